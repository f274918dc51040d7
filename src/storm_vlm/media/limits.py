"""What one `load_video` call may cost: pixels per frame, decodes at once, seconds.

Pixels. A decoded frame is converted to RGB *and scaled down in the same FFmpeg call*
(`output_size` picks the size), so a huge video never exists as full-size RGB in memory: the
clip costs at most T x max_pixels x 3 bytes. What cannot be scaled is the decoder's own
picture (YUV, about 1.5 bytes per pixel, times the frames a codec keeps for reference), so
streams whose pictures exceed `MAX_SOURCE_PIXELS` are refused before decoding and FFmpeg is
told to refuse larger pictures inside the bitstream too (its `max_pixels` decoder option).

Slots. Decoding is CPU-bound and each decode holds its decoder's pictures, so a process
decodes at most `max_concurrent_decodes()` videos at once, on that many long-lived decoding
threads (`run_decode`); further calls wait for a slot.

Time. `Budget` carries one call's deadline (`timeout_s`, waiting for a slot included) and its
cancel check; readers call `Budget.check()` between packets, about once per frame, and the
waiting caller enforces the deadline itself, so it returns on time even while FFmpeg is busy
inside one long call (the decode then stops at its next check).
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from storm_vlm.media.errors import DecodeCancelled, DecodeTimeout, fail
from storm_vlm.utils import check_int

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_SOURCE_PIXELS", "MAX_IMAGE_PIXELS", "display_size", "output_size", "Budget",
           "set_max_concurrent_decodes", "max_concurrent_decodes", "run_decode"]

# Default bound on each returned frame: 1024 x 1024 pixels (1365 x 768 for 16:9). Every video
# encoder this project pairs with reads far less (SigLIP-so400m-448: 448 x 448), and the bound
# keeps a 128-frame clip at 128 x 3 MiB whatever the source resolution. Callers that know their
# model's input pass `min_side` (or a smaller `max_pixels`) and get smaller frames still.
DEFAULT_MAX_PIXELS = 1024 * 1024

# Largest picture decoded at all: the most H.264 and H.265 allow (levels 6 to 6.2: 35,651,584
# luma samples, e.g. 8192 x 4352), so every standard 8K video decodes; a 16000 x 16000 stream is
# refused instead of costing hundreds of MB per decoder picture.
MAX_SOURCE_PIXELS = 8192 * 4352

# Still images are decoded once, with no reference pictures, so a larger picture is affordable:
# Pillow's decompression-bomb threshold (about 89.5 MP, a 48 MP phone photo passes).
MAX_IMAGE_PIXELS = 89_478_485


def display_size(width: int, height: int, sample_aspect_ratio=None) -> tuple[int, int]:
    """(width, height) a width x height picture is shown at, given its pixels' aspect ratio.

    Anamorphic video (a DVD's 720 x 480 shown at 16:9, HDV's 1440 x 1080 shown at 1920 x 1080)
    stores non-square pixels; players stretch it to the display aspect ratio, and so must frames
    handed to a model, or every circle is an ellipse. The picture is shrunk along one side rather
    than stretched along the other, so no pixels are invented. None or a non-positive ratio
    (unknown) means square pixels.
    """
    sar = sample_aspect_ratio
    if not sar or sar <= 0 or sar == 1:
        return width, height
    if sar > 1:
        return width, max(1, round(height / sar))
    return max(1, round(width * sar)), height


def output_size(width: int, height: int, max_pixels: int | None, min_side: int | None) -> tuple[int, int]:
    """(width, height) a width x height frame is scaled to: never up, aspect ratio kept.

    min_side: scale down until the shorter side is min_side (what a processor that resizes to
    min_side x min_side needs; nothing it could see is lost). max_pixels: the frame has at most
    this many pixels; it wins over min_side for extreme aspect ratios.
    """
    scale = 1.0
    short = min(width, height)
    if min_side is not None and short > min_side:
        scale = min_side / short
    if max_pixels is not None and width * height * scale * scale > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    if scale >= 1.0:
        return width, height
    out_w, out_h = max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))
    while max_pixels is not None and out_w * out_h > max_pixels:  # rounding up may overshoot by a row
        if out_w >= out_h:
            out_w -= 1
        else:
            out_h -= 1
    return out_w, out_h


_POLL_S = 0.05  # how often a waiting caller looks at its deadline and cancel check


def _clock() -> float:
    return time.monotonic()


class Budget:
    """One call's deadline and cancel check.

    timeout_s: seconds from construction (None: no limit). cancel: None, a callable returning
    True to stop, or an object with `is_set()` (threading.Event). `check()` raises
    DecodeCancelled / DecodeTimeout naming the file.
    """

    def __init__(self, path: str, timeout_s: float | None, cancel):
        self.path = path
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else _clock() + timeout_s
        self._aborted = False
        if cancel is None or callable(getattr(cancel, "is_set", None)):
            self._cancelled = getattr(cancel, "is_set", None)
        elif callable(cancel):
            self._cancelled = cancel
        else:
            raise fail(path, f"cancel must be a callable or a threading.Event, got {type(cancel).__name__}")

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - _clock()

    def abort(self) -> None:
        """The caller stopped waiting: the decode stops at its next check."""
        self._aborted = True

    def check(self, waiting: str | None = None) -> None:
        if self._aborted:
            raise fail(self.path, "stopped: the caller is no longer waiting", DecodeCancelled)
        if self._cancelled is not None and self._cancelled():
            raise fail(self.path, "cancelled by the caller" + (f" while {waiting}" if waiting else "")
                       + " (decoding stopped)", DecodeCancelled)
        self.check_deadline(waiting)

    def check_deadline(self, waiting: str | None = None) -> None:
        """The deadline part of `check` alone (never calls the caller's cancel check)."""
        if self.deadline is not None and _clock() > self.deadline:
            cause = f"decoding took longer than {self.timeout_s:g} s (timeout_s)"
            if waiting:
                cause = f"gave up after {self.timeout_s:g} s (timeout_s) {waiting}"
            raise fail(self.path, cause, DecodeTimeout)


class _DecodePool:
    """The process's decoding threads: at most `size` decodes run at once, always on these
    threads. Keeping decodes off the callers' threads (a server may have dozens) matters for
    memory too: glibc keeps an arena per thread, so freed decoder pictures would otherwise stay
    resident once per caller thread instead of once per decoding thread."""

    def __init__(self, size: int):
        self._lock = threading.Lock()
        self._size = size
        self._executor = None
        self._pid = None
        self._running = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def running(self) -> int:
        return self._running

    def resize(self, size: int) -> None:
        with self._lock:
            old, self._executor, self._size = self._executor, None, size
        if old is not None and self._pid == os.getpid():
            old.shutdown(wait=False)  # its running and queued decodes still finish

    def submit(self, fn) -> Future:
        with self._lock:
            if self._executor is None or self._pid != os.getpid():  # none yet, or inherited through fork
                self._executor = ThreadPoolExecutor(self._size, thread_name_prefix="storm-video-decode")
                self._pid = os.getpid()
            return self._executor.submit(self._counted, fn)

    def _counted(self, fn):
        with self._lock:
            self._running += 1
        try:
            return fn()
        finally:
            with self._lock:
                self._running -= 1


_POOL = _DecodePool(max(1, min(4, os.cpu_count() or 1)))


def run_decode(fn, budget: Budget):
    """fn() on one of the process's decoding threads; returns its result or raises its error.

    While the call waits for a thread, `budget` (deadline and cancel) is checked here; once it
    runs, the decoding thread checks it between packets, and the deadline is also enforced
    here, so a caller never waits past `timeout_s` even while FFmpeg is inside one long call.
    Whenever this caller stops waiting (timeout, cancel, KeyboardInterrupt), the decode is
    told to stop at its next check.
    """
    future = _POOL.submit(fn)
    try:
        while True:
            try:
                return future.result(timeout=_POLL_S)
            except FutureTimeout:
                if not future.running():
                    budget.check(waiting=f"waiting for a decode slot ({_POOL.running} of {_POOL.size} busy)")
                else:  # the decoding thread checks `cancel`; this one only keeps the deadline
                    budget.check_deadline()
    except BaseException:
        future.cancel()
        budget.abort()
        raise


def set_max_concurrent_decodes(limit: int) -> None:
    """At most `limit` `load_video` calls decode at once in this process; others wait (default:
    the CPU count, at most 4). Takes effect for new calls; running decodes finish."""
    _POOL.resize(check_int("max concurrent decodes", limit))


def max_concurrent_decodes() -> int:
    """The current limit (see `set_max_concurrent_decodes`)."""
    return _POOL.size
