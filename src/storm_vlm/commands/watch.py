"""`storm-vlm watch MODEL_DIR SOURCE`: watch a video as it comes in and answer questions while it runs.

SOURCE is a video file (read as fast as possible, or at the pace it plays with --realtime), a
folder of growing segments (new files taken in name order, see `storm_vlm.streaming.sources`) or
a pipe (`-` for standard input, or a FIFO; --format names a streamable format such as mpegts).
Frames are sampled at --fps and encoded chunk by chunk (--chunk-seconds) through the model's
causal projector (`storm_vlm.streaming.StormStream`); memory stays bounded by --max-visual-tokens.

Questions are typed (or piped) on standard input while it runs, one per line, and answered from
everything seen so far; `@SECONDS question` waits until the video reaches SECONDS. `/status`
prints where the stream is, `/quit` ends. -q questions are asked when the source ends. After the
source ends, questions are still answered until standard input ends (--exit-at-end: stop at once).
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time

from storm_vlm.commands import add_precision_argument
from storm_vlm.errors import StormError
from storm_vlm.utils import check_int, check_model_dir

HELP = ("type a question (answered from what has been seen so far), '@SECONDS question' (asked when the video "
        "reaches SECONDS), /status, /quit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR",
                        help="a STORM model folder with a causal projector (projector_bidirectional=False)")
    parser.add_argument("source", metavar="SOURCE",
                        help="a video file, a folder of growing segments, '-' (standard input) or a FIFO")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", help="read a file at the pace it plays")
    pace.add_argument("--fast", action="store_true", help="read a file as fast as possible (the default)")
    parser.add_argument("--fps", type=float, default=1.0, metavar="F", help="frames sampled per second of video (default 1)")
    parser.add_argument("--chunk-seconds", type=float, default=2.0, metavar="S",
                        help="seconds of video encoded together (default 2): a question sees the video up to the "
                             "last full chunk")
    parser.add_argument("--format", default=None, metavar="FMT",
                        help="the container format of a pipe when it cannot be probed (mpegts, matroska, nut, ...)")
    parser.add_argument("--idle-timeout", type=float, default=10.0, metavar="S",
                        help="a folder of segments ends when nothing changed for S seconds (default 10)")
    parser.add_argument("--max-visual-tokens", type=int, default=None, metavar="N",
                        help="memory budget in visual tokens (default: the LLM's positions less room for the question)")
    parser.add_argument("--memory-policy", default="resample", choices=["resample", "uniform", "window"],
                        help="what is kept of the past past the budget (default resample: the older half thinned)")
    parser.add_argument("--temporal-sample", type=int, default=None, metavar="S",
                        help="test-time temporal sampling: keep every S-th pooled frame (default: the model's)")
    parser.add_argument("-q", "--question", action="append", default=[], metavar="QUESTION",
                        help="a question to ask when the source ends (repeat for more)")
    parser.add_argument("--options", nargs="+", default=None, metavar="OPTION",
                        help="ask every question as multiple choice with these options")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="M", help="answer length limit (default 128)")
    parser.add_argument("--exit-at-end", action="store_true",
                        help="stop when the source ends (after -q and questions already waiting)")
    parser.add_argument("--status-every", type=float, default=60.0, metavar="S",
                        help="print the stream's state every S seconds of video to stderr (default 60; 0: never)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_precision_argument(parser)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _check(args) -> None:
    check_model_dir(args.model)
    check_int("--max-new-tokens", args.max_new_tokens, error=StormError)
    if args.temporal_sample is not None:
        check_int("--temporal-sample", args.temporal_sample, error=StormError)
    if args.max_visual_tokens is not None:
        check_int("--max-visual-tokens", args.max_visual_tokens, error=StormError)
    if not 0 < args.fps <= 120:
        raise StormError(f"--fps must be between 0 and 120, got {args.fps:g}")
    if not args.chunk_seconds > 0:
        raise StormError(f"--chunk-seconds must be > 0, got {args.chunk_seconds:g}")
    if args.options is not None and not 2 <= len(args.options) <= 26:
        raise StormError(f"--options: give between 2 and 26 options, got {len(args.options)}")
    if args.status_every < 0:
        raise StormError(f"--status-every must be >= 0, got {args.status_every:g}")


def parse_question(line: str) -> tuple[float | None, str]:
    """'@90 What happened?' -> (90.0, 'What happened?'); a plain line -> (None, line)."""
    if line.startswith("@"):
        head, _, rest = line[1:].partition(" ")
        try:
            at = float(head)
        except ValueError:
            raise StormError(f"'@SECONDS question': {head!r} is not a number of seconds") from None
        if not at >= 0 or not rest.strip():
            raise StormError("'@SECONDS question' needs seconds >= 0 and a question")
        return at, rest.strip()
    return None, line


class _Watcher:
    """The main loop: chunks from the decoding thread, questions from the stdin thread, one at a time."""

    def __init__(self, args, stream, source):
        self.args = args
        self.stream = stream
        self.source = source
        self.chunks: queue.Queue = queue.Queue(maxsize=2)  # bounded: decoding waits for the model
        self.questions: queue.Queue = queue.Queue()
        self.timed: list[tuple[float, str]] = []
        self.video_s = 0.0  # stream time just after the last frame fed
        self.started = time.monotonic()
        self.next_status = args.status_every or float("inf")
        self.source_done = False
        self.stdin_done = args.source == "-"
        self.quit = False

    # ---- threads ----

    def decode(self) -> None:
        try:
            for chunk in self.source.chunks():
                self.chunks.put(("chunk", chunk))
            self.chunks.put(("end", None))
        except StormError as exc:
            self.chunks.put(("error", exc))
        except Exception as exc:  # reported by the main thread, which ends the stream
            self.chunks.put(("error", StormError(f"reading {self.args.source} failed ({type(exc).__name__}: {exc})")))

    def read_stdin(self) -> None:
        for line in sys.stdin:
            self.questions.put(line.strip())
        self.questions.put(None)

    # ---- answering ----

    def ask(self, question: str, note: str = "") -> None:
        from storm_vlm.choices import LETTERS, extract_choice, format_question
        from storm_vlm.inference import PrintStreamer

        if self.stream.frames_seen == 0:
            print(f"[{_clock(0)}] {question}\n(no frames yet: ask again once the video has started)", flush=True)
            return
        print(f"[{_clock(self.video_s)}, {self.stream.frames_seen} frames{note}] {question}", flush=True)
        text = format_question(question, self.args.options) if self.args.options else question
        try:
            reply = self.stream.ask(text, self.args.max_new_tokens,
                                    streamer=PrintStreamer(self.stream.predictor.tokenizer))
        except StormError as exc:
            print(f"error: {exc}", flush=True)
            return
        if self.args.options:
            choice = extract_choice(reply.text, self.args.options)
            print("-> names none of the options" if choice is None
                  else f"-> {LETTERS[choice]}. {self.args.options[choice]}", flush=True)

    def status(self, out=sys.stderr) -> None:
        s = self.stream.stats()
        mem = self.stream.memory_bytes()["total"] / 2**20
        lag = ""
        if self.args.realtime:
            lag = f", {max(0.0, time.monotonic() - self.started - self.video_s):.1f} s behind real time"
        print(f"[{_clock(self.video_s)}] {s['frames']} frames, {s['visual_tokens']} visual tokens kept of "
              f"{s['max_visual_tokens']} ({s['kept_frames']} pooled frames, {s['rebuilds']} rebuilds), "
              f"{mem:.1f} MiB held{lag}", file=out, flush=True)

    def handle(self, line: str) -> None:
        if not line:
            return
        if line in ("/quit", "/exit"):
            self.quit = True
        elif line == "/status":
            self.status(out=sys.stdout)
        elif line == "/help":
            print(HELP, flush=True)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", flush=True)
        else:
            try:
                at, question = parse_question(line)
            except StormError as exc:
                print(f"error: {exc}", flush=True)
                return
            if at is not None and at > self.video_s and not self.source_done:
                self.timed.append((at, question))
                self.timed.sort(key=lambda x: x[0])
            else:
                self.ask(question)

    def due(self) -> None:
        while self.timed and (self.timed[0][0] <= self.video_s or self.source_done):
            at, question = self.timed.pop(0)
            note = "" if at <= self.video_s else f"; asked for {_clock(at)}, the video ended before"
            self.ask(question, note)

    # ---- the loop ----

    def run(self) -> int:
        threading.Thread(target=self.decode, name="storm-watch-decode", daemon=True).start()
        if not self.stdin_done:
            threading.Thread(target=self.read_stdin, name="storm-watch-stdin", daemon=True).start()
        while not self.quit:
            try:  # questions first: they are answered between chunks
                line = self.questions.get_nowait()
                if line is None:
                    self.stdin_done = True
                else:
                    self.handle(line)
                continue
            except queue.Empty:
                pass
            if self.source_done:
                if self.stdin_done or self.args.exit_at_end:
                    break
                time.sleep(0.05)
                continue
            try:
                kind, payload = self.chunks.get(timeout=0.05)
            except queue.Empty:
                continue
            if kind == "chunk":
                self.stream.feed(payload.frames)
                self.video_s = float(payload.timestamps[-1]) + 1.0 / self.args.fps
                if self.video_s >= self.next_status:
                    self.status()
                    self.next_status += self.args.status_every
                self.due()
            else:
                if kind == "error":
                    print(f"storm-vlm watch: {payload}", file=sys.stderr, flush=True)
                self.source_done = True
                self.video_s = max(self.video_s, self.source.sampler.end)
                print(f"(end of the video at {_clock(self.video_s)}: {self.stream.frames_seen} frames)",
                      file=sys.stderr, flush=True)
                self.due()
                for question in self.args.question:
                    self.ask(question)
        self.source.stop.set()
        return 0


def run(args: argparse.Namespace) -> int:
    _check(args)
    for q in args.question:
        if not q.strip():
            raise StormError("-q: a question must not be empty")
    if args.source == "-" and not args.question:
        print("(the video comes on standard input, so questions cannot: give them with -q)", file=sys.stderr)
    from storm_vlm.inference import Predictor
    from storm_vlm.streaming.sources import open_source
    from storm_vlm.streaming.stream import StormStream, check_streamable

    from storm_vlm.model.configuration import StormConfig

    config = StormConfig.from_pretrained(args.model, local_files_only=True)
    check_streamable(config)  # before loading the weights
    source = open_source(args.source, fps=args.fps, chunk_seconds=args.chunk_seconds, realtime=args.realtime,
                         fmt=args.format, idle_timeout=args.idle_timeout, min_side=config.vision_config.image_size,
                         on_error=lambda exc: print(f"storm-vlm watch: skipped: {exc}", file=sys.stderr, flush=True))
    predictor = Predictor.from_pretrained(args.model, args.device, args.precision, verbose=True)
    stream = StormStream(predictor, temporal_sample_stride=args.temporal_sample,
                         max_visual_tokens=args.max_visual_tokens, memory_policy=args.memory_policy)
    if sys.stdin.isatty() and args.source != "-":
        print(HELP, file=sys.stderr)
    return _Watcher(args, stream, source).run()
