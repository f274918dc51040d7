"""Speed paths that leave a STORM model's outputs unchanged; `enable_fast_paths(model)` turns them on.

CPU inference only (fp32, or bf16 autocast for the vision layers, GELU, LLM attention and the C
decode step; no autograd): everywhere else each path steps aside and the plain computation runs.

- **Matmul backend** (`matmul_backend.py`): every `nn.Linear` runs on the fastest of torch's BLAS,
  oneDNN and a C kernel for its shape and row count, timed on first use.
- **Vision tower**: the tanh-GELU is evaluated as x·sigmoid(2u) (`_GELUTanhCPU`): the same
  function in one pass of a C kernel (float32 and bfloat16; four tensor passes without a C
  compiler), where PyTorch's CPU tanh-GELU goes through a slow vectorised tanh. SigLIP encoder
  layers (`_LeanSiglipLayer`) in float32 run whole, one frame at a time, in C (`cpu_vit_layer`,
  `ssm/_vit_layer_kernel.c`) where that is the faster (timed per layer shape: while the weights fit
  in cache; STORM's tower runs its layers as one such stack, `siglip_stack`); otherwise, and under
  bf16 autocast, both LayerNorms (the residual add folded into the second) and the per-frame
  attention run in C (`cpu_attention`, `ssm/_attention_kernel.c`; float32, or bf16 products under
  autocast) between the library's products. Without the C kernels (or with
  `STORM_VLM_ATTENTION_KERNEL=0`) they only add their residuals in place (bit-for-bit transformers'
  result). At small widths element-wise passes cost about as much as the matrix products, so each
  pass saved shows.
- **Projector mixers** (`_OneCallDirections`): each direction of a Mamba mixer (conv + SiLU, x_proj,
  the selective scan) runs as one call of a C function (`storm_mixer_direction_f32` in
  `ssm/_scan_kernel.c`) that takes every time tile through the three steps in turn, where it applies
  (float32, one intra-op thread, up to 512 inner channels, unmasked): the same kernels' arithmetic
  (bit for bit where x_proj's measured backend is the C kernel), without the Python between them; a
  bidirectional mixer's backward direction adds its output onto the forward one's as it stores it.
- **LLM layers** (Qwen2, Llama): the RMSNorm (`_RMSNormCPU`) and the MLP's gate, silu(gate) · up
  (`_GatedMLPCPU`), run as one C pass each (`ssm/_attention_kernel.c`, `ssm/_elementwise_kernel.c`;
  the gate also in bfloat16 under autocast), where transformers takes six and two tensor passes
  over the prompt's activations. Float rounding apart, transformers' result.
- **Decode step** (`decode.py`): a greedy one-token step of a Llama-style LLM in one call of a
  C function (or as ~20 tensor operations per layer), on the `StormKVCache` (`kv_cache.py`), whose
  layers append in place instead of concatenating.
- **LLM attention** (`storm_vlm.model.cpu_attention`, registered as `storm_sdpa` with transformers'
  AttentionInterface when first enabled, the LLM's SDPA otherwise): a causal prompt, from the start
  or continuing a cache (no padding), in float32 or under bf16 autocast runs in C
  (`ssm/_attention_kernel.c`, each KV head read once for its query heads;
  `STORM_VLM_ATTENTION_KERNEL=0` keeps transformers' SDPA); a one-token step with grouped KV heads
  that does not take the decode step above runs as one r x L product per KV head.

tests/test_cpu_fast_paths.py, tests/test_perf_fast_paths.py, tests/test_attention_kernel.py and
tests/test_vit_layer_kernel.py check that outputs are unchanged (logits within float rounding, greedy
tokens identical).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUTanh, SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from storm_vlm.model.cpu_attention import (STORM_SDPA, attention_library, c_layer_norm, c_rms_norm,
                                           frame_attention, use_storm_sdpa)
from storm_vlm.model.cpu_vit_layer import fused_layer, fused_layer_is_faster, vit_layer, vit_layers
from storm_vlm.model.decode import drop_decode_step
from storm_vlm.model.matmul_backend import measured_linear, packed_weight, plain_linear, use_measured_linears
from storm_vlm.model.ssm import BiMambaMixer, MambaMixer, _threads, cpu_kernel
from storm_vlm.model.ssm.fast_scan import FUSED_RANK_PER_STATE
from storm_vlm.model.ssm.mixer import conv_taps, state_matrix

__all__ = ["enable_fast_paths", "language_model_of", "siglip_stack", "STORM_SDPA"]


def _inference_on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


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
        if not _inference_on_cpu(x):
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


def _qkv(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SigLIP's q, k, v projections of x as column slices of one product, the three weights side by
    side (one wider product, x read and, under autocast, cast once; the weights are concatenated per
    call, a copy 1/rows of the product's work), which the C attention reads in place. Projections
    that are not plain biased Linear layers (`plain_linear`) of one dtype run as they are."""
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    if all(plain_linear(p) and p.bias is not None and p.weight.dtype == projs[0].weight.dtype for p in projs):
        weight = torch.cat([p.weight for p in projs])
        bias = torch.cat([p.bias for p in projs])
        return measured_linear(x, weight, bias).split([p.out_features for p in projs], dim=-1)
    return tuple(p(x) for p in projs)


