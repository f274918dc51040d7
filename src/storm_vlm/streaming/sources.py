"""Frames read incrementally with PyAV, for a stream: a file, a folder of growing segments, a pipe.

`open_source(SOURCE, fps=..., chunk_seconds=...)` gives a `FrameSource` whose `chunks()` yields
`Chunk`s of frames sampled at `fps` (frames per second of video time) as they are decoded, never
holding more than one chunk:

- a **file**: decoded front to back, as fast as possible or (``realtime=True``) at the pace the
  video plays, each frame released when its time has come on the wall clock; with ``follow=True``
  a file still being written (MPEG-TS, Matroska, fragmented MP4) is read as it grows, until
  nothing has been appended for ``idle_timeout`` seconds;
- a **folder of segments** (what a recorder or an HLS/DASH segmenter writes: seg_000.ts,
  seg_001.ts, ...): files are taken in name order; a segment is read once the next one exists
  (so it is complete), the last one once the folder has not changed for ``idle_timeout`` seconds,
  which also ends the stream. Names are compared with their numbers as numbers (seg_9 before
  seg_10, seg_999 before seg_1000), only names after the last segment taken are read (a
  recorder may delete old segments), and playlists, lists and partial files a recorder writes
  beside its segments (.m3u8, .mpd, .csv, .txt, .tmp, .part, ...) are ignored. Times continue
  across segments;
- a **pipe**: ``-`` (standard input) or a FIFO, for formats that PyAV can read without seeking
  (MPEG-TS, Matroska/WebM, NUT, Y4M, MJPEG, fragmented MP4); ``fmt`` names the format when probing
  cannot (``--format mpegts``). A plain MP4 needs its index, which is at the end: write it to a
  file, or as fragmented MP4 (``-movflags frag_keyframe+empty_moov``).

Only local files, folders and pipes are read, through self-contained video demuxers (no URLs, no
playlists or reference formats: an HLS .m3u8 or an ffconcat list could make FFmpeg read other
files). `FrameSampler` keeps the fps and the running time of the stream across segments (the
server's session endpoint uses it for uploaded segments); timestamps that jump back (a camera
that reconnects, an encoder restarted, MPEG-TS timestamps wrapping) continue the stream's time
instead of hiding the frames until the old time is reached again. This module does not import
torch.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from storm_vlm.errors import StormError
from storm_vlm.media.container import ALLOWED_FORMATS, IMAGE_FORMATS, find_truncation
from storm_vlm.media.limits import DEFAULT_MAX_PIXELS, MAX_SOURCE_PIXELS, Budget, display_size, output_size
from storm_vlm.media.readers import decoded_frames, sample_aspect_ratio, shown_rgb
from storm_vlm.streaming import MAX_CHUNK_FRAMES
from storm_vlm.utils import numbered_name_key
from storm_vlm.video import VideoDecodeError

__all__ = ["Chunk", "FrameSampler", "FrameSource", "open_source", "decode_segment", "stdin_binary", "STREAM_FORMATS",
           "MAX_CHUNK_FRAMES"]

# The loader's self-contained demuxers (each reads only the bytes it is given: no playlists or
# reference formats), less the still-image ones.
STREAM_FORMATS = ALLOWED_FORMATS - IMAGE_FORMATS
_CONTAINER_OPTIONS = {"format_whitelist": ",".join(sorted(STREAM_FORMATS)), "protocol_whitelist": "file,pipe"}
# Timestamps going back by more than this start a new run of time (smaller steps back are jitter).
BACKWARD_JUMP_S = 1.0
# What a recorder writes beside its segments (playlists, segment lists, files being written).
NOT_SEGMENTS = frozenset({".m3u8", ".m3u", ".mpd", ".csv", ".txt", ".ffconcat", ".json", ".xml", ".log",
                          ".tmp", ".part", ".partial"})
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _av():
    import av

    return av


@dataclass
class Chunk:
    """frames (T, H, W, 3) uint8 RGB; timestamps (T,) seconds of stream time; source: where they came from."""

    frames: np.ndarray
    timestamps: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.frames.shape[0])


class FrameSampler:
    """Keeps one frame per 1/fps seconds of stream time, across segments (times continue).

    `begin_segment()` before each segment's frames; `take(t)` with a frame's time in its segment
    returns its stream time when the frame is kept, else None. A time more than BACKWARD_JUMP_S
    before the previous one (a reconnect, a restarted encoder, a timestamp wrap) starts a new
    run that continues from the stream's end, as a new segment would.
    """

    def __init__(self, fps: float):
        if not (isinstance(fps, (int, float)) and 0 < fps < 1000):
            raise StormError(f"fps must be a number between 0 and 1000, got {fps!r}")
        self.step = 1.0 / float(fps)
        self.next_t = 0.0
        self.end = 0.0  # stream time just after the last frame seen
        self._offset = 0.0
        self._first: float | None = None
        self._last = 0.0
        self._frame_s = 0.0

    def begin_segment(self, frame_s: float | None = None) -> None:
        """A new segment starts where the stream so far ends; `frame_s`: its frames' duration if known."""
        self._first = None
        self._frame_s = frame_s or 0.0

    def take(self, t: float) -> float | None:
        if self._first is None or t < self._last - BACKWARD_JUMP_S:
            self._offset, self._first = self.end, t
        self._last = t
        now = self._offset + max(0.0, t - self._first)
        self.end = max(self.end, now + (self._frame_s or 0.0))
        if now + 1e-6 < self.next_t:
            return None
        self.next_t += self.step
        if self.next_t <= now:  # after a gap in the stream, no burst of frames: the next one is a step later
            self.next_t = now + self.step
        return now


