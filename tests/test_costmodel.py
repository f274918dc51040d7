"""The cost model's token, parameter and FLOP counts against hand calculations (real size)."""

import pytest
import torch

from storm_vlm import StormConfig, StormForConditionalGeneration
from storm_vlm.perf.costmodel import (
    A100_80GB,
    DEFAULT_COMPRESSIONS,
    Compression,
    decode_bounds,
    decode_cost,
    kv_bytes_per_token,
    llm_prefill_cost,
    param_counts,
    parse_compressions,
    pipeline_cost,
    projector_cost,
    real_config,
    vision_tower_cost,
)


@pytest.fixture(scope="module")
def real():
    return real_config()


def test_real_config_token_counts(real):
    # 448 px / 14 px patches = 32 x 32 = 1024 patches; 2 x 2 pixel shuffle -> 256 tokens per frame.
    assert real.patch_grid_side == 32
    assert real.tokens_per_frame == 256
    none, pool4, pool4_sample2 = (pipeline_cost(real, 128, DEFAULT_COMPRESSIONS[c]) for c in (1, 4, 8))
    assert none.visual_tokens == 128 * 256 == 32768
    assert pool4.visual_tokens == 128 // 4 * 256 == 8192
    assert pool4_sample2.visual_tokens == 128 // 4 // 2 * 256 == 4096
    # a partial last pooling group still makes a frame: 130 frames -> ceil(130/4) = 33 frames
    assert pipeline_cost(real, 130, DEFAULT_COMPRESSIONS[4]).visual_tokens == 33 * 256


def test_real_parameter_counts(real):
    counts = param_counts(real)
    # Qwen2-7B: 15,231,233,024 bytes of bf16 weights in its safetensors index = 7,615,616,512 params.
    assert counts["llm"] == 7_615_616_512
    # SigLIP-so400m vision tower without the pooling head: embeddings + 27 layers + post-layernorm.
    d, i = 1152, 4304
    layer = 4 * (d * d + d) + (d * i + i) + (i * d + d) + 4 * d
    assert counts["vision_tower"] == (3 * 14 * 14 * d + d) + 1024 * d + 27 * layer + 2 * d
    # Mamba projector: Linear(4608 -> 3584) + 2 x [LayerNorm + BiMamba] + LayerNorm.
    D, Di, R, S, K = 3584, 7168, 224, 16, 4
    direction = (Di * K + Di) + Di * (R + 2 * S) + (R * Di + Di) + Di * S + Di
    mixer = D * 2 * Di + 2 * direction + Di * D
    assert counts["projector"] == (4608 * D + D) + 2 * (2 * D + mixer) + 2 * D


