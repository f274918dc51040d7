"""The matmul backend (`_MeasuredLinear`): every `nn.Linear` of the model picks, per weight shape
and number of input rows (in power-of-two buckets from `_MEASURE_MIN_ROWS` up to
`_MEASURE_ROWS`, one bucket above), the fastest of torch's default BLAS (`F.linear`), oneDNN
(`torch.ops.mkldnn._linear_pointwise` on the same weight, no copy) and this project's C kernel
(`ssm/_linear_kernel.c`, on a packed copy of the weight kept beside it), by timing them on the
first input of that bucket (on at most `_MEASURE_ROWS` of its rows) and caching the answer for the
process. Which one wins depends on the CPU, its ISA, the shape and the row count (the libraries
block the product differently and are sized for large matrices, the C kernel for small widths), so
it is measured, never assumed. `STORM_VLM_MATMUL=blas|onednn|storm` pins the choice (e.g. for
bit-for-bit reproducibility across runs; they differ by float rounding only). bf16 is not chosen
here: it is a precision (`storm_vlm.precision`, whose "auto" takes bf16 autocast where the CPU has
native bf16). `fast_paths.enable_fast_paths` installs it (`use_measured_linears`).
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from storm_vlm.model.ssm import _threads, cpu_kernel
from storm_vlm.model.ssm._derived import derived

__all__ = ["matmul_choices", "measured_linear", "packed_weight", "plain_linear", "storm_linear", "use_measured_linears",
           "fastest", "timed"]

_MATMUL_ENV = "STORM_VLM_MATMUL"
_MEASURE_MIN_ROWS = 64  # fewer rows (decode, short prompts): torch's default, nothing to win
_MEASURE_ROWS = 2048  # rows timed at most when choosing; also the last bucket (bounds the cost at large widths)
_MATMUL_CHOICE: dict = {}  # (in, out, bias, rows bucket) -> "blas" | "onednn" | "storm"
_BACKENDS = ("blas", "onednn", "storm")
_LINEAR_WORK = 1 << 22  # multiply-adds per thread at least for the C kernel


def _onednn_linear(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def packed_weight(weight: torch.Tensor, bias: torch.Tensor | None, lanes: int) -> tuple:
    """The weight (out, in) as `storm_linear_f32` reads it — transposed to (in, out) with out padded
    with zeros to whole vectors of `lanes` — and the bias padded alike; kept (`_derived.derived`)
    until either changes or the width does."""
    return derived("packed linear", _pack, weight, bias, extra=(lanes,))


def _pack(weight: torch.Tensor, bias: torch.Tensor | None, lanes: int) -> tuple:
    out, k = weight.shape
    ldw = -(-out // lanes) * lanes
    w = weight.new_zeros(k, ldw)
    w[:, :out] = weight.t()
    b = None
    if bias is not None:
        b = bias.new_zeros(ldw)
        b[:out] = bias
    return w, b


def storm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lib=None) -> torch.Tensor:
    """F.linear(x, weight, bias) through `storm_linear_f32` (float32, a contiguous weight), the rows
    split over torch's threads; `lib`: the C kernel library (default: `cpu_kernel.load_library()`,
    which must not be None)."""
    lib = lib or cpu_kernel.load_library()
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    w, b = packed_weight(weight, bias, lib.storm_lanes)
    y = x2.new_empty(rows, n)
    args = (x2.data_ptr(), x2.stride(0), k, w.data_ptr(), w.shape[1], None if b is None else b.data_ptr(),
            y.data_ptr(), n, n)
    spans = _threads.spans(rows, max(1, _LINEAR_WORK // max(k * n, 1)), 64)
    _threads.run_all(lib.storm_linear_f32, [(*args, r0, r1) for r0, r1 in spans])
    return y.view(*x.shape[:-1], n)


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
    """"blas", "onednn" or "storm" for this weight shape and row count: pinned by STORM_VLM_MATMUL
    (where that backend exists here), else timed once per rows bucket on `x`."""
    pinned = os.environ.get(_MATMUL_ENV, "auto")
    if pinned in _BACKENDS:
        return pinned if _available(pinned) else "blas"
    rows = x.numel() // x.shape[-1]
    key = (weight.shape[1], weight.shape[0], bias is not None, _rows_bucket(rows))
    choice = _MATMUL_CHOICE.get(key)
    if choice is None:
        sample = x.reshape(-1, x.shape[-1])[:_MEASURE_ROWS]
        candidates = {"blas": lambda: F.linear(sample, weight, bias),
                      "onednn": lambda: _onednn_linear(sample, weight, bias),
                      "storm": lambda: storm_linear(sample, weight, bias)}
        fns = {name: fn for name, fn in candidates.items() if _available(name)}
        try:
            choice = fastest(fns)
        except RuntimeError:  # oneDNN refused this shape or layout
            fns.pop("onednn", None)
            choice = fastest(fns)
        _MATMUL_CHOICE[key] = choice
    return choice


def _available(backend: str) -> bool:
    if backend == "onednn":
        return torch.backends.mkldnn.is_available()
    return backend == "blas" or cpu_kernel.load_library() is not None


def matmul_choices() -> dict:
    """The backend each Linear shape uses in this process: {(in, out, bias, rows bucket): "blas" |
    "onednn" | "storm"}."""
    return dict(_MATMUL_CHOICE)


def measured_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), for CPU fp32 inference on the fastest backend for the shape
    (`_matmul_backend`); autograd, autocast, other dtypes and devices, and inputs under
    `_MEASURE_MIN_ROWS` rows take `F.linear`."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and x.dim() >= 2 and weight.is_contiguous()
            and x.numel() >= _MEASURE_MIN_ROWS * x.shape[-1] and not torch.is_autocast_enabled("cpu")):
        backend = _matmul_backend(x, weight, bias)
        if backend == "onednn":
            return _onednn_linear(x, weight, bias)
        lib = cpu_kernel.load_library() if backend == "storm" else None
        if lib is not None:  # (None: the kernels were switched off after this shape's choice)
            return storm_linear(x, weight, bias, lib)
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
