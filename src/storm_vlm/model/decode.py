"""The decode step (`DecodeStep`, Llama-style LLMs: Qwen2, Llama): a one-token step runs through a lean
path on the `StormKVCache` (preallocated buffers the step writes into in place). The whole step
(embedding rows, every layer, final norm, LM head) runs in one call of a C function
(`ssm/_decode_kernel.c`, built with the scan kernel by `ssm/cpu_kernel.py`) for a batch's rows at once —
one row, or a batched generation's left-padded rows (a server's or an evaluation's batch), fp32
weights or the bfloat16 precision's bf16 linear layers, SiLU MLP, on a float32 or bf16 cache. It
reads the model's own matrices, no copies, each as one sequential stream that serves every row; the
per-layer small operations (norms, rotary, softmax, gate) then cost microseconds instead of a tensor
operation each. It runs on torch's threads (each product's rows and the attention's query heads split
between them); with several, the first steps of one row also time it against the tensor step and the
faster runs the rest. `STORM_VLM_DECODE_KERNEL=1` pins it, `=0` turns it off; without a C compiler or
with `compile_decode=True`, an unpadded step runs as tensor operations: ~20 tensor ops per layer instead
of the ~60 of transformers' generic forward, q/k/v and gate/up read as one matrix each, rotary
embedding as one small product (a padded batch then takes the model's own forward). A decode step
reads every weight once per token, so it is bound by how fast the weights stream; each projection is
read in the layout that streams faster for its shape on this host — an input-major (k x n) copy or the
model's own (n x k) matrix — timed when the step is built (the copies only where they fit in a quarter
of free memory; otherwise the model's own matrices). `enable_fast_paths(model, compile_decode=True)`
also runs the per-layer step through `torch.compile` (needs a C++ compiler; the first steps pay the
compilation).

`decode_step` is what StormForConditionalGeneration.forward calls; `fast_paths.enable_fast_paths`
sets the switches it reads.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from storm_vlm.model.kv_cache import GrowingKVLayer, StormKVCache
from storm_vlm.model.matmul_backend import fastest
from storm_vlm.model.ssm import cpu_kernel
from storm_vlm.utils import available_memory_bytes

__all__ = ["DecodeStep", "decode_step", "decode_step_path", "drop_decode_step"]

_ROPE_BLOCK = 256  # positions of the rotary embedding computed at once for the C decode step
_DECODE_MODEL_TYPES = ("qwen2", "llama")
_DECODE_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # language model -> DecodeStep
_C_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # cache -> (key, DecodeStep._kernel_plan)
_CHECKED_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # cache -> ref to the step that checked
_KERNEL_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)  # of the projections the C step reads
_PACK_MEMORY_SHARE = 0.25  # input-major copies only while they take at most this share of free memory


_DECODE_KERNEL_ENV = "STORM_VLM_DECODE_KERNEL"


def _decode_kernel_setting() -> str:
    """STORM_VLM_DECODE_KERNEL as "off" (0/false/off/no: the step runs as tensor operations), "on"
    (1/true/on/yes: the C step for every row it applies to, whatever the thread count) or "auto"
    (anything else: with several torch threads it is timed against the tensor step first, see
    `DecodeStep.__call__`)."""
    if cpu_kernel.switched_off(_DECODE_KERNEL_ENV):
        return "off"
    return "on" if cpu_kernel.switched_on(_DECODE_KERNEL_ENV) else "auto"


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
    # The step is built during a generation's first decode step: drawing from torch's global generator
    # here would shift every later sample, so `manual_seed(s); generate(do_sample=True)` would give other
    # tokens on a model's first generation than on its next ones (and than transformers' model)
    x = torch.randn(1, mats[0].shape[1], dtype=mats[0].dtype, generator=torch.Generator().manual_seed(0))
    def own():
        for w in mats:
            torch.mm(x, w.t())
    def input_major():
        for w in copies:
            torch.mm(x, w)
    return copies if fastest({"own": own, "input_major": input_major}) == "input_major" and \
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
    """A one-token decode step for a Llama-style causal LM (Qwen2, Llama) on CPU, fp32.

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
    the model's own matrices. Those layouts serve the tensor-operation path (no C compiler, or the
    tensor step timed faster); the C step (`_kernel_step`) reads the model's own matrices.
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
        # the tensor path computes in float32 on float32 weights; with bfloat16 projections (the bfloat16
        # precision) only the C step runs, and the tensor path's copies would be memory spent for nothing
        self.tensor_path = all(w.dtype == torch.float32 for w in mats)
        if pack is None:
            pack = self.tensor_path and nbytes <= _PACK_MEMORY_SHARE * available_memory_bytes()
        self.fused = bool(pack)
        ln1, _, _, mlp0 = mods[0]
        act = F.silu if getattr(cfg, "hidden_act", None) == "silu" else mlp0.act_fn
        # The C step (every row, every layer in one call) reads the model's own tensors, 16 per layer in
        # storm_decode_f32's order: the two norms' weights (float32), then each projection's weight and
        # bias (all float32, or all bfloat16: the bfloat16 precision's LLM linear layers)
        own, norms, projections = [], [], []
        for norm1, norm2, a, mlp in mods:
            own += [norm1.weight, norm2.weight]
            norms += [norm1.weight, norm2.weight]
            for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                own += [m.weight, m.bias]
                projections += [t for t in (m.weight, m.bias) if t is not None]
        # ... and the embedding table, the final norm's weight and the LM head (float32 or bfloat16)
        self._kernel_ends = (inner.embed_tokens.weight, inner.norm.weight, lm.lm_head.weight, lm.lm_head.bias)
        head = [t for t in self._kernel_ends[2:] if t is not None]
        self._kernel = None
        if (kernel and not compile_layers and act is F.silu and _decode_kernel_setting() != "off"
                and type(inner.embed_tokens) is nn.Embedding
                and all(t.is_contiguous() and t.dtype == torch.float32 for t in norms + list(self._kernel_ends[:2]))
                and all(t.is_contiguous() and t.dtype in _KERNEL_WEIGHT_DTYPES for t in projections + head)
                and len({t.dtype for t in projections}) == 1 == len({t.dtype for t in head})):
            self._kernel = cpu_kernel.load_library()
            self._kernel_bf16 = (int(projections[0].dtype == torch.bfloat16), int(head[0].dtype == torch.bfloat16))
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

    def _rope(self, positions: list[int]):
        """(cos, sin), each (B, hd), of the rotary embedding at each row's position, as the model's
        rotary module gives them; None for a partial rotary embedding (not what the C step computes).
        Taken from a table of positions computed by the module in one call (from the smallest position
        to _ROPE_BLOCK past the largest): one call per step costs more than the step's other Python
        work. RoPE types whose module changes its frequencies with the positions (dynamic, longrope)
        are called at every step, with every row's position, as the model's forward calls them."""
        rot = self._lm().model.rotary_emb
        lo, hi = min(positions), max(positions)
        rope_type = str(getattr(rot, "rope_type", "default"))
        if "dynamic" in rope_type or "longrope" in rope_type:
            cos, sin = rot(torch.empty(1), torch.tensor(positions)[:, None])
            cos, sin = cos[:, 0], sin[:, 0]
        else:
            table = self._rope_table
            if (table is None or not table[0] <= lo <= hi < table[0] + table[1].shape[0]
                    or table[3] != rot.inv_freq.data_ptr()):
                cos, sin = rot(torch.empty(1), torch.arange(lo, hi + _ROPE_BLOCK)[None])
                table = self._rope_table = (lo, cos[0].contiguous(), sin[0].contiguous(), rot.inv_freq.data_ptr())
            first, cos, sin, _ = table
            if lo == hi:  # (one row, or rows at one position: a view, no copy)
                cos, sin = cos[lo - first].expand(len(positions), -1), sin[lo - first].expand(len(positions), -1)
            else:
                rows = torch.tensor(positions) - first
                cos, sin = cos[rows], sin[rows]
        if cos.shape[1] != self.hd or self.hd % 2:
            return None
        return cos.contiguous(), sin.contiguous()

    def _kernel_plan(self, cache):
        """What the C step needs of `cache` besides the position (after `reserve(1)` on every layer):
        (pointer arrays of the key / value buffers and of the transposed keys, their strides, the
        bf16 bits), or None where it does not apply (buffers not (B, G, capacity, hd) with hd
        contiguous, float32 or bfloat16, alike in every layer). Kept per cache object (not on it: a
        copy of the cache has buffers of its own) until a layer's buffers change (their
        `generation`)."""
        lanes = self._kernel.storm_lanes
        key = (lanes, [layer.generation for layer in cache.layers])
        plan = _C_PLANS.get(cache)
        if plan is not None and plan[0] == key:
            return plan[1]
        bufs = [(layer._key_buf, layer._value_buf) for layer in cache.layers]
        kb0, vb0 = bufs[0]
        dtypes = (torch.float32, torch.bfloat16)
        usable = (kb0.stride(-1) == 1 and kb0.dtype in dtypes and vb0.dtype in dtypes
                  and all(kb.stride() == vb.stride() == kb0.stride() and kb.dtype == kb0.dtype
                          and vb.dtype == vb0.dtype for kb, vb in bufs))
        plan = None
        if usable:
            # bf16 values: a prefill under bf16 autocast, whose attention multiplies q and k rounded to bf16
            # (SDPA casts them), as the step's scores then do, on keys kept as bf16 pairs
            pairs = vb0.dtype == torch.bfloat16
            kts = [layer.transposed_keys(lanes, pairs) for layer in cache.layers]  # may start new ones
            key = (lanes, [layer.generation for layer in cache.layers])
            plan = ((ctypes.c_void_p * (2 * len(bufs)))(*[t.data_ptr() for pair in bufs for t in pair]),
                    (ctypes.c_void_p * len(kts))(*[t.data_ptr() for t in kts]), kts[0].stride(0), kts[0].stride(1),
                    kb0.stride(0), kb0.stride(1), kb0.stride(2),
                    (kb0.dtype == torch.bfloat16) | (vb0.dtype == torch.bfloat16) << 1 | pairs << 2)
        _C_PLANS[cache] = (key, plan)
        return plan

    def _kernel_step(self, input_ids: torch.Tensor, pos: int, cache, positions: list[int],
                     froms: torch.Tensor | None) -> torch.Tensor | None:
        """The tokens' logits (B, V) through the C step (`_decode_kernel.c`: the embedding, every layer,
        the final norm and the LM head, for the B rows at once), their keys and values written at `pos`
        of the cache's buffers (after `reserve(1)` on every layer), row b's rotary embedding at
        positions[b], its attention over cache positions froms[b].. (None: all); None (nothing done)
        where it does not apply: no kernel, a token outside the embedding table (its error comes from
        the embedding), buffers or rotary embedding not as the C step takes them."""
        if self._kernel is None:
            return None
        embed, norm_w, head_w, head_b = self._kernel_ends
        tokens = input_ids[:, 0].contiguous()
        inside = bool(((tokens >= 0) & (tokens < embed.shape[0])).all())
        plan = self._kernel_plan(cache) if inside else None
        rope = self._rope(positions) if plan is not None else None
        if rope is None:
            return None
        kv, kt, ktb, ktg, sb, sg, st, kv_bf16 = plan
        heads, kv_heads, hd, scaling, inter, eps, _, _ = self.dims
        d, rows = embed.shape[1], tokens.shape[0]
        # scratch per thread, not per step object: two threads may decode with the same model
        threads = torch.get_num_threads()
        need = self._kernel.storm_decode_scratch(rows, d, heads, kv_heads, hd, inter, pos + 1, threads)
        scratch = getattr(self._scratch, "buf", None)
        if scratch is None or scratch.numel() < need:
            scratch = self._scratch.buf = torch.empty(need + need // 4)
        logits = torch.empty(rows, head_w.shape[0])
        layers = cache.layers
        cos, sin = rope
        w_bf16, head_bf16 = self._kernel_bf16
        self._kernel.storm_decode_f32(rows, len(layers), d, heads, kv_heads, hd, inter, eps, scaling, pos,
                                      None if froms is None else froms.data_ptr(), embed.data_ptr(),
                                      tokens.data_ptr(), cos.data_ptr(), sin.data_ptr(), self._kernel_weights, w_bf16,
                                      kv, sb, sg, st, kv_bf16, kt, ktb, ktg, min([layer._keys_t_len for layer in layers]),
                                      norm_w.data_ptr(), self.norm[1], head_w.data_ptr(),
                                      None if head_b is None else head_b.data_ptr(), head_bf16, head_w.shape[0],
                                      logits.data_ptr(), scratch.data_ptr(), threads)
        for layer in layers:
            layer._keys_t_len = pos + 1
        return logits

    def __call__(self, input_ids: torch.Tensor, cache, kernel_only: bool = False, positions: list[int] | None = None,
                 froms: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits (B, 1, V) of the next token; None (the cache untouched) where the C step does not
        apply and either `kernel_only` is set, the cache is not float32 (a prefill under autocast) or
        the rows are not all at the cache's length with no padding: `positions` (B ints: each row's
        rotary position; default: the cache's length) and `froms` (B int64: each row's first
        attended cache position; default: all 0) describe a left-padded batch, which only the C step
        takes.

        With several torch threads both steps are threaded (the C step splits each product's rows
        and the attention's query heads, with a barrier between dependent parts; the tensor step
        through BLAS / oneDNN), and which is faster depends on the host and the model's size. Then
        the first steps of one row decide, once per thread count: the C step twice (the first copies
        every cached key into its layout, untimed), the tensor step once, and the faster takes the
        steps after (both give the model's logits up to float rounding). STORM_VLM_DECODE_KERNEL=1
        pins the C step, =0 the tensor step."""
        lm = self._lm()
        pos = cache.get_seq_length()
        plain = froms is None and (positions is None or all(p == pos for p in positions))
        positions = positions or [pos] * input_ids.shape[0]
        bufs = [layer.reserve(1) for layer in cache.layers]
        threads = torch.get_num_threads()
        trials = None
        if (self._kernel is not None and threads > 1 and threads not in self._kernel_wins and not kernel_only
                and input_ids.shape[0] == 1 and plain and _decode_kernel_setting() != "on"
                and all(t.dtype == torch.float32 for pair in bufs for t in pair)):
            trials = self._trials.setdefault(threads, [])
        start = time.perf_counter()
        kernel = self._kernel_wins.get(threads, True) and (trials is None or len(trials) < 2)
        logits = self._kernel_step(input_ids, pos, cache, positions, froms) if kernel else None
        if logits is None:
            h = lm.model.embed_tokens(input_ids[:, 0])  # (B, d)
            if kernel_only or not plain or any(t.dtype != h.dtype for pair in bufs for t in pair):
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
    """`model`'s output for one decode step through `DecodeStep`, or None where it does not apply
    (then the model's own forward runs): CPU, fp32 weights (or bf16 LLM linear layers), no autograd,
    eval mode, one new token per row on a non-empty `StormKVCache`, at most left padding in
    `attention_mask` (a batched generation's: zeros, then ones), the new tokens at the cache's
    length, an LLM `DecodeStep` supports. Each row's rotary position is what the model's forward
    would give it: `position_ids` (generate passes them, counted from each row's first real token),
    else the cache's length. Under CPU autocast (the bfloat16 precision: bf16 products), with bf16
    linear layers (that precision as the loaders set it up: storm_vlm.inference.prepare_for_inference)
    or with padding, only the C step is taken, in float32 on a bf16 or fp32 cache: autocast would cast
    every fp32 weight to bf16 at every step, more work than reading it once, and the float32 step is
    at least as accurate. Called by StormForConditionalGeneration.forward."""
    if (not getattr(model, "_storm_decode", True) or input_ids is None or inputs_embeds is not None
            or input_ids.dim() != 2 or input_ids.shape[1] != 1 or input_ids.device.type != "cpu"
            or torch.is_grad_enabled() or model.training or use_cache is False
            or not isinstance(cache, StormKVCache)
            or not set(kwargs) <= _DECODE_KWARGS or not isinstance(kwargs.get("logits_to_keep", 0), int)
            or kwargs.get("return_dict", True) is False):
        return None
    lm = model.language_model
    if (lm.lm_head.weight.dtype not in _KERNEL_WEIGHT_DTYPES
            or not all(type(layer) is GrowingKVLayer for layer in cache.layers)):
        return None
    past, rows = cache.get_seq_length(), input_ids.shape[0]
    if past == 0 or len(cache.layers) != lm.config.num_hidden_layers:
        return None
    froms = None
    if attention_mask is not None:
        if attention_mask.shape != (rows, past + 1):
            return None
        if not bool(attention_mask.all()):
            froms = past + 1 - attention_mask.sum(1, dtype=torch.int64)
            if not torch.equal(attention_mask.bool(), torch.arange(past + 1) >= froms[:, None]):
                return None  # not left padding
    positions = None
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[1] != 1 or position_ids.shape[0] not in (1, rows):
            return None
        positions = position_ids[:, 0].expand(rows).tolist()
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
    if not torch.is_autocast_enabled("cpu") and step.tensor_path:
        logits = step(input_ids, cache, positions=positions, froms=froms)
    else:
        with torch.autocast("cpu", enabled=False):
            logits = step(input_ids, cache, kernel_only=True, positions=positions, froms=froms)
    return None if logits is None else CausalLMOutputWithPast(logits=logits, cache=cache)


def decode_step_path(model) -> str | None:
    """How `model`'s current decode step runs one row (`DecodeStep.path`); None before its first step."""
    lm = getattr(model, "language_model", None)
    step = None if lm is None else _DECODE_STEPS.get(lm)
    return None if step is None else step.path


def drop_decode_step(lm) -> None:
    """Forget the step built for the language model `lm`: the next decode step builds it afresh with
    the model's current switches."""
    _DECODE_STEPS.pop(lm, None)
