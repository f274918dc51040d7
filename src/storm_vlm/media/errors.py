"""The errors `load_video` raises: one `VideoDecodeError` naming the file and the cause, and two
subclasses a server tells apart from a bad file (a time limit, a caller that went away)."""

from __future__ import annotations

from storm_vlm.errors import StormError

__all__ = ["VideoDecodeError", "DecodeTimeout", "DecodeCancelled", "fail", "describe"]


class VideoDecodeError(StormError):
    """A video (or image) could not be read; the message names the file and the cause."""


class DecodeTimeout(VideoDecodeError):
    """Reading took longer than the call's `timeout_s` (waiting for a decode slot included)."""


class DecodeCancelled(VideoDecodeError):
    """The call's `cancel` check said stop (e.g. the HTTP client disconnected)."""


def fail(path: str, cause: str, kind: type[VideoDecodeError] = VideoDecodeError) -> VideoDecodeError:
    return kind(f"{path}: {cause}")


def describe(exc: BaseException) -> str:
    """The cause of a library error in a few words (FFmpeg's "[Errno N] cause: 'file'" as "cause")."""
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return str(text).replace("\n", " ")
