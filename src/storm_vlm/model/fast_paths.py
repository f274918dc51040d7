"""Speed paths that leave a STORM model's outputs unchanged; `enable_fast_paths(model)` turns them on.

CPU inference only (fp32, or bf16 autocast for the vision layers, GELU, LLM attention and the C
decode step; no autograd): everywhere else each path steps aside and the plain computation runs.

- **Matmul backend** (`_MeasuredLinear`): every `nn.Linear` of the model picks, per weight shape
  and number of input rows (in power-of-two buckets from `_MEASURE_MIN_ROWS` up to
  `_MEASURE_ROWS`, one bucket above), the faster of torch's default BLAS (`F.linear`) and oneDNN
  (`torch.ops.mkldnn._linear_pointwise` on the same weight, no copy), by timing both on the first
  input of that bucket (on at most `_MEASURE_ROWS` of its rows) and caching the answer for the
  process. Which one wins depends on the CPU, its ISA, the shape and the row count (the two
  libraries block the product differently, so the winner for one weight can change with the rows),
  so it is measured, never assumed. `STORM_VLM_MATMUL=blas|onednn` pins the choice (e.g. for
  bit-for-bit reproducibility across runs; the two differ by float rounding only). bf16 is not
  chosen here: it is a precision (`storm_vlm.precision`, whose "auto" takes bf16 autocast where the
  CPU has native bf16).
- **Vision tower**: the tanh-GELU is evaluated as x·sigmoid(2u) (`_GELUTanhCPU`): the same
  function in one pass of a C kernel (float32 and bfloat16; four tensor passes without a C
  compiler), where PyTorch's CPU tanh-GELU goes through a slow vectorised tanh. SigLIP encoder
  layers (`_LeanSiglipLayer`) run both LayerNorms (the residual add folded into the second) and the
  per-frame attention in C (`cpu_attention`, `ssm/_attention_kernel.c`; float32, or bf16 products
  under autocast); without the C kernels (or with `STORM_VLM_ATTENTION_KERNEL=0`) they only add
  their residuals in place (bit-for-bit transformers' result). At small widths such element-wise
  passes cost about as much as the matrix products, so each pass saved shows.
- **LLM layers** (Qwen2, Llama): the RMSNorm (`_RMSNormCPU`) and the MLP's gate, silu(gate) · up
  (`_GatedMLPCPU`), run as one C pass each (`ssm/_attention_kernel.c`, `ssm/_elementwise_kernel.c`;
  the gate also in bfloat16 under autocast), where transformers takes six and two tensor passes
  over the prompt's activations. Float rounding apart, transformers' result.
- **Decode step** (`DecodeStep`, Llama-style LLMs: Qwen2, Llama): a greedy one-token step runs
  through a lean single-token path on the `StormKVCache` (preallocated buffers the step writes
  into in place). For one row (batch 1, SiLU MLP, fp32 weights; also under CPU bf16 autocast, on a
  partly bf16 cache) the whole step (embedding row, every layer, final norm, LM head) runs in one
  call of a C function (`ssm/_decode_kernel.c`, built with the scan kernel by `ssm/cpu_kernel.py`),
  which reads the model's own matrices, no copies, each as one sequential stream; the per-layer
  small operations (norms, rotary, softmax, gate) then cost microseconds instead of a tensor
  operation each. It runs on torch's threads (each product's rows and the attention's query heads
  split between them); with several, the first steps also time it against the tensor step and the
  faster runs the rest. `STORM_VLM_DECODE_KERNEL=1` pins it, `=0` turns it off; without a C
  compiler, for batches, or with
  `compile_decode=True`, the step runs as tensor operations:
  ~20 tensor ops per layer instead of the ~60 of transformers' generic forward,
  q/k/v and gate/up read as one matrix each, rotary embedding as one small product. A decode step
  reads every weight once per token, so it is bound by how fast the weights stream; each
  projection is read in the layout that streams faster for its shape on this host — an
  input-major (k x n) copy or the model's own (n x k) matrix — timed when the step is built (the
  copies only where they fit in a quarter of free memory; otherwise the model's own matrices).
  `enable_fast_paths(model, compile_decode=True)` also runs the per-layer step through
  `torch.compile` (needs a C++ compiler; the first steps pay the compilation).
- **LLM attention** (`storm_vlm.model.cpu_attention`, registered as `storm_sdpa` with transformers'
  AttentionInterface when first enabled, the LLM's SDPA otherwise): a causal prompt, from the start
  or continuing a cache (no padding), in float32 or under bf16 autocast runs in C
  (`ssm/_attention_kernel.c`, each KV head read once for its query heads;
  `STORM_VLM_ATTENTION_KERNEL=0` keeps transformers' SDPA); a one-token step with grouped KV heads
  that does not take the decode step above runs as one r x L product per KV head.
- `StormKVCache`: a DynamicCache whose layers append in place into a buffer with spare room,
  instead of concatenating (copying the whole cache) at every generated token.

tests/test_cpu_fast_paths.py, tests/test_perf_fast_paths.py and tests/test_attention_kernel.py check
that outputs are unchanged (logits within float rounding, greedy tokens identical).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
import threading
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUTanh, SiLUActivation
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from storm_vlm.model.cpu_attention import (STORM_SDPA, attention_library, c_frame_attention, c_layer_norm,
                                           c_rms_norm, use_storm_sdpa)
from storm_vlm.model.ssm import _threads, cpu_kernel
from storm_vlm.utils import available_memory_bytes

__all__ = ["enable_fast_paths", "decode_step", "decode_step_path", "DecodeStep", "StormKVCache", "STORM_SDPA",
           "matmul_choices"]


class _GELUTanhCPU(nn.Module):
    """GELU with the tanh approximation (SigLIP's `gelu_pytorch_tanh`), computed faster on CPU.

    0.5·x·(1 + tanh(u)) = x·sigmoid(2u), 2u = x·(c + c·0.044715·x²), c = 2·√(2/π). PyTorch's CPU
    `gelu(approximate="tanh")` goes through a slow vectorised tanh (in bfloat16, what the vision tower
    runs under bf16 autocast, slower still). Here, for contiguous float32 and bfloat16 tensors, one
    pass of the C kernel (`ssm/_elementwise_kernel.c`, float32 math, bf16
    rounded as torch rounds), split over torch's thread count; without the kernel, float32/64 take
    the sigmoid form in four tensor passes (one addcmul, sigmoid and two in-place multiplies). Both
    differ from transformers' result by float rounding (< 1e-6; one bf16 rounding step at most in
    bf16). Inference only: with autograd, or on other dtypes and devices, it is `F.gelu(x, "tanh")`.
    """

    _TWO_C = 2.0 * math.sqrt(2.0 / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return nn.functional.gelu(x, approximate="tanh")
        kernel = _ELEMENTWISE.get(x.dtype) if x.is_contiguous() else None
        lib = cpu_kernel.load_library() if kernel else None
        if lib is not None:
            return _one_pass(getattr(lib, kernel), x)
        if x.dtype not in (torch.float32, torch.float64):
            return nn.functional.gelu(x, approximate="tanh")
        y = torch.addcmul(x.new_tensor(self._TWO_C), x, x, value=0.044715 * self._TWO_C).mul_(x)
        return torch.sigmoid_(y).mul_(x)


_ELEMENTWISE = {torch.float32: "storm_gelu_tanh_f32", torch.bfloat16: "storm_gelu_tanh_bf16"}
_ONE_PASS_CHUNK = 1 << 16  # elements per thread at least: a hand-off to a worker costs tens of microseconds


def _one_pass(fn, *xs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fn(x..., y, n) of a C element-wise kernel over contiguous xs (one shape and dtype) into y — a
    new tensor, or `out` (which may be one of xs) — in one piece of whole vectors per torch thread."""
    y = torch.empty_like(xs[0]) if out is None else out
    ptrs, size = [t.data_ptr() for t in (*xs, y)], y.element_size()
    pieces = _threads.spans(y.numel(), _ONE_PASS_CHUNK, 64)
    _threads.run_all(fn, [(*(p + i * size for p in ptrs), j - i) for i, j in pieces])
    return y


