"""Analytic cost model of a STORM video-LLM: parameters, FLOPs and bytes per module.

Pure arithmetic on a `StormConfig` (no weights, no tensors). It counts what the code in this
repository executes for one video of T frames:

* **vision tower** (SigLIP, per frame, P = (image_size / patch_size)² patches, width d, MLP width I):
  patch embedding 2·P·(3·p²)·d; per layer q/k/v/o projections 8·P·d², attention 4·P²·d
  (QKᵀ and AV, 2·P²·d each), MLP 4·P·d·I. Only the layers up to `vision_feature_layer` run
  (26 of SigLIP-so400m's 27 at -2; the post-layernorm and pooling head never run), as
  `StormForConditionalGeneration` stops the tower there.
* **projector** on the sweep sequence of Lp = T·N tokens (N = P / r² after the r x r pixel shuffle,
  C = r²·d_vision inputs, width D = LLM width): pixel shuffle moves bytes only (0 FLOPs); the input
  Linear 2·Lp·C·D; each Mamba layer: in_proj 2·Lp·D·2Di (Di = expand·D), out_proj 2·Lp·Di·D, and
  per direction (two when bidirectional) depthwise conv 2·Lp·Di·K, x_proj 2·Lp·Di·(R + 2S),
  dt_proj 2·Lp·R·Di and the selective scan 6·Lp·Di·S (per state and step, as
  `selective_scan_reference` computes it: δ·A, (δu)·B, h·dA + (δu)B, C·h and its sum over the states;
  the exp and the per-channel δ·u, D·u and z gate are left out, as elementwise). The MLP baseline:
  2·Lp·C·D + 2·Lp·D·D. Compression adds one FLOP per pooled input element: T·N·D for temporal
  pooling, then (frames left)·N·D for spatial pooling.
* **LLM prefill** over L = visual tokens + text tokens (width d, MLP width I, h query heads and g
  key/value heads of size hd): per layer q/o 4·L·d·h·hd, k/v 4·L·d·g·hd, attention 4·L²·h·hd
  (dense, as SDPA computes it; `causal=True` counts the lower triangle only, as flash kernels
  do), SwiGLU MLP 6·L·d·I; the LM head 2·d·V for the last position only (generation keeps one
  logit row).
* **decode**, per generated token with c tokens in the KV cache: per layer the same projections
  and MLP for one token plus attention 4·(c+1)·h·hd; the LM head 2·d·V. Its bytes are the LLM's
  weights it reads (all but the input-embedding table, of which it reads one row, unless the LM head
  is tied to it and reads it whole) plus the KV cache,
  2·layers·g·hd·(c+1) elements: a decode step is memory bound on GPUs and CPUs alike, and
  compression shrinks only the KV part (see `decode_bounds`).

Norms, activations, softmax, RoPE and residual adds are left out (elementwise, < 1% of FLOPs).
Token counts come from `StormConfig.num_visual_tokens`, the one place that counts them.

`real_config()` is the paper's size: SigLIP-so400m-patch14-448 (without the pooling head, as
`storm-vlm build` loads it) + Qwen2-7B with the 2-layer bidirectional Mamba projector. `benchmarks/cost_model.py` prints the tables.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

__all__ = [
    "QWEN2_7B",
    "PAPER_REFERENCE",
    "DEFAULT_COMPRESSIONS",
    "Compression",
    "ModuleCost",
    "PipelineCost",
    "Hardware",
    "A100_80GB",
    "real_config",
    "with_compression",
    "parse_compressions",
    "param_counts",
    "vision_tower_cost",
    "projector_cost",
    "llm_prefill_cost",
    "decode_cost",
    "decode_bounds",
    "pipeline_cost",
    "kv_bytes_per_token",
    "gemm_shapes",
]

# Qwen2-7B (the LLM of the paper's main model).
QWEN2_7B = dict(
    model_type="qwen2",
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
)

# What the paper states about cost, quoted from its abstract (STORM, arXiv 2503.04130): compute
# cut by up to 8x and decoding latency by 2.4-2.9x for a fixed number of input frames. Its per-module
# latency figures are not quoted here.
PAPER_REFERENCE = {
    "source": "STORM, arXiv 2503.04130, abstract",
    "compute_reduction_max": 8.0,
    "decoding_latency_reduction": (2.4, 2.9),
}

SCAN_FLOPS_PER_STATE = 6
SCAN_CHUNK = 16  # steps per chunk of storm_vlm.model.ssm's CPU scan (for the memory estimate)


@dataclass(frozen=True)
class Compression:
    """A compression setting: `factor` = temporal_pool · temporal_sample · spatial_pool².

    The profiler's default mapping: 1 = none, 4 = temporal pool 4, 8 = temporal pool 4 + temporal
    sample 2.
    """

    factor: int
    temporal_pool: int = 1
    temporal_sample: int = 1
    spatial_pool: int = 1

    def __post_init__(self):
        for name in ("factor", "temporal_pool", "temporal_sample", "spatial_pool"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"compression {name} must be an int >= 1, got {value!r}")
        product = self.temporal_pool * self.temporal_sample * self.spatial_pool**2
        if product != self.factor:
            raise ValueError(
                f"compression {self.factor}: temporal pool {self.temporal_pool} x temporal sample "
                f"{self.temporal_sample} x spatial pool {self.spatial_pool}² = {product}, not {self.factor}"
            )

    @property
    def label(self) -> str:
        parts = []
        if self.temporal_pool > 1:
            parts.append(f"tpool{self.temporal_pool}")
        if self.temporal_sample > 1:
            parts.append(f"tsample{self.temporal_sample}")
        if self.spatial_pool > 1:
            parts.append(f"spool{self.spatial_pool}")
        return "+".join(parts) or "none"


DEFAULT_COMPRESSIONS = {
    1: Compression(1),
    4: Compression(4, temporal_pool=4),
    8: Compression(8, temporal_pool=4, temporal_sample=2),
}


def parse_compressions(spec: str) -> list[Compression]:
    """Parse "1,4,8" or custom "16=4:2:2" (factor=temporal_pool:temporal_sample[:spatial_pool]).

    Plain factors use DEFAULT_COMPRESSIONS (1 none, 4 = temporal pool 4, 8 = pool 4 + sample 2).
    """
    out = []
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            continue
        try:
            if "=" in item:
                factor, rest = item.split("=", 1)
                nums = [int(x) for x in rest.split(":")]
                if not 2 <= len(nums) <= 3:
                    raise ValueError("expected pool:sample[:spatial]")
                out.append(Compression(int(factor), *nums))
            else:
                factor = int(item)
                if factor not in DEFAULT_COMPRESSIONS:
                    raise ValueError(
                        f"no default mapping for {factor} (defaults: {sorted(DEFAULT_COMPRESSIONS)}); "
                        f"write it as {factor}=POOL:SAMPLE[:SPATIAL]"
                    )
                out.append(DEFAULT_COMPRESSIONS[factor])
        except ValueError as exc:
            raise ValueError(f"bad compression {item!r}: {exc}") from None
    if not out:
        raise ValueError(f"no compression settings in {spec!r}")
    return out


def real_config(**overrides):
    """StormConfig of the paper's size: SigLIP-so400m-patch14-448 + Qwen2-7B, Mamba projector."""
    # imported here: the rest of the cost model is plain arithmetic and loads without torch
    from storm_vlm.model.configuration import SIGLIP_SO400M_448, StormConfig

    # `storm-vlm build` loads SigLIP without its attention-pooling head (STORM reads hidden states).
    vision = dict(model_type="siglip_vision_model", vision_use_head=False, **SIGLIP_SO400M_448)
    vision.update(overrides.pop("vision_config", {}))
    text = dict(QWEN2_7B)
    text.update(overrides.pop("text_config", {}))
    return StormConfig(vision_config=vision, text_config=text, **overrides)


