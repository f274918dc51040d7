"""Load frames from a video (or a still image) with PyAV: `load_video` and `VideoDecodeError`.

What a call may cost is bounded, so that a hostile or broken file cannot take a server down:

- pixels: frames are scaled down while they are converted to RGB (never materialised at full
  size) to at most `max_pixels` (default `DEFAULT_MAX_PIXELS`) or to `min_side` on the shorter
  side; streams with pictures above `MAX_SOURCE_PIXELS` (images: `MAX_IMAGE_PIXELS`) are
  refused before decoding, since the decoder's own pictures cannot be scaled.
- concurrency: at most `max_concurrent_decodes()` calls decode at once per process
  (`set_max_concurrent_decodes`), on the process's decoding threads; others wait for a slot.
- time and cancellation: `timeout_s` bounds the call (waiting for a slot included) and
  `cancel` (a callable or threading.Event) stops it; both are checked between packets.
- files: only self-contained formats (`ALLOWED_FORMATS`) are opened, so a playlist (HLS,
  ffconcat, ...) cannot make the loader read other files on the machine.

It also says what happened: a file shorter than its container declares fails as truncated
(or, with `allow_truncated=True`, gives the part that decodes, marked `truncated`); a stream
whose frame timestamps are implausible is read frame by frame; running out of memory is
reported as such. How frames are picked (seeking vs decoding forward) is described in
`storm_vlm.media.readers`. This module imports neither torch nor PyAV at import time.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

import numpy as np

from storm_vlm.media.container import (ALLOWED_FORMATS, IMAGE_FORMATS, Truncation, animated_webp, av, av_errors,
                                       check_file, find_truncation, open_container)
from storm_vlm.media.errors import DecodeCancelled, DecodeTimeout, VideoDecodeError, describe, fail
from storm_vlm.media.images import ImageTooLarge, image_header
from storm_vlm.media.limits import (DEFAULT_MAX_PIXELS, MAX_IMAGE_PIXELS, MAX_SOURCE_PIXELS, Budget,
                                    max_concurrent_decodes, output_size, run_decode, set_max_concurrent_decodes)
from storm_vlm.media.readers import (FrameSink, SeekingReader, SequentialReader, decoded_frames, rotate_frame,
                                     sample_aspect_ratio, shown_frames)
from storm_vlm.utils import check_int

__all__ = ["VideoClip", "VideoDecodeError", "DecodeTimeout", "DecodeCancelled", "load_video", "rotate_frame",
           "uniform_indices", "ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "MAX_SOURCE_PIXELS", "MAX_IMAGE_PIXELS",
           "set_max_concurrent_decodes", "max_concurrent_decodes"]

# Demuxers whose seeking is index-based and precise enough to sample by seeking (not MPEG-TS:
# see storm_vlm.media.readers).
_SEEKABLE_FORMATS = {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "nut"}


@dataclass(frozen=True, eq=False)
class VideoClip:
    """Frames sampled from a video.

    frames: (T, H, W, 3) uint8 RGB, rotation metadata already applied (a phone's portrait video
        comes back portrait, as ffmpeg and players show it; decord, which lmms-eval and LLaVA-NeXT
        read videos with, returns the stored landscape pictures), at the display aspect
        ratio (anamorphic video's non-square pixels made square, extra["sample_aspect_ratio"]),
        transparent pictures shown over white, scaled down to the call's max_pixels / min_side
        (extra["source_size"] is the decoded size).
    timestamps: (T,) float64 seconds from the first frame of the stream (an MP4 edit list applied:
        the first frame shown).
    indices: (T,) int64 source frame indices (frame i is shown at i / native_fps; with a variable
        frame rate, the index of a time on that grid: the frame nearest it was read).
    native_fps: the stream's frame rate (None for a still image).
    duration: seconds spanned by the whole stream (num_source_frames / native_fps).
    num_source_frames: frames in the whole stream (the decodable part when truncated).
    repeated: True when the clip had fewer frames than asked and frames were repeated.
    is_image: True for a still image (then T == 1).
    rotation: display rotation applied, degrees counter-clockwise (0, 90, 180 or 270); a display
        matrix with a mirror is applied as ffmpeg shows it (extra["mirrored"]: mirrored left-right
        before the rotation).
    truncated: True when the file is cut short and the clip covers only the part that decodes
        (only with allow_truncated=True; extra["truncated"] says how much is missing).
    extra: how it was read: reader, seeks, frames decoded, where the frame count came from,
        source_size (of the first picture decoded) and frame_size (width, height), and "timing" /
        "truncated" / "mirrored" notes.

    Unpacks as `frames, timestamps = load_video(...)`.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    indices: np.ndarray
    native_fps: float | None
    duration: float
    num_source_frames: int
    repeated: bool
    path: str
    is_image: bool = False
    rotation: int = 0
    truncated: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __iter__(self):
        return iter((self.frames, self.timestamps))

    def __len__(self) -> int:
        return int(self.frames.shape[0])


# ---------------------------------------------------------------- pure helpers


def uniform_indices(num_available: int, num_frames: int) -> tuple[np.ndarray, bool]:
    """Indices into `num_available` frames for uniform sampling of exactly `num_frames`.

    With enough frames: round(linspace(0, n-1, T)), distinct, first and last included. (lmms-eval's
    and LLaVA-NeXT's readers truncate instead, linspace(..., dtype=int): where the two differ, this
    picks the next frame, never more than one frame apart.)
    With fewer: each frame repeated evenly (counts differ by at most one), in order,
    still including the first and last frame. Returns (indices (T,), repeated).
    """
    if num_available < 1 or num_frames < 1:
        raise ValueError("num_available and num_frames must be >= 1")
    if num_available >= num_frames:
        if num_frames == 1:
            return np.zeros(1, dtype=np.int64), False
        idx = np.round(np.linspace(0, num_available - 1, num_frames)).astype(np.int64)
        return idx, False
    idx = np.floor((np.arange(num_frames) + 0.5) * num_available / num_frames).astype(np.int64)
    return np.clip(idx, 0, num_available - 1), True


def _real(value) -> bool:
    """A finite real number: int, float, Fraction or a numpy scalar (a pandas cell), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive_seconds(value) -> bool:
    return _real(value) and value > 0


def _check_args(path: str, num_frames, fps, start, end, max_pixels, min_side, timeout_s, allow_truncated) -> None:
    try:
        check_int("num_frames", num_frames)
        if max_pixels is not None:
            check_int("max_pixels", max_pixels)
        if min_side is not None:
            check_int("min_side", min_side)
    except ValueError as exc:
        raise fail(path, str(exc)) from None
    if fps is not None and not _positive_seconds(fps):
        raise fail(path, f"fps must be a positive number, got {fps!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and (not _real(value) or value < 0):
            raise fail(path, f"{name} must be a non-negative number of seconds, got {value!r}")
    if start is not None and end is not None and start >= end:
        raise fail(path, f"start ({start} s) must be before end ({end} s)")
    if timeout_s is not None and not _positive_seconds(timeout_s):
        raise fail(path, f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    if not isinstance(allow_truncated, bool):
        raise fail(path, f"allow_truncated must be True or False, got {allow_truncated!r}")


# ---------------------------------------------------------------- entry point


def load_video(path, num_frames: int = 32, fps: float | None = None, start: float | None = None,
               end: float | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               min_side: int | None = None, timeout_s: float | None = None, cancel=None,
               allow_truncated: bool = False) -> VideoClip:
    """Sample frames from a video file (or load a still image as one frame).

    Uniform mode (fps=None): exactly `num_frames` frames at indices round(linspace(0, n-1, T))
    of the clip [start, end) (seconds; default the whole video: the frames on screen during it,
    the one on screen at `start` included); a clip with fewer frames than asked is padded by
    repeating frames evenly (`repeated=True`).
    fps mode: one frame every 1/fps seconds of the clip (never more often than the native
    rate); when that gives more than `num_frames`, `num_frames` uniformly spread frames.
    Still images (png, jpg, ...) give T=1.

    Frame size: each frame is scaled down (never up, aspect ratio kept) while decoding to at
    most `max_pixels` pixels (None: no cap) and, with `min_side`, until its shorter side is
    `min_side` -- pass the model's input side (e.g. 448 for SigLIP-448): the processor resizes
    to that anyway and no detail it could see is lost. The clip costs at most
    T x max_pixels x 3 bytes. Sources above MAX_SOURCE_PIXELS (images: MAX_IMAGE_PIXELS) are
    refused: the decoder's own pictures cannot be scaled.

    timeout_s: give up (DecodeTimeout) after this many seconds, waiting for one of the
    process's decode slots (`set_max_concurrent_decodes`) included. cancel: a callable
    returning True, or a threading.Event, checked between packets (from the decoding thread)
    and while waiting for a slot: when it fires the call stops with DecodeCancelled (e.g. a
    server whose client disconnected). The decode runs on one of the process's decoding
    threads; this call waits for it. allow_truncated:
    a file cut short fails by default; with True the clip samples the part that decodes and
    says so (`truncated=True`, extra["truncated"]).

    Returns a VideoClip: frames (T, H, W, 3) uint8, timestamps (T,) seconds, plus metadata.
    Raises VideoDecodeError (a ValueError; DecodeTimeout and DecodeCancelled are subclasses)
    naming the file and the cause on any failure.
    """
    path = os.fspath(path)
    _check_args(path, num_frames, fps, start, end, max_pixels, min_side, timeout_s, allow_truncated)
    start, end = (None if value is None else float(value) for value in (start, end))
    budget = Budget(path, timeout_s, cancel)
    size = check_file(path)
    loader = _Loader(path, size, find_truncation(path, size), budget, int(num_frames), fps, start, end,
                     max_pixels, min_side, allow_truncated)
    return run_decode(loader.run, budget)


def _declared_duration(container, stream) -> float | None:
    """Seconds the stream (else the container) declares, or None."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av().time_base
    return None


class _Loader:
    """One `load_video` call on an open container."""

    def __init__(self, path, size, truncation: Truncation | None, budget: Budget, num_frames, fps, start, end,
                 max_pixels, min_side, allow_truncated):
        self.path, self.size, self.truncation, self.budget = path, size, truncation, budget
        self.num_frames, self.fps, self.start, self.end = num_frames, fps, start, end
        self.max_pixels, self.min_side, self.allow_truncated = max_pixels, min_side, allow_truncated
        self.source_size = (0, 0)
        self.sample_aspect_ratio = None
        self.sink = None

    # -- streams

    def video_stream(self, container, image: bool = False, header_size: tuple[int, int] | None = None):
        """The video stream to read, its size checked against the cap and FFmpeg told to enforce it.

        FFmpeg's choice (av_find_best_stream: a default-flagged track first, then by frames probed
        and bit rate), never an attached picture (the cover art of a song or podcast); when that
        choice is one, the default-flagged stream, else the first. header_size: an image's size
        from its header, for when FFmpeg's probe left it unknown (it does above its max_pixels).
        """
        disposition = av().stream.Disposition
        streams = [s for s in container.streams.video if not s.disposition & disposition.attached_pic]
        if not streams:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            found = "only a cover picture" if container.streams.video else f"streams found: {', '.join(kinds)}"
            raise fail(self.path, f"no video stream ({found})")
        stream = container.streams.best("video")
        if stream is None or stream.disposition & disposition.attached_pic:
            stream = next((s for s in streams if s.disposition & disposition.default), streams[0])
        context = stream.codec_context
        if context is None:
            raise fail(self.path, "no decoder for its video codec")
        cap, name = (MAX_IMAGE_PIXELS, "MAX_IMAGE_PIXELS") if image else (MAX_SOURCE_PIXELS, "MAX_SOURCE_PIXELS")
        width, height = context.width, context.height
        if not width * height and header_size:
            width, height = header_size
        if width * height > cap:
            raise fail(self.path, f"its pictures are {width}x{height} ({width * height / 1e6:.1f} MP), more than the "
                                  f"{cap / 1e6:.1f} MP this loader decodes (storm_vlm.video.{name}): the decoder "
                                  f"alone would need {width * height * 1.5 / 2**20:.0f} MiB per picture. Scale it "
                                  f"down first (e.g. ffmpeg -i in -vf scale=-2:2160 out.mp4)")
        # FFmpeg refuses pictures above the cap inside the bitstream too (a header may lie).
        context.options = {**(context.options or {}), "max_pixels": str(cap)}
        self.source_size = (width, height)
        if not image:
            self.sample_aspect_ratio = sample_aspect_ratio(stream)
        return stream

    def opener(self, options: dict | None = None):
        """A callable opening the (video) file afresh: (container, its video stream)."""
        def open_stream():
            container = open_container(self.path, self.budget, options, truncation=self.truncation)
            try:
                return container, self.video_stream(container)
            except BaseException:
                container.close()
                raise
        return open_stream

    # -- the call

    def run(self) -> VideoClip:
        """Open, decode and sample (on a decoding thread); every failure as a VideoDecodeError."""
        self.budget.check()
        container = open_container(self.path, self.budget, truncation=self.truncation)
        try:
            with container:
                return self.load(container)
        except VideoDecodeError:
            raise
        except MemoryError:
            raise fail(self.path, self.out_of_memory()) from None
        except av_errors() as exc:
            if isinstance(exc, av().ExitError):  # FFmpeg's read-timeout interrupt
                self.budget.check()
            damage = self.truncation.describe() if self.truncation is not None else "the file is corrupt"
            if self.truncation is None and getattr(exc, "errno", None) == 22 and not self.source_size[0]:
                # A picture whose size was unknown until decoding, refused by FFmpeg's max_pixels.
                damage = (f"the decoder refused a picture: it is larger than this loader decodes "
                          f"({MAX_SOURCE_PIXELS / 1e6:.1f} MP for video, {MAX_IMAGE_PIXELS / 1e6:.1f} MP for "
                          f"images), or the file is corrupt")
            raise fail(self.path, f"decoding failed: {damage} ({describe(exc)})") from None
        finally:
            if self.sink is not None:
                self.sink.close()

    def load(self, container) -> VideoClip:
        format_names = set((container.format.name or "").split(","))
        image = bool(format_names & IMAGE_FORMATS)
        if "webp_pipe" in format_names and animated_webp(self.path):
            raise fail(self.path, "animated WebP is not supported (FFmpeg decodes only still WebP images); "
                                  "convert it to a video or GIF first")
        if image:
            try:
                header = image_header(self.path)
            except ImageTooLarge as exc:
                raise fail(self.path, f"its picture is larger than the {MAX_IMAGE_PIXELS / 1e6:.1f} MP this loader "
                                      f"decodes (storm_vlm.video.MAX_IMAGE_PIXELS): {exc}") from None
            stream = self.video_stream(container, image, header and header.size)
            return self.load_image(container, stream, header and header.orientation)
        stream = self.video_stream(container)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        extra = {}
        timing = _implausible_timing(container, stream)
        in_order = _pts_are_guesses(format_names, stream)
        if self.truncation is not None:
            declared, decodable = self.decodable(container, stream)
            if not self.allow_truncated:
                raise fail(self.path, self.truncation.describe() + self.decodable_note(declared, decodable, rate)
                           + "; pass allow_truncated=True to sample from the part that decodes")
            reader = SequentialReader(self.opener(), self.path, self.budget, rate, in_order=in_order,
                                      tolerate_tail=True)
            extra["truncated"] = {**self.truncation.as_dict(), "declared_frames": declared}
        elif timing is not None:
            note, duration_s = timing
            options = {"ignore_editlist": "1"} if "mov" in format_names else None
            reader = SequentialReader(self.opener(options), self.path, self.budget, rate, even_over=duration_s)
            extra["timing"] = (f"{note}; frames were read in decoding order and spread evenly over the "
                               f"declared {duration_s:.3f} s")
        else:
            reader = SeekingReader(container, stream, self.path, self.budget)
            if in_order or not (format_names & _SEEKABLE_FORMATS) or not reader.can_seek():
                reader.close()
                reader = SequentialReader(self.opener(), self.path, self.budget, rate, in_order=in_order)
        try:
            n = reader.num_frames()
            rate = reader.rate
            if "truncated" in extra:
                extra["truncated"]["decoded_frames"] = n
            first, last = _clip_bounds(self.path, n, rate, self.start, self.end)
            n_clip = last - first + 1
            if self.fps is None:
                rel, repeated = uniform_indices(n_clip, self.num_frames)
            else:
                rel, repeated = _fps_indices(n_clip, rate, float(self.fps), self.num_frames), False
            indices = rel + first
            self.sink = FrameSink(self.path, indices, self.max_pixels, self.min_side, self.source_size,
                                  self.sample_aspect_ratio)
            reader.read(self.sink)
        finally:
            reader.close()
        return VideoClip(frames=self.sink.frames, timestamps=self.sink.timestamps, indices=indices.astype(np.int64),
                         native_fps=float(rate), duration=n / float(rate), num_source_frames=n,
                         repeated=bool(repeated), path=self.path, rotation=self.sink.rotation,
                         truncated="truncated" in extra,
                         extra={"reader": type(reader).__name__, **reader.stats, **self.sizes(), **extra})

    def load_image(self, container, stream, orientation: tuple[int, bool] | None) -> VideoClip:
        """The one frame of a still image, turned upright by `orientation` (its header's EXIF, as
        `load_image` shows it) or, without one, by the decoded frame's display matrix."""
        self.sink = FrameSink(self.path, np.zeros(1, dtype=np.int64), self.max_pixels, self.min_side,
                              self.source_size)
        self.sink.orientation = orientation
        stats = {"decoded": 0}
        for frame in decoded_frames(container, stream, self.budget, stats):
            self.sink.put(0, frame, 0.0)
            return VideoClip(frames=self.sink.frames, timestamps=np.zeros(1), indices=np.zeros(1, dtype=np.int64),
                             native_fps=None, duration=0.0, num_source_frames=1, repeated=False, path=self.path,
                             is_image=True, rotation=self.sink.rotation, extra=self.sizes())
        damage = ": its picture data is corrupt or cut short" if stats.get("skipped_packets") else ""
        raise fail(self.path, f"no decodable frame in the image{damage}")

    def sizes(self) -> dict:
        """source_size and frame_size for `extra`, "mirrored" when the picture was, and the
        sample_aspect_ratio of non-square pixels."""
        sizes = {"source_size": tuple(self.sink.source_size), "frame_size": tuple(self.sink.frame_size)}
        if self.sink.mirrored:
            sizes["mirrored"] = True
        sar = self.sink.sample_aspect_ratio
        if sar and sar != 1:
            sizes["sample_aspect_ratio"] = float(sar)
        return sizes

    # -- what went wrong

    def decodable(self, container, stream) -> tuple[int | None, int | None]:
        """(frames the stream declares, frames that decode) of a truncated file, None when unknown."""
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        duration_s = _declared_duration(container, stream)
        declared = shown_frames(stream) or (round(duration_s * float(rate)) if duration_s and rate else None)
        entries = stream.index_entries
        if stream.frames and len(entries) >= stream.frames:  # a full sample index (MP4): count what is present
            return declared, sum(1 for e in entries if not e.is_discard and e.pos >= 0 and e.pos + e.size <= self.size)
        reader = SeekingReader(container, stream, self.path, self.budget)
        try:
            return declared, (reader.num_frames() if reader.can_seek() else None)
        except (DecodeTimeout, DecodeCancelled):
            raise
        except (VideoDecodeError, *av_errors()):
            return declared, None
        finally:
            reader.close()

    @staticmethod
    def decodable_note(declared, decodable, rate) -> str:
        if decodable is None:
            return "; how many of its frames decode is unknown"
        seconds = f"{decodable / float(rate):.1f} s" if rate else ""
        if declared:
            if rate:
                seconds = f" ({seconds} of {declared / float(rate):.1f} s)"
            return f"; about {decodable} of its {declared} frames{seconds} can be decoded"
        return f"; about {decodable} frames{f' ({seconds})' if seconds else ''} can be decoded"

    def out_of_memory(self) -> str:
        width, height = self.sink.source_size if self.sink is not None else self.source_size
        if not width * height:
            return "out of memory while decoding"
        frame_w, frame_h = output_size(width, height, self.max_pixels, self.min_side)
        clip_mib = self.num_frames * frame_w * frame_h * 3 / 2**20
        return (f"out of memory while decoding {width}x{height} frames ({width * height * 1.5 / 2**20:.0f} MiB each "
                f"in the decoder; the clip needs {self.num_frames} x {frame_w}x{frame_h} RGB = {clip_mib:.0f} MiB); "
                f"free memory, or lower num_frames or max_pixels")


def _implausible_timing(container, stream) -> tuple[str, float] | None:
    """(note, declared seconds) when the frame rate says a frame lasts longer than the whole stream.

    A stream declaring several frames in D seconds whose frame durations claim far more (e.g. an
    MP4 time-to-sample table of 2^31 ticks) cannot be sampled by time: every target would land
    on the first frame.
    """
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    duration_s = _declared_duration(container, stream)
    if stream.frames > 1 and duration_s and rate and rate > 0 and 1 / float(rate) > 1.5 * duration_s:
        return (f"frame timestamps are implausible: {stream.frames} frames declared in {duration_s:.3f} s, but "
                f"{1 / float(rate):.3g} s per frame"), duration_s
    return None


def _pts_are_guesses(format_names, stream) -> bool:
    """AVI stores no presentation timestamps: for codecs that reorder frames (H.264, MPEG-4 ASP as
    in Xvid/DivX files: UCF101, HMDB51) FFmpeg's guesses are a frame late and, with B-frames, out
    of order, so sampling by time returned wrong frames. Such files are read in display order."""
    codec = stream.codec_context.codec
    return "avi" in format_names and codec is not None and bool(codec.reorder)


def _clip_bounds(path, n, rate, start, end) -> tuple[int, int]:
    """First and last source frame index of the clip [start, end) in seconds: the frames on
    screen during it (frame i is shown from i / rate to (i + 1) / rate), so a clip within one
    frame's display time has that frame."""
    first = 0 if start is None else int(math.floor(start * rate + 1e-6))
    if first > n - 1:
        raise fail(path, f"start {start} s is at or beyond the end of the video ({n / float(rate):.3f} s)")
    last = n - 1 if end is None else min(n - 1, max(first, int(math.ceil(end * rate - 1e-6)) - 1))
    return first, last


def _fps_indices(n_clip: int, rate, fps: float, num_frames: int) -> np.ndarray:
    """Relative indices for sampling at `fps` (capped at the native rate and at num_frames)."""
    step = float(rate) / fps  # source frames per sample
    count = max(1, int(math.floor((n_clip - 1) / step + 1e-6)) + 1) if step > 1 else n_clip
    if count > num_frames:
        return uniform_indices(n_clip, num_frames)[0]
    if step <= 1:
        return np.arange(n_clip, dtype=np.int64)
    return np.floor(np.arange(count) * step + 1e-6).astype(np.int64)
