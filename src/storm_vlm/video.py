"""Load frames from a video (or a still image) with PyAV: `load_video` and `VideoDecodeError`.

Sampling seeks instead of decoding the whole file: for each wanted frame the decoder
either jumps to the keyframe before it (when that keyframe lies beyond the current
decoder position) or decodes forward (when the wanted frame is in the GOP already being
decoded). 128 frames of an hour-long video therefore cost about 128 short decodes.

Frames are identified by presentation time: frame i of a stream is the one shown at
`first_pts + i / fps`. Formats that cannot seek (or streams without timestamps or a frame
rate) fall back to decoding sequentially. This module does not import torch.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from storm_vlm.errors import StormError
from storm_vlm.utils import check_int

__all__ = ["VideoClip", "VideoDecodeError", "load_video", "rotate_frame", "uniform_indices"]

# Demuxers whose seeking is index-based and precise enough to sample by seeking.
_SEEKABLE_FORMATS = {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "nut"}
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "jpegls_pipe",
                  "ppm_pipe", "pgm_pipe", "qoi_pipe"}


def _av():
    """PyAV, imported on first use so that `import storm_vlm` stays cheap."""
    import av

    return av


def _av_errors() -> tuple:
    return (_av().FFmpegError, OSError, EOFError, MemoryError, UnicodeDecodeError)


class VideoDecodeError(StormError):
    """A video (or image) could not be read; the message names the file and the cause."""


@dataclass(frozen=True, eq=False)
class VideoClip:
    """Frames sampled from a video.

    frames: (T, H, W, 3) uint8 RGB, rotation metadata already applied.
    timestamps: (T,) float64 seconds from the first frame of the stream.
    indices: (T,) int64 source frame indices (frame i is shown at i / native_fps).
    native_fps: the stream's frame rate (None for a still image).
    duration: seconds spanned by the whole stream (num_source_frames / native_fps).
    num_source_frames: frames in the whole stream.
    repeated: True when the clip had fewer frames than asked and frames were repeated.
    is_image: True for a still image (then T == 1).
    rotation: display rotation applied, degrees counter-clockwise (0, 90, 180 or 270).
    extra: how it was read: reader, seeks, frames decoded, where the frame count came from.

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
    extra: dict = field(default_factory=dict, repr=False)

    def __iter__(self):
        return iter((self.frames, self.timestamps))

    def __len__(self) -> int:
        return int(self.frames.shape[0])


# ---------------------------------------------------------------- pure helpers