def stdin_binary():
    """Standard input as a binary file object of its own, over the same descriptor (falling back
    to sys.stdin's buffer, or sys.stdin, when it has none: a test's StringIO). Not sys.stdin's own
    buffer: a daemon thread blocked reading that holds the lock the interpreter takes to flush it
    at exit, and the process aborts ("could not acquire lock ... at interpreter shutdown")."""
    try:
        return open(sys.stdin.fileno(), "rb", closefd=False)
    except (AttributeError, OSError, ValueError):
        return getattr(sys.stdin, "buffer", sys.stdin)


def _open(target, fmt: str | None, name: str):
    """av.open with the demuxer allow-list; VideoDecodeError naming the source otherwise."""
    av = _av()
    if fmt is not None and fmt not in STREAM_FORMATS:
        raise StormError(f"--format {fmt!r} is not a stream format read here ({', '.join(sorted(STREAM_FORMATS))})")
    path = target if isinstance(target, str) else None
    try:
        return av.open("file:" + os.path.abspath(path) if path else target, mode="r", format=fmt,
                       metadata_errors="ignore", container_options=_CONTAINER_OPTIONS,
                       options={"max_pixels": str(MAX_SOURCE_PIXELS)})
    except (av.FFmpegError, OSError, EOFError, UnicodeDecodeError) as exc:
        cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        # a regular file, named or opened (the server's uploaded segment), can say whether it was cut off
        on_disk = path or getattr(target, "name", None)
        if not (isinstance(on_disk, (str, os.PathLike)) and os.path.isfile(on_disk)):
            on_disk = None
        truncation = find_truncation(on_disk, os.path.getsize(on_disk)) if on_disk else None
        if truncation is not None:  # e.g. an MP4 still being recorded: its index is written last
            raise VideoDecodeError(f"{name}: {truncation.describe()}; a recording still being written is read from "
                                   "a folder of segments or a pipe (MPEG-TS, Matroska, fragmented MP4)") from None
        hint = "" if on_disk else ", and a pipe needs a streamable format (--format)"
        raise VideoDecodeError(f"{name}: not a readable video stream ({cause}); playlists and reference formats "
                               f"are not read{hint}") from None