def _fast_gelu_tanh(module: nn.Module) -> None:
    """Swap transformers' GELUTanh (the C `gelu(approximate="tanh")` variant) for `_GELUTanhCPU`."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GELUTanh and isinstance(getattr(child, "act", None), functools.partial):
                setattr(parent, name, _GELUTanhCPU())


def _inference_on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class _RMSNormCPU(nn.Module):
    """Llama's / Qwen2's RMSNorm (mixed in before the model's class) whose CPU float32 inference is one
    pass of the C kernel (`cpu_attention.c_rms_norm`), where transformers takes six tensor passes;
    the same operations in the same order, the mean of squares summed in another order (float
    rounding). Otherwise, and with `STORM_VLM_ATTENTION_KERNEL=0`, transformers' forward."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (hidden_states.dtype == w.dtype == torch.float32 and hidden_states.is_contiguous() and w.is_contiguous()
                and w.dim() == 1 and _inference_on_cpu(hidden_states, w)):
            lib = attention_library()
            if lib is not None:
                return c_rms_norm(lib, hidden_states, w, self.variance_epsilon)
        return super().forward(hidden_states)


class _Qwen2RMSNormCPU(_RMSNormCPU, Qwen2RMSNorm):
    pass


class _LlamaRMSNormCPU(_RMSNormCPU, LlamaRMSNorm):
    pass


class _GatedMLPCPU(nn.Module):
    """Llama's / Qwen2's MLP, down(silu(gate(x)) · up(x)) (mixed in before the model's class), whose CPU
    inference computes silu(gate) · up in one pass of the C kernel, float32 or bfloat16 (under
    autocast; float32 math rounded once), in place in gate's output, where PyTorch takes two passes
    and an intermediate tensor the size of the MLP's activation. Otherwise transformers' forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (type(self.act_fn) is SiLUActivation and _inference_on_cpu(x)):
            return super().forward(x)
        g, u = self.gate_proj(x), self.up_proj(x)
        kernel = _SILU_MUL.get(g.dtype)
        lib = (cpu_kernel.load_library() if kernel and g.dtype == u.dtype and g.shape == u.shape
               and g.is_contiguous() and u.is_contiguous() and not (g.requires_grad or u.requires_grad) else None)
        return self.down_proj(self.act_fn(g) * u if lib is None else _one_pass(getattr(lib, kernel), g, u, out=g))


class _Qwen2MLPCPU(_GatedMLPCPU, Qwen2MLP):
    pass


class _LlamaMLPCPU(_GatedMLPCPU, LlamaMLP):
    pass


_SILU_MUL = {torch.float32: "storm_silu_mul_f32", torch.bfloat16: "storm_silu_mul_bf16"}
_LLM_CLASSES = {Qwen2RMSNorm: _Qwen2RMSNormCPU, LlamaRMSNorm: _LlamaRMSNormCPU, Qwen2MLP: _Qwen2MLPCPU,
                LlamaMLP: _LlamaMLPCPU}


def _lean_llm_modules(module: nn.Module) -> None:
    """Swap the class of every Qwen2 / Llama RMSNorm and MLP under `module` for its CPU variant above
    (the same object, parameters and state dict)."""
    for sub in module.modules():
        if type(sub) in _LLM_CLASSES:
            sub.__class__ = _LLM_CLASSES[type(sub)]


def _plain_layer_norm(norm) -> bool:
    return (type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None
            and norm.weight.dtype == torch.float32 and norm.bias.dtype == torch.float32
            and norm.weight.is_contiguous() and norm.bias.is_contiguous() and len(norm.normalized_shape) == 1)


# Keyword arguments towers pass down to their layers that change nothing in an SDPA layer's result
# (LLaVA-OneVision passes its `vision_aspect_ratio`; transformers' towers pass `output_hidden_states`).
_INERT_KWARGS = ("output_hidden_states", "return_dict", "vision_aspect_ratio")


def _inert(kwargs: dict) -> bool:
    return all(key in _INERT_KWARGS for key in kwargs)


def _residual_add(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x as transformers adds them (in the promoted dtype: under bf16 autocast a bf16 branch
    output joins the float32 residual stream in float32), in place on x where x already has that dtype."""
    return x.add_(residual) if x.dtype == torch.promote_types(x.dtype, residual.dtype) else residual + x


