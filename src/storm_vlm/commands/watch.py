"""`storm-vlm watch MODEL_DIR SOURCE`: watch a video as it comes in and answer questions while it runs.

SOURCE is a video file (read as fast as possible, or at the pace it plays with --realtime; with
--follow, as a recorder still writes it), a folder of growing segments (new files taken in name
order, see `storm_vlm.streaming.sources`) or a pipe (`-` for standard input, or a FIFO; --format
names a streamable format such as mpegts). Frames are sampled at --fps and encoded chunk by chunk
(--chunk-seconds) through the model's causal projector (`storm_vlm.streaming.StormStream`); memory
stays bounded by --max-visual-tokens.

Questions are typed (or piped) on standard input while it runs, one per line, and answered from
everything seen so far (a question that comes before the first frames waits for them);
`@SECONDS question` is answered from the frames shown at or before SECONDS and none after (a
chunk is split there). `/status` prints where the stream is, `/quit` ends. -q questions are
asked when the source ends. After the source ends, questions are still answered until standard
input ends (--exit-at-end: stop at once). Ctrl-C or SIGTERM stops it (exit status 130 or 143);
a source that yields no frame at all is an error (exit status 1).
"""

from __future__ import annotations

import argparse
import bisect
import os
import queue
import signal
import sys
import threading
import time

from storm_vlm.commands import add_precision_argument, check_model_then_media
from storm_vlm.errors import StormError
from storm_vlm.streaming import MAX_CHUNK_FRAMES
from storm_vlm.utils import check_int, check_model_dir

HELP = ("type a question (answered from what has been seen so far), '@SECONDS question' (answered from the video "
        "up to SECONDS), /status, /quit")
_EPS = 1e-6  # seconds: frame times within this of a question's time count as at it


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it stops as Ctrl-C does."""


class _NoFrames(StormError):
    """The source ended, or failed, before its first frame."""


class _EncodeFailed(StormError):
    """A chunk could not be encoded (e.g. out of memory): the stream cannot go on without it."""


def _terminate(signum, frame):
    raise _Terminated()


EXAMPLES = """\
examples:
  storm-vlm watch MODEL recording.mp4 -q "What happened?" --exit-at-end
  storm-vlm watch MODEL recording.mp4 --realtime           # at the pace it plays; type questions
  storm-vlm watch MODEL segments/ --idle-timeout 30        # a folder a recorder fills (seg_00001.ts, ...)
  storm-vlm watch MODEL recording.ts --follow              # a file a recorder is still writing
  ffmpeg -i rtsp://camera/stream -c copy -f mpegts - | storm-vlm watch MODEL - -q "What happened?"