def decode_segment(target, sampler: FrameSampler, name: str, fmt: str | None = None,
                   min_side: int | None = None, on_damage=None) -> Iterator[tuple[float, np.ndarray]]:
    """(stream time, frame (H, W, 3) uint8) for the frames of one file or pipe that `sampler` keeps.

    target: a path or a binary file object. Frames are converted to RGB and scaled down in one
    step as `load_video` does (`storm_vlm.media.limits.output_size`: at most DEFAULT_MAX_PIXELS,
    and to a shorter side of `min_side` when given, the vision tower's input size), at their display
    aspect ratio and with transparent pixels over white (`storm_vlm.media.readers.shown_rgb`); pictures above
    MAX_SOURCE_PIXELS are refused. Packets the decoder rejects as invalid data (a damaged stretch of
    a recording or of a camera's stream) are skipped and decoding goes on, as `load_video` and
    players do: `on_damage(VideoDecodeError)` is told once per damaged stretch, where the stream
    was. Other decoding errors after the start end the segment with VideoDecodeError naming `name`
    (frames before them have been yielded), as does a segment none of whose frames decode."""
    from av.video.reformatter import VideoReformatter

    av = _av()
    container = _open(target, fmt, name)
    reformatter = VideoReformatter()
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{name}: no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width or 0, stream.codec_context.height or 0
        if width * height > MAX_SOURCE_PIXELS:
            raise VideoDecodeError(f"{name}: {width} x {height} pictures are larger than this reader decodes "
                                   f"({MAX_SOURCE_PIXELS} pixels)")
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        pixel_shape = sample_aspect_ratio(stream)
        sampler.begin_segment(1.0 / float(rate) if rate else None)
        index, orientation = 0, None
        stats = {"decoded": 0}
        reported = 0  # damaged packets told to on_damage so far

        def report_damage():
            nonlocal reported
            skipped = stats.get("skipped_packets", 0)
            if skipped > reported and on_damage is not None:
                on_damage(VideoDecodeError(f"{name}: {skipped - reported} damaged packet(s) skipped at "
                                           f"{sampler.end:.1f} s of the stream (invalid data); going on"))
            reported = skipped

        try:
            for frame in decoded_frames(container, stream, Budget(name, None, None), stats):
                report_damage()
                t = frame.time
                if t is None:
                    t = index / float(rate) if rate else index * sampler.step
                index += 1
                kept = sampler.take(float(t))
                if kept is None:
                    continue
                size = output_size(*display_size(frame.width, frame.height, pixel_shape), DEFAULT_MAX_PIXELS, min_side)
                pixels, orientation = shown_rgb(frame, size, reformatter, orientation)
                yield kept, pixels
        except (av.FFmpegError, OSError, EOFError) as exc:
            cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise VideoDecodeError(f"{name}: decoding stopped ({cause})") from None
        if index == 0 and stats.get("skipped_packets"):
            raise VideoDecodeError(f"{name}: no frame could be decoded ({stats['skipped_packets']} packet(s) of "
                                   "invalid data)")
        report_damage()


class _Growing:
    """A file still being written, read front to back as a pipe is (no seeking): at its end, more
    is waited for until nothing has been appended for `idle_timeout` seconds, or `stop` is set."""

    def __init__(self, path: str, idle_timeout: float, poll_s: float, stop: threading.Event):
        self.name = path  # lets a failed open say that an MP4 being recorded has no index yet
        self._file = open(path, "rb")
        self._idle_timeout, self._poll_s, self._stop = idle_timeout, poll_s, stop
        self._ended = False  # once idle that long, the end is the end (FFmpeg may read again at its end)

    def read(self, size: int = -1) -> bytes:
        waited_since = time.monotonic()
        while True:
            data = self._file.read(size)
            if data or self._ended or self._stop.is_set():
                return data
            if time.monotonic() - waited_since >= self._idle_timeout:
                self._ended = True
                return data
            self._stop.wait(self._poll_s)

    def close(self) -> None:
        self._file.close()


