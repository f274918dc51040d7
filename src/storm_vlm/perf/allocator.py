"""glibc allocator tuning for CPU processes (`tune_cpu_allocator`).

Every `storm-vlm` command calls it on start (cli.py); library users call it themselves, since it
is process-wide: nothing here runs on import. (No torch here: the CLI imports this before it knows
whether a command needs torch.)
"""

from __future__ import annotations

import ctypes

__all__ = ["tune_cpu_allocator", "allocator_state"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit); a tensor larger than
# that still gets its own mapping, whose first-touch faults are small next to the work on it.
_MMAP_THRESHOLD = 32 * 2**20
_TRIM_THRESHOLD = 2**31 - 1
_ALLOCATOR_STATE: dict = {"tuned": False}


def tune_cpu_allocator() -> dict:
    """Keep freed CPU memory in the process for reuse instead of handing it back to the kernel.

    With glibc's defaults every tensor of more than ~128 KiB-32 MiB is a fresh mmap (or fresh
    heap above a trimmed top) and each of its 4 KiB pages is mapped and zeroed by the kernel on
    first touch (a minor fault). An inference allocates such tensors all the time (every Linear
    output, every KV-cache append), so on a CPU the kernel's page zeroing can cost a large share of
    a prefill; `storm-vlm profile` reports the fault count per row (`page_faults`) and
    `--no-tune-malloc` shows the difference on a given host. This sets M_MMAP_THRESHOLD to 32 MiB
    (the largest glibc allows) and a high M_TRIM_THRESHOLD, so freed blocks are reused — what
    jemalloc/tcmalloc, which PyTorch's CPU tuning guide recommends, do too. The cost: the process
    keeps its peak heap resident (`malloc_trim(0)` still returns it; the profiler calls it before
    each row). Process-wide and irreversible; call it once at the start of a long-lived CPU
    inference process. Linux/glibc only: elsewhere it does nothing.

    Returns {"tuned": bool, "mmap_threshold": bytes, "trim_threshold": bytes} or with "reason".
    """
    if _ALLOCATOR_STATE.get("tuned"):
        return dict(_ALLOCATOR_STATE)
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD)) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_TRIM_THRESHOLD)) == 1
    except (OSError, AttributeError) as exc:
        _ALLOCATOR_STATE.update(tuned=False, reason=f"no glibc mallopt ({exc})")
        return dict(_ALLOCATOR_STATE)
    if ok:
        _ALLOCATOR_STATE.clear()
        _ALLOCATOR_STATE.update(tuned=True, mmap_threshold=_MMAP_THRESHOLD, trim_threshold=_TRIM_THRESHOLD)
    else:
        _ALLOCATOR_STATE.update(tuned=False, reason="mallopt refused the thresholds")
    return dict(_ALLOCATOR_STATE)


def allocator_state() -> dict:
    """What `tune_cpu_allocator` did in this process: {"tuned": bool, ...} (a copy)."""
    return dict(_ALLOCATOR_STATE)
