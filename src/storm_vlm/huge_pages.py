"""Transparent huge pages (2 MiB) for CPU tensors: a loaded model's weights (`place_in_huge_pages`,
on buffers from `huge_page_buffers`) and large scratch tensors (`advise_huge_pages`).

Streaming through memory on 4 KiB pages takes a TLB miss every 4 KiB, and the hardware prefetchers
stop at every page boundary; fresh 4 KiB pages are also faulted in one by one on first touch.
The loader (`storm_vlm.inference.prepare_for_inference`) places a CPU model's weights and the
selective scan advises its L-sized buffers; nothing here runs on import. STORM_VLM_HUGE_PAGES=0
turns all of it off.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["huge_pages_unavailable", "advise_huge_pages", "huge_page_buffers", "place_in_huge_pages"]


_HUGE_PAGE = 2 * 2**20  # x86-64 and arm64 (4 KiB base pages): a PMD-sized transparent huge page
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_unavailable() -> str | None:
    """None where this process can ask for transparent huge pages; otherwise why it cannot (not Linux,
    THP off in the kernel, or STORM_VLM_HUGE_PAGES=0)."""
    if os.environ.get("STORM_VLM_HUGE_PAGES", "1") == "0":
        return "STORM_VLM_HUGE_PAGES=0"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "no transparent huge pages on this platform"
    mode = _thp_mode()
    if mode is None:
        return f"no {_THP_MODE}"
    return "transparent huge pages are off in the kernel ([never])" if "[never]" in mode else None


@functools.lru_cache(maxsize=None)
def _thp_mode() -> str | None:
    try:
        return _THP_MODE.read_text()
    except OSError:
        return None


def _load_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise() if hasattr(mmap, "MADV_HUGEPAGE") else None


def advise_huge_pages(t: torch.Tensor, min_bytes: int = 4 * _HUGE_PAGE) -> torch.Tensor:
    """`t`, its memory (the whole 2 MiB pages inside it) advised MADV_HUGEPAGE when it is a CPU tensor of
    at least `min_bytes`; advice only, and nothing where `huge_pages_unavailable()`. For large tensors
    about to be written: their pages are then faulted in 2 MiB at a time."""
    nbytes = t.numel() * t.element_size()
    if (_madvise is not None and t.device.type == "cpu" and nbytes >= min_bytes
            and huge_pages_unavailable() is None):
        start = (t.data_ptr() + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        end = (t.data_ptr() + nbytes) & ~(_HUGE_PAGE - 1)
        if end > start:
            _madvise(start, end - start, mmap.MADV_HUGEPAGE)
    return t


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
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so it is mapped 2 MiB at a time
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
    faster (docs/performance.md). Small weights, as most of
    a narrow model's, never get huge pages from the allocator (only allocations of 2 MiB and more
    can), so they are packed side by side here. Values, shapes, dtypes and the Parameter objects are
    unchanged, each parameter keeps a storage of its own (`huge_page_buffers`), and the old storage
    is freed. For inference models (the loader calls it on CPU): it changes every parameter's
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
