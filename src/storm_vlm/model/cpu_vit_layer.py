"""A SigLIP encoder layer one frame at a time in C (`ssm/_vit_layer_kernel.c`), for CPU inference in float32.

`vit_layer(lib, fused_layer(layer, x), x)`: (frames, T, D) -> (frames, T, D), transformers'
`SiglipEncoderLayer` result within float rounding, the frames split over torch's threads. Each
frame's activations stay in cache from the first LayerNorm to the last residual add, and every
product runs through one register-blocked kernel reading the weights where nn.Linear keeps them;
`vit_layers` runs several layers in a row the same way. `fused_layer_is_faster` says whether it or
the layer's separate passes (`fast_paths._LeanSiglipLayer`) run a call: timed per layer shape on this
CPU, because which wins depends on the caches and the widths.

tests/test_vit_layer_kernel.py checks it against transformers' layer.
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import nn

from storm_vlm.model.cpu_attention import ATTENTION_KERNEL_ENV
from storm_vlm.model.matmul_backend import plain_linear, timed
from storm_vlm.model.ssm import _threads, cpu_kernel

__all__ = ["fused_layer", "fused_layer_is_faster", "vit_layer", "vit_layers", "vit_layer_choices"]

_LAYER_WORK = 1 << 22  # multiply-adds per thread at least: a hand-off to a worker costs tens of microseconds
_TIMED_WORK = 1 << 26  # multiply-adds of a call at least before the fused and the separate passes are timed
_SAMPLE_WORK = 1 << 27  # multiply-adds they are timed on at most (whole frames: at least one)
_CHOICE: dict = {}  # (T, D, I, heads) -> "fused" | "separate"


# layer -> (key, its _LayerStruct or None): beside the layer, not on it, so copying or pickling a model
# never meets a ctypes structure of raw addresses
_STRUCTS = weakref.WeakKeyDictionary()
_PARAMS = ("ln1w", "ln1b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "ln2w", "ln2b", "w1", "b1", "w2", "b2")


class _LayerStruct(ctypes.Structure):
    """`storm_vit_layer` of the C kernel: one layer's sizes and parameter addresses."""

    _fields_ = [("d", ctypes.c_int64), ("i_dim", ctypes.c_int64), ("heads", ctypes.c_int64), ("eps1", ctypes.c_float),
                ("eps2", ctypes.c_float), ("scale", ctypes.c_float), *((name, ctypes.c_void_p) for name in _PARAMS)]


def _layer_struct(layer) -> _LayerStruct | None:
    """The layer as the kernel reads it, or None where it does not apply: plain LayerNorms and biased
    Linear layers (no hooks) of SigLIP's shapes with contiguous float32 parameters, d divisible by the
    heads, a positive scale. Kept in `_STRUCTS` while the layer's parameters stay the same tensors in
    the same places (the kernel reads them in place, so new values written into them need nothing).
    Every call of a layer asks, so modules and parameters are read from their dicts (nn.Module's
    attribute lookups would cost as much as a frame's layer at the bench widths)."""
    mods = layer._modules
    attn, mlp = mods["self_attn"], mods["mlp"]
    n1, n2 = mods["layer_norm1"], mods["layer_norm2"]
    linears = (*(attn._modules[n] for n in ("q_proj", "k_proj", "v_proj", "out_proj")),
               *(mlp._modules[n] for n in ("fc1", "fc2")))
    if not (all(map(plain_linear, linears)) and type(n1) is type(n2) is nn.LayerNorm):
        return None
    params = [m._parameters.get(name) for m in (n1, *linears[:4], n2, *linears[4:]) for name in ("weight", "bias")]
    if any(t is None for t in params):
        return None
    key = (n1.eps, n2.eps, attn.scale, attn.num_heads, *map(id, params), *(t.data_ptr() for t in params))
    cached = _STRUCTS.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1]
    d, inter = params[0].shape[0], params[12].shape[0]
    shapes = [(d,)] * 2 + [(d, d), (d,)] * 4 + [(d,)] * 2 + [(inter, d), (inter,), (d, inter), (d,)]
    ok = (all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and tuple(t.shape) == shape
              for t, shape in zip(params, shapes))
          and tuple(n1.normalized_shape) == tuple(n2.normalized_shape) == (d,) and d % attn.num_heads == 0
          and attn.scale > 0)
    struct = _LayerStruct(d, inter, attn.num_heads, n1.eps, n2.eps, attn.scale,
                          *(t.data_ptr() for t in params)) if ok else None
    _STRUCTS[layer] = (key, struct)
    return struct


