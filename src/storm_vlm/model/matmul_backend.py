"""The matmul backend (`_MeasuredLinear`): every `nn.Linear` of the model picks, per weight shape
and number of input rows (in power-of-two buckets from `_MEASURE_MIN_ROWS` up to
`_MEASURE_ROWS`, one bucket above), the faster of torch's default BLAS (`F.linear`) and oneDNN
(`torch.ops.mkldnn._linear_pointwise` on the same weight, no copy), by timing both on the first
input of that bucket (on at most `_MEASURE_ROWS` of its rows) and caching the answer for the
process. Which one wins depends on the CPU, its ISA, the shape and the row count (the two
libraries block the product differently, so the winner for one weight can change with the rows),
so it is measured, never assumed. `STORM_VLM_MATMUL=blas|onednn` pins the choice (e.g. for
bit-for-bit reproducibility across runs; the two differ by float rounding only). bf16 is not
chosen here: it is a precision (`storm_vlm.precision`, whose "auto" takes bf16 autocast where the
CPU has native bf16). `fast_paths.enable_fast_paths` installs it (`use_measured_linears`).
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["matmul_choices", "measured_linear", "plain_linear", "use_measured_linears", "fastest", "timed"]

_MATMUL_ENV = "STORM_VLM_MATMUL"
_MEASURE_MIN_ROWS = 64  # fewer rows (decode, short prompts): torch's default, nothing to win
_MEASURE_ROWS = 2048  # rows timed at most when choosing; also the last bucket (bounds the cost at large widths)
_MATMUL_CHOICE: dict = {}  # (in, out, bias, rows bucket) -> "blas" | "onednn"


def _onednn_linear(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def timed(fns: dict, repeats: int = 5, warmup: int = 2) -> dict:
    """{key: best seconds of `repeats` alternating runs} of each callable, after `warmup` rounds
    (oneDNN builds its kernel for a new shape on the first call; both libraries touch fresh buffers)."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def fastest(fns: dict, repeats: int = 5, warmup: int = 2) -> str:
    """The key of the fastest callable (`timed`)."""
    best = timed(fns, repeats, warmup)
    return min(best, key=best.get)


def _rows_bucket(rows: int) -> int:
    """The power of two at or below `rows`, at most `_MEASURE_ROWS`: choices are cached per bucket."""
    return min(1 << (rows.bit_length() - 1), _MEASURE_ROWS)


def _matmul_backend(x: torch.Tensor, weight: torch.Tensor, bias) -> str:
    """"blas" or "onednn" for this weight shape and row count: pinned by STORM_VLM_MATMUL, else timed
    once per rows bucket on `x`."""
    pinned = os.environ.get(_MATMUL_ENV, "auto")
    if pinned in ("blas", "onednn"):
        return pinned if pinned == "blas" or torch.backends.mkldnn.is_available() else "blas"
    rows = x.numel() // x.shape[-1]
    key = (weight.shape[1], weight.shape[0], bias is not None, _rows_bucket(rows))
    choice = _MATMUL_CHOICE.get(key)
    if choice is None:
        choice = "blas"
        if torch.backends.mkldnn.is_available():
            sample = x.reshape(-1, x.shape[-1])[:_MEASURE_ROWS]
            try:
                choice = fastest({"blas": lambda: F.linear(sample, weight, bias),
                                   "onednn": lambda: _onednn_linear(sample, weight, bias)})
            except RuntimeError:  # oneDNN refused this shape or layout
                choice = "blas"
        _MATMUL_CHOICE[key] = choice
    return choice


def matmul_choices() -> dict:
    """The backend each Linear shape uses in this process: {(in, out, bias, rows bucket): "blas" | "onednn"}."""
    return dict(_MATMUL_CHOICE)


def measured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), for CPU fp32 inference on the faster of BLAS and oneDNN for the
    shape (`_matmul_backend`); autograd, autocast, other dtypes and devices, and inputs under
    `_MEASURE_MIN_ROWS` rows take `F.linear`."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and x.dim() >= 2 and weight.is_contiguous()
            and x.numel() >= _MEASURE_MIN_ROWS * x.shape[-1] and not torch.is_autocast_enabled("cpu")
            and _matmul_backend(x, weight, bias) == "onednn"):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class _MeasuredLinear(nn.Linear):
    """`nn.Linear` through `measured_linear`. Same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return measured_linear(x, self.weight, self.bias)


def plain_linear(module: nn.Module) -> bool:
    """Whether `module` computes F.linear(x, its weight, its bias) and nothing else: an nn.Linear or
    `_MeasuredLinear` (no subclass with its own forward) without hooks."""
    return (type(module) in (nn.Linear, _MeasuredLinear) and not module._forward_hooks
            and not module._forward_pre_hooks)


def use_measured_linears(module: nn.Module) -> None:
    """Make every plain `nn.Linear` under `module` a `_MeasuredLinear` (the same object, parameters
    and hooks: only its class changes)."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = _MeasuredLinear
