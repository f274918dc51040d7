"""Softmax attention and LayerNorm through the C kernel (`ssm/_attention_kernel.c`), for CPU inference,
and the `storm_sdpa` attention function that hands transformers' LLM attention to it.

- `c_attention`: softmax(scale·q·kᵀ)·v over strided (B, H, L, hd) views, every key visible or causal
  (also after cached positions), grouped-query heads, float32 or bfloat16 arrays, split over torch's
  threads by (batch, head). `c_attention_is_faster` says whether it or PyTorch's SDPA runs a call
  (timed per shape class on this CPU). `frame_attention` is a ViT layer's case (the heads side by
  side in the last dimension), `c_layer_norm` a LayerNorm with the residual add folded in: both for
  `fast_paths._LeanSiglipLayer`. `c_rms_norm`: the LLM's RMSNorm (`fast_paths._RMSNormCPU`).
- `storm_sdpa_attention` (registered as "storm_sdpa" by `use_storm_sdpa`): transformers' SDPA
  attention, with a causal prompt — from the start, or continuing a cache without padding — through
  `c_attention` where it is the faster, and a one-token step with grouped KV heads as one r x L
  product per KV head.
- `attention_library()`: the C library, or None without a compiler or with
  `STORM_VLM_ATTENTION_KERNEL=0` (transformers' computation, bit for bit).

tests/test_attention_kernel.py checks them against PyTorch's SDPA and LayerNorm (float64 references).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from storm_vlm.model.matmul_backend import timed
from storm_vlm.model.ssm import _threads, cpu_kernel

__all__ = ["STORM_SDPA", "ATTENTION_KERNEL_ENV", "attention_choices", "attention_library", "c_attention",
           "c_attention_is_faster", "c_layer_norm", "c_rms_norm", "continues_cache", "frame_attention",
           "storm_sdpa_attention", "use_storm_sdpa"]


STORM_SDPA = "storm_sdpa"
ATTENTION_KERNEL_ENV = "STORM_VLM_ATTENTION_KERNEL"
_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)
_ATTENTION_WORK = 1 << 21  # multiply-adds per thread at least: a hand-off to a worker costs tens of microseconds
_LN_ELEMENTS = 1 << 16  # elements per thread at least, likewise
_TIMED_WORK = 1 << 24  # multiply-adds of a call at least before C and SDPA are timed against each other
_SAMPLE_ROWS = 512  # queries (and keys) they are timed on at most
_SDPA_MARGIN = 1.15  # how much faster SDPA must be to be taken (the C kernel is the path tested everywhere)
_ATTENTION_CHOICE: dict = {}  # (dtype, H, G, hd, causal, rows bucket) -> "c" | "sdpa"


def attention_library():
    """The C kernel library for the attention and LayerNorm paths, or None: no C compiler, or
    STORM_VLM_ATTENTION_KERNEL=0 (false/off/no), which keeps transformers' computation."""
    return None if cpu_kernel.switched_off(ATTENTION_KERNEL_ENV) else cpu_kernel.load_library()