class _LeanSiglipLayer(SiglipEncoderLayer):
    """A SigLIP encoder layer whose CPU inference (no mask, SDPA attention, no autograd) runs the
    same computation with fewer tensor passes.

    With the C kernels built, in float32 with a tanh-GELU MLP: the whole layer per frame in C
    (`cpu_vit_layer.vit_layer`) where `fused_layer_is_faster`. Otherwise (float32, or under bf16
    autocast) `_c_passes`: both LayerNorms (the second with the residual add folded in) and the
    attention run in `ssm/_attention_kernel.c` (`c_layer_norm`, `frame_attention`): at SigLIP's
    frame length each (frame, head) is a few 64 x 64 products that SDPA's flash kernel blocks for
    much longer sequences, and torch's LayerNorm is slow at small widths. Same result within float
    rounding (under autocast: the same dtypes as transformers', the norms and the residual stream in
    float32, the products in bf16). Without the C kernels the residual adds land
    in place where the dtypes allow and no attention-weights tuple is built: bit-for-bit transformers'
    result. With a mask, autograd, keyword arguments outside `_INERT_KWARGS` or off CPU it is that
    layer."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        attn = self.self_attn
        if (attention_mask is not None or not _inert(kwargs) or torch.is_grad_enabled() or self.training
                or hidden_states.device.type != "cpu" or attn.config._attn_implementation != "sdpa"):
            return super().forward(hidden_states, attention_mask, **kwargs)
        mlp = self.mlp
        lib = attention_library() if hidden_states.dtype == torch.float32 and hidden_states.dim() == 3 else None
        if lib is not None:
            fused = fused_layer(self, hidden_states) if type(mlp.activation_fn) is _GELUTanhCPU else None
            if fused is not None and fused_layer_is_faster(lib, fused, hidden_states,
                                                           lambda x: self._c_passes(lib, x)):
                return vit_layer(lib, fused, hidden_states)
            if ((not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") == torch.bfloat16)
                    and _plain_layer_norm(self.layer_norm1) and _plain_layer_norm(self.layer_norm2)):
                return self._c_passes(lib, hidden_states)
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        x = self.layer_norm1(hidden_states)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2)
        hidden_states = _residual_add(attn.out_proj(o.reshape(*hidden_states.shape[:-1], -1)), hidden_states)
        x = mlp.fc2(mlp.activation_fn(mlp.fc1(self.layer_norm2(hidden_states))))
        return _residual_add(x, hidden_states)

    def _c_passes(self, lib, hidden_states: torch.Tensor) -> torch.Tensor:
        """The layer as separate passes: LayerNorms and attention in C, the products through
        `measured_linear`, the GELU through `_GELUTanhCPU`."""
        attn, mlp = self.self_attn, self.mlp
        hidden_states = hidden_states.contiguous()  # the embeddings' output is a transposed view
        x = c_layer_norm(lib, hidden_states, self.layer_norm1)
        q, k, v = _qkv(attn, x)
        h = attn.out_proj(frame_attention(lib, q, k, v, attn.num_heads, attn.scale)).float()
        x = c_layer_norm(lib, h, self.layer_norm2, residual=hidden_states)  # h += hidden_states
        return _residual_add(mlp.fc2(mlp.activation_fn(mlp.fc1(x))), h)


def siglip_stack(layers, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """`layers` (SigLIP encoder layers in a row) on hidden_states (frames, T, D) as one C call per
    piece of frames — groups of frames through every layer before the next group (`vit_layers`) —
    where each layer, called alone, would take the fused layer: the same bits as calling them one by
    one, without the frames leaving the cache between layers. None where any would not (hooks on a
    layer, another path, `fused_layer_is_faster` saying no): the caller then calls them."""
    if (not layers or torch.is_grad_enabled() or hidden_states.dtype != torch.float32 or hidden_states.dim() != 3
            or hidden_states.device.type != "cpu"):
        return None
    lib = attention_library()
    structs = []
    for layer in layers:
        if (lib is None or type(layer) is not _LeanSiglipLayer or layer.training or layer._forward_hooks
                or layer._forward_pre_hooks or layer.self_attn.config._attn_implementation != "sdpa"
                or type(layer.mlp.activation_fn) is not _GELUTanhCPU):
            return None
        struct = fused_layer(layer, hidden_states)
        if struct is None or not fused_layer_is_faster(lib, struct, hidden_states,
                                                       lambda x, layer=layer: layer._c_passes(lib, x)):
            return None
        structs.append(struct)
    return vit_layers(lib, structs, hidden_states)


def _lean_siglip_layers(module: nn.Module) -> None:
    for sub in module.modules():
        if type(sub) is SiglipEncoderLayer:
            sub.__class__ = _LeanSiglipLayer


_ONE_CALL_MAX_CHANNELS = 512  # the blocks' states of every channel wait between time tiles (the scan's SPAN)


class _OneCallDirections:
    """Mixin for `MambaMixer` / `BiMambaMixer`: a direction as one C call (``cpu_kernel.mixer_direction``)
    where `_one_call_library` says it applies, else the mixer's own (see the module docstring)."""

    def _direction(self, x, z, valid, sfx, reverse, state=None, want_state=False, add_to=None):
        conv, x_proj, dt_proj, A_log, D = self._direction_params(sfx)
        lib = None
        if valid is None and state is None and not want_state and dt_proj.bias is not None:
            lib = _one_call_library(self, x, z, (conv.weight, conv.bias, x_proj.weight, x_proj.bias, dt_proj.weight,
                                                 dt_proj.bias, A_log, D), x_proj)
        if lib is None:
            return super()._direction(x, z, valid, sfx, reverse, state, want_state, add_to)
        into = add_to if add_to is not None and add_to.dtype == torch.float32 and add_to.is_contiguous() else None
        w, b = packed_weight(x_proj.weight, x_proj.bias, lib.storm_lanes)
        y = cpu_kernel.mixer_direction(lib, x, z, conv_taps(conv.weight), conv.bias, w, b, self.dt_rank,
                                       dt_proj.weight, state_matrix(A_log), D, dt_proj.bias, reverse, into)
        return (y if add_to is None or into is not None else add_to + y), None