def fused_layer(layer, x: torch.Tensor) -> _LayerStruct | None:
    """The layer as `vit_layer` reads it, where it computes this call: x (frames, T, D) float32 on CPU,
    no autocast, a layer the kernel reads (`_layer_struct`) of width D; else None. The MLP's
    activation is taken to be tanh-GELU (SigLIP's `gelu_pytorch_tanh`): the caller checks it."""
    if x.dtype != torch.float32 or x.dim() != 3 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return None
    struct = _layer_struct(layer)
    return struct if struct is not None and struct.d == x.shape[-1] else None


def _work(t: int, d: int, inter: int) -> int:
    """Multiply-adds of one frame through the layer."""
    return t * d * (4 * d + 2 * inter + 2 * t)


def vit_layer(lib, layer: _LayerStruct, x: torch.Tensor) -> torch.Tensor:
    """transformers' SigLIP encoder layer on x (frames, T, D), one frame at a time in C: a new
    contiguous tensor (x, any strides, is only read). `layer`: what `fused_layer` gave for x."""
    return vit_layers(lib, [layer], x)


def vit_layers(lib, layers: list[_LayerStruct], x: torch.Tensor) -> torch.Tensor:
    """Several layers in a row (each what `fused_layer` gave for x, one width) on x, groups of frames
    through all of them before the next group: the same bits as `vit_layer` once per layer, without
    the frames leaving the cache between layers."""
    frames, t, d = x.shape
    y = x.new_empty(frames, t, d)
    table = (ctypes.c_void_p * len(layers))(*map(ctypes.addressof, layers))
    args = (table, len(layers), x.data_ptr(), *x.stride(), y.data_ptr(), t)
    work = sum(_work(t, d, layer.i_dim) for layer in layers)
    spans = _threads.spans(frames, max(1, _LAYER_WORK // max(work, 1)))
    if any(_threads.run_all(lib.storm_vit_layers_f32, [(*args, f0, f1) for f0, f1 in spans])):
        raise MemoryError("storm_vlm: no memory for the ViT layer kernel's scratch")
    return y


def fused_layer_is_faster(lib, layer: _LayerStruct, x: torch.Tensor, separate) -> bool:
    """Whether `vit_layer` should run this call rather than `separate(x)` (the layer's own passes).
    Timed, not assumed, once per (T, D, I, heads) on the first call of at least `_TIMED_WORK`
    multiply-adds, both on its first frames (`_SAMPLE_WORK` multiply-adds, one frame at least; a
    frame of a real-width SigLIP is timed once after a warm-up): which wins depends on the CPU's
    caches and on the widths. Smaller calls take the fused kernel untimed;
    STORM_VLM_ATTENTION_KERNEL=1 (true/on/yes) pins it (no timing: the same result every run)."""
    if cpu_kernel.switched_on(ATTENTION_KERNEL_ENV):
        return True
    frames, t, d = x.shape
    work = _work(t, d, layer.i_dim)
    if frames * work < _TIMED_WORK:
        return True
    key = (t, d, layer.i_dim, layer.heads)
    choice = _CHOICE.get(key)
    if choice is None:
        sample = x[: max(1, _SAMPLE_WORK // work)]
        rounds = (5, 2) if work <= _SAMPLE_WORK else (1, 1)
        times = timed({"fused": lambda: vit_layer(lib, layer, sample), "separate": lambda: separate(sample)}, *rounds)
        choice = min(times, key=times.get)
        _CHOICE[key] = choice
    return choice == "fused"


def vit_layer_choices() -> dict:
    """What `fused_layer_is_faster` timed in this process: {(T, D, I, heads): "fused" | "separate"}."""
    return dict(_CHOICE)