class FrameSource:
    """Chunks of frames from a file, a folder of segments or a pipe (see the module's docstring).

    kind: "file", "directory" or "pipe". `stop` (a threading.Event) ends `chunks()` early;
    `on_error(exc)` is told about a segment of a folder that cannot be decoded (it is skipped;
    without `on_error` the error is raised) and about damaged data skipped within a source.
    `follow`: a file still being written (MPEG-TS, Matroska, fragmented MP4) is read as it grows,
    until nothing is appended for `idle_timeout` seconds; without it a file ends where it ended when
    its end was reached (`grew()` says whether it has grown since). `min_side`: frames are scaled
    down to this shorter side while decoded (the model's input size: nothing it could see is lost).
    """

    def __init__(self, source: str, kind: str, *, fps: float = 1.0, chunk_seconds: float = 2.0,
                 realtime: bool = False, fmt: str | None = None, idle_timeout: float = 10.0, poll_s: float = 0.25,
                 stop: threading.Event | None = None, on_error=None, min_side: int | None = None,
                 follow: bool = False):
        self.sampler = FrameSampler(fps)
        if not (isinstance(chunk_seconds, (int, float)) and 0 < chunk_seconds * fps <= MAX_CHUNK_FRAMES):
            raise StormError(f"chunk seconds must be > 0 and a chunk at most {MAX_CHUNK_FRAMES} frames (it is "
                             f"decoded and encoded at once), got {chunk_seconds!r} s at {fps:g} fps")
        if not (isinstance(idle_timeout, (int, float)) and idle_timeout > 0):
            raise StormError(f"idle timeout must be > 0 seconds, got {idle_timeout!r}")
        if fmt is not None and fmt not in STREAM_FORMATS:
            raise StormError(f"format {fmt!r} is not a stream format read here ({', '.join(sorted(STREAM_FORMATS))})")
        self.source = source
        self.kind = kind
        self.chunk_frames = max(1, round(chunk_seconds * fps))
        self.realtime = realtime
        self.fmt = fmt
        self.idle_timeout = float(idle_timeout)
        self.poll_s = float(poll_s)
        self.stop = stop or threading.Event()
        self.on_error = on_error
        self.min_side = min_side
        self.follow = follow and kind == "file"
        self.frames_read = 0
        self._size = os.path.getsize(source) if kind == "file" else 0

    # ---- frames ----

    def _decode(self, target, name: str) -> Iterator[tuple[float, np.ndarray, str]]:
        for t, f in decode_segment(target, self.sampler, name, self.fmt, self.min_side, self.on_error):
            yield t, f, name

    def _frames(self) -> Iterator[tuple[float, np.ndarray, str]]:
        if self.kind == "file" and not self.follow:
            yield from self._decode(self.source, self.source)
        elif self.kind in ("file", "pipe"):
            name = "standard input" if self.source == "-" else self.source
            if self.source == "-":
                handle = stdin_binary()
            elif self.follow:
                handle = _Growing(self.source, self.idle_timeout, self.poll_s, self.stop)
            else:
                handle = open(self.source, "rb")
            try:
                yield from self._decode(handle, name)
            finally:
                if self.source != "-":  # standard input stays open
                    handle.close()
        else:
            for path in self._segments():
                try:
                    yield from self._decode(str(path), str(path))
                except VideoDecodeError as exc:
                    if self.on_error is None:
                        raise
                    self.on_error(exc)

    def grew(self) -> bool:
        """Whether a file source is larger now than when the source was made (still being written)."""
        try:
            return self.kind == "file" and os.path.getsize(self.source) > self._size
        except OSError:
            return False

    def check(self) -> None:
        """VideoDecodeError unless a file source opens as a video (cheap: the header only), so that a
        caller learns of a wrong file before loading a model; folders, pipes and a followed file that
        is still empty are read as they come."""
        if self.kind == "file" and not (self.follow and self._size == 0):
            with _open(self.source, self.fmt, self.source) as container:
                if not container.streams.video:
                    raise VideoDecodeError(f"{self.source}: no video stream")

    def _listing(self, after: list | None) -> list[tuple[list, Path, int]]:
        """(name key, path, size) of the folder's segments named after `after`, in name order.
        A file deleted while listed (a recorder removing old segments) is left out."""
        found = []
        with os.scandir(self.source) as entries:
            for entry in entries:
                key = numbered_name_key(entry.name)
                if entry.name.startswith(".") or Path(entry.name).suffix.lower() in NOT_SEGMENTS:
                    continue
                if after is not None and key <= after:
                    continue
                try:
                    if entry.is_file():
                        found.append((key, Path(entry.path), entry.stat().st_size))
                except OSError:
                    continue
        return sorted(found, key=lambda item: item[0])

    def _segments(self) -> Iterator[Path]:
        """Complete segments in name order: one once a later one exists; the last once the folder
        is idle for idle_timeout (then the stream ends). Only the last name taken is remembered, so
        an endless recording costs no memory per segment."""
        after = None
        changed = time.monotonic()
        last_seen: list = []
        while not self.stop.is_set():
            listing = self._listing(after)
            signature = [(str(path), size) for _, path, size in listing]
            if signature != last_seen:
                last_seen, changed = signature, time.monotonic()
            if len(listing) > 1:
                after = listing[0][0]
                yield listing[0][1]
                continue
            if time.monotonic() - changed >= self.idle_timeout:
                if listing:
                    yield listing[0][1]
                return
            self.stop.wait(self.poll_s)

    # ---- chunks ----

    def chunks(self) -> Iterator[Chunk]:
        """Chunks of up to chunk_seconds x fps frames (same frame size within a chunk), in order."""
        frames, times, source = [], [], ""
        wall0 = stream0 = None

        def flush():
            chunk = Chunk(np.stack(frames), np.asarray(times, dtype=np.float64), source)
            frames.clear()
            times.clear()
            return chunk

        try:
            for t, frame, name in self._frames():
                if self.stop.is_set():
                    return
                if self.realtime:
                    if wall0 is None:
                        wall0, stream0 = time.monotonic(), t
                    wait = wall0 + (t - stream0) - time.monotonic()
                    if wait > 0 and self.stop.wait(wait):
                        return
                if frames and frames[0].shape != frame.shape:
                    yield flush()
                frames.append(frame)
                times.append(t)
                source = name
                self.frames_read += 1
                if len(frames) >= self.chunk_frames:
                    yield flush()
        except Exception:
            if frames and not self.stop.is_set():  # the frames decoded before an error are part of the stream
                yield flush()
            raise
        if frames and not self.stop.is_set():
            yield flush()