def with_compression(config, compression: Compression):
    """A copy of `config` with temporal_pool_size / spatial_pool_stride / temporal_sample_stride set."""
    cfg = copy.deepcopy(config)
    cfg.temporal_pool_size = compression.temporal_pool
    cfg.spatial_pool_stride = compression.spatial_pool
    cfg.temporal_sample_stride = compression.temporal_sample
    cfg.validate_storm_fields()
    return cfg


# ---- shapes -----------------------------------------------------------------------------------


def _vision_shape(config) -> dict:
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    return dict(
        d=vc.hidden_size,
        inter=vc.intermediate_size,
        layers=vc.num_hidden_layers,
        patches=side * side,
        patch=vc.patch_size,
        channels=getattr(vc, "num_channels", 3),
        head=bool(getattr(vc, "vision_use_head", True)),
    )


def _llm_shape(config) -> dict:
    tc = config.text_config
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    qwen = tc.model_type == "qwen2"
    attn_bias = bool(getattr(tc, "attention_bias", False))
    return dict(
        d=tc.hidden_size,
        inter=tc.intermediate_size,
        layers=tc.num_hidden_layers,
        heads=heads,
        kv_heads=kv,
        head_dim=head_dim,
        vocab=tc.vocab_size,
        qkv_bias=qwen or attn_bias,
        o_bias=attn_bias and not qwen,
        mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        tied=bool(getattr(tc, "tie_word_embeddings", False)),
    )


