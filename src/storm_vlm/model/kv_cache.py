"""`StormKVCache`: a transformers `DynamicCache` whose layers append in place into a buffer with spare
room, instead of concatenating (copying the whole cache) at every generated token.

StormForConditionalGeneration creates it for `generate` and for `forward(use_cache=True)`; the decode
step (`decode.py`) writes a token's keys and values straight into its buffers.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["StormKVCache", "GrowingKVLayer", "reusable_start"]

_BUFFER_GENERATIONS = itertools.count()


def _pending_view(name: str) -> property:
    """`GrowingKVLayer.keys` / `.values`, stored as `name`: reading or assigning either first makes
    the views `advance` left pending."""
    def get(self):
        if self._pending is not None:
            self._make_views()
        return getattr(self, name)

    def set(self, t) -> None:
        if self._pending is not None:
            self._make_views()
        setattr(self, name, t)
    return property(get, set)


def keys_as_attention_reads_them(key_states: torch.Tensor, value_states: torch.Tensor) -> torch.Tensor:
    """Under autocast, keys in the values' autocast dtype: transformers' rotary embedding hands over
    float32 keys beside values in the autocast dtype, and every attention casts the keys to that
    dtype before reading them, so kept in it they take half the bytes and attention reads the same
    values. Otherwise the keys as they are."""
    device = key_states.device.type
    if (key_states.dtype != value_states.dtype and torch.is_autocast_enabled(device)
            and value_states.dtype == torch.get_autocast_dtype(device)):
        return key_states.to(value_states.dtype)
    return key_states


class GrowingKVLayer(DynamicLayer):
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

    Under autocast the keys are kept in the autocast dtype, as the values are (the attention casts
    them to it anyway; transformers' rotary embedding makes them float32).

    `advance` only counts: the views `keys` / `values` are made when next read (a decode step on
    every layer would otherwise make two views per layer per token, a sizeable share of a step's
    overhead). For the C decode step the layer also keeps its keys in that step's layout
    (`transposed_keys`: as much memory again as float32 keys, half that under bf16 autocast), filled by
    the step itself: positions from `_keys_t_len` on are (re)copied at the next step (which then sets
    the mark), so every writer of keys moves that mark back to where it writes (`update`, `reserve`, a
    new buffer). `generation` changes whenever the buffers do.
    """

    _pending: int | None = None  # set by `advance`: `keys` / `values` are views of this length, not made yet
    keys = _pending_view("_keys")
    values = _pending_view("_values")

    def _make_views(self) -> None:
        n, self._pending = self._pending, None
        self._keys, self._values = self._key_buf.narrow(2, 0, n), self._value_buf.narrow(2, 0, n)

    def get_seq_length(self) -> int:
        return self._pending if self._pending is not None else super().get_seq_length()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._set_buffers(None, None)

    def _set_buffers(self, kb, vb) -> None:
        self._pending = None  # callers have read (or drop) the views
        self._key_buf, self._value_buf = kb, vb
        self._keys_t, self._keys_t_len = None, 0  # a new buffer: the transposed keys start over
        self.generation = next(_BUFFER_GENERATIONS)

    def transposed_keys(self, lanes: int, pairs: bool = False) -> torch.Tensor:
        """The key buffer (B, H, capacity, hd) laid out for the C decode step as float32
        (B, H, ceil(capacity / lanes), hd, lanes) — `lanes` positions per block, component-major — or,
        with `pairs` (scores on bf16 q and k), as int32 (B, H, ceil(capacity / lanes), ceil(hd / 2),
        lanes), each a pair of consecutive components in bf16; its first `_keys_t_len` positions hold
        the current keys. Call after `reserve`."""
        kb = self._key_buf
        blocks = -(-kb.shape[2] // lanes)
        components = -(-kb.shape[3] // 2) if pairs else kb.shape[3]
        shape = (*kb.shape[:2], blocks, components, lanes)
        dtype = torch.int32 if pairs else torch.float32
        if self._keys_t is None or self._keys_t.shape != shape or self._keys_t.dtype != dtype:
            self._keys_t = torch.zeros(shape, dtype=dtype, device=kb.device)
            self._keys_t_len = 0
            self.generation = next(_BUFFER_GENERATIONS)
        return self._keys_t

    def drop_transposed_keys(self) -> None:
        """Free the decode step's copy of the keys (`transposed_keys`, as large as the keys again): a
        cache kept for later copying needs only its keys and values; a decode step remakes it."""
        self._keys_t, self._keys_t_len = None, 0

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
        key_states = keys_as_attention_reads_them(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._set_buffers(None, None)
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
            self._set_buffers(kb, vb)
        self._keys_t_len = min(self._keys_t_len, n)  # positions n.. are rewritten
        self._key_buf[:, :, n:needed].copy_(key_states)
        self._value_buf[:, :, n:needed].copy_(value_states)
        self.keys = self._key_buf[:, :, :needed]
        self.values = self._value_buf[:, :, :needed]
        return self.keys, self.values

    def reserve(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers (B, H, capacity, hd), with room for `tokens` more tokens after
        the current ones (grown or adopted as `update` would). For writers that append in place
        and then call `advance`."""
        kb, n = self._key_buf, self.get_seq_length()
        self._keys_t_len = min(self._keys_t_len, n)  # the caller writes positions n..
        if self._pending is not None and n + tokens <= kb.shape[2]:
            return kb, self._value_buf  # advance counted tokens in our buffers
        if (kb is not None and n + tokens <= kb.shape[-2] and self.keys.data_ptr() == kb.data_ptr()
                and self.values.data_ptr() == self._value_buf.data_ptr() and self.keys.shape[0] == kb.shape[0]):
            return kb, self._value_buf  # the views are ours (update / advance made them)
        if not self._owns(self.keys, self.values, n + tokens):
            capacity = n + tokens + max(128, (n + tokens) // 16)
            kb = self.keys.new_empty(*self.keys.shape[:2], capacity, self.keys.shape[-1])
            vb = self.values.new_empty(*self.values.shape[:2], capacity, self.values.shape[-1])
            kb[:, :, :n].copy_(self.keys)
            vb[:, :, :n].copy_(self.values)
            self._set_buffers(kb, vb)
            self.keys, self.values = kb[:, :, :n], vb[:, :, :n]
        return self._key_buf, self._value_buf

    def advance(self, tokens: int) -> None:
        """Count `tokens` tokens written into the buffers after the current ones (see `reserve`)."""
        self._pending = self.get_seq_length() + tokens

    def reset(self) -> None:
        self._set_buffers(None, None)
        super().reset()


class StormKVCache(DynamicCache):
    """`DynamicCache` whose full-attention layers append in place (see `GrowingKVLayer`).

    What `StormForConditionalGeneration` uses when it creates a KV cache (in `generate`, or in
    `forward` with `use_cache=True` and no cache given); same contents as a `DynamicCache`.
    Sliding-window and other special layers stay as transformers builds them.
    """

    def __init__(self, ddp_cache_data=None, config=None, **kwargs):
        super().__init__(ddp_cache_data, config=config, **kwargs)
        self.layers = [self._growing(layer) if type(layer) is DynamicLayer else layer for layer in self.layers]
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = GrowingKVLayer

    @staticmethod
    def _growing(layer: DynamicLayer) -> GrowingKVLayer:
        new = GrowingKVLayer()
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            new.update(layer.keys, layer.values)
        return new


def reusable_start(ids: Sequence[int], cached_ids: Sequence[int], placeholder_ids: Collection[int]) -> int:
    """How many leading tokens of a prompt `ids` a KV cache of `cached_ids` can give: their shared
    start, at most len(ids) - 1 (the last prompt token always runs: it gives the first logits), and
    0 unless that start holds every placeholder of `ids` and ends outside a run of them (a video's
    visual tokens come from the cache whole, or not at all)."""
    n = min(len(ids), len(cached_ids))
    shared = next((i for i in range(n) if ids[i] != cached_ids[i]), n)
    shared = min(shared, len(ids) - 1)
    last = next((i for i in range(len(ids) - 1, -1, -1) if ids[i] in placeholder_ids), -1)  # the text after is short
    cut_run = shared < len(cached_ids) and cached_ids[shared] in placeholder_ids
    return shared if shared > last and not cut_run else 0
