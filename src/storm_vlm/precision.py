"""Which precision is fast on the hardware at hand.

bf16 autocast only pays on CPUs with native bf16 matrix instructions (AVX512-BF16 / AMX);
on an AVX2-only CPU oneDNN emulates it and a bf16 matmul runs ~50x slower than fp32
(measured here: 36 vs 0.5 GFLOP/s at 1024x1024, one thread). fp16 on CPU is slower still.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (oneDNN's own check)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
