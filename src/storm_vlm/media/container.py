"""Opening media files safely, and noticing files that were cut short.

Only demuxers in `ALLOWED_FORMATS` are used, and each of them reads the one file it is given.
Playlist and reference formats (HLS .m3u8, ffconcat, DASH manifests, image sequences, ...)
would open further files named inside them -- anywhere on the machine -- so they are refused;
FFmpeg enforces this (its `format_whitelist`) after probing the file's first bytes and before
the demuxer reads its header, i.e. before any referenced file could be opened. Paths are
opened through FFmpeg's `file:` protocol only, so a name such as "concat:a|b" or "http://..."
is just a (missing) file name, and a ":" in a real file name works.

`find_truncation` reads the container's own size fields (MP4/QuickTime boxes, the Matroska/
WebM segment, AVI RIFF chunks): a file shorter than they declare was cut short.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from storm_vlm.media.errors import DecodeTimeout, describe, fail
from storm_vlm.media.limits import MAX_IMAGE_PIXELS, Budget

__all__ = ["ALLOWED_FORMATS", "IMAGE_FORMATS", "av", "check_file", "open_container", "Truncation",
           "find_truncation", "animated_webp"]

# Demuxers (FFmpeg names) that read exactly the file they are given. Video containers and raw
# video streams first, then single still images; image2 (which FFmpeg picks for some images by
# their extension) is opened with pattern_type=none, so a name like "img%d.png" is one file,
# never a numbered sequence. Not here on purpose: hls, dash, concat, mxf, sdp/rtp/rtsp, tee,
# lavfi and capture devices.
ALLOWED_FORMATS = frozenset({
    "mov", "mp4", "m4a", "3gp", "3g2", "mj2",  # FFmpeg's one QuickTime/MP4 demuxer
    "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "ogg", "asf", "nut",
    "gif", "apng", "webp", "h264", "hevc", "m4v", "mpegvideo", "ivf", "obu", "mjpeg", "yuv4mpegpipe",
    "image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif_pipe", "jpegls_pipe",
    "jpegxl_pipe", "ppm_pipe", "pgm_pipe", "pbm_pipe", "pam_pipe", "qoi_pipe",
})
IMAGE_FORMATS = frozenset(name for name in ALLOWED_FORMATS if name.endswith("_pipe") or name == "image2")

_WHITELIST = ",".join(sorted(ALLOWED_FORMATS))


def av():
    """PyAV, imported on first use so that `import storm_vlm` stays cheap."""
    import av as module

    return module


def av_errors() -> tuple:
    """Exceptions a corrupt file can raise from PyAV (MemoryError is handled apart, first)."""
    return (av().FFmpegError, OSError, EOFError, UnicodeDecodeError)


def check_file(path: str) -> int:
    """The size of `path` if it is a non-empty regular file; VideoDecodeError naming the problem."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if str(path).lower().startswith("file://"):
            raise fail(path, "a file: URL; give the file's path itself (without file://)") from None
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", str(path)):  # http://, rtsp://, s3://, ...
            raise fail(path, "URLs are not fetched; download the video and give its path") from None
        raise fail(path, "no such file") from None
    except OSError as exc:
        raise fail(path, f"cannot be read ({describe(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        raise fail(path, "is a directory, not a video file")
    if not stat.S_ISREG(info.st_mode):
        raise fail(path, "is not a regular file (a device, pipe or socket); only video and image files are read")
    if info.st_size == 0:
        raise fail(path, "file is empty (0 bytes)")
    return info.st_size


def _sniff(path: str) -> str | None:
    """A name for a refused reference format, from the file's first bytes (for the message)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return None
    if head.startswith(b"#EXTM3U") or head.startswith(b"#EXT-X-"):
        return "an HLS playlist (m3u8)"
    if head.startswith(b"ffconcat"):
        return "an ffconcat list"
    if head.startswith(b"<?xml") and b"<MPD" in head or head.startswith(b"<MPD"):
        return "a DASH manifest"
    if head.lower().startswith(b"[playlist]"):
        return "a playlist (pls)"
    if head.startswith(b"v=0"):
        return "an SDP session description"
    return None


def animated_webp(path: str) -> bool:
    """Whether `path` is an animated WebP (its VP8X header's animation flag), which FFmpeg's WebP
    decoder cannot read: it fails as invalid data, which would be reported as a corrupt file."""
    try:
        with open(path, "rb") as f:
            head = f.read(21)
    except OSError:
        return False
    return len(head) == 21 and head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and bool(head[20] & 0x02)


def open_container(path: str, budget: Budget, options: dict | None = None, truncation=None):
    """`av.open` of the local file `path` with the demuxer allow-list; VideoDecodeError otherwise.

    options: extra demuxer options (e.g. {"ignore_editlist": "1"}). Probing gets FFmpeg's
    `max_pixels` too, so it never decodes a picture above MAX_IMAGE_PIXELS; the deadline of
    `budget` bounds probing. `truncation` (from `find_truncation`) explains a failure.
    """
    container_options = {"pattern_type": "none", **(options or {}),  # the allow-lists are not for callers to lift
                         "format_whitelist": _WHITELIST, "protocol_whitelist": "file"}
    kwargs = {}
    remaining = budget.remaining()
    if remaining is not None:
        kwargs["timeout"] = max(remaining, 0.001)
    try:
        return av().open("file:" + os.path.abspath(path), mode="r", metadata_errors="ignore",
                         options={"max_pixels": str(MAX_IMAGE_PIXELS)}, container_options=container_options,
                         **kwargs)
    except MemoryError:
        raise fail(path, "out of memory while opening the file") from None
    except av().ExitError:
        budget.check()
        raise fail(path, f"opening took longer than {budget.timeout_s:g} s (timeout_s)", DecodeTimeout) from None
    except av_errors() as exc:
        # FFmpeg refuses a playlist by its content, whatever its name: as a format off the allow-list
        # when the name says what it is (list.m3u8), as invalid data otherwise (a playlist named .mp4)
        if what := _sniff(path):
            raise fail(path, f"is {what}, which refers to other files or streams; playlists and reference formats "
                             "are not read (only self-contained video and image files)") from None
        if truncation is not None:
            raise fail(path, f"not a readable video or image: {truncation.describe()}; nothing can be decoded "
                             f"({describe(exc)})") from None
        if isinstance(exc, av().ArgumentError) and getattr(exc, "errno", None) == 22:
            raise fail(path, "not a readable video or image: its format is not one this loader opens "
                             "(storm_vlm.video.ALLOWED_FORMATS) or its header is invalid") from None
        raise fail(path, f"not a readable video or image ({describe(exc)})") from None


# ---------------------------------------------------------------- truncation


@dataclass(frozen=True)
class Truncation:
    """A file shorter than its container's size fields declare."""

    container: str  # "MP4", "Matroska/WebM", "AVI"
    file_bytes: int
    declared_bytes: int
    detail: str  # where it is cut, e.g. "its 'mdat' box is cut off"
    at_least: bool = True  # declared_bytes is a lower bound (more boxes may have followed)

    def describe(self) -> str:
        bound = "at least " if self.at_least else ""
        return (f"the file is truncated: {self.detail} ({self.file_bytes:,} bytes present of the {bound}"
                f"{self.declared_bytes:,} its {self.container} structure declares)")

    def as_dict(self) -> dict:
        return {"container": self.container, "file_bytes": self.file_bytes,
                "declared_bytes": self.declared_bytes, "detail": self.detail}


_MP4_TOP_LEVEL = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp",
                  b"sidx", b"moof", b"mfra", b"meta", b"pdin", b"prft", b"emsg", b"junk"}
_MAX_BOXES = 100_000  # a fragmented mp4 has two boxes per fragment; beyond this, stop looking


def find_truncation(path: str, size: int) -> Truncation | None:
    """A Truncation when the container's size fields reach past the end of the file; None when
    they fit, or for formats without such fields (MPEG-TS, raw streams), or when unsure."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) >= 8 and head[4:8] in _MP4_TOP_LEVEL:
                return _mp4_truncation(f, size)
            if head[:4] == b"\x1a\x45\xdf\xa3":
                return _matroska_truncation(f, size)
            if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
                return _riff_truncation(f, size)
    except OSError:
        return None
    return None


def _mp4_truncation(f, size: int) -> Truncation | None:
    offset, seen = 0, set()
    for _ in range(_MAX_BOXES):
        if offset >= size:
            return None
        f.seek(offset)
        header = f.read(16)
        if len(header) < 8:
            return Truncation("MP4", size, offset + 8, "a box header is cut off")
        length, kind = int.from_bytes(header[:4], "big"), header[4:8]
        if not all(32 <= c < 127 for c in kind):
            return None  # not a box: trailing bytes of some other kind, do not guess
        if length == 1:
            if len(header) < 16:
                return Truncation("MP4", size, offset + 16, "a box header is cut off")
            length = int.from_bytes(header[8:16], "big")
        elif length == 0:
            length = size - offset  # "extends to the end of the file"
        if length < 8:
            return None
        name = kind.decode("ascii")
        if offset + length > size:
            detail = f"its '{name}' box is cut off"
            if "moov" not in seen and kind != b"moov":
                detail += " and the index ('moov' box), which this file keeps after it, is missing"
            return Truncation("MP4", size, offset + length, detail)
        seen.add(name)
        offset += length
    return None


def _ebml_vint(f, keep_marker: bool):
    """(value, all-ones) of an EBML variable-length integer, or None at the end of the file."""
    first = f.read(1)
    if not first:
        return None
    b0 = first[0]
    length = next((i + 1 for i in range(8) if b0 & (0x80 >> i)), None)
    if length is None:
        return None
    rest = f.read(length - 1)
    if len(rest) < length - 1:
        return None
    value = b0 if keep_marker else b0 & (0xFF >> length)
    for b in rest:
        value = (value << 8) | b
    all_ones = value == (1 << (7 * length)) - 1 and not keep_marker
    return value, all_ones


def _matroska_truncation(f, size: int) -> Truncation | None:
    f.seek(0)
    for expected in (0x1A45DFA3, 0x18538067):  # the EBML header, then the Segment
        element = _ebml_vint(f, keep_marker=True)
        length = _ebml_vint(f, keep_marker=False)
        if element is None or length is None or element[0] != expected:
            return None
        if length[1]:
            return None  # unknown size (a live recording): nothing is declared
        start = f.tell()
        if expected == 0x1A45DFA3:
            f.seek(start + length[0])
    end = start + length[0]
    if end > size:
        return Truncation("Matroska/WebM", size, end, "its segment is cut off", at_least=False)
    return None


def _riff_truncation(f, size: int) -> Truncation | None:
    offset = 0
    for _ in range(_MAX_BOXES):
        if offset >= size:
            return None
        f.seek(offset)
        header = f.read(12)
        if len(header) < 8 or header[:4] != b"RIFF":
            return None
        length = int.from_bytes(header[4:8], "little")
        if length == 0xFFFFFFFF:
            return None  # unknown size: written to a pipe, the muxer could not go back to fill it in
        end = offset + 8 + length
        if end > size:
            return Truncation("AVI", size, end, f"its '{header[8:12].decode('latin-1')}' RIFF chunk is cut off")
        offset = end + (end & 1)
    return None
