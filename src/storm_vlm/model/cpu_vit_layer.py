"""A SigLIP encoder layer one frame at a time in C (`ssm/_vit_layer_kernel.c`), for CPU inference in float32.

`vit_layer(lib, layer, x)`: (frames, T, D) -> (frames, T, D), transformers' `SiglipEncoderLayer`
result within float rounding, the frames split over torch's threads. Each frame's activations stay in
cache from the first LayerNorm to the last residual add, and every product runs through one
register-blocked kernel reading the weights where nn.Linear keeps them. `fused_layer_is_faster` says
whether it or the layer's separate passes (`fast_paths._LeanSiglipLayer`) run a call: timed per layer
shape on this CPU, because at real SigLIP widths the weights no longer fit in cache and BLAS wins.

tests/test_vit_layer_kernel.py checks it against transformers' layer.
"""

from __future__ import annotations

import torch
from torch import nn

from storm_vlm.model.cpu_attention import ATTENTION_KERNEL_ENV
from storm_vlm.model.matmul_backend import plain_linear, timed
from storm_vlm.model.ssm import _threads, cpu_kernel

__all__ = ["fused_layer_applies", "fused_layer_is_faster", "vit_layer", "vit_layer_choices"]

_LAYER_WORK = 1 << 22  # multiply-adds per thread at least: a hand-off to a worker costs tens of microseconds
_TIMED_WORK = 1 << 26  # multiply-adds of a call at least before the fused and the separate passes are timed
_SAMPLE_FRAMES = 8  # frames they are timed on at most
_CHOICE: dict = {}  # (T, D, I, heads) -> "fused" | "separate"


def _float32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def fused_layer_applies(layer, x: torch.Tensor) -> bool:
    """Whether `vit_layer` computes this call: x (frames, T, D) float32 on CPU, no autocast, plain
    LayerNorms and biased Linear layers of SigLIP's shapes with contiguous float32 parameters. The
    MLP's activation is taken to be tanh-GELU (SigLIP's `gelu_pytorch_tanh`): the caller checks it."""
    attn, mlp = layer.self_attn, layer.mlp
    d = x.shape[-1]
    inter = mlp.fc1.out_features
    linears = {attn.q_proj: (d, d), attn.k_proj: (d, d), attn.v_proj: (d, d), attn.out_proj: (d, d),
               mlp.fc1: (inter, d), mlp.fc2: (d, inter)}
    norms = (layer.layer_norm1, layer.layer_norm2)
    return (x.dtype == torch.float32 and x.dim() == 3 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
            and all(type(n) is nn.LayerNorm and n.weight is not None and n.bias is not None
                    and _float32(n.weight, n.bias) and tuple(n.normalized_shape) == (d,) for n in norms)
            and all(plain_linear(p) and p.bias is not None and _float32(p.weight, p.bias)
                    and tuple(p.weight.shape) == shape for p, shape in linears.items())
            and d % attn.num_heads == 0 and attn.scale > 0)


def _work(t: int, d: int, inter: int) -> int:
    """Multiply-adds of one frame through the layer."""
    return t * d * (4 * d + 2 * inter + 2 * t)


def vit_layer(lib, layer, x: torch.Tensor) -> torch.Tensor:
    """transformers' SigLIP encoder layer on x (frames, T, D), one frame at a time in C: a new
    contiguous tensor (x, any strides, is only read). Needs `fused_layer_applies(layer, x)`."""
    frames, t, d = x.shape
    attn, mlp = layer.self_attn, layer.mlp
    n1, n2 = layer.layer_norm1, layer.layer_norm2
    y = x.new_empty(frames, t, d)
    ptr = torch.Tensor.data_ptr
    weights = [ptr(p) for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj) for p in (lin.weight, lin.bias)]
    args = (ptr(x), *x.stride(), ptr(y), t, d, mlp.fc1.out_features, attn.num_heads, ptr(n1.weight), ptr(n1.bias), n1.eps,
            *weights, ptr(n2.weight), ptr(n2.bias), n2.eps, ptr(mlp.fc1.weight), ptr(mlp.fc1.bias),
            ptr(mlp.fc2.weight), ptr(mlp.fc2.bias), attn.scale)
    spans = _threads.spans(frames, max(1, _LAYER_WORK // max(_work(t, d, mlp.fc1.out_features), 1)))
    if any(_threads.run_all(lib.storm_vit_layer_f32, [(*args, f0, f1) for f0, f1 in spans])):
        raise MemoryError("storm_vlm: no memory for the ViT layer kernel's scratch")
    return y


def fused_layer_is_faster(lib, layer, x: torch.Tensor, separate) -> bool:
    """Whether `vit_layer` should run this call rather than `separate(x)` (the layer's own passes).
    Timed, not assumed, once per (T, D, I, heads) on the first call of at least `_TIMED_WORK`
    multiply-adds, both on its first `_SAMPLE_FRAMES` frames: the fused kernel wins while a layer's
    weights fit in cache and loses to BLAS at real SigLIP widths. Smaller calls take the fused kernel
    untimed; STORM_VLM_ATTENTION_KERNEL=1 (true/on/yes) pins it (no timing: the same result every run)."""
    if cpu_kernel.switched_on(ATTENTION_KERNEL_ENV):
        return True
    frames, t, d = x.shape
    inter = layer.mlp.fc1.out_features
    if frames * _work(t, d, inter) < _TIMED_WORK:
        return True
    key = (t, d, inter, layer.self_attn.num_heads)
    choice = _CHOICE.get(key)
    if choice is None:
        sample = x[:_SAMPLE_FRAMES]
        times = timed({"fused": lambda: vit_layer(lib, layer, sample), "separate": lambda: separate(sample)})
        choice = min(times, key=times.get)
        _CHOICE[key] = choice
    return choice == "fused"


def vit_layer_choices() -> dict:
    """What `fused_layer_is_faster` timed in this process: {(T, D, I, heads): "fused" | "separate"}."""
    return dict(_CHOICE)
