"""Speed paths that leave a STORM model's outputs unchanged; `enable_fast_paths(model)` turns them on.

- On CPU inference the vision tower's tanh-GELU is evaluated as x·sigmoid(2u) (`_GELUTanhCPU`):
  the same function through sigmoid and in-place ops, where PyTorch's CPU tanh-GELU goes through
  a slow vectorised tanh.
- One-token decode attention with grouped KV heads on CPU runs as one r x L product per KV head
  (`storm_sdpa`, registered with transformers' AttentionInterface when first enabled).
- `StormKVCache`: a DynamicCache whose layers append in place into a buffer with spare room,
  instead of concatenating (copying the whole cache) at every generated token.

Each path falls back to the plain computation wherever it does not apply (autograd, other
dtypes or devices, masks); tests/test_cpu_fast_paths.py checks outputs are identical.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from transformers.activations import GELUTanh
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

__all__ = ["enable_fast_paths", "StormKVCache", "STORM_SDPA"]


class _GELUTanhCPU(nn.Module):
    """GELU with the tanh approximation (SigLIP's `gelu_pytorch_tanh`), computed faster on CPU.

    0.5·x·(1 + tanh(u)) = x·sigmoid(2u), u = √(2/π)·(x + 0.044715·x³): the same function, evaluated
    with sigmoid and in-place ops. PyTorch's CPU `gelu(approximate="tanh")` goes through a slow
    vectorised tanh; this form is about twice as fast and differs by < 1e-6 (float rounding). Used for
    fp32/fp64 CPU inference only; with autograd, other dtypes or devices it is `F.gelu(x, "tanh")`.
    """

    _TWO_C = 2.0 * math.sqrt(2.0 / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64)
                or (torch.is_grad_enabled() and x.requires_grad)):
            return nn.functional.gelu(x, approximate="tanh")
        y = x * x
        y.mul_(0.044715 * self._TWO_C).add_(self._TWO_C).mul_(x)
        return torch.sigmoid_(y).mul_(x)


def _fast_gelu_tanh(module: nn.Module) -> None:
    """Swap transformers' GELUTanh (the C `gelu(approximate="tanh")` variant) for `_GELUTanhCPU`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GELUTanh and isinstance(getattr(child, "act", None), functools.partial):
                setattr(parent, name, _GELUTanhCPU())


STORM_SDPA = "storm_sdpa"


def _storm_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                          **kwargs):
    """transformers' SDPA attention, with one faster case: a single query token on CPU with grouped KV heads.

    query (B, H, 1, hd), key/value (B, G, L, hd) with H = G·r. transformers hands this (no mask) to
    `scaled_dot_product_attention(..., enable_gqa=True)`, whose CPU kernel then runs H separate
    1 x L products and reads each KV head r times; here the r query heads of a group become r query
    rows of that group's KV head — (B, G, r, hd) against (B, G, L, hd): one r x L product per KV
    head, same result (what transformers itself does when a mask is present). Every other
    case (prefill, masks, CUDA, ...) goes to `sdpa_attention_forward` unchanged.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.shape[2] == 1 and groups > 1 and query.device.type == "cpu" and attention_mask is None
        and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
        and not kwargs.get("output_attentions", False) and key.shape[1] * groups == query.shape[1]
    ):
        b, h, _, hd = query.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, h // groups, groups, hd), key, value, dropout_p=dropout, scale=scaling
        )
        return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _use_storm_sdpa(config) -> None:
    """Switch a text config from "sdpa" to STORM_SDPA (same masks and kernels, faster GQA decode on CPU)."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if config._attn_implementation == "sdpa" and heads and kv < heads:
        AttentionInterface.register(STORM_SDPA, _storm_sdpa_attention)  # idempotent
        AttentionMaskInterface.register(STORM_SDPA, sdpa_mask)
        config._attn_implementation = STORM_SDPA


class _GrowingKVLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place into a buffer with spare room.

    `DynamicLayer.update` concatenates, copying the whole cache of the layer at every generated
    token: O(context) bytes per step, twice what attention reads. Here `keys` / `values` are views
    (B, H, L, hd) into buffers (B, H, capacity, hd) that grow by 1/16 (at least 128 tokens) when
    full, so an append copies only the new tokens (amortised: the whole cache once per ~L/16
    steps). Values, shapes and every other `DynamicLayer` method are unchanged (`crop` keeps the
    view, so the next append overwrites the dropped tokens; an operation that replaces the tensors,
    e.g. `batch_select_indices`, makes the next append re-adopt them into a fresh buffer). When
    gradients flow into the cache it falls back to concatenation (in-place writes would break
    autograd's saved views).
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buf = self._value_buf = None

    def _owns(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> bool:
        kb, vb = self._key_buf, self._value_buf
        if kb is None or needed > kb.shape[-2] or self.keys.numel() == 0:
            return False
        return (
            self.keys.data_ptr() == kb.data_ptr() and self.values.data_ptr() == vb.data_ptr()
            and self.keys.stride() == kb.stride() and self.values.stride() == vb.stride()
            and self.keys.shape[:2] == key_states.shape[:2] == kb.shape[:2]
            and kb.dtype == key_states.dtype and vb.dtype == value_states.dtype
            and kb.device == key_states.device
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._key_buf = self._value_buf = None
            return super().update(key_states, value_states, *args, **kwargs)
        n = self.get_seq_length()
        needed = n + key_states.shape[-2]
        if not self._owns(key_states, value_states, needed):
            capacity = needed + max(128, needed // 16)
            kb = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
            vb = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
            if n:
                kb[:, :, :n].copy_(self.keys)
                vb[:, :, :n].copy_(self.values)
            self._key_buf, self._value_buf = kb, vb
        self._key_buf[:, :, n:needed].copy_(key_states)
        self._value_buf[:, :, n:needed].copy_(value_states)
        self.keys = self._key_buf[:, :, :needed]
        self.values = self._value_buf[:, :, :needed]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        super().reset()


class StormKVCache(DynamicCache):
    """`DynamicCache` whose full-attention layers append in place (see `_GrowingKVLayer`).

    What `StormForConditionalGeneration` uses when it creates a KV cache (in `generate`, or in
    `forward` with `use_cache=True` and no cache given); same contents as a `DynamicCache`.
    Sliding-window and other special layers stay as transformers builds them.
    """

    def __init__(self, ddp_cache_data=None, config=None, **kwargs):
        super().__init__(ddp_cache_data, config=config, **kwargs)
        self.layers = [self._growing(layer) if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = _GrowingKVLayer

    @staticmethod
    def _growing(layer: DynamicLayer) -> _GrowingKVLayer:
        new = _GrowingKVLayer()
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            new.update(layer.keys, layer.values)
        return new


def enable_fast_paths(model) -> None:
    """Turn the paths above on for a StormForConditionalGeneration (its constructor calls this)."""
    _use_storm_sdpa(model.language_model.config)
    _fast_gelu_tanh(model.vision_tower)
