"""Tensors derived from parameters for CPU inference (a weight packed for the C product kernel, a
conv's taps transposed, Mamba's A = -exp(A_log)), computed once and reused while the parameters
stay as they are: at the bench widths each such small op costs as much as the Python around it,
and a mixer direction took several per call.

`derived` keys an entry on the tensors it is made from — their identity, version counter (bumped
by every in-place write: an optimizer step, `load_state_dict`, `copy_`) and storage address (a move
to another device or dtype is a new tensor) — so a changed parameter is seen at the next call. An
entry is dropped when its first tensor is freed. The results carry no autograd graph: callers use
them only where nothing records gradients through the parameters.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

__all__ = ["derived"]

_CACHE: dict = {}  # (kind, id(first tensor)) -> (key, value)


def derived(kind: str, fn: Callable, *tensors: torch.Tensor | None, extra: tuple = ()):
    """``fn(*tensors, *extra)``, cached per ``kind`` and first tensor until any of ``tensors`` (None
    allowed after the first) or ``extra`` (hashable) changes. Inference tensors (made under
    `torch.inference_mode`) track no versions: for them it is computed at every call."""
    if any(t is not None and t.is_inference() for t in tensors):
        return fn(*tensors, *extra)
    key = (extra, *(None if t is None else (id(t), t._version, t.data_ptr()) for t in tensors))
    slot = (kind, id(tensors[0]))
    hit = _CACHE.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = fn(*tensors, *extra)
    if slot not in _CACHE:
        weakref.finalize(tensors[0], _CACHE.pop, slot, None)
    _CACHE[slot] = (key, value)
    return value