while it runs, type a question (answered from what has been seen so far), '@SECONDS question'
(answered from the video up to SECONDS), /status or /quit. URLs, playlists (.m3u8) and other
reference formats are not opened: pipe them through ffmpeg. Exit status: 0, 1 when the source
gave no frame, 2 for bad arguments, 130 after Ctrl-C, 143 after SIGTERM. See docs/live-video.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("model", metavar="MODEL_DIR",
                        help="a STORM model folder with a causal projector (projector_bidirectional=False)")
    parser.add_argument("source", metavar="SOURCE",
                        help="a video file, a folder of growing segments, '-' (standard input) or a FIFO")

    reading = parser.add_argument_group("reading the source")
    pace = reading.add_mutually_exclusive_group()
    pace.add_argument("--realtime", action="store_true", help="read a file at the pace it plays")
    pace.add_argument("--fast", action="store_true", help="read a file as fast as possible (the default)")
    reading.add_argument("--follow", action="store_true",
                         help="a file still being written (MPEG-TS, Matroska, fragmented MP4): read it as it grows, "
                              "until nothing is appended for --idle-timeout seconds")
    reading.add_argument("--fps", type=float, default=1.0, metavar="F",
                         help="frames sampled per second of video (default 1, at most 120)")
    reading.add_argument("--chunk-seconds", type=float, default=None, metavar="S",
                         help=f"seconds of video encoded together (default 2, at most {MAX_CHUNK_FRAMES} frames): a "
                              "typed question sees the video up to the last full chunk")
    reading.add_argument("--format", default=None, metavar="FMT",
                         help="the container format of a pipe when it cannot be probed (mpegts, matroska, nut, "
                              "yuv4mpegpipe, ...)")
    reading.add_argument("--idle-timeout", type=float, default=10.0, metavar="S",
                         help="a folder of segments (or a file with --follow) ends when nothing changed for S "
                              "seconds (default 10)")

    memory = parser.add_argument_group("memory")
    memory.add_argument("--max-visual-tokens", type=int, default=None, metavar="N",
                        help="memory budget in visual tokens (default: the LLM's positions less room for the question)")
    memory.add_argument("--memory-policy", default="resample", choices=["resample", "uniform", "window"],
                        help="what is kept of the past past the budget (default resample: the older half thinned)")
    memory.add_argument("--temporal-sample", type=int, default=None, metavar="S",
                        help="test-time temporal sampling: keep every S-th pooled frame (default: the model's)")

    asking = parser.add_argument_group("questions and answers")
    asking.add_argument("-q", "--question", action="append", default=[], metavar="QUESTION",
                        help="a question to ask when the source ends (repeat for more)")
    asking.add_argument("--options", nargs="+", default=None, metavar="OPTION",
                        help="ask every question as multiple choice with these options")
    asking.add_argument("--max-new-tokens", type=int, default=128, metavar="M",
                        help="answer length limit (default 128)")
    asking.add_argument("--exit-at-end", action="store_true",
                        help="stop when the source ends (after -q and questions already waiting)")
    asking.add_argument("--status-every", type=float, default=60.0, metavar="S",
                        help="print the stream's state every S seconds of video to stderr (default 60; 0: never)")

    model = parser.add_argument_group("model")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_precision_argument(model)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _check(args) -> None:
    check_model_then_media(args.model, args.source, "SOURCE")
    check_model_dir(args.model)
    check_int("--max-new-tokens", args.max_new_tokens, error=StormError)
    if args.temporal_sample is not None:
        check_int("--temporal-sample", args.temporal_sample, error=StormError)
    if args.max_visual_tokens is not None:
        check_int("--max-visual-tokens", args.max_visual_tokens, error=StormError)
    if not 0 < args.fps <= 120:
        raise StormError(f"--fps must be between 0 and 120, got {args.fps:g}")
    if args.chunk_seconds is None:
        args.chunk_seconds = min(2.0, MAX_CHUNK_FRAMES / args.fps)
    if not 0 < args.chunk_seconds * args.fps <= MAX_CHUNK_FRAMES:
        raise StormError(f"--chunk-seconds must be > 0 and hold at most {MAX_CHUNK_FRAMES} frames at --fps "
                         f"{args.fps:g} (at most {MAX_CHUNK_FRAMES / args.fps:g} s), got {args.chunk_seconds:g}")
    if not args.idle_timeout > 0:
        raise StormError(f"--idle-timeout must be > 0 seconds, got {args.idle_timeout:g}")
    from storm_vlm.streaming.sources import STREAM_FORMATS

    if args.format is not None and args.format not in STREAM_FORMATS:
        raise StormError(f"--format {args.format!r} is not a stream format read here "
                         f"({', '.join(sorted(STREAM_FORMATS))})")
    if args.options is not None and not 2 <= len(args.options) <= 26:
        raise StormError(f"--options: give between 2 and 26 options, got {len(args.options)}")
    if not args.status_every >= 0:
        raise StormError(f"--status-every must be >= 0, got {args.status_every:g}")
    for q in args.question:
        if not q.strip():
            raise StormError("-q: a question must not be empty")


