"""Real-size STORM (SigLIP-so400m-patch14-448 + Qwen2-7B) built on the meta device: shapes and counts."""

import pytest
import torch

from storm_vlm import StormConfig, StormForConditionalGeneration
from storm_vlm.model.compression import spatial_pool, temporal_pool

SIGLIP_SO400M_448 = dict(model_type="siglip_vision_model", hidden_size=1152, num_hidden_layers=27,
                         intermediate_size=4304, num_attention_heads=16, image_size=448, patch_size=14,
                         vision_use_head=False)
QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                tie_word_embeddings=False)


@pytest.fixture(scope="module")
def real_model():
    cfg = StormConfig(vision_config=SIGLIP_SO400M_448, text_config=QWEN2_7B, vision_feature_layer=-2)
    with torch.device("meta"):
        model = StormForConditionalGeneration(cfg)
    return model


def test_token_counts_at_real_size(real_model):
    cfg = real_model.config
    assert cfg.tokens_per_frame == 256  # 32 x 32 patches, 2 x 2 pixel shuffle
    assert cfg.num_visual_tokens(128) == 32768
    pooled = StormConfig(vision_config=SIGLIP_SO400M_448, text_config=QWEN2_7B, temporal_pool_size=4)
    assert pooled.num_visual_tokens(128) == 8192
    assert pooled.num_visual_tokens(128, temporal_sample_stride=2) == 4096
    both = StormConfig(vision_config=SIGLIP_SO400M_448, text_config=QWEN2_7B, temporal_pool_size=4,
                       spatial_pool_stride=2)
    assert both.num_visual_tokens(128) == 2048


def test_shapes_on_meta(real_model):
    with torch.no_grad():
        feats = real_model._vision_features(torch.empty(2, 3, 448, 448, device="meta"))
    assert feats.shape == (2, 1024, 1152)  # second-to-last SigLIP layer: 32 x 32 patches
    projected = torch.empty(1, 128, 256, 3584, device="meta")  # the projector's output for 128 frames
    pooled, _ = temporal_pool(projected, 4)
    assert pooled.shape == (1, 32, 256, 3584) and pooled.shape[1] * pooled.shape[2] == 8192
    assert spatial_pool(pooled, 2)[0].shape == (1, 32, 64, 3584)


def test_parameter_counts_of_the_three_parts(real_model):
    counts = {name: sum(p.numel() for p in getattr(real_model, name).parameters())
              for name in ("vision_tower", "projector", "language_model")}
    for name, n in counts.items():
        print(f"{name:15s} {n / 1e6:10.1f} M parameters")
    assert 400e6 < counts["vision_tower"] < 430e6  # so400m without its pooling head
    assert 7.5e9 < counts["language_model"] < 7.7e9  # Qwen2-7B: 7.6 B
    # projector: Linear(4 * 1152 -> 3584) + 2 bidirectional Mamba layers at d_model 3584
    assert 150e6 < counts["projector"] < 220e6
    assert all(p.device.type == "meta" for p in real_model.parameters())