def _projector_shape(config) -> dict:
    r = config.downsample_ratio
    d_model = config.text_config.hidden_size
    d_inner = config.projector_expand * d_model
    return dict(
        type=config.projector_type,
        in_dim=config.vision_config.hidden_size * r * r,
        d=d_model,
        layers=config.projector_num_layers,
        d_inner=d_inner,
        d_state=config.projector_d_state,
        d_conv=config.projector_d_conv,
        dt_rank=math.ceil(d_model / 16),
        directions=2 if config.projector_bidirectional else 1,
    )


def _vision_chunks(config, num_frames: int) -> list[int]:
    """Frames per vision-tower call: `vision_batch_size` at most, split as evenly as
    `StormForConditionalGeneration._vision_features` splits them (no short last call)."""
    calls = -(-num_frames // config.vision_batch_size)
    return [num_frames * (c + 1) // calls - num_frames * c // calls for c in range(calls)]


# ---- parameters -------------------------------------------------------------------------------


def param_counts(config) -> dict:
    """Parameters per module: {"vision_tower", "projector", "llm", "total"} (exact for this code)."""
    v = _vision_shape(config)
    d, i = v["d"], v["inter"]
    layer = 2 * d + (4 * d * d + 4 * d) + 2 * d + (d * i + i + i * d + d)
    vision = (v["channels"] * v["patch"] ** 2 * d + d) + v["patches"] * d + v["layers"] * layer + 2 * d
    if v["head"]:
        vision += d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * i + i + i * d + d)

    p = _projector_shape(config)
    dm, di = p["d"], p["d_inner"]
    if p["type"] == "mlp":
        projector = 2 * p["in_dim"] + (p["in_dim"] * dm + dm) + (dm * dm + dm)
    else:
        direction = (di * p["d_conv"] + di) + di * (p["dt_rank"] + 2 * p["d_state"]) + (p["dt_rank"] * di + di)
        direction += di * p["d_state"] + di
        mixer = dm * 2 * di + p["directions"] * direction + di * dm
        projector = (p["in_dim"] * dm + dm) + p["layers"] * (2 * dm + mixer) + 2 * dm

    l = _llm_shape(config)
    d, q, kv = l["d"], l["heads"] * l["head_dim"], l["kv_heads"] * l["head_dim"]
    attn = d * q + 2 * d * kv + q * d
    if l["qkv_bias"]:
        attn += q + 2 * kv
    if l["o_bias"]:
        attn += d
    mlp = 3 * d * l["inter"] + ((2 * l["inter"] + d) if l["mlp_bias"] else 0)
    llm = l["vocab"] * d + l["layers"] * (attn + mlp + 2 * d) + d + (0 if l["tied"] else l["vocab"] * d)
    return {"vision_tower": vision, "projector": projector, "llm": llm, "total": vision + projector + llm}


def kv_bytes_per_token(config, bytes_per_el: int = 2) -> int:
    """KV-cache bytes per cached token: 2 (k, v) · layers · g · hd · bytes."""
    l = _llm_shape(config)
    return 2 * l["layers"] * l["kv_heads"] * l["head_dim"] * bytes_per_el


# ---- per-module cost --------------------------------------------------------------------------


@dataclass
class ModuleCost:
    """FLOPs and bytes of one module call. `weight_bytes` are read once per call;
    `activation_bytes` is the largest live activation set (KV cache included for the LLM)."""

    flops: float
    weight_bytes: float
    activation_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes


def vision_tower_cost(config, num_frames: int, bytes_per_el: int = 2) -> ModuleCost:
    """SigLIP on `num_frames` frames: the layers up to `vision_feature_layer` (the model stops there)."""
    v = _vision_shape(config)
    P, d, I = v["patches"], v["d"], v["inter"]
    layer = config.vision_feature_layer
    run_layers = layer if layer >= 0 else v["layers"] + 1 + layer  # hidden_states[k] is after k layers
    per_layer = P * (8 * d * d + 4 * d * I) + 4 * P * P * d
    per_frame = 2 * P * (v["channels"] * v["patch"] ** 2) * d + run_layers * per_layer
    chunk = max(_vision_chunks(config, num_frames), default=0)
    # a chunk's running hidden state, the MLP intermediate and one head's attention matrix;
    # the selected layer of every frame is kept for the projector.
    act = chunk * P * (2 * d + I) + chunk * P * P + num_frames * P * d
    weights = param_counts(config)["vision_tower"]
    return ModuleCost(num_frames * per_frame, weights * bytes_per_el, act * bytes_per_el)


def projector_cost(config, num_frames: int, bytes_per_el: int = 2) -> ModuleCost:
    """Pixel shuffle + projector + temporal/spatial pooling over the whole T-frame video."""
    p = _projector_shape(config)
    N = config.projector_tokens_per_frame
    Lp = num_frames * N
    C, D, Di, S, R, K = p["in_dim"], p["d"], p["d_inner"], p["d_state"], p["dt_rank"], p["d_conv"]
    if p["type"] == "mlp":
        flops = 2 * Lp * C * D + 2 * Lp * D * D
        act = Lp * (C + 2 * D)
    else:
        direction = 2 * Lp * Di * K + 2 * Lp * Di * (R + 2 * S) + 2 * Lp * R * Di + SCAN_FLOPS_PER_STATE * Lp * Di * S
        layer = 2 * Lp * D * 2 * Di + 2 * Lp * Di * D + p["directions"] * direction
        flops = 2 * Lp * C * D + p["layers"] * layer
        # x, z, δ, u and each direction's y over the whole sequence; the scan keeps its per-state
        # tensors (Di x S) for one chunk of steps only (the fused CUDA kernel: one step)
        act = Lp * (C + D) + Lp * Di * (4 + p["directions"]) + 2 * SCAN_CHUNK * Di * S
    if config.temporal_pool_size > 1:
        flops += Lp * D
    if config.spatial_pool_stride > 1:  # on the frames temporal pooling left
        flops += -(-num_frames // config.temporal_pool_size) * N * D
    weights = param_counts(config)["projector"]
    return ModuleCost(flops, weights * bytes_per_el, act * bytes_per_el)


def _llm_token_linear_flops(l: dict) -> int:
    d, q, kv = l["d"], l["heads"] * l["head_dim"], l["kv_heads"] * l["head_dim"]
    return 2 * d * q + 2 * 2 * d * kv + 2 * q * d + 6 * d * l["inter"]


def llm_prefill_cost(config, seq_len: int, bytes_per_el: int = 2, causal: bool = False) -> ModuleCost:
    """One causal-LM forward over `seq_len` tokens, keeping the last position's logits.

    Attention is counted dense (4·L²·h·hd, what SDPA's math path computes); `causal=True` counts
    only the lower triangle (2·L·(L+1)·h·hd), what flash-attention kernels compute.
    """
    l = _llm_shape(config)
    q = l["heads"] * l["head_dim"]
    attention = 2 * seq_len * (seq_len + 1) * q if causal else 4 * seq_len * seq_len * q
    per_layer = seq_len * _llm_token_linear_flops(l) + attention
    flops = l["layers"] * per_layer + 2 * l["d"] * l["vocab"]
    kv = kv_bytes_per_token(config, bytes_per_el) * seq_len
    # live per layer: residual + q + gate/up MLP intermediates
    act = seq_len * (2 * l["d"] + q + 2 * l["inter"]) * bytes_per_el + l["vocab"] * 4
    weights = param_counts(config)["llm"]
    return ModuleCost(flops, weights * bytes_per_el, kv + act)


def decode_cost(config, context_len: int, bytes_per_el: int = 2) -> ModuleCost:
    """One generated token with `context_len` tokens already in the KV cache."""
    l = _llm_shape(config)
    q = l["heads"] * l["head_dim"]
    per_layer = _llm_token_linear_flops(l) + 4 * (context_len + 1) * q
    flops = l["layers"] * per_layer + 2 * l["d"] * l["vocab"]
    kv = kv_bytes_per_token(config, bytes_per_el) * (context_len + 1)
    # the input-embedding lookup reads one row of the table, not the table; a tied LM head reads all of it
    weights = param_counts(config)["llm"] - (0 if l["tied"] else (l["vocab"] - 1) * l["d"])
    return ModuleCost(flops, weights * bytes_per_el, kv)


def decode_bounds(config, context_a: int, context_b: int, bytes_per_el: int = 2, hardware: "Hardware | None" = None) -> dict:
    """How much faster a decode step on a `context_b`-token cache can be than on `context_a` tokens.

    {"flops_ratio": FLOPs(a) / FLOPs(b) (the compute-bound limit), "bytes_ratio": bytes(a) / bytes(b)
    (the memory-bound limit: weights read + KV cache), and with `hardware` "roofline_ratio" and the
    roofline seconds "roofline_s_a" / "roofline_s_b"}. A step reads every weight whatever the cache
    length, so the achievable ratio lies at or below the larger of the two and, where the step is
    memory bound (GPUs, and CPUs at batch 1), near `bytes_ratio`.
    """
    a, b = decode_cost(config, context_a, bytes_per_el), decode_cost(config, context_b, bytes_per_el)
    out = {"flops_ratio": a.flops / b.flops, "bytes_ratio": a.bytes / b.bytes}
    if hardware is not None:
        sa, sb = hardware.seconds(a), hardware.seconds(b)
        out.update(roofline_ratio=sa / sb, roofline_s_a=sa, roofline_s_b=sb)
    return out


# ---- the whole pipeline -----------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """A roofline: a module takes max(FLOPs / (peak · mfu), bytes / bandwidth)."""

    name: str
    peak_flops: float
    bandwidth: float
    mfu: float = 0.5

    def seconds(self, cost: ModuleCost) -> float:
        return max(cost.flops / (self.peak_flops * self.mfu), cost.bytes / self.bandwidth)


# bf16 dense tensor-core peak and HBM bandwidth of an A100 80GB SXM.
A100_80GB = Hardware("A100-80GB (bf16, 50% MFU)", peak_flops=312e12, bandwidth=2.039e12, mfu=0.5)


@dataclass
class PipelineCost:
    """Costs of one video question: `frames` in, `visual_tokens` to the LLM, `decode_tokens` out."""

    frames: int
    compression: Compression
    visual_tokens: int
    text_tokens: int
    decode_tokens: int
    vision_tower: ModuleCost
    projector: ModuleCost
    llm_prefill: ModuleCost
    decode_per_token: ModuleCost
    extra: dict = field(default_factory=dict)

    @property
    def prefill_flops(self) -> float:
        """FLOPs before the first generated token: vision + projector + LLM prefill."""
        return self.vision_tower.flops + self.projector.flops + self.llm_prefill.flops

    @property
    def total_flops(self) -> float:
        return self.prefill_flops + self.decode_tokens * self.decode_per_token.flops

    def seconds(self, hw: Hardware) -> dict:
        """Roofline seconds per module and in total on `hw`."""
        out = {
            "vision_tower": hw.seconds(self.vision_tower),
            "projector": hw.seconds(self.projector),
            "llm_prefill": hw.seconds(self.llm_prefill),
            "decode_per_token": hw.seconds(self.decode_per_token),
        }
        out["total"] = (
            out["vision_tower"] + out["projector"] + out["llm_prefill"] + self.decode_tokens * out["decode_per_token"]
        )
        return out

    def as_dict(self) -> dict:
        return {
            "frames": self.frames,
            "compression": self.compression.factor,
            "compression_label": self.compression.label,
            "visual_tokens": self.visual_tokens,
            "text_tokens": self.text_tokens,
            "decode_tokens": self.decode_tokens,
            **{k: asdict(getattr(self, k)) for k in ("vision_tower", "projector", "llm_prefill", "decode_per_token")},
        }


def pipeline_cost(
    config,
    num_frames: int,
    compression: Compression | None = None,
    text_tokens: int = 64,
    decode_tokens: int = 16,
    bytes_per_el: int = 2,
    causal: bool = False,
) -> PipelineCost:
    """Costs per module for one `num_frames`-frame video question under `compression`.

    compression None uses the config's own pooling/sampling; `causal` as in `llm_prefill_cost`.
    The vision tower and projector run on every frame (pooling comes after the projector); only
    the LLM sees fewer tokens.
    """
    cfg = config if compression is None else with_compression(config, compression)
    if compression is None:
        compression = Compression(
            cfg.temporal_pool_size * cfg.temporal_sample_stride * cfg.spatial_pool_stride**2,
            cfg.temporal_pool_size,
            cfg.temporal_sample_stride,
            cfg.spatial_pool_stride,
        )
    visual = cfg.num_visual_tokens(num_frames)
    seq = visual + text_tokens
    return PipelineCost(
        frames=num_frames,
        compression=compression,
        visual_tokens=visual,
        text_tokens=text_tokens,
        decode_tokens=decode_tokens,
        vision_tower=vision_tower_cost(cfg, num_frames, bytes_per_el),
        projector=projector_cost(cfg, num_frames, bytes_per_el),
        llm_prefill=llm_prefill_cost(cfg, seq, bytes_per_el, causal),
        decode_per_token=decode_cost(cfg, seq, bytes_per_el),
    )


def gemm_shapes(config, num_frames: int, compression: Compression | None = None, text_tokens: int = 64) -> dict:
    """The matrix products of one prefill, per module: {"vision_tower" | "projector" | "llm_prefill":
    [(m, k, n, count), ...]}, an (m x k) @ (k x n) product run `count` times (attention's
    products, the scan and the convolution are not listed), as the CPU fast paths run them: one call
    per vision chunk (`vision_batch_size` frames at most, split evenly), SigLIP's q, k and v as one
    product (`fast_paths._qkv`). What a module's FLOPs would cost if it were nothing but these
    products at a given rate: the GEMM-only bound of its rate."""
    cfg = config if compression is None else with_compression(config, compression)
    v, p, l = _vision_shape(cfg), _projector_shape(cfg), _llm_shape(cfg)
    layer = cfg.vision_feature_layer
    run_layers = layer if layer >= 0 else v["layers"] + 1 + layer
    d, i = v["d"], v["inter"]
    vision = []
    for frames, calls in sorted(Counter(_vision_chunks(cfg, num_frames)).items()):
        rows, n = frames * v["patches"], run_layers * calls
        vision += [(rows, d, 3 * d, n), (rows, d, d, n), (rows, d, i, n), (rows, i, d, n)]
    lp = num_frames * cfg.projector_tokens_per_frame
    D, Di = p["d"], p["d_inner"]
    projector = [(lp, p["in_dim"], D, 1)]
    if p["type"] == "mlp":
        projector.append((lp, D, D, 1))
    else:
        projector += [(lp, D, 2 * Di, p["layers"]), (lp, Di, D, p["layers"]),
                      (lp, Di, p["dt_rank"] + 2 * p["d_state"], p["layers"] * p["directions"]),
                      (lp, p["dt_rank"], Di, p["layers"] * p["directions"])]
    seq = cfg.num_visual_tokens(num_frames) + text_tokens
    q, kv = l["heads"] * l["head_dim"], l["kv_heads"] * l["head_dim"]
    n = l["layers"]
    llm = [(seq, l["d"], q, n), (seq, l["d"], kv, 2 * n), (seq, q, l["d"], n), (seq, l["d"], l["inter"], 2 * n),
           (seq, l["inter"], l["d"], n)]
    return {"vision_tower": vision, "projector": projector, "llm_prefill": llm}