def video_on_stdin(source: str) -> bool:
    """Whether SOURCE is standard input: '-', or another name of it (/dev/stdin, /proc/self/fd/0).
    Questions are then not read from standard input: they would take the video's bytes."""
    if source == "-":
        return True
    try:
        named, stdin = os.stat(source), os.fstat(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # no such file, or a standard input without a descriptor
        return False
    return (named.st_dev, named.st_ino) == (stdin.st_dev, stdin.st_ino)


def parse_question(line: str) -> tuple[float | None, str]:
    """'@90 What happened?' -> (90.0, 'What happened?'); a plain line -> (None, line)."""
    if line.startswith("@"):
        head, _, rest = line[1:].partition(" ")
        try:
            at = float(head)
        except ValueError:
            raise StormError(f"'@SECONDS question': {head!r} is not a number of seconds") from None
        if not 0 <= at < float("inf") or not rest.strip():
            raise StormError("'@SECONDS question' needs a finite number of seconds >= 0 and a question")
        return at, rest.strip()
    return None, line


class _Watcher:
    """The main loop: chunks from the decoding thread, questions from the stdin thread, one at a time."""

    def __init__(self, args, stream, source):
        self.args = args
        self.stream = stream
        self.source = source
        self.step = 1.0 / args.fps
        self.chunks: queue.Queue = queue.Queue(maxsize=2)  # bounded: decoding waits for the model
        self.questions: queue.Queue = queue.Queue()
        self.timed: list[tuple[float, str]] = []  # '@SECONDS' questions, by time
        self.early: list[str] = []  # questions that came before the first frames
        self.video_s = 0.0  # stream time just after the last frame fed
        self.last_t = -self.step  # time of the last frame fed
        self.started = time.monotonic()
        self.next_status = args.status_every or float("inf")
        self.source_done = False
        self.stdin_done = video_on_stdin(args.source)
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
        """Lines of standard input as questions; bytes that are not UTF-8 become U+FFFD. Standard
        input that cannot be read (closed, detached) ends like an empty one."""
        from storm_vlm.streaming.sources import stdin_binary

        try:
            for line in stdin_binary():
                if isinstance(line, bytes):
                    line = line.decode("utf-8", "replace")
                self.questions.put(line.strip())
        except (OSError, ValueError):
            pass
        self.questions.put(None)

    # ---- answering ----

    def ask(self, question: str, at: float | None = None, note: str = "") -> None:
        """Answer from every frame fed so far; `at`: the time an '@SECONDS' question was asked for."""
        from storm_vlm.choices import LETTERS, extract_choice, format_question
        from storm_vlm.inference import PrintStreamer

        when = self.video_s if at is None or note else min(at, self.video_s)
        if self.stream.frames_seen == 0:
            print(f"[{_clock(when)}] {question}\n(no frames yet: the video has not started)", flush=True)
            return
        print(f"[{_clock(when)}, {self.stream.frames_seen} frames{note}] {question}", flush=True)
        text = format_question(question, self.args.options) if self.args.options else question
        try:
            reply = self.stream.ask(text, self.args.max_new_tokens,
                                    streamer=PrintStreamer(self.stream.predictor.tokenizer))
        except StormError as exc:
            print(f"error: {exc}", flush=True)
            return
        except Exception as exc:  # e.g. out of memory: the stream is unchanged, the next question is answered
            print(f"\nerror: answering failed ({type(exc).__name__}: {exc})", flush=True)
            return
        if self.args.options:
            choice = extract_choice(reply.text, self.args.options)
            print("-> names none of the options" if choice is None
                  else f"-> {LETTERS[choice]}. {self.args.options[choice]}", flush=True)

    def ask_late(self, at: float | None, question: str) -> None:
        """A question once the source has ended: from every frame, saying so when it was asked for later."""
        late = at is not None and at > self.video_s + _EPS
        self.ask(question, at, f"; asked for {_clock(at)}, the video ended before" if late else "")

    def status(self, out=None) -> None:
        """The stream's state on `out` (None: standard error as it is now, not as it was at import)."""
        s = self.stream.stats()
        mem = self.stream.memory_bytes()["total"] / 2**20
        lag = ""
        if self.args.realtime:
            lag = f", {max(0.0, time.monotonic() - self.started - self.video_s):.1f} s behind real time"
        print(f"[{_clock(self.video_s)}] {s['frames']} frames, {s['visual_tokens']} visual tokens kept of "
              f"{s['max_visual_tokens']} ({s['kept_frames']} pooled frames, {s['rebuilds']} rebuilds), "
              f"{mem:.1f} MiB held{lag}", file=out or sys.stderr, flush=True)

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
            if self.source_done:
                self.ask_late(at, question)
            elif at is not None and at + _EPS >= self.last_t + self.step:  # frames up to `at` may still come
                self.timed.append((at, question))
                self.timed.sort(key=lambda x: x[0])
            elif at is not None:  # every frame up to `at` is in
                late = at + _EPS < self.last_t
                self.ask(question, at, f"; asked for {_clock(at)}, the video was past it already" if late else "")
            elif self.stream.frames_seen == 0:
                self.early.append(question)
                print("(no frames yet: asked once the video has started)", file=sys.stderr, flush=True)
            else:
                self.ask(question)

    # ---- the loop ----

    def _feed(self, frames, times) -> None:
        if len(frames) == 0:
            return
        self.stream.feed(frames)
        self.last_t = float(times[-1])
        self.video_s = min(float(times[-1]) + self.step, max(self.source.sampler.end, float(times[-1])))
        if self.video_s >= self.next_status:
            self.status()
            self.next_status = self.video_s + self.args.status_every

    def feed(self, chunk) -> None:
        """Feed a chunk, split where an '@SECONDS' question falls: it sees the frames shown at or
        before SECONDS and none after. A question whose time is at or past this chunk's last frame
        waits while a later frame could still be at or before it (sampled frames are at least
        1/fps apart)."""
        frames, times, done = chunk.frames, chunk.timestamps, 0
        while self.timed:
            at, question = self.timed[0]
            upto = bisect.bisect_right(times, at + _EPS)  # frames shown at or before `at`
            if upto == len(times) and at + _EPS >= times[-1] + self.step:
                break
            self._feed(frames[done:upto], times[done:upto])
            done = max(done, upto)
            self.timed.pop(0)
            self.ask(question, at)
        self._feed(frames[done:], times[done:])
        for question in self.early:
            self.ask(question)
        self.early.clear()

    def end(self, kind: str, payload) -> None:
        """The source ended (kind "end") or failed ("error"): the waiting questions are answered."""
        if kind == "error":
            print(f"storm-vlm watch: {payload}", file=sys.stderr, flush=True)
        self.source_done = True
        self.video_s = max(self.video_s, self.source.sampler.end)
        print(f"(end of the video at {_clock(self.video_s)}: {self.stream.frames_seen} frames)",
              file=sys.stderr, flush=True)
        if not self.source.follow and self.source.grew():
            print(f"({self.args.source} has grown since it was opened: it is still being written, and what came "
                  "after its end then was not read; --follow reads a file as it grows)", file=sys.stderr, flush=True)
        for at, question in self.timed:
            self.ask_late(at, question)
        for question in self.early + self.args.question:
            self.ask(question)
        self.timed.clear()
        self.early.clear()

    def loop(self) -> None:
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
                try:
                    self.feed(payload)
                except Exception as exc:  # the video's state would skip these frames: stop, saying why
                    raise _EncodeFailed(f"encoding the video after {_clock(self.video_s)} failed ({type(exc).__name__}: "
                                        f"{exc}); stopped (a smaller --chunk-seconds or --fps needs less memory)") from exc
                continue
            if self.stream.frames_seen == 0:
                detail = f": {payload}" if kind == "error" else ""
                raise _NoFrames(f"no video frames could be read from {self.args.source}{detail}")
            self.end(kind, payload)

    def run(self) -> int:
        """Watch until the source and standard input end (or /quit); 130 after Ctrl-C, 143 after
        SIGTERM, 1 when the source gave no frame or a chunk could not be encoded."""
        threading.Thread(target=self.decode, name="storm-watch-decode", daemon=True).start()
        if not self.stdin_done:
            threading.Thread(target=self.read_stdin, name="storm-watch-stdin", daemon=True).start()
        try:
            self.loop()
        except (_NoFrames, _EncodeFailed) as exc:
            print(f"storm-vlm watch: error: {exc}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt as exc:
            print(f"\n(stopped at {_clock(self.video_s)}: {self.stream.frames_seen} frames)", file=sys.stderr,
                  flush=True)
            return 143 if isinstance(exc, _Terminated) else 130
        finally:
            self.source.stop.set()
        return 0


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.source == "-" and sys.stdin.isatty():
        raise StormError("SOURCE '-' reads the video from standard input, which is a terminal here: pipe a video in "
                         "(ffmpeg -i INPUT -f mpegts - | storm-vlm watch MODEL - -q QUESTION)")
    if video_on_stdin(args.source) and not args.question:
        print("(the video comes on standard input, so questions cannot: give them with -q)", file=sys.stderr)
    from storm_vlm.inference import Predictor
    from storm_vlm.model.configuration import StormConfig
    from storm_vlm.streaming.sources import open_source
    from storm_vlm.streaming.stream import StormStream, check_streamable

    config = StormConfig.from_pretrained(args.model, local_files_only=True)
    check_streamable(config)  # before loading the weights
    source = open_source(args.source, fps=args.fps, chunk_seconds=args.chunk_seconds, realtime=args.realtime,
                         fmt=args.format, idle_timeout=args.idle_timeout, min_side=config.vision_config.image_size,
                         follow=args.follow,
                         on_error=lambda exc: print(f"storm-vlm watch: skipped: {exc}", file=sys.stderr, flush=True))
    if args.follow and source.kind != "file":
        raise StormError(f"--follow reads a file still being written; {args.source} is a {source.kind}, which is "
                         "read as it comes anyway")
    source.check()  # a file that is not a video fails now, not after the model has loaded
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        predictor = Predictor.from_pretrained(args.model, args.device, args.precision, verbose=True)
        stream = StormStream(predictor, temporal_sample_stride=args.temporal_sample,
                             max_visual_tokens=args.max_visual_tokens, memory_policy=args.memory_policy)
        if sys.stdin.isatty() and not video_on_stdin(args.source):
            print(HELP, file=sys.stderr)
        return _Watcher(args, stream, source).run()
    except _Terminated:  # while the model loads
        print("storm-vlm watch: terminated", file=sys.stderr, flush=True)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