def open_source(source: str, **kwargs) -> FrameSource:
    """A FrameSource for `source`: "-" (standard input), a FIFO, a folder or a video file.
    StormError when it is none of those (a URL included: network sources are not opened)."""
    if source == "-":
        return FrameSource(source, "pipe", **kwargs)
    try:
        mode = os.stat(source).st_mode
    except OSError as exc:
        if _URL.match(source):
            raise StormError(f"{source}: URLs are not opened, only local files, folders and pipes; let ffmpeg "
                             "read it and pipe the video in: ffmpeg -i URL -c copy -f mpegts - | storm-vlm watch "
                             "MODEL -") from None
        raise StormError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        return FrameSource(source, "directory", **kwargs)
    if stat.S_ISFIFO(mode):
        return FrameSource(source, "pipe", **kwargs)
    if stat.S_ISREG(mode):
        if os.path.getsize(source) == 0 and not kwargs.get("follow"):
            raise StormError(f"{source}: the file is empty (0 bytes)")
        return FrameSource(source, "file", **kwargs)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise StormError(f"{source}: devices (a camera, a capture card) are not opened, only files, folders and "
                         f"pipes; let ffmpeg read it and pipe the video in: ffmpeg -i {source} -f mpegts - | "
                         "storm-vlm watch MODEL -")
    raise StormError(f"{source}: not a video file, a folder of segments or a pipe")