def _one_call_library(mixer, x, z, params, x_proj):
    """The C library where a direction can run as one call: float32 CPU inference (grad mode off),
    contiguous channels and parameters, one intra-op thread (with more, the separate kernels split
    their work over them), at most `_ONE_CALL_MAX_CHANNELS` inner channels, dt_rank <= FUSED_RANK_PER_STATE
    x d_state (as where the scan forms delta itself) and a plain x_proj; else None."""
    if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32 or z.dtype != torch.float32
            or x.stride(2) != 1 or z.stride(2) != 1 or torch.get_num_threads() != 1
            or mixer.d_inner > _ONE_CALL_MAX_CHANNELS or mixer.dt_rank > FUSED_RANK_PER_STATE * mixer.d_state
            or not plain_linear(x_proj)
            or any(p is not None and (p.dtype != torch.float32 or not p.is_contiguous()) for p in params)):
        return None
    return cpu_kernel.load()


class _MambaMixerCPU(_OneCallDirections, MambaMixer):
    pass


class _BiMambaMixerCPU(_OneCallDirections, BiMambaMixer):
    pass


_ONE_CALL_CLASSES = {MambaMixer: _MambaMixerCPU, BiMambaMixer: _BiMambaMixerCPU}


def _one_call_mixers(module: nn.Module) -> None:
    for sub in module.modules():
        if type(sub) in _ONE_CALL_CLASSES:
            sub.__class__ = _ONE_CALL_CLASSES[type(sub)]


def language_model_of(model) -> nn.Module | None:
    """The LLM of a video-LLM: STORM's `model.language_model`; transformers' LLaVA models keep theirs
    in `model.model.language_model`. None where there is neither."""
    return getattr(model, "language_model", None) or getattr(getattr(model, "model", None), "language_model", None)


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
    lm = language_model_of(model)
    if lm is not None:
        drop_decode_step(lm)
        if getattr(lm, "config", None) is not None:
            use_storm_sdpa(lm.config)
    _fast_gelu_tanh(model)
    _lean_siglip_layers(model)
    _lean_llm_modules(model)
    _one_call_mixers(model)
    use_measured_linears(model)