@pytest.mark.parametrize("projector_type,head", [("mamba", True), ("mlp", False)])
def test_param_counts_match_the_model(projector_type, head):
    vision = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=head)
    text = dict(model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    cfg = StormConfig(vision_config=vision, text_config=text, projector_type=projector_type, projector_bidirectional=head)
    with torch.device("meta"):
        model = StormForConditionalGeneration(cfg)
    counts = param_counts(cfg)
    assert counts["vision_tower"] == sum(p.numel() for p in model.vision_tower.parameters())
    assert counts["projector"] == sum(p.numel() for p in model.projector.parameters())
    assert counts["llm"] == sum(p.numel() for p in model.language_model.parameters())


def test_vision_tower_flops_by_hand(real):
    P, d, I = 1024, 1152, 4304
    layers = 26  # vision_feature_layer -2: hidden_states[26], after 26 of the 27 layers
    patch_embed = 2 * P * (3 * 14 * 14) * d
    qkvo = 4 * (2 * P * d * d)  # four d x d projections, 2 FLOPs per multiply-add
    attention = 2 * (2 * P * P * d)  # QK^T and AV
    mlp = 2 * P * d * I + 2 * P * I * d
    per_frame = patch_embed + layers * (qkvo + attention + mlp)
    assert vision_tower_cost(real, 1).flops == per_frame
    assert vision_tower_cost(real, 64).flops == 64 * per_frame


def test_projector_flops_by_hand(real):
    T, N = 32, 256
    L = T * N
    D, Di, S, R, K = 3584, 7168, 16, 224, 4
    linear_in = 2 * L * 4608 * D
    per_direction = 2 * L * Di * K + 2 * L * Di * (R + 2 * S) + 2 * L * R * Di + 6 * L * Di * S
    per_layer = 2 * L * D * (2 * Di) + 2 * L * Di * D + 2 * per_direction
    assert projector_cost(real, T).flops == linear_in + 2 * per_layer
    pooled = StormConfig(**{**real.to_dict(), "temporal_pool_size": 4})
    assert projector_cost(pooled, T).flops == linear_in + 2 * per_layer + L * D  # one add per pooled element


def test_llm_prefill_and_decode_flops_by_hand(real):
    d, I, layers, V, kv = 3584, 18944, 28, 152064, 4 * 128
    L = 8192 + 64
    per_layer = (
        2 * L * d * d  # q
        + 2 * (2 * L * d * kv)  # k, v (4 KV heads of 128)
        + 2 * L * d * d  # o
        + 4 * L * L * d  # attention: 2·L²·d for QK^T and for AV
        + 3 * (2 * L * d * I)  # SwiGLU gate, up, down
    )
    assert llm_prefill_cost(real, L).flops == layers * per_layer + 2 * d * V
    c = 16384
    per_token = 2 * d * d * 2 + 2 * 2 * d * kv + 6 * d * I + 4 * (c + 1) * d
    cost = decode_cost(real, c)
    assert cost.flops == layers * per_token + 2 * d * V
    # decode reads every LLM weight but the embedding table (one row of it) and the whole KV cache:
    # 2 (k,v) x 28 layers x 512 x 2 bytes per token
    assert kv_bytes_per_token(real) == 2 * 28 * 512 * 2
    assert cost.bytes == (7_615_616_512 - (V - 1) * d) * 2 + (c + 1) * 2 * 28 * 512 * 2


def test_decode_bounds_at_256_frames(real):
    """Decode is weight-bound: 4x compression at 256 frames can cut a step ~1.19x in bytes, 1.95x in FLOPs."""
    none, four = 65536 + 64, 16384 + 64
    b = decode_bounds(real, none, four, hardware=A100_80GB)
    weights = (7_615_616_512 - 152063 * 3584) * 2  # 14.1 GB read per step
    kv = 2 * 28 * 512 * 2
    assert b["bytes_ratio"] == pytest.approx((weights + (none + 1) * kv) / (weights + (four + 1) * kv))
    assert 1.18 < b["bytes_ratio"] < 1.20 and 1.9 < b["flops_ratio"] < 2.0
    assert b["roofline_ratio"] == pytest.approx(b["bytes_ratio"])  # memory bound on an A100
    assert b["roofline_s_a"] == pytest.approx(decode_cost(real, none).bytes / A100_80GB.bandwidth)


def test_compression_cuts_llm_cost_superlinearly_and_leaves_vision(real):
    none = pipeline_cost(real, 256, DEFAULT_COMPRESSIONS[1])
    four = pipeline_cost(real, 256, DEFAULT_COMPRESSIONS[4])
    assert four.vision_tower.flops == none.vision_tower.flops
    assert four.projector.flops > none.projector.flops  # pooling adds a little
    ratio = none.llm_prefill.flops / four.llm_prefill.flops
    assert 4 < ratio < 16  # linear parts shrink 4x, attention ~16x
    assert none.total_flops / four.total_flops < ratio  # the vision tower is not reduced


def test_parse_compressions():
    assert parse_compressions("1,4,8") == [DEFAULT_COMPRESSIONS[1], DEFAULT_COMPRESSIONS[4], DEFAULT_COMPRESSIONS[8]]
    assert DEFAULT_COMPRESSIONS[8] == Compression(8, temporal_pool=4, temporal_sample=2)
    assert parse_compressions("16=4:1:2") == [Compression(16, 4, 1, 2)]
    with pytest.raises(ValueError, match="no default mapping for 3"):
        parse_compressions("3")
    with pytest.raises(ValueError, match="not 16"):
        parse_compressions("16=4:2")
    with pytest.raises(ValueError, match="bad compression"):
        parse_compressions("x")


def test_bench_cpu_config_keeps_the_real_proportions(real):
    """configs/bench-cpu.yaml: widths and tokens per frame / 16, depths kept -> same FLOP shares."""
    from pathlib import Path

    from storm_vlm.perf.profiler import load_model_config

    bench, defaults = load_model_config(Path(__file__).resolve().parents[1] / "configs" / "bench-cpu.yaml")
    assert bench.vision_config.num_hidden_layers == 27 and bench.text_config.num_hidden_layers == 28
    assert bench.tokens_per_frame * 16 == real.tokens_per_frame
    rp, bp = param_counts(real), param_counts(bench)
    for part in ("vision_tower", "llm"):  # parameters go as width²: 16² = 256
        assert 230 < rp[part] / bp[part] < 260
    for frames in (32, 128, 256):
        for c in (1, 4, 8):
            r = pipeline_cost(real, frames, DEFAULT_COMPRESSIONS[c], text_tokens=64)
            b = pipeline_cost(bench, frames, DEFAULT_COMPRESSIONS[c], text_tokens=defaults["text_tokens"])
            for part in ("vision_tower", "projector", "llm_prefill"):
                share_r = getattr(r, part).flops / r.prefill_flops
                share_b = getattr(b, part).flops / b.prefill_flops
                assert abs(share_r - share_b) < 0.015, (frames, c, part, share_r, share_b)
