"""CPU memory placement: glibc allocator tuning (`tune_cpu_allocator`) and weights on transparent huge
pages (`place_in_huge_pages`, `huge_page_buffers`).

Every `storm-vlm` command tunes the allocator on start (cli.py), and the model loaders place a CPU
inference model's weights; library users call these themselves: nothing here runs on import.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["tune_cpu_allocator", "allocator_state", "huge_pages_unavailable", "huge_page_buffers",
           "place_in_huge_pages"]

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


_HUGE_PAGE = 2 * 2**20  # x86-64 and arm64 (4 KiB base pages): a PMD-sized transparent huge page
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_unavailable() -> str | None:
    """None where this process can ask for transparent huge pages; otherwise why it cannot (not Linux,
    THP off in the kernel, or STORM_VLM_HUGE_PAGES=0)."""
    if os.environ.get("STORM_VLM_HUGE_PAGES", "1") == "0":
        return "STORM_VLM_HUGE_PAGES=0"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "no transparent huge pages on this platform"
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return f"no {_THP_MODE}"
    return "transparent huge pages are off in the kernel ([never])" if "[never]" in mode else None


def huge_page_buffers(sizes: list[int]) -> list[torch.Tensor]:
    """One uint8 CPU tensor of each size in `sizes` (bytes, uninitialised), all in one anonymous mapping
    advised MADV_HUGEPAGE, starting at a 2 MiB boundary, each at a 64-byte boundary.

    Each tensor has a storage of its own (a slice of the mapping; the mapping is unmapped when the
    last of them is freed), so to transformers' tied-weight checks, safetensors and `copy.deepcopy`
    they are unrelated tensors, as separately allocated ones are. Raises OSError where
    `huge_pages_unavailable()` (check it first)."""
    reason = huge_pages_unavailable()
    if reason is not None:
        raise OSError(reason)
    ends = [(n + 63) // 64 * 64 for n in sizes]
    mapping = mmap.mmap(-1, sum(ends) + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the page faults then map 2 MiB pages
    view = memoryview(mapping)
    off = -ctypes.addressof(ctypes.c_char.from_buffer(mapping)) % _HUGE_PAGE
    out = []
    for n, step in zip(sizes, ends):
        out.append(torch.frombuffer(view[off:off + n], dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8))
        off += step
    return out


def place_in_huge_pages(module: nn.Module) -> int:
    """Move `module`'s CPU parameters into memory backed by transparent huge pages (2 MiB); returns the
    bytes moved (0 where `huge_pages_unavailable()`).

    A decode step reads every weight once per token, so its time is how fast the weights stream
    from memory. On 4 KiB pages that stream crosses a page every 4 KiB: a TLB miss each, and the
    hardware prefetchers stop at every page boundary; on 2 MiB pages a single core streams markedly
    faster (`python benchmarks/decode.py` prints this host's rate both ways). Small weights, as most of
    a narrow model's, never get huge pages from the allocator (only allocations of 2 MiB and more
    can), so they are packed side by side here. Values, shapes, dtypes and the Parameter objects are
    unchanged, each parameter keeps a storage of its own (`huge_page_buffers`), and the old storage
    is freed. For inference models (the loaders call it on CPU): it changes every parameter's
    `.data`, so a step built on the old storages (the decode step) is rebuilt, as after any weight
    change. Left where they are: parameters off the CPU, not contiguous, inference tensors, and any
    that shares its storage with another tensor of the module (a view, a tie through storage rather
    than through the same Parameter), which moving would untie.
    """
    if huge_pages_unavailable() is not None:
        return 0
    tensors = list(module.parameters()) + list(module.buffers())
    owners: dict[int, int] = {}
    for t in tensors:
        if t.device.type == "cpu" and t.numel():
            ptr = t.untyped_storage().data_ptr()
            owners[ptr] = owners.get(ptr, 0) + 1
    movable = [
        p for p in module.parameters()
        if p.device.type == "cpu" and p.numel() and p.is_contiguous() and not p.is_inference()
        and p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size()
        and owners[p.untyped_storage().data_ptr()] == 1
    ]
    if not movable:
        return 0
    sizes = [p.numel() * p.element_size() for p in movable]
    for p, buf in zip(movable, huge_page_buffers(sizes)):
        new = buf.view(p.dtype).view(p.shape)
        new.copy_(p.detach())
        p.data = new
    return sum(sizes)