class _LeanSiglipLayer(SiglipEncoderLayer):
    """A SigLIP encoder layer whose CPU inference (no mask, SDPA attention, no autograd) runs the
    same computation with fewer tensor passes.

    With the C kernels built (float32, or under bf16 autocast), both LayerNorms (the second with the
    residual add folded in) and the attention run in `ssm/_attention_kernel.c` (`c_layer_norm`,
    `c_frame_attention`): at SigLIP's frame length each (frame, head) is a few 64 x 64 products that
    SDPA's flash kernel blocks for much longer sequences, and torch's LayerNorm is slow at small
    widths. Same result within float rounding (under autocast: the same dtypes as transformers', the
    norms and the residual stream in float32, the products in bf16). Otherwise the residual adds land
    in place where the dtypes allow and no attention-weights tuple is built: bit-for-bit transformers'
    result. With a mask, autograd, keyword arguments outside `_INERT_KWARGS` or off CPU it is that
    layer."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attn = self.self_attn
        if (attention_mask is not None or not _inert(kwargs) or torch.is_grad_enabled() or self.training
                or hidden_states.device.type != "cpu" or attn.config._attn_implementation != "sdpa"):
            return super().forward(hidden_states, attention_mask, **kwargs)
        mlp = self.mlp
        lib = None
        if (hidden_states.dtype == torch.float32 and hidden_states.dim() == 3
                and (not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == torch.bfloat16)
                and _plain_layer_norm(self.layer_norm1) and _plain_layer_norm(self.layer_norm2)):
            lib = attention_library()
        if lib is not None:
            hidden_states = hidden_states.contiguous()  # the embeddings' output is a transposed view
            x = c_layer_norm(lib, hidden_states, self.layer_norm1)
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            h = attn.out_proj(c_frame_attention(lib, q, k, v, attn.num_heads, attn.scale)).float()
            x = c_layer_norm(lib, h, self.layer_norm2, residual=hidden_states)  # h += hidden_states
            return _residual_add(mlp.fc2(mlp.activation_fn(mlp.fc1(x))), h)
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        x = self.layer_norm1(hidden_states)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2)
        hidden_states = _residual_add(attn.out_proj(o.reshape(*hidden_states.shape[:-1], -1)), hidden_states)
        x = mlp.fc2(mlp.activation_fn(mlp.fc1(self.layer_norm2(hidden_states))))
        return _residual_add(x, hidden_states)


def _lean_siglip_layers(module: nn.Module) -> None:
    for sub in module.modules():
        if type(sub) is SiglipEncoderLayer:
            sub.__class__ = _LeanSiglipLayer


_BUFFER_GENERATIONS = itertools.count()
_ROPE_BLOCK = 256  # positions of the rotary embedding computed at once for the C decode step


def _pending_view(name: str) -> property:
    """`_GrowingKVLayer.keys` / `.values`, stored as `name`: reading or assigning either first makes
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

    `advance` only counts: the views `keys` / `values` are made when next read (a decode step on
    every layer would otherwise make two views per layer per token, a sizeable share of a step's
    overhead). For the C decode step the layer also keeps its keys in that step's layout
    (`transposed_keys`, float32: as much memory again as float32 keys), filled by the step itself:
    positions from `_keys_t_len` on are (re)copied at the next step (which then sets the mark), so
    every writer of keys moves that mark back to where it writes (`update`, `reserve`, a new
    buffer). `generation` changes whenever the buffers do.
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

    def transposed_keys(self, lanes: int) -> torch.Tensor:
        """The key buffer (1, H, capacity, hd) laid out for the C decode step as float32
        (H, ceil(capacity / lanes), hd, lanes) — `lanes` positions per block, component-major; its
        first `_keys_t_len` positions hold the current keys. Call after `reserve`."""
        kb = self._key_buf
        shape = (kb.shape[1], -(-kb.shape[2] // lanes), kb.shape[3], lanes)
        if self._keys_t is None or self._keys_t.shape != shape:
            self._keys_t = torch.zeros(shape, dtype=torch.float32, device=kb.device)
            self._keys_t_len = 0
            self.generation = next(_BUFFER_GENERATIONS)
        return self._keys_t

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


# ---- matmul backend --------------------------------------------------------------------------------

_MATMUL_ENV = "STORM_VLM_MATMUL"
_MEASURE_MIN_ROWS = 64  # fewer rows (decode, short prompts): torch's default, nothing to win
_MEASURE_ROWS = 2048  # rows timed at most when choosing; also the last bucket (bounds the cost at large widths)
_MATMUL_CHOICE: dict = {}  # (in, out, bias, rows bucket) -> "blas" | "onednn"


def _onednn_linear(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fastest(fns: dict, repeats: int = 5, warmup: int = 2) -> str:
    """The key of the fastest callable: best of `repeats` alternating runs each, after `warmup` rounds
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
                choice = _fastest({"blas": lambda: F.linear(sample, weight, bias),
                                   "onednn": lambda: _onednn_linear(sample, weight, bias)})
            except RuntimeError:  # oneDNN refused this shape or layout
                choice = "blas"
        _MATMUL_CHOICE[key] = choice
    return choice


def matmul_choices() -> dict:
    """The backend each Linear shape uses in this process: {(in, out, bias, rows bucket): "blas" | "onednn"}."""
    return dict(_MATMUL_CHOICE)


class _MeasuredLinear(nn.Linear):
    """`nn.Linear` whose CPU fp32 inference runs on the faster of BLAS and oneDNN for its shape
    (`_matmul_backend`). Same parameters, same state dict; autograd, other dtypes and devices, and
    inputs under `_MEASURE_MIN_ROWS` rows take `F.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and not torch.is_grad_enabled() and x.dim() >= 2 and w.is_contiguous()
                and x.numel() >= _MEASURE_MIN_ROWS * x.shape[-1] and not torch.is_autocast_enabled("cpu")
                and _matmul_backend(x, w, self.bias) == "onednn"):
            return _onednn_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


def _measured_linears(module: nn.Module) -> None:
    """Make every plain `nn.Linear` under `module` a `_MeasuredLinear` (the same object, parameters
    and hooks: only its class changes)."""
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = _MeasuredLinear


# ---- decode step ------------------------------------------------------------------------------------

_DECODE_MODEL_TYPES = ("qwen2", "llama")
_DECODE_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # language model -> DecodeStep
_C_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # cache -> (key, DecodeStep._kernel_plan)
_CHECKED_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # cache -> ref to the step that checked
_PACK_MEMORY_SHARE = 0.25  # input-major copies only while they take at most this share of free memory


_DECODE_KERNEL_ENV = "STORM_VLM_DECODE_KERNEL"


def _decode_kernel_setting() -> str:
    """STORM_VLM_DECODE_KERNEL as "off" (0/false/off/no: the step runs as tensor operations), "on"
    (1/true/on/yes: the C step for every row it applies to, whatever the thread count) or "auto"
    (anything else: with several torch threads it is timed against the tensor step first, see
    `DecodeStep.__call__`)."""
    if cpu_kernel.switched_off(_DECODE_KERNEL_ENV):
        return "off"
    return "on" if os.environ.get(_DECODE_KERNEL_ENV, "").strip().lower() in ("1", "true", "on", "yes") else "auto"


def _decode_unsupported(lm) -> str | None:
    """Why `DecodeStep` cannot run this causal LM (None when it can)."""
    cfg = lm.config
    if cfg.model_type not in _DECODE_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {_DECODE_MODEL_TYPES}"
    inner = getattr(lm, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not a Llama-style decoder (model.embed_tokens / layers / norm / rotary_emb)"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"]):
        return "sliding-window layers"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(
                isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q/k/v/o Linear projections"
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            return "MLP without gate/up/down Linear projections"
        if getattr(attn, "sliding_window", None) is not None:
            return "sliding-window attention"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon"):
                return "a norm that is not RMSNorm"
    if not hasattr(inner.norm, "variance_epsilon") or not isinstance(getattr(lm, "lm_head", None), nn.Linear):
        return "final norm / lm_head not RMSNorm / Linear"
    eps = {n.variance_epsilon for L in inner.layers for n in (L.input_layernorm, L.post_attention_layernorm)}
    if len(eps) != 1:
        return "RMSNorm epsilons differ between layers"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
        return "logit soft-capping"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Llama/Qwen2 RMSNorm of an fp32 row: weight * (x * rsqrt(mean(x²) + eps)), as transformers computes it
    return F.rms_norm(x, weight.shape, weight, eps)


def _input_major_wins(mats: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Input-major (k x n contiguous) copies of `mats` ((n x k) matrices of one shape) when one pass
    of matrix-vector products over the copies beats one over `mats` by at least 5 % on this host
    (timed, alternating, best of 3); else None. Which layout streams faster depends on the shape
    (short rows favour input-major) and the BLAS, so it is timed, not assumed."""
    copies = [w.t().contiguous() for w in mats]
    x = torch.randn(1, mats[0].shape[1], dtype=mats[0].dtype)
    def own():
        for w in mats:
            torch.mm(x, w.t())
    def input_major():
        for w in copies:
            torch.mm(x, w)
    return copies if _fastest({"own": own, "input_major": input_major}) == "input_major" and \
        _timed_ratio(own, input_major) > 1.05 else None


def _timed_ratio(a, b, repeats: int = 3) -> float:
    """best time of `a` / best time of `b` (alternating runs)."""
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0] / best[1]


class DecodeStep:
    """A greedy one-token decode step for a Llama-style causal LM (Qwen2, Llama) on CPU, fp32.

    `step(input_ids (B, 1), cache: StormKVCache) -> logits (B, 1, V)`: appends the token's keys and
    values to the cache in place and returns what `lm(input_ids, cache=cache).logits` returns, up to
    float rounding. Built by `decode_step` the first time it applies; rebuilt when a weight changes
    (a parameter's storage or version counter moves, as with `load_state_dict` or an optimizer step),
    which `decode_step` checks when a cache first meets the step: change weights between
    generations, not in the middle of one.

    `fused` (the default where the copies take at most a quarter of free memory): q/k/v read as one
    matrix and gate/up as one, each projection (q/k/v, o, gate/up, down, lm_head) in the layout that
    streams faster on this host for its shape — an input-major copy or the model's own (out, in)
    matrix — timed when the step is built (`layouts` says which). Otherwise every projection reads
    the model's own matrices. Those layouts serve the tensor-operation path (batches, no C compiler);
    one row goes through the C step (`_kernel_step`), which reads the model's own matrices.
    """

    def __init__(self, lm, pack: bool | None = None, compile_layers: bool = False, kernel: bool = True):
        self._lm = weakref.ref(lm)  # _DECODE_STEPS holds steps weakly keyed by their LM: no cycle
        inner = lm.model
        cfg = lm.config
        attn0 = inner.layers[0].self_attn
        self.hd = attn0.head_dim
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.scaling = attn0.scaling
        owners = [inner.embed_tokens, inner.norm, lm.lm_head]
        for L in inner.layers:
            owners += [L.input_layernorm, L.post_attention_layernorm, L.self_attn.q_proj, L.self_attn.k_proj,
                       L.self_attn.v_proj, L.self_attn.o_proj, L.mlp.gate_proj, L.mlp.up_proj, L.mlp.down_proj]
        # (the module's parameter dict, name, tensor) of every tensor the step reads
        self._slots = [(m._parameters, name, m._parameters[name]) for m in owners for name in ("weight", "bias")
                       if m._parameters.get(name) is not None]
        self._tensors = [t for _, _, t in self._slots]
        self._inference_weights = any(t.is_inference() for t in self._tensors)
        self._snapshot = self._weights_key()
        mods = [(L.input_layernorm, L.post_attention_layernorm, L.self_attn, L.mlp) for L in inner.layers]
        mats = [m.weight for _, _, a, mlp in mods for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj,
                                                           mlp.up_proj, mlp.down_proj)] + [lm.lm_head.weight]
        nbytes = sum(w.numel() * w.element_size() for w in mats)
        if pack is None:
            pack = nbytes <= _PACK_MEMORY_SHARE * available_memory_bytes()
        self.fused = bool(pack)
        ln1, _, _, mlp0 = mods[0]
        act = F.silu if getattr(cfg, "hidden_act", None) == "silu" else mlp0.act_fn
        # The C step (one row, every layer in one call) reads the model's own tensors, 16 per layer in
        # storm_decode_f32's order: the two norms' weights, then each projection's weight and bias.
        own = []
        for norm1, norm2, a, mlp in mods:
            own += [norm1.weight, norm2.weight]
            for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                own += [m.weight, m.bias]
        # ... and the embedding table, the final norm's weight and the LM head
        self._kernel_ends = (inner.embed_tokens.weight, inner.norm.weight, lm.lm_head.weight, lm.lm_head.bias)
        self._kernel = None
        if (kernel and not compile_layers and act is F.silu and _decode_kernel_setting() != "off"
                and type(inner.embed_tokens) is nn.Embedding
                and all(t is None or (t.is_contiguous() and t.dtype == torch.float32)
                        for t in own + list(self._kernel_ends))):
            self._kernel = cpu_kernel.load_library()
        if self._kernel is not None:
            self._kernel_weights = (ctypes.c_void_p * len(own))(*[None if t is None else t.data_ptr() for t in own])
            # the storages those addresses point into stay alive even if a parameter's `.data` is replaced
            self._kernel_storages = [t.detach() for t in own + list(self._kernel_ends) if t is not None]
        self._rope_table = None  # (first position, cos, sin, inv_freq's address): see _rope
        self._trials: dict[int, list[float]] = {}  # torch thread count -> seconds of the timed steps
        self._kernel_wins: dict[int, bool] = {}  # torch thread count -> the C step was the faster
        self._scratch = threading.local()  # the C step's scratch, per thread
        # The tensor path: every product is torch.mm(x, M) with M (in, out): an input-major copy, or a
        # transposed view of an (out, in) matrix (then BLAS reads it row by row, as F.linear does).
        if self.fused:
            qkv = [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]) for _, _, a, _ in mods]
            gu = [torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) for _, _, _, mlp in mods]
            groups = {"qkv": qkv, "o": [a.o_proj.weight for _, _, a, _ in mods], "gate_up": gu,
                      "down": [mlp.down_proj.weight for _, _, _, mlp in mods], "lm_head": [lm.lm_head.weight]}
            self.layouts, mm = {}, {}
            for name, group in groups.items():
                copies = _input_major_wins(group)
                self.layouts[name] = "input-major" if copies is not None else "own"
                mm[name] = copies if copies is not None else [w.t() for w in group]
            self.weights = []
            for i, (ln1, ln2, a, mlp) in enumerate(mods):
                qkv_b = None
                if any(m.bias is not None for m in (a.q_proj, a.k_proj, a.v_proj)):
                    qkv_b = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                                       for m in (a.q_proj, a.k_proj, a.v_proj)])
                gu_b = None if mlp.gate_proj.bias is None else torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
                self.weights.append((ln1.weight, ln2.weight, mm["qkv"][i], qkv_b, mm["o"][i], a.o_proj.bias,
                                     mm["gate_up"][i], gu_b, mm["down"][i], mlp.down_proj.bias))
            self.head = (mm["lm_head"][0], lm.lm_head.bias)
        else:
            self.layouts = {}
            self.weights = [(ln1.weight, ln2.weight) + tuple(t for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                                        mlp.gate_proj, mlp.up_proj, mlp.down_proj)
                                                            for t in (m.weight.t(), m.bias))
                            for ln1, ln2, a, mlp in mods]
            self.head = (lm.lm_head.weight.t(), lm.lm_head.bias)
        self.dims = (self.heads, self.kv_heads, self.hd, self.scaling, mlp0.gate_proj.out_features,
                     ln1.variance_epsilon, act, self.fused)
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        # rotary: out = x @ R with R[i, i] = cos_i, R[i + h, i] = -sin_i (i < h), R[i - h, i] = sin_i (i >= h),
        # h = hd / 2: transformers' x * cos + rotate_half(x) * sin as one (hd x hd) product
        half = self.hd // 2
        idx = torch.arange(self.hd)
        rows = torch.cat([idx, idx[:half] + half, idx[half:] - half])
        self._rot_flat = rows * self.hd + torch.cat([idx, idx])  # where cos, then ±sin go in R (flattened)
        self._rot_sign = torch.cat([torch.ones(self.hd), -torch.ones(half), torch.ones(self.hd - half)])
        self._layers_fn = torch.compile(_decode_layers, dynamic=True) if compile_layers else _decode_layers

    def _weights_key(self) -> tuple:
        """Storages and version counters of every tensor the step reads, summed: replacing their
        storage (`.data = ...`, `.to()`) or their values in place (`load_state_dict`, an optimizer
        step) changes it. (Inference tensors have no version counter, and cannot be changed in place
        outside inference mode.)"""
        versions = 0 if self._inference_weights else sum([t._version for t in self._tensors])
        return sum([t.data_ptr() for t in self._tensors]), versions

    def stale(self) -> bool:
        """True when a weight changed since this step was built (then `decode_step` rebuilds it):
        a parameter replaced by another, or changed as `_weights_key` says."""
        return any([params[name] is not t for params, name, t in self._slots]) or self._weights_key() != self._snapshot

    def _rotation(self, pos: int, h: torch.Tensor) -> torch.Tensor:
        cos, sin = self._lm().model.rotary_emb(h[:1, None], torch.tensor([[pos]], device=h.device))
        rot = h.new_zeros(self.hd * self.hd)
        rot[self._rot_flat] = torch.cat([cos[0, 0], sin[0, 0]]).mul_(self._rot_sign)
        return rot.view(self.hd, self.hd)

    @property
    def path(self) -> str:
        """How one row's step runs at the current thread count: "C step (<isa> x<lanes>)" or "tensor
        operations" (with the reason where the C step was timed slower)."""
        k = self._kernel
        if k is None:
            return "tensor operations"
        threads = torch.get_num_threads()
        if self._kernel_wins.get(threads) is False:
            return f"tensor operations (timed faster than the C step at {threads} threads)"
        return f"C step ({k.storm_isa} x{k.storm_lanes})"

    def _rope(self, pos: int):
        """(cos, sin) rows (hd,) of the rotary embedding at `pos`, as the model's rotary module gives
        them; None for a partial rotary embedding (not what the C step computes). Taken from a table
        of _ROPE_BLOCK positions, computed by the module in one call: one call per step costs more
        than the step's other Python work. RoPE types whose module changes its frequencies with the
        position (dynamic, longrope) are called for each position."""
        rot = self._lm().model.rotary_emb
        table = self._rope_table
        if table is None or not table[0] <= pos < table[0] + table[1].shape[0] or table[3] != rot.inv_freq.data_ptr():
            rope_type = str(getattr(rot, "rope_type", "default"))
            n = 1 if "dynamic" in rope_type or "longrope" in rope_type else _ROPE_BLOCK
            cos, sin = rot(torch.empty(1), torch.arange(pos, pos + n)[None])
            table = self._rope_table = (pos, cos[0].contiguous(), sin[0].contiguous(), rot.inv_freq.data_ptr())
        _, cos, sin, _ = table
        if cos.shape[1] != self.hd or self.hd % 2:
            return None
        return cos[pos - table[0]], sin[pos - table[0]]

    def _kernel_plan(self, cache):
        """What the C step needs of `cache` besides the position (after `reserve(1)` on every layer):
        (pointer arrays of the key / value buffers and of the transposed keys, their strides, the
        bf16 bits), or None where it does not apply (not one row; buffers not (1, G, capacity, hd)
        with hd contiguous, float32 or bfloat16, alike in every layer). Kept per cache object (not
        on it: a copy of the cache has buffers of its own) until a layer's buffers change (their
        `generation`)."""
        lanes = self._kernel.storm_lanes
        key = (lanes, [layer.generation for layer in cache.layers])
        plan = _C_PLANS.get(cache)
        if plan is not None and plan[0] == key:
            return plan[1]
        bufs = [(layer._key_buf, layer._value_buf) for layer in cache.layers]
        kb0, vb0 = bufs[0]
        dtypes = (torch.float32, torch.bfloat16)
        usable = (kb0.shape[0] == 1 and kb0.stride(-1) == 1 and kb0.dtype in dtypes and vb0.dtype in dtypes
                  and all(kb.stride() == vb.stride() == kb0.stride() and kb.dtype == kb0.dtype
                          and vb.dtype == vb0.dtype for kb, vb in bufs))
        plan = None
        if usable:
            kts = [layer.transposed_keys(lanes) for layer in cache.layers]  # may start new ones
            key = (lanes, [layer.generation for layer in cache.layers])
            plan = ((ctypes.c_void_p * (2 * len(bufs)))(*[t.data_ptr() for pair in bufs for t in pair]),
                    (ctypes.c_void_p * len(kts))(*[t.data_ptr() for t in kts]), kts[0].stride(0),
                    kb0.stride(1), kb0.stride(2), (kb0.dtype == torch.bfloat16) | (vb0.dtype == torch.bfloat16) << 1)
        _C_PLANS[cache] = (key, plan)
        return plan

    def _kernel_step(self, input_ids: torch.Tensor, pos: int, cache) -> torch.Tensor | None:
        """The token's logits (1, V) through the C step (`_decode_kernel.c`: the embedding, every
        layer, the final norm and the LM head), its keys and values written at `pos` of the cache's
        buffers (after `reserve(1)` on every layer); None (nothing done) where it does not apply: no
        kernel, more than one row, a token outside the embedding table (its error comes from the
        embedding), buffers or rotary embedding not as the C step takes them."""
        if self._kernel is None or input_ids.shape[0] != 1:
            return None
        embed, norm_w, head_w, head_b = self._kernel_ends
        token = int(input_ids[0, 0])
        plan = self._kernel_plan(cache) if 0 <= token < embed.shape[0] else None
        rope = self._rope(pos) if plan is not None else None
        if rope is None:
            return None
        kv, kt, ktg, sg, st, kv_bf16 = plan
        heads, kv_heads, hd, scaling, inter, eps, _, _ = self.dims
        d = embed.shape[1]
        # scratch per thread, not per step object: two threads may decode with the same model
        threads = torch.get_num_threads()
        need = self._kernel.storm_decode_scratch(d, heads, kv_heads, hd, inter, pos + 1, threads)
        scratch = getattr(self._scratch, "buf", None)
        if scratch is None or scratch.numel() < need:
            scratch = self._scratch.buf = torch.empty(need + need // 4)
        logits = torch.empty(1, head_w.shape[0])
        layers = cache.layers
        cos, sin = rope
        self._kernel.storm_decode_f32(len(layers), d, heads, kv_heads, hd, inter, eps, scaling, pos, embed.data_ptr(),
                                      token, cos.data_ptr(), sin.data_ptr(), self._kernel_weights, kv, sg, st, kv_bf16,
                                      kt, ktg, min([layer._keys_t_len for layer in layers]), norm_w.data_ptr(),
                                      self.norm[1], head_w.data_ptr(), None if head_b is None else head_b.data_ptr(),
                                      head_w.shape[0], logits.data_ptr(), scratch.data_ptr(), threads)
        for layer in layers:
            layer._keys_t_len = pos + 1
        return logits

    def __call__(self, input_ids: torch.Tensor, cache, kernel_only: bool = False) -> torch.Tensor | None:
        """Logits (B, 1, V) of the next token; None (the cache untouched) where the C step does not
        apply and either `kernel_only` is set or the cache is not float32 (a prefill under autocast).

        With several torch threads both steps are threaded (the C step splits each product's rows
        and the attention's query heads, with a barrier between dependent parts; the tensor step
        through BLAS / oneDNN), and which is faster depends on the host and the model's size. Then
        the first steps decide, once per thread count: the C step twice (the first copies every
        cached key into its layout, untimed), the tensor step once, and the faster takes the steps
        after (both give the model's logits up to float rounding). STORM_VLM_DECODE_KERNEL=1 pins the
        C step, =0 the tensor step."""
        lm = self._lm()
        pos = cache.get_seq_length()
        bufs = [layer.reserve(1) for layer in cache.layers]
        threads = torch.get_num_threads()
        trials = None
        if (self._kernel is not None and threads > 1 and threads not in self._kernel_wins and not kernel_only
                and input_ids.shape[0] == 1 and _decode_kernel_setting() != "on"
                and all(t.dtype == torch.float32 for pair in bufs for t in pair)):
            trials = self._trials.setdefault(threads, [])
        start = time.perf_counter()
        kernel = self._kernel_wins.get(threads, True) and (trials is None or len(trials) < 2)
        logits = self._kernel_step(input_ids, pos, cache) if kernel else None
        if logits is None:
            h = lm.model.embed_tokens(input_ids[:, 0])  # (B, d)
            if kernel_only or any(t.dtype != h.dtype for pair in bufs for t in pair):
                return None
            rot = self._rotation(pos, h)
            h = self._layers_fn(h, rot, self.weights, [kb for kb, _ in bufs], [vb for _, vb in bufs], pos, self.dims)
            x = _rms_norm(h, *self.norm)
            head, bias = self.head
            logits = torch.mm(x, head) if bias is None else torch.addmm(bias, x, head)
        for layer in cache.layers:
            layer.advance(1)
        if trials is not None:
            trials.append(time.perf_counter() - start)
            if len(trials) >= 3:  # (more than 3 where two threads decoded at once)
                self._kernel_wins[threads] = trials[1] <= trials[2]
        return logits[:, None]


def _mm(x, m, bias):
    return torch.mm(x, m) if bias is None else torch.addmm(bias, x, m)


def _decode_layers(h, rot, weights, key_bufs, value_bufs, pos: int, dims):
    """Every decoder layer for one token: h (B, d) -> (B, d). Writes each layer's key and value at
    position `pos` of its buffers (B, G, capacity, hd) and attends over positions 0..pos. Every
    matrix is (in, out) for torch.mm (see DecodeStep). A pure tensor function (no Python state), so
    `torch.compile` can take it whole."""
    heads, kv_heads, hd, scaling, inter, eps, act, fused = dims
    b = h.shape[0]
    nqk = (heads + kv_heads) * hd
    for w, kb, vb in zip(weights, key_bufs, value_bufs):
        x = F.rms_norm(h, w[0].shape, w[0], eps)
        if fused:
            qkv = _mm(x, w[2], w[3])
        else:
            qkv = torch.cat([_mm(x, w[2], w[3]), _mm(x, w[4], w[5]), _mm(x, w[6], w[7])], -1)
        qk = torch.mm(qkv[:, :nqk].reshape(-1, hd), rot).view(b, heads + kv_heads, hd)  # rotary embedding
        kb.select(2, pos).copy_(qk[:, heads:])
        vb.select(2, pos).copy_(qkv[:, nqk:].view(b, kv_heads, hd))
        q = qk[:, :heads].reshape(b, kv_heads, heads // kv_heads, hd)  # the r query heads of a KV head as r rows
        o = F.scaled_dot_product_attention(q, kb.narrow(2, 0, pos + 1), vb.narrow(2, 0, pos + 1), scale=scaling)
        o = o.reshape(b, heads * hd)
        o_w, o_b = (w[4], w[5]) if fused else (w[8], w[9])
        h = torch.addmm(h, o, o_w) if o_b is None else torch.addmm(h, o, o_w).add_(o_b)
        x = F.rms_norm(h, w[1].shape, w[1], eps)
        if fused:
            gu = _mm(x, w[6], w[7])
            gu = act(gu[:, :inter]).mul_(gu[:, inter:])
            d_w, d_b = w[8], w[9]
        else:
            gu = act(_mm(x, w[10], w[11])).mul_(_mm(x, w[12], w[13]))
            d_w, d_b = w[14], w[15]
        h = torch.addmm(h, gu, d_w) if d_b is None else torch.addmm(h, gu, d_w).add_(d_b)
    return h


_DECODE_KWARGS = {"return_dict", "cache_position", "logits_to_keep"}


def decode_step(model, input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache, kwargs):
    """`model`'s output for one greedy decode step through `DecodeStep`, or None where it does not
    apply (then the model's own forward runs): CPU, fp32 weights, no autograd, eval mode, one new
    token per row on a non-empty `StormKVCache`, no padding in `attention_mask`, positions that
    follow the cache, an LLM `DecodeStep` supports. Under CPU autocast (the bfloat16 precision: fp32
    weights, bf16 products) only the C step is taken, in float32 on a bf16 or fp32 cache: autocast
    would cast every weight to bf16 at every step, more work than reading it once in fp32, and the
    float32 step is at least as accurate. Called by StormForConditionalGeneration.forward."""
    if (not getattr(model, "_storm_decode", True) or input_ids is None or inputs_embeds is not None
            or input_ids.dim() != 2 or input_ids.shape[1] != 1 or input_ids.device.type != "cpu"
            or torch.is_grad_enabled() or model.training or use_cache is False
            or not isinstance(cache, StormKVCache)
            or not set(kwargs) <= _DECODE_KWARGS or not isinstance(kwargs.get("logits_to_keep", 0), int)
            or kwargs.get("return_dict", True) is False):
        return None
    lm = model.language_model
    if lm.lm_head.weight.dtype != torch.float32 or not all(type(layer) is _GrowingKVLayer for layer in cache.layers):
        return None
    past = cache.get_seq_length()
    if past == 0 or len(cache.layers) != lm.config.num_hidden_layers:
        return None
    if attention_mask is not None and (attention_mask.shape != (input_ids.shape[0], past + 1)
                                       or not bool(attention_mask.all())):
        return None
    if position_ids is not None and not bool((position_ids == past).all()):
        return None
    cache_position = kwargs.get("cache_position")
    if cache_position is not None and not bool((cache_position == past).all()):
        return None
    step = _DECODE_STEPS.get(lm)
    # The weights are checked when a cache first meets this step (a generation's first step), not at
    # every step: over a few hundred tensors the check costs a few percent of a step (cold caches)
    seen = _CHECKED_CACHES.get(cache)
    checked = seen is not None and step is not None and seen() is step
    if step is None or (not checked and step.stale()):
        if getattr(lm, "_storm_decode_unsupported", None) is None:
            lm._storm_decode_unsupported = _decode_unsupported(lm) or ""
        if lm._storm_decode_unsupported:
            return None
        step = DecodeStep(lm, compile_layers=getattr(model, "_storm_compile_decode", False),
                          kernel=getattr(model, "_storm_decode_kernel", True))
        _DECODE_STEPS[lm] = step
    if not checked:
        _CHECKED_CACHES[cache] = weakref.ref(step)
    if not torch.is_autocast_enabled("cpu"):
        logits = step(input_ids, cache)
    else:
        with torch.autocast("cpu", enabled=False):
            logits = step(input_ids, cache, kernel_only=True)
    return None if logits is None else CausalLMOutputWithPast(logits=logits, cache=cache)


def decode_step_path(model) -> str | None:
    """How `model`'s current decode step runs one row (`DecodeStep.path`); None before its first step."""
    lm = getattr(model, "language_model", None)
    step = None if lm is None else _DECODE_STEPS.get(lm)
    return None if step is None else step.path


def enable_fast_paths(model, *, decode: bool = True, compile_decode: bool = False,
                      decode_kernel: bool = True) -> None:
    """Turn the paths above on for `model` (StormForConditionalGeneration's constructor calls this).

    The module-level paths (matmul backend, SigLIP layers and GELU, `storm_sdpa` on the
    `language_model`'s config) apply to any transformers model that has such modules, so other
    video-LLMs can be measured on the same kernels (benchmarks/peers.py). The decode step is taken
    by StormForConditionalGeneration.forward: `decode=False` turns it off (the model's own forward
    then runs every step), `compile_decode=True` runs its layer function through `torch.compile`
    (a C++ compiler is needed; the first steps pay the compilation), `decode_kernel=False` runs one
    row's step as tensor operations instead of the C step (as `STORM_VLM_DECODE_KERNEL=0` does).
    Calling it again changes only these three switches.
    """
    model._storm_decode = bool(decode)
    model._storm_compile_decode = bool(compile_decode)
    model._storm_decode_kernel = bool(decode_kernel)
    # STORM's LLM is `model.language_model`; transformers' LLaVA models keep theirs in `model.model`
    lm = getattr(model, "language_model", None) or getattr(getattr(model, "model", None), "language_model", None)
    if lm is not None:
        _DECODE_STEPS.pop(lm, None)
        if getattr(lm, "config", None) is not None:
            use_storm_sdpa(lm.config)
    _fast_gelu_tanh(model)
    _lean_siglip_layers(model)
    _lean_llm_modules(model)
    _measured_linears(model)
