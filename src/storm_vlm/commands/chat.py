"""`storm-vlm chat MODEL_DIR VIDEO [-q QUESTION]`: ask a STORM model about a video.

With `-q` it answers one question and exits. Without, it opens a conversation about the video
(decoded and encoded once; each answer streams as it is generated): type a question, or
`/video PATH` (another video), `/reset` (forget the conversation), `/help`, `/quit`. Questions may
also be piped in, one per line (bytes that are not UTF-8 are read as U+FFFD). At a terminal, Ctrl-C
during an answer stops that answer and returns to the prompt; at the prompt (or when piped) it
exits.
"""

from __future__ import annotations

import argparse
import os
import sys

from storm_vlm.commands import add_precision_argument, check_model_then_media
from storm_vlm.errors import StormError
from storm_vlm.utils import check_int, check_model_dir

# Positions kept for the conversation's text (template, questions, earlier answers) beside the video.
CHAT_TEXT_TOKENS = 256
HELP = "commands: /video PATH  another video (starts over) | /reset  forget the conversation | /quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="a STORM model folder (from `storm-vlm build` or training)")
    parser.add_argument("video", metavar="VIDEO",
                        help="video file, a still image, or a folder of a video's frames (image files in name order)")
    parser.add_argument("-q", "--question", default=None,
                        help="the question to ask (without it: a conversation, questions typed or piped in)")
    parser.add_argument("--options", nargs="+", default=None, metavar="OPTION",
                        help="multiple-choice options: each question is asked with them lettered A, B, ... and the "
                             "reply is read as one of them")
    parser.add_argument("--frames", type=int, default=32, metavar="N", help="frames sampled uniformly (default: 32)")
    parser.add_argument("--fps", type=float, default=None, metavar="F",
                        help="sample at this rate instead (at most --frames frames)")
    parser.add_argument("--start", type=float, default=None, metavar="SECONDS", help="read the video from here")
    parser.add_argument("--end", type=float, default=None, metavar="SECONDS", help="read the video up to here")
    parser.add_argument("--temporal-sample", type=int, default=None, metavar="S",
                        help="test-time temporal sampling: keep every S-th frame's tokens (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="M", help="answer length limit (default: 128)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_precision_argument(parser)


def run(args: argparse.Namespace) -> int:
    check_int("--frames", args.frames, error=StormError)
    check_int("--max-new-tokens", args.max_new_tokens, error=StormError)
    if args.temporal_sample is not None:
        check_int("--temporal-sample", args.temporal_sample, error=StormError)
    if args.options is not None and not 2 <= len(args.options) <= 26:
        raise StormError(f"--options: give between 2 and 26 options, got {len(args.options)}")
    check_model_then_media(args.model, args.video, "VIDEO")
    check_model_dir(args.model)
    from storm_vlm.choices import LETTERS, extract_choice, format_question
    from storm_vlm.inference import ChatSession, Predictor, PrintStreamer
    from storm_vlm.eval.frames import load_frame_folder
    from storm_vlm.video import load_video

    def read(path: str):
        if not os.path.isdir(path):
            return load_video(path, num_frames=args.frames, fps=args.fps, start=args.start, end=args.end).frames
        if (args.fps, args.start, args.end) != (None, None, None):
            raise StormError(f"{path}: a folder of frames has no timestamps for --fps / --start / --end")
        return load_frame_folder(path, args.frames)

    frames = read(args.video)  # a bad video fails before the model loads
    predictor = Predictor.from_pretrained(args.model, args.device, args.precision, verbose=True)

    def stride_for(frames) -> int | None:
        """--temporal-sample, raised to the smallest stride with which the video fits the LLM (planner)."""
        from storm_vlm.planner import fit_stride

        config = predictor.model.config
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        if not limit:
            return args.temporal_sample
        asked = args.temporal_sample or config.temporal_sample_stride
        stride = fit_stride(config, [len(frames)], CHAT_TEXT_TOKENS + args.max_new_tokens, asked, limit)
        if stride != asked:
            print(f"({len(frames)} frames make {config.num_visual_tokens(len(frames), asked)} visual tokens at "
                  f"temporal sampling s={asked}, more than the LLM's {limit} positions leave: s={stride} applied, "
                  f"{config.num_visual_tokens(len(frames), stride)} visual tokens)", file=sys.stderr)
        return stride

    session = ChatSession(predictor, frames, temporal_sample_stride=stride_for(frames))

    def ask(question: str) -> None:
        text = format_question(question, args.options) if args.options else question
        reply = session.ask(text, args.max_new_tokens, streamer=PrintStreamer(predictor.tokenizer))
        if args.options:
            choice = extract_choice(reply.text, args.options)
            print("-> names none of the options" if choice is None
                  else f"-> {LETTERS[choice]}. {args.options[choice]}", flush=True)

    if args.question is not None:
        ask(args.question)
        return 0
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 reaches ask (as_text), not a crash
    if interactive:
        print(HELP, file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt) as exc:
            if interactive:
                print()  # end the prompt's line (Ctrl-D, Ctrl-C)
            if isinstance(exc, KeyboardInterrupt):
                raise  # the CLI says "interrupted" and exits 130
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/help":
            print(HELP)
        elif line == "/reset":
            session.reset()
            print("(conversation cleared; same video)")
        elif line.startswith("/video"):
            path = line[len("/video"):].strip()
            try:
                new_frames = read(path)
                session.stride = stride_for(new_frames)
                session.set_video(new_frames)
                print(f"(now asking about {path})")
            except StormError as exc:
                print(f"error: {exc}")
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}")
        else:
            try:
                ask(line)
            except StormError as exc:
                print(f"error: {exc}")
            except KeyboardInterrupt:
                if not interactive:
                    raise
                print("\n(answer interrupted)", flush=True)  # not part of the conversation; the model stays loaded