def uniform_indices(num_available: int, num_frames: int) -> tuple[np.ndarray, bool]:
    """Indices into `num_available` frames for uniform sampling of exactly `num_frames`.

    With enough frames: round(linspace(0, n-1, T)), distinct, first and last included.
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


def rotate_frame(frame: np.ndarray, rotation: float) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, FFmpeg's convention) to (H, W, C)."""
    k = int(round(float(rotation) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(frame, k=k)) if k else frame


def _fail(path: str, cause: str) -> VideoDecodeError:
    return VideoDecodeError(f"{path}: {cause}")


def _describe(exc: BaseException) -> str:
    # FFmpeg errors carry "[Errno N] cause: 'file'"; the cause alone reads better.
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return str(text).replace("\n", " ")


def _check_args(path: str, num_frames, fps, start, end) -> None:
    try:
        check_int("num_frames", num_frames)
    except ValueError as exc:
        raise _fail(path, str(exc)) from None
    if fps is not None and (not isinstance(fps, (int, float, Fraction)) or not math.isfinite(fps) or fps <= 0):
        raise _fail(path, f"fps must be a positive number, got {fps!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
            raise _fail(path, f"{name} must be a non-negative number of seconds, got {value!r}")
    if start is not None and end is not None and start >= end:
        raise _fail(path, f"start ({start} s) must be before end ({end} s)")


# ---------------------------------------------------------------- entry point


def load_video(path, num_frames: int = 32, fps: float | None = None, start: float | None = None,
               end: float | None = None) -> VideoClip:
    """Sample frames from a video file (or load a still image as one frame).

    Uniform mode (fps=None): exactly `num_frames` frames at indices round(linspace(0, n-1, T))
    of the clip [start, end) (seconds; default the whole video); a clip with fewer frames
    than asked is padded by repeating frames evenly (`repeated=True`).
    fps mode: one frame every 1/fps seconds of the clip (never more often than the native
    rate); when that gives more than `num_frames`, `num_frames` uniformly spread frames.
    Still images (png, jpg, ...) give T=1.

    Returns a VideoClip: frames (T, H, W, 3) uint8, timestamps (T,) seconds, plus metadata.
    Raises VideoDecodeError (a ValueError) naming the file and the cause on any failure.
    """
    path = os.fspath(path)
    _check_args(path, num_frames, fps, start, end)
    if not os.path.exists(path):
        raise _fail(path, "no such file")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise _fail(path, "file is empty (0 bytes)")
    try:
        container = _av().open(path, mode="r", metadata_errors="ignore")
    except _av_errors() as exc:
        raise _fail(path, f"not a readable video or image ({_describe(exc)})") from None
    try:
        with container:
            return _load_from_container(container, path, int(num_frames), fps, start, end)
    except VideoDecodeError:
        raise
    except _av_errors() as exc:
        raise _fail(path, f"decoding failed, the file is truncated or corrupt ({_describe(exc)})") from None


def _load_from_container(container, path, num_frames, fps, start, end) -> VideoClip:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise _fail(path, f"no video stream (streams found: {', '.join(kinds)})")
    stream = container.streams.video[0]
    format_names = set((container.format.name or "").split(","))
    if format_names & _IMAGE_FORMATS:
        return _load_image(container, stream, path)
    reader = _SeekingReader(container, stream, path)
    if not (format_names & _SEEKABLE_FORMATS) or not reader.can_seek():
        reader = _SequentialReader(container, stream, path)
    n = reader.num_frames()
    rate = reader.rate
    first, last = _clip_bounds(path, n, rate, start, end)
    n_clip = last - first + 1
    if fps is None:
        rel, repeated = uniform_indices(n_clip, num_frames)
    else:
        rel, repeated = _fps_indices(n_clip, rate, float(fps), num_frames), False
    indices = rel + first
    wanted = np.unique(indices)
    decoded = reader.read(wanted)  # index -> (frame array, timestamp, rotation)
    shapes = {decoded[int(i)][0].shape for i in wanted}
    if len(shapes) > 1:
        raise _fail(path, f"frame size changes within the video ({sorted(shapes)})")
    frames = np.stack([decoded[int(i)][0] for i in indices])
    timestamps = np.array([decoded[int(i)][1] for i in indices], dtype=np.float64)
    rotation = decoded[int(indices[0])][2]
    return VideoClip(frames=frames, timestamps=timestamps, indices=indices.astype(np.int64),
                     native_fps=float(rate), duration=n / float(rate), num_source_frames=n,
                     repeated=bool(repeated), path=path, rotation=rotation,
                     extra={"reader": type(reader).__name__, **reader.stats})


def _clip_bounds(path, n, rate, start, end) -> tuple[int, int]:
    """First and last source frame index of the clip [start, end) in seconds."""
    duration = n / float(rate)
    first = 0 if start is None else int(math.ceil(start * rate - 1e-6))
    last = n - 1 if end is None else min(n - 1, int(math.ceil(end * rate - 1e-6)) - 1)
    if first > n - 1:
        raise _fail(path, f"start {start} s is at or beyond the end of the video ({duration:.3f} s)")
    if last < first:
        raise _fail(path, f"the clip [{start}, {end}) s contains no frame (video is {duration:.3f} s at "
                          f"{float(rate):g} fps)")
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


_local = threading.local()


def _to_rgb(frame, rotation: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame, display rotation applied."""
    reformatter = getattr(_local, "reformatter", None)
    if reformatter is None:
        from av.video.reformatter import VideoReformatter

        # One converter per thread: building a new one for every frame costs more than the decode.
        reformatter = _local.reformatter = VideoReformatter()
    rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
    return rotate_frame(rgb, rotation)


def _frame_rotation(frame) -> int:
    try:
        return int(round(float(frame.rotation) / 90.0)) % 4 * 90  # 0, 90, 180 or 270 counter-clockwise
    except (AttributeError, _av().FFmpegError):
        return 0


def _load_image(container, stream, path) -> VideoClip:
    for frame in container.decode(stream):
        rotation = _frame_rotation(frame)
        array = _to_rgb(frame, rotation)
        return VideoClip(frames=array[None], timestamps=np.zeros(1), indices=np.zeros(1, dtype=np.int64),
                         native_fps=None, duration=0.0, num_source_frames=1, repeated=False, path=path,
                         is_image=True, rotation=rotation)
    raise _fail(path, "no decodable frame in the image")


# ---------------------------------------------------------------- readers


class _SeekingReader:
    """Random access by presentation time: seek to a keyframe, decode forward to the wanted pts."""

    def __init__(self, container, stream, path):
        self.container, self.stream, self.path = container, stream, path
        self.stats = {"seeks": 0, "decoded": 0}
        self.time_base = stream.time_base
        self.rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.first_pts = stream.start_time
        self.frame_pts = 1.0  # pts units per frame, set by can_seek()
        self._frames = None  # active decode iterator (None: must seek before decoding)
        self._pending = None  # a decoded frame pushed back onto the active iterator
        self._pos = None  # pts of the last frame taken from the active iterator
        self._gop_frames = 0  # largest keyframe distance seen while decoding, in frames
        self._keyframes = None  # sorted keyframe presentation timestamps from the container index

    def can_seek(self) -> bool:
        if not self.rate or self.rate <= 0 or not self.time_base:
            return False
        self.frame_pts = float(1 / (self.rate * self.time_base))
        if self.first_pts is None:
            frame = next(iter(self._decode_from(None)), None)
            if frame is None or frame.pts is None:
                return False
            self.first_pts = frame.pts
        entries = self.stream.index_entries
        if len(entries):
            # mp4 indexes decode timestamps; with B-frames they trail the presentation ones by a
            # constant delay, which the first entry (a keyframe shown first) reveals.
            shift = max(0, self.first_pts - entries[0].timestamp) if entries[0].is_keyframe else 0
            keys = [e.timestamp for e in entries if e.is_keyframe]
            if keys:
                self._keyframes = np.array(sorted(keys), dtype=np.float64) + shift
        return True

    # -- frame count

    def num_frames(self) -> int:
        """Frames in the stream: stream.frames when it agrees with the duration, else probe the tail."""
        stream = self.stream
        duration_s = None
        if stream.duration:
            duration_s = float(stream.duration * self.time_base)
        elif self.container.duration:
            duration_s = self.container.duration / _av().time_base - float(self.first_pts * self.time_base)
        estimate = round(duration_s * float(self.rate)) if duration_s else None
        if stream.frames and estimate and abs(stream.frames - estimate) <= max(2, 0.02 * estimate):
            self.stats["count_source"] = "stream.frames"
            return int(stream.frames)
        last_pts = self._probe_last_pts(duration_s)
        self.stats["count_source"] = "tail probe"
        return int(round((last_pts - self.first_pts) / self.frame_pts)) + 1

    def _probe_last_pts(self, duration_s) -> float:
        """Decode the last stretch of the stream and return the largest pts found."""
        back_s = 2.0
        while True:
            target = self.first_pts
            if duration_s:
                target = self.first_pts + max(0.0, duration_s - back_s) / float(self.time_base)
            last = None
            for frame in self._decode_from(target):
                if frame.pts is not None:
                    last = frame.pts if last is None else max(last, frame.pts)
            if last is not None:
                return float(last)
            if target <= self.first_pts:
                raise _fail(self.path, "no decodable frame")
            back_s *= 8

    # -- decoding

    def _decode_from(self, target_pts):
        """Yield decoded frames (pts order), after seeking to the keyframe at or before target_pts."""
        if target_pts is not None:
            self.container.seek(int(math.floor(target_pts)), stream=self.stream, backward=True)
            self.stats["seeks"] += 1
        last_key = None
        for packet in self.container.demux(self.stream):
            for frame in self.stream.decode(packet):
                self.stats["decoded"] += 1
                if frame.key_frame and frame.pts is not None:
                    if last_key is not None:
                        gap = int(round((frame.pts - last_key) / self.frame_pts))
                        self._gop_frames = max(self._gop_frames, gap)
                    last_key = frame.pts
                yield frame

    def _next_frame(self):
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        return next(self._frames, None)

    def _should_seek(self, target_pts: float) -> bool:
        """Seek when the keyframe before the target lies beyond the decoder position, else decode on."""
        if self._frames is None or self._pos is None or target_pts <= self._pos:
            return True
        if self._keyframes is not None:
            i = int(np.searchsorted(self._keyframes, target_pts, side="right")) - 1
            # A seek saves decoding the frames between here and that keyframe; not worth it for one or two.
            return i >= 0 and self._keyframes[i] - self._pos > 2 * self.frame_pts
        gop = self._gop_frames or 32
        return (target_pts - self._pos) / self.frame_pts > gop

    def _seek(self, pts: float) -> None:
        self._frames = self._decode_from(pts)
        self._pending = None
        self._pos = None

    def read(self, indices: np.ndarray) -> dict:
        """Decode the frames at sorted, distinct `indices`: {index: (rgb (H, W, 3), seconds, rotation)}."""
        out = {}
        for index in indices:
            index = int(index)
            target = self.first_pts + index * self.frame_pts
            frame = None
            # Back off further when a seek lands after the wanted frame (keyframe index in dts, VFR).
            for backoff_s in (None, 1.0, 8.0, 64.0, math.inf):
                seek_pts = target
                if backoff_s is not None:
                    seek_pts = max(self.first_pts, target - backoff_s / float(self.time_base))
                    self._seek(seek_pts)
                elif self._should_seek(target):
                    self._seek(target)
                frame, status = self._advance_to(target)
                if status in ("ok", "eof") or seek_pts <= self.first_pts:
                    break
            if frame is None:
                if index == 0:
                    raise _fail(self.path, "no decodable frame")
                raise _fail(self.path, f"truncated or corrupt: no frame decodable at "
                                       f"{index / float(self.rate):.3f} s (frame {index} of the stream)")
            rotation = _frame_rotation(frame)
            out[index] = (_to_rgb(frame, rotation), float((frame.pts - self.first_pts) * self.time_base), rotation)
        return out

    def _advance_to(self, target: float):
        """Decode forward to the frame nearest `target` pts.

        Returns (frame, "ok"), (frame, "overshoot") when the first frame decoded is already past
        the target, (None, "eof") when the stream ended more than 1.5 frames before the target,
        or (None, "empty") when nothing was decoded.
        """
        half = self.frame_pts / 2
        prev = None
        while self._frames is not None:
            frame = self._next_frame()
            if frame is None:
                self._frames = None  # end of stream
                break
            if frame.pts is None:
                continue
            self._pos = frame.pts
            if frame.pts >= target - half:
                if prev is None:
                    return frame, ("overshoot" if frame.pts > target + half else "ok")
                if abs(prev.pts - target) <= abs(frame.pts - target):
                    self._pending, self._pos = frame, prev.pts
                    return prev, "ok"
                return frame, "ok"
            prev = frame
        if prev is None:
            return None, "empty"
        # The last frame counts only when within 1.5 frames of the target.
        return (prev, "ok") if target - prev.pts <= 3 * half else (None, "eof")


class _SequentialReader:
    """Decode the whole stream (for formats that cannot seek, or streams without timestamps)."""

    def __init__(self, container, stream, path):
        self.container, self.stream, self.path = container, stream, path
        self.stats = {"seeks": 0, "decoded": 0}
        self._times = None
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.rate = rate if rate and rate > 0 else Fraction(25)

    def _frames(self):
        for packet in self.container.demux(self.stream):
            for frame in self.stream.decode(packet):
                self.stats["decoded"] += 1
                yield frame

    def num_frames(self) -> int:
        times = []
        for i, frame in enumerate(self._frames()):
            if frame.pts is not None and frame.time_base:
                times.append(float(frame.pts * frame.time_base))
            else:
                times.append(i / float(self.rate))
        if not times:
            raise _fail(self.path, "no decodable frame")
        self._times = [t - times[0] for t in times]
        self.stats["count_source"] = "full decode"
        return len(times)

    def read(self, indices: np.ndarray) -> dict:
        """Second pass over a freshly opened file, converting only the wanted frames."""
        wanted = set(int(i) for i in indices)
        out = {}
        with _av().open(self.path, metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            i = 0
            for packet in container.demux(stream):
                for frame in stream.decode(packet):
                    if i in wanted:
                        rotation = _frame_rotation(frame)
                        out[i] = (_to_rgb(frame, rotation), self._times[i], rotation)
                    i += 1
                if len(out) == len(wanted):
                    break
        missing = wanted - set(out)
        if missing:
            raise _fail(self.path, f"frame {min(missing)} could not be decoded on the second pass")
        return out