def _check_rows(name: str, x: torch.Tensor, *others: torch.Tensor | None) -> None:
    """The row kernels read and write float32 through raw pointers: x and every other tensor must be
    contiguous float32 CPU tensors, each the shape of x or of one row of it (a ValueError otherwise,
    where a wrong dtype or size would read or write outside the buffers)."""
    for t in (x, *(o for o in others if o is not None)):
        if (t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous()
                or t.shape not in (x.shape, x.shape[-1:])):
            raise ValueError(f"{name}: needs contiguous float32 CPU tensors shaped like x {tuple(x.shape)} or "
                             f"its rows, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _by_rows(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """y = fn(*args, y, d, r0, r1) of a C row kernel over x's rows of d (a new y like x), the rows
    split over torch's threads."""
    y = torch.empty_like(x)
    d = x.shape[-1]
    rows = _threads.spans(x.numel() // d, max(1, _LN_ELEMENTS // d))
    _threads.run_all(fn, [(*args, y.data_ptr(), d, r0, r1) for r0, r1 in rows])
    return y


def c_layer_norm(lib, x: torch.Tensor, norm: nn.LayerNorm, residual: torch.Tensor | None = None) -> torch.Tensor:
    """norm(x) in one C pass per row (float32, contiguous); with `residual`, x += residual first, in place."""
    _check_rows("c_layer_norm", x, residual, norm.weight, norm.bias)
    return _by_rows(lib.storm_add_layer_norm_f32, x, x.data_ptr(), None if residual is None else residual.data_ptr(),
                    norm.weight.data_ptr(), norm.bias.data_ptr(), norm.eps)


def c_rms_norm(lib, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's / Qwen2's RMSNorm of x (float32, contiguous, weight float32 of x's last size) in one C
    pass per row: weight · x / sqrt(mean(x²) + eps)."""
    _check_rows("c_rms_norm", x, weight)
    return _by_rows(lib.storm_rms_norm_f32, x, x.data_ptr(), weight.data_ptr(), eps)


def c_attention(lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
                causal: bool) -> torch.Tensor:
    """out = softmax(scale·q·kᵀ)·v per batch row and head (`_attention_kernel.c`), every key visible or
    causal (the L queries are the last L of the Lk key positions: query t sees keys 0..Lk - L + t);
    grouped-query heads h read KV head h // (H / G). q, out (B, H, L, hd), k, v (B, G, Lk, hd): views
    with unit last stride (any other strides: transposed or column-sliced views need no copy), all
    float32 or all bfloat16: widened and computed in float32, or in the avx512bf16 build (CPUs with
    AVX512-BF16) multiplied as bf16 dot products, the probabilities rounded to bf16 for the value
    product as PyTorch's bf16 SDPA rounds them. The (batch, head) pairs are split over torch's
    threads."""
    b, heads, length, hd = q.shape
    keys = k.shape[2]
    if (any(t.dtype != q.dtype or t.device.type != "cpu" or t.dim() != 4 or t.stride(-1) != 1 for t in (q, k, v, out))
            or q.dtype not in _ATTENTION_DTYPES or out.shape != q.shape or k.shape != v.shape
            or k.shape[0] != b or k.shape[3] != hd or heads % k.shape[1]):
        raise ValueError(f"c_attention: needs float32 or bfloat16 CPU tensors of one dtype with unit last stride, q and "
                         f"out (B, H, L, hd), k and v (B, G, Lk, hd) with G dividing H; got q {tuple(q.shape)} {q.dtype}, "
                         f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}, out {tuple(out.shape)} {out.dtype}")
    if causal and keys < length:
        raise ValueError(f"causal attention of {length} queries needs at least as many keys, got {keys}")
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]
    work = length * keys * hd // (2 if causal else 1)
    pairs = _threads.spans(b * heads, max(1, _ATTENTION_WORK // max(work, 1)))
    args = (q.data_ptr(), strides[0], k.data_ptr(), strides[1], v.data_ptr(), strides[2], out.data_ptr(), strides[3],
            heads, k.shape[1], length, keys, hd, scale, int(causal), int(q.dtype == torch.bfloat16))
    if any(_threads.run_all(lib.storm_attention, [(*args, p0, p1) for p0, p1 in pairs])):
        raise MemoryError("storm_vlm: no memory for the attention kernel's scratch")
    return out


def frame_attention(lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """A ViT's attention, every key visible: q, k, v (B, L, heads·hd) views with unit last stride
    (column slices of one fused q/k/v product too), float32 or bfloat16 -> (B, L, heads·hd) in q's
    dtype, the heads side by side (what out_proj reads). Through `c_attention`, or PyTorch's SDPA
    where `c_attention_is_faster` says so."""
    b, length, width = q.shape
    dtype = q.dtype if q.dtype in _ATTENTION_DTYPES else torch.float32
    q, k, v = (t if t.dtype == dtype and t.stride(-1) == 1 else t.to(dtype).contiguous() for t in (q, k, v))
    split = [t.view(b, length, heads, width // heads).transpose(1, 2) for t in (q, k, v)]
    if not c_attention_is_faster(lib, *split, scale=scale, causal=False):
        out = torch.nn.functional.scaled_dot_product_attention(*split, scale=scale)
        return out.transpose(1, 2).reshape(b, length, width)
    o = q.new_empty(b, length, width)
    c_attention(lib, *split, o.view(b, length, heads, width // heads).transpose(1, 2), scale=scale, causal=False)
    return o


def c_attention_is_faster(lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> bool:
    """Whether `c_attention` should run this call (q (B, H, L, hd), k, v (B, G, Lk, hd)) rather than
    PyTorch's SDPA. Which is faster depends on the CPU (PyTorch's flash kernel runs its blocks through
    oneDNN, which uses AMX where the CPU has it), the dtype, the head layout and the length, so it is
    timed, not assumed: once per (dtype, H, G, hd, causal, power-of-two bucket of L up to
    `_SAMPLE_ROWS`), on the first call of at least `_TIMED_WORK` multiply-adds, both run on its first
    `_SAMPLE_ROWS` queries and keys (a few frames' worth), and SDPA is taken only when
    `_SDPA_MARGIN` times faster. Smaller calls take the C kernel untimed. STORM_VLM_ATTENTION_KERNEL=1
    (true/on/yes) pins the C kernel (no timing; bit-for-bit the same result on every run)."""
    if cpu_kernel.switched_on(ATTENTION_KERNEL_ENV):
        return True
    b, heads, length, hd = q.shape
    work = b * heads * length * k.shape[2] * hd // (2 if causal else 1)
    if work < _TIMED_WORK:
        return True
    rows = min(1 << (length.bit_length() - 1), _SAMPLE_ROWS)
    key = (q.dtype, heads, k.shape[1], hd, causal, rows)
    choice = _ATTENTION_CHOICE.get(key)
    if choice is None:
        frames = max(1, min(b, _SAMPLE_ROWS // length))  # frames: a few whole ones; a prompt: its first rows
        qs, ks, vs = q[:frames, :, :rows], k[:frames, :, :rows], v[:frames, :, :rows]
        out = torch.empty(frames, rows, heads, hd, dtype=q.dtype).transpose(1, 2)
        times = timed({"c": lambda: c_attention(lib, qs, ks, vs, out, scale, causal),
                       "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                           qs, ks, vs, scale=scale, is_causal=causal, enable_gqa=heads != k.shape[1])})
        choice = "sdpa" if times["sdpa"] * _SDPA_MARGIN < times["c"] else "c"
        _ATTENTION_CHOICE[key] = choice
    return choice == "c"


def attention_choices() -> dict:
    """What `c_attention_is_faster` timed in this process: {(dtype, H, G, hd, causal, rows): "c" | "sdpa"}."""
    return dict(_ATTENTION_CHOICE)


def storm_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    """transformers' SDPA attention, with two faster cases on CPU.

    query (B, H, q, hd), key/value (B, G, L, hd) with H = G·r.
    - One query token (decode) with grouped KV heads (r > 1), no mask: the r query heads of a group
      become r query rows of that group's KV head — (B, G, r, hd) against (B, G, L, hd): one r x L
      product per KV head, where `scaled_dot_product_attention(..., enable_gqa=True)` runs H
      separate 1 x L products.
    - Causal prefill (q > 1 tokens; no mask — transformers' causal-only case — or exactly the causal
      mask of a prompt continuing a cache, `continues_cache`) in float32 or bfloat16 (under
      autocast) without autograd, with the C kernels built: `c_attention`
      (`ssm/_attention_kernel.c`) reads each KV head once for its r query heads and the
      (B, H, q, hd) views as they are, where PyTorch's CPU flash kernel runs blocked products sized
      for wide heads; unless `c_attention_is_faster` finds SDPA faster on this CPU. Same result
      within float rounding.
    Every other case (padding or other masks, autograd, CUDA, ...) goes to `sdpa_attention_forward`
    unchanged.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (query.device.type == "cpu" and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
             and not kwargs.get("output_attentions", False) and key.shape[1] * groups == query.shape[1])
    length = query.shape[2]
    if plain and attention_mask is None and length == 1 and groups > 1:
        b, h, _, hd = query.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, h // groups, groups, hd), key, value, dropout_p=dropout, scale=scaling
        )
        return out.reshape(b, h, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # under autocast SDPA casts q, k, v to the autocast dtype (rotary has made q and k float32 again)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    if (plain and causal and length > 1 and key.shape[2] >= length and (dropout == 0 or not module.training)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
            and dtype in _ATTENTION_DTYPES and query.shape[-1] == key.shape[-1] == value.shape[-1]
            and (attention_mask is None or continues_cache(attention_mask, length, key.shape[2]))):
        lib = attention_library()
        if lib is not None:
            b, h, _, hd = query.shape
            if attention_mask is None:  # as transformers: the causal mask covers the first `length` keys
                key, value = key[:, :, :length], value[:, :, :length]
            query, key, value = (t if t.dtype == dtype and t.stride(-1) == 1 else t.to(dtype).contiguous()
                                 for t in (query, key, value))
            scale = hd ** -0.5 if scaling is None else scaling
            if c_attention_is_faster(lib, query, key, value, scale, causal=True):
                out = query.new_empty(b, length, h, hd)
                c_attention(lib, query, key, value, out.transpose(1, 2), scale, causal=True)
                return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def continues_cache(mask: torch.Tensor, length: int, keys: int) -> bool:
    """Whether `mask` (transformers' boolean SDPA mask, (B or 1, 1, length, keys)) is exactly causal
    for `length` new tokens after `keys - length` cached ones, in every batch row (no padding): a
    prompt that continues a cache, which `c_attention` computes without the mask. One pass over the
    mask, 1/(heads·hd) of what the attention reads."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (length, keys):
        return False
    causal = torch.ones(length, keys, dtype=torch.bool, device=mask.device).tril_(keys - length)
    return bool(torch.equal(mask, causal.expand_as(mask)))


def use_storm_sdpa(config) -> None:
    """Switch a text config from "sdpa" to STORM_SDPA (same masks; faster GQA decode and causal
    prefill on CPU)."""
    if config._attn_implementation == "sdpa" and getattr(config, "num_attention_heads", None):
        AttentionInterface.register(STORM_SDPA, storm_sdpa_attention)  # idempotent
        AttentionMaskInterface.register(STORM_SDPA, sdpa_mask)
        config._attn_implementation = STORM_SDPA
