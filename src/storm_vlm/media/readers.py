"""From decoded pictures to the clip's frames.

`FrameSink` holds the output: one (T, h, w, 3) uint8 array allocated at the first frame, each
decoded picture converted to RGB and scaled to (w, h) by FFmpeg in one step and written to every
row that wants it -- so the peak is the clip plus one small frame, never a stack of full-size
frames.

Readers decide which pictures those are:

`SeekingReader` (random access by presentation time): for each wanted frame the decoder either
jumps to the keyframe before it (when that keyframe lies beyond the current decoder position)
or decodes forward (when the wanted frame is in the GOP already being decoded), so 128 frames of
an hour-long video cost about 128 short decodes. Frame i of a stream is the one shown at
`first_pts + i / fps` (the frame nearest that time; past the last frame's timestamp, the last
frame while its display time lasts).

`SequentialReader` decodes the whole stream, twice (count, then convert the wanted frames): for
formats that cannot seek exactly, streams without timestamps or frame rate, AVI with codecs that
reorder frames (AVI stores no presentation timestamps: FFmpeg's guesses are a frame late and,
with B-frames, out of order; frame i is then the i-th in display order, shown at i / fps), files
whose timestamps are implausible (frames are then taken in order and spread evenly over the
declared duration), and truncated files read on request (decoding stops where the data ends).
MPEG-TS/PS (.ts, .m2ts, .mts) and raw streams are read so, at the cost of two full decodes: they
have no keyframe index and FFmpeg seeks them by a binary search over timestamps, landing on any
packet. Measured against a full decode, seeking sampled wrong frames in .ts files of H.264 (with
B-frames, or open GOPs), MPEG-2 and HEVC (up to 13 of 64 frames), and on a 3-minute file still
decoded three quarters of it or more.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from storm_vlm.media.container import av, av_errors
from storm_vlm.media.errors import fail
from storm_vlm.media.images import over_white
from storm_vlm.media.limits import Budget, display_size, output_size

__all__ = ["FrameSink", "SeekingReader", "SequentialReader", "rotate_frame", "frame_orientation", "scaled_rgb",
           "has_alpha", "shown_rgb", "sample_aspect_ratio", "shown_frames", "decoded_frames", "continuous_times",
           "nearest_frames"]


def rotate_frame(frame: np.ndarray, rotation: float, mirrored: bool = False) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, FFmpeg's convention) to (H, W, C),
    after mirroring it left-right when `mirrored` (see `frame_orientation`)."""
    if mirrored:
        frame = frame[:, ::-1]
    k = int(round(float(rotation) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(frame, k=k)) if k or mirrored else frame


def frame_orientation(frame) -> tuple[int, bool]:
    """(rotation, mirrored) of a decoded frame's display matrix, as ffmpeg's autorotate shows it:
    mirror left-right when `mirrored`, then rotate by `rotation` degrees counter-clockwise.

    A mirrored matrix (a front camera's recording) is not a rotation: its angle alone would turn
    a left-right mirror into a 180-degree turn. The cases follow fftools' autorotate (transpose,
    hflip and vflip filters) one for one; angles are rounded to a multiple of 90 degrees.

    Reading `frame.side_data` ties the frame into a reference cycle (PyAV caches the container on
    the frame), freed only by the garbage collector: pass a small frame (`scaled_rgb`'s copy,
    which carries the side data), never a decoder's full-size picture.
    """
    try:
        clockwise = int(round(-float(frame.rotation) / 90.0)) % 4  # fftools' get_rotation
    except (AttributeError, av().FFmpegError):
        return 0, False
    try:
        side_data = frame.side_data.get(av().sidedata.sidedata.Type.DISPLAYMATRIX)
    except (AttributeError, ValueError, av().FFmpegError):
        # ValueError: side data of a type this PyAV does not name (a JPEG's EXIF block with some
        # FFmpeg builds): the rotation alone, which frame.rotation reads without that enumeration
        return clockwise * 270 % 360, False
    if side_data is None:
        return 0, False
    m = np.frombuffer(bytes(side_data), dtype=np.int32)
    if clockwise == 1:
        return (90, True) if m[3] > 0 else (270, False)  # transpose=cclock_flip, or clock
    if clockwise == 3:
        return (270, True) if m[3] < 0 else (90, False)  # transpose=clock_flip, or cclock
    if clockwise == 2:  # hflip if m[0] < 0, vflip if m[4] < 0
        return {(True, True): (180, False), (True, False): (0, True), (False, True): (180, True),
                (False, False): (0, False)}[(bool(m[0] < 0), bool(m[4] < 0))]
    return (180, True) if m[4] < 0 else (0, False)  # vflip, or nothing


def scaled_rgb(frame, size: tuple[int, int], reformatter, format: str = "rgb24"):
    """A decoded frame as an rgb24 (or `format`) av.VideoFrame of size = (w, h), its properties
    and side data copied from it."""
    if size == (frame.width, frame.height):
        return reformatter.reformat(frame, format=format)
    # area averaging: every source pixel counts (no aliasing when shrinking a lot)
    return reformatter.reformat(frame, format=format, width=size[0], height=size[1], interpolation="AREA")


def has_alpha(frame) -> bool:
    """Whether a decoded frame may be transparent: an alpha plane, or a palette (GIF, PNG)."""
    return frame.format.has_palette or any(c.is_alpha for c in frame.format.components)


def shown_rgb(frame, size: tuple[int, int], reformatter, orientation: tuple[int, bool] | None = None):
    """(pixels (h, w, 3) uint8, orientation) of a decoded frame as a player shows it: scaled to
    size = (w, h), transparent pixels over white (as `storm_vlm.media.images.load_image` shows
    them), turned upright by `orientation` (rotation, mirrored), read from the scaled copy's side
    data when None (see `frame_orientation`)."""
    alpha = has_alpha(frame)
    scaled = scaled_rgb(frame, size, reformatter, "rgba" if alpha else "rgb24")
    if orientation is None:
        orientation = frame_orientation(scaled)
    pixels = scaled.to_ndarray()
    return rotate_frame(over_white(pixels) if alpha else pixels, *orientation), orientation


def sample_aspect_ratio(stream):
    """The shape of a video stream's pixels (width / height; None when unknown), as ffmpeg guesses
    it: the container's (an MP4 'pasp' box, Matroska's display size) over the bitstream's."""
    for ratio in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if ratio and ratio > 0:
            return ratio
    return None


def shown_frames(stream) -> int:
    """The frames a stream declares that are shown (0: none declared): `stream.frames` less the
    samples an MP4 edit list hides. A clip cut without re-encoding (`ffmpeg -ss 5 -i in.mp4 -c
    copy out.mp4`, phone and editor trims) keeps the frames from the keyframe before its start,
    marked discarded in the index: ffmpeg and players never show them, and counting them put
    frames past the end of the stream."""
    entries = stream.index_entries
    if stream.frames and len(entries) >= stream.frames:  # a full sample index (MP4)
        return stream.frames - sum(1 for e in entries if e.is_discard)
    return stream.frames


def decoded_frames(container, stream, budget: Budget, stats: dict, stop_at_corrupt: bool = False):
    """Decoded frames of `stream` in presentation order, checking `budget` before each packet.

    A packet the decoder rejects as invalid data (a damaged stretch of a recording or a download)
    is skipped, as ffmpeg and players do, and counted in stats["skipped_packets"]: the frames
    around it still decode, where raising would lose the whole video to one bad packet. A file
    none of whose frames decode still fails (the readers find the frames missing).
    stop_at_corrupt: end at the first packet the demuxer flags corrupt (in a truncated file, the
    one cut short), after draining the frames the decoder still holds.
    """
    invalid = av().InvalidDataError
    for packet in container.demux(stream):
        budget.check()
        if stop_at_corrupt and packet.is_corrupt:
            stats["stopped_at"] = "a packet cut short"
            packet = None  # flush the decoder
        try:
            frames = stream.decode(packet)
        except invalid:
            stats["skipped_packets"] = stats.get("skipped_packets", 0) + 1
            frames = ()
        for frame in frames:
            stats["decoded"] += 1
            yield frame
        if packet is None:
            return


class FrameSink:
    """The clip being filled: row r of the output holds source frame indices[r].

    Frames are scaled with `output_size(w, h, max_pixels, min_side)` from their display size
    (`display_size`: non-square pixels of `sample_aspect_ratio` shown square); the output array is
    allocated when the first frame arrives (its size is known then). A stream whose picture size
    changes midway (an HLS recording switching variants, a WebRTC recording) has its later frames
    scaled to that same size, as ffmpeg does. Transparent pictures (PNG, GIF, WebP, video with
    alpha) are shown over white, as `storm_vlm.media.images.load_image` shows them.
    """

    def __init__(self, path: str, indices: np.ndarray, max_pixels: int | None, min_side: int | None,
                 declared_size: tuple[int, int] = (0, 0), sample_aspect_ratio=None):
        self.path = path
        self.sample_aspect_ratio = sample_aspect_ratio
        self.indices = np.asarray(indices, dtype=np.int64)
        self.wanted = np.unique(self.indices)
        self.max_pixels, self.min_side = max_pixels, min_side
        self.rows: dict[int, list[int]] = {}
        for row, index in enumerate(self.indices.tolist()):
            self.rows.setdefault(index, []).append(row)
        self.frames = None
        self.timestamps = np.zeros(len(self.indices), dtype=np.float64)
        self.orientation = None  # (rotation, mirrored) of the first frame, applied to every frame
        self.done: set[int] = set()
        self.source_size = declared_size  # (w, h) of the first picture decoded (the stream's, before)
        self.frame_size = None  # (w, h) of the output frames before rotation
        # One converter per call, reused for every frame (building one per frame costs more than
        # small decodes), released by `close`: never per thread, since FFmpeg's converter owns
        # worker threads, and freeing one inherited through fork (a DataLoader worker) hangs.
        self._reformatter = None

    def close(self) -> None:
        self._reformatter = None

    def put(self, index: int, frame, seconds: float) -> None:
        if self.frames is None:
            self.source_size = (frame.width, frame.height)
            shown = display_size(*self.source_size, self.sample_aspect_ratio)
            self.frame_size = output_size(*shown, self.max_pixels, self.min_side)
        if self._reformatter is None:
            from av.video.reformatter import VideoReformatter

            self._reformatter = VideoReformatter()
        rgb, self.orientation = shown_rgb(frame, self.frame_size, self._reformatter, self.orientation)
        if self.frames is None:
            self.frames = np.empty((len(self.indices), *rgb.shape), dtype=np.uint8)
        for row in self.rows[index]:
            self.frames[row] = rgb
            self.timestamps[row] = seconds
        self.done.add(index)

    def missing(self) -> list[int]:
        return [i for i in self.wanted.tolist() if i not in self.done]

    @property
    def rotation(self) -> int:
        return (self.orientation or (0, False))[0]

    @property
    def mirrored(self) -> bool:
        return (self.orientation or (0, False))[1]


# ---------------------------------------------------------------- seeking

# Seconds past a stream's first frame that lie beyond the end of any video (a seek there lands on
# the last keyframe), yet small enough that demuxers rescale them without overflow.
_PAST_THE_END_S = 2.0 ** 31


class SeekingReader:
    """Random access by presentation time: seek to a keyframe, decode forward to the wanted pts."""

    def __init__(self, container, stream, path: str, budget: Budget, damage: str = "corrupt"):
        self.container, self.stream, self.path, self.budget = container, stream, path, budget
        self.damage = damage  # how a missing frame is explained ("corrupt", "corrupt or cut short")
        self.stats = {"seeks": 0, "decoded": 0}
        self.time_base = stream.time_base
        self.rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.first_pts = stream.start_time
        self.frame_pts = 1.0  # pts units per frame, set by can_seek()
        self._frames = None  # active decode iterator (None: must seek before decoding)
        self._pending = None  # a decoded frame pushed back onto the active iterator
        self._pos = None  # pts of the last frame taken from the active iterator
        self._ended = False  # the active iterator reached the end of the stream
        self._gop_frames = 0  # largest keyframe distance seen while decoding, in frames
        self._keyframes = None  # sorted keyframe presentation timestamps from the container index

    def can_seek(self) -> bool:
        if not self.rate or self.rate <= 0 or not self.time_base:
            return False
        self.frame_pts = float(1 / (self.rate * self.time_base))
        if self.first_pts is None:
            frames = self._decode_from(None)
            frame = next(frames, None)
            frames.close()
            if frame is None or frame.pts is None:
                return False
            self.first_pts = frame.pts
        self._load_keyframes()
        return True

    def _load_keyframes(self) -> None:
        """Keyframe times from the container's index; None (guess from the GOPs decoded) while the
        index has at most one entry: Matroska/WebM read theirs (Cues) only at the first seek, so
        this runs again after each seek until it is known."""
        entries = self.stream.index_entries
        if len(entries) <= 1:
            return
        # mp4 indexes decode timestamps; with B-frames they trail the presentation ones by a
        # constant delay, which the first entry (a keyframe shown first) reveals.
        shift = max(0, self.first_pts - entries[0].timestamp) if entries[0].is_keyframe else 0
        keys = [e.timestamp for e in entries if e.is_keyframe]
        if len(keys) > 1:
            self._keyframes = np.array(sorted(keys), dtype=np.float64) + shift

    # -- frame count

    def num_frames(self) -> int:
        """Frames in the stream: stream.frames when it agrees with the duration, else probe the tail."""
        stream = self.stream
        duration_s = None
        if stream.duration:
            duration_s = float(stream.duration * self.time_base)
        elif self.container.duration:
            duration_s = self.container.duration / av().time_base - float(self.first_pts * self.time_base)
        estimate = round(duration_s * float(self.rate)) if duration_s else None
        declared = shown_frames(stream)
        if declared and estimate and abs(declared - estimate) <= max(2, 0.02 * estimate):
            self.stats["count_source"] = "stream.frames"
            return int(declared)
        last_pts = self._probe_last_pts(duration_s)
        self.stats["count_source"] = "tail probe"
        return int(round((last_pts - self.first_pts) / self.frame_pts)) + 1

    def _probe_last_pts(self, duration_s) -> float:
        """Decode the last stretch of the stream and return the largest pts found.

        Without a declared duration (Matroska/WebM written to a pipe: a browser's MediaRecorder, a
        live recording; they have no Cues either) the decode starts at the last keyframe, found by
        seeking past the end: the demuxer reads packets up to there, far cheaper than decoding
        the whole stream. Where that finds nothing, the whole stream is decoded."""
        if not duration_s:
            try:
                last = self._last_pts_from(self.first_pts + _PAST_THE_END_S / float(self.time_base))
            except av_errors():
                last = None
            if last is not None:
                return last
        back_s = 2.0
        while True:
            target = self.first_pts
            if duration_s:
                target = self.first_pts + max(0.0, duration_s - back_s) / float(self.time_base)
            last = self._last_pts_from(target)
            if last is not None:
                return last
            if target <= self.first_pts:
                raise fail(self.path, "no decodable frame")
            back_s *= 8

    def _last_pts_from(self, target) -> float | None:
        """The largest pts decoded from the keyframe at or before `target` to the end (None: no frame)."""
        last = None
        for frame in self._decode_from(target):
            if frame.pts is not None:
                last = frame.pts if last is None else max(last, frame.pts)
        return None if last is None else float(last)

    # -- decoding

    def _decode_from(self, target_pts):
        """Yield decoded frames (pts order), after seeking to the keyframe at or before target_pts."""
        if target_pts is not None:
            self.container.seek(int(math.floor(target_pts)), stream=self.stream, backward=True)
            self.stats["seeks"] += 1
            if self._keyframes is None:
                self._load_keyframes()
        last_key = None
        for frame in decoded_frames(self.container, self.stream, self.budget, self.stats):
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
        if self._ended:  # nothing lies beyond the end of the stream
            return False
        if self._keyframes is not None:
            i = int(np.searchsorted(self._keyframes, target_pts, side="right")) - 1
            # A seek saves decoding the frames between here and that keyframe; not worth it for one or two.
            return i >= 0 and self._keyframes[i] - self._pos > 2 * self.frame_pts
        gop = self._gop_frames or 32
        return (target_pts - self._pos) / self.frame_pts > gop

    def _seek(self, pts: float) -> None:
        self.close()
        self._frames = self._decode_from(pts)

    def close(self) -> None:
        """Drop the active decode; call it before the file is closed: a decode left suspended
        and freed after its file kept the decoder's pictures resident (tens of MB per call on
        large frames, which the allocator could not reuse)."""
        if self._frames is not None:
            self._frames.close()
        self._frames = self._pending = self._pos = None
        self._ended = False

    def read(self, sink: FrameSink) -> None:
        """Decode the frames `sink` wants (sorted, distinct indices) into it."""
        # Backing off may reach before the first frame shown: a trimmed MP4's first frames are
        # decoded from a keyframe its edit list hides (the index's first entry).
        entries = self.stream.index_entries
        earliest = min(self.first_pts, entries[0].timestamp) if len(entries) else self.first_pts
        for index in sink.wanted.tolist():
            target = self.first_pts + index * self.frame_pts
            frame = None
            # Back off further when a seek lands after the wanted frame (keyframe index in dts, VFR).
            for backoff_s in (None, 1.0, 8.0, 64.0, math.inf):
                seek_pts = target
                if backoff_s is not None:
                    seek_pts = max(earliest, target - backoff_s / float(self.time_base))
                    self._seek(seek_pts)
                elif self._should_seek(target):
                    self._seek(target)
                frame, status = self._advance_to(target)
                if status in ("ok", "eof") or seek_pts <= earliest:
                    break
            if frame is None:
                if index == 0:
                    raise fail(self.path, "no decodable frame")
                raise fail(self.path, f"the file is {self.damage}: no frame decodable at "
                                      f"{index / float(self.rate):.3f} s (frame {index} of the stream)")
            sink.put(index, frame, float((frame.pts - self.first_pts) * self.time_base))

    def _advance_to(self, target: float):
        """Decode forward to the frame nearest `target` pts: the nearer of the last frame before it
        and the first at or after it (with a variable frame rate they can be far apart).

        Returns (frame, "ok"); (frame, "overshoot") when the first frame decoded is more than half
        a frame past the target; (None, "empty") when nothing was decoded. When the stream ends
        first, its last frame is on screen for its duration (at least a frame and a half; a
        recording or slideshow may hold it for seconds) and stays pending for the next targets:
        (it, "ok") within that time, else (None, "eof"): frames were due that the data lacks.
        """
        half = self.frame_pts / 2
        prev = None
        while self._frames is not None:
            frame = self._next_frame()
            if frame is None:
                self._ended = True
                break
            if frame.pts is None:
                continue
            self._pos = frame.pts
            if frame.pts >= target:
                if prev is None:
                    return frame, ("overshoot" if frame.pts > target + half else "ok")
                if target - prev.pts <= frame.pts - target:
                    self._pending, self._pos = frame, prev.pts
                    return prev, "ok"
                return frame, "ok"
            prev = frame
        if prev is None:
            return None, "empty"
        self._pending = prev
        shown = max(prev.duration or 0, self.frame_pts) + half
        return (prev, "ok") if target - prev.pts <= shown else (None, "eof")


# ---------------------------------------------------------------- sequential


# A forward timestamp jump this large in a format whose timestamps may restart (MPEG-TS/PS, FLV)
# is a discontinuity, not a pause: ffmpeg's own threshold (its -dts_delta_threshold).
_TS_JUMP_S = 10.0


def continuous_times(times: list[float], step: float, max_jump: float = math.inf) -> list[float]:
    """Seconds from the first frame for frames decoded at `times` (display order), running on by
    `step` across discontinuities: a time that goes back or stays (recordings joined, a camera's
    or broadcast's clock restarting) or jumps ahead by more than `max_jump` seconds. Clip
    timestamps then always increase, as they do in ffmpeg's output for such files."""
    out = [0.0]
    for before, now in zip(times, times[1:]):
        gap = now - before
        out.append(out[-1] + (gap if 0 < gap <= max_jump else step))
    return out


def nearest_frames(times, targets) -> np.ndarray:
    """For frames shown at increasing `times` (seconds), the index of the one nearest each target
    time: the nearer of the last frame before it and the first at or after it, the earlier on a
    tie, the last frame past the end (the frame SeekingReader decodes for a target)."""
    times = np.asarray(times, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    after = np.minimum(np.searchsorted(times, targets), len(times) - 1)
    before = np.maximum(after - 1, 0)
    return np.where(targets - times[before] <= times[after] - targets, before, after)


class SequentialReader:
    """Decode the whole stream: a counting pass, then a pass converting only the wanted frames.

    Clip index i means the frame shown at i / rate, as with SeekingReader: with a constant frame
    rate the i-th frame decoded; with a variable one (an animated GIF's per-frame delays, a
    screen recording in MPEG-TS) the decoded frame nearest that time, so that start / end and
    fps select by time and uniform sampling spreads over time whatever the container.

    open_stream: a callable returning (container, stream), a fresh one per pass.
    even_over: None (timestamps from the frames' pts), or a duration in seconds to spread the
    frames evenly over (for streams whose timestamps are implausible).
    in_order: frame i is shown at i / rate, whatever its pts (AVI, whose pts are guesses).
    tolerate_tail: stop quietly at a decoding error after the first frame (a truncated file read
    on request) instead of failing.
    """

    def __init__(self, open_stream, path: str, budget: Budget, rate=None, even_over: float | None = None,
                 in_order: bool = False, tolerate_tail: bool = False):
        self.open_stream, self.path, self.budget = open_stream, path, budget
        self.even_over, self.in_order, self.tolerate_tail = even_over, in_order, tolerate_tail
        self.stats = {"seeks": 0, "decoded": 0}
        self._times = None  # seconds of each decoded frame from the first
        self._variable = False  # frames are not at i / rate: clip indices are times on that grid
        self.rate = rate if rate and rate > 0 else Fraction(25)

    def _frames(self, container, stream):
        frames = decoded_frames(container, stream, self.budget, self.stats, stop_at_corrupt=self.tolerate_tail)
        count = 0
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except av_errors() as exc:
                if not (self.tolerate_tail and count):
                    raise
                self.stats["stopped_at"] = f"frame {count}: {type(exc).__name__}"
                return
            count += 1
            yield frame

    def close(self) -> None:
        """Nothing held between calls: each pass opens and closes its own container."""

    def num_frames(self) -> int:
        times = []
        container, stream = self.open_stream()
        with container:
            discontinuous = bool(container.format.flags & av().format.Flags.ts_discont.value)
            for i, frame in enumerate(self._frames(container, stream)):
                if frame.pts is not None and frame.time_base:
                    times.append(float(frame.pts * frame.time_base))
                else:
                    times.append(i / float(self.rate))
        if not times:
            raise fail(self.path, "no decodable frame")
        n = len(times)
        if self.even_over and n > 1:
            self.rate = Fraction(n) / Fraction(self.even_over)
        if self.even_over or self.in_order:
            self._times = [i / float(self.rate) for i in range(n)]
        else:
            self._times = continuous_times(times, 1 / float(self.rate), _TS_JUMP_S if discontinuous else math.inf)
        self.stats["count_source"] = "full decode"
        seconds = np.asarray(self._times)
        self._variable = not np.all(np.abs(seconds * float(self.rate) - np.arange(n)) < 0.5)
        if self._variable:  # as SeekingReader counts: the time grid up to the last frame
            n = int(round(seconds[-1] * float(self.rate))) + 1
        return n

    def read(self, sink: FrameSink) -> None:
        """Second pass over a freshly opened file, converting only the wanted frames (with a variable
        frame rate, the decoded frame nearest each wanted index's time i / rate)."""
        wanted = sink.wanted
        sources = nearest_frames(self._times, wanted / float(self.rate)) if self._variable else wanted
        targets: dict[int, list[int]] = {}
        for index, source in zip(wanted.tolist(), sources.tolist()):
            targets.setdefault(source, []).append(index)
        last = max(targets, default=-1)
        container, stream = self.open_stream()
        with container:
            for i, frame in enumerate(self._frames(container, stream)):
                for index in targets.get(i, ()):
                    sink.put(index, frame, self._times[i])
                if i >= last:
                    break
        missing = sink.missing()
        if missing:
            raise fail(self.path, f"frame {missing[0]} could not be decoded on the second pass")
