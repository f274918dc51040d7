import itertools
import math

import pytest

import storm_vlm
from storm_vlm import StormConfig
from storm_vlm.errors import ConfigError


def tiny_config(**kw):
    vision = dict(model_type="siglip_vision_model", image_size=64, patch_size=8, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    text = dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
    return StormConfig(vision_config=vision, text_config=text, **kw)


def test_defaults_are_siglip_so400m_448():
    cfg = StormConfig()
    assert cfg.model_type == "storm"
    assert cfg.vision_config.hidden_size == 1152 and cfg.vision_config.image_size == 448
    assert cfg.vision_feature_layer == -2 and cfg.projector_type == "mamba"
    assert cfg.tokens_per_frame == 256  # (448 / 14 / 2) ** 2
    assert cfg.num_visual_tokens(128) == 32768


@pytest.mark.parametrize("k,p,s", list(itertools.product([1, 2, 3, 4], [1, 2], [1, 2, 3])))
def test_num_visual_tokens_formula(k, p, s):
    cfg = tiny_config(temporal_pool_size=k, spatial_pool_stride=p, temporal_sample_stride=s)
    grid = 64 // 8 // 2  # 4 x 4 tokens per frame after pixel shuffle
    for t in (1, 2, 5, 8, 13):
        frames = math.ceil(math.ceil(t / k) / s)
        assert cfg.num_visual_tokens(t) == frames * (grid // p) ** 2
        # the call-time stride overrides the default; 1 disables sampling
        assert cfg.num_visual_tokens(t, temporal_sample_stride=1) == math.ceil(t / k) * (grid // p) ** 2


def test_visual_token_layout_mirrors_the_config_fields():
    cfg = tiny_config(temporal_pool_size=2, spatial_pool_stride=2, temporal_sample_stride=3)
    layout = cfg.visual_token_layout
    assert layout.as_row() == [64 // 8 // 2, 2, 2, 3]
    cfg.temporal_pool_size = 4  # a derived value, never a stale copy
    assert cfg.visual_token_layout.temporal_pool_size == 4


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(projector_type="transformer"), "projector_type"),
        (dict(temporal_pool_size=0), "temporal_pool_size"),
        (dict(spatial_pool_stride=-1), "spatial_pool_stride"),
        (dict(temporal_sample_stride=1.5), "temporal_sample_stride"),
        (dict(spatial_pool_stride=3), "spatial_pool_stride"),
        (dict(downsample_ratio=0), "downsample_ratio"),
        (dict(vision_feature_layer=7), "vision_feature_layer"),
        (dict(vision_batch_size=0), "vision_batch_size"),
        (dict(projector_num_layers=-1), "projector_num_layers"),
        (dict(projector_bidirectional="yes"), "projector_bidirectional"),
        (dict(projector_bidirectional=False, projector_divide_out=True), "projector_divide_out"),
        (dict(video_token_id=-3), "video_token_id"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**kwargs)


def test_bad_num_frames_and_stride_at_call_time():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="num_frames"):
        cfg.num_visual_tokens(0)
    with pytest.raises(ValueError, match="temporal_sample_stride"):
        cfg.num_visual_tokens(8, temporal_sample_stride=0)


def test_save_load_round_trip_and_auto_config(tmp_path):
    from transformers import AutoConfig

    cfg = tiny_config(temporal_pool_size=2, projector_type="mlp", video_token_id=98, image_token_id=99)
    cfg.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, StormConfig)
    a, b = back.to_dict(), cfg.to_dict()
    a.pop("_name_or_path"), b.pop("_name_or_path")
    assert a == b
    assert back.text_config.model_type == "qwen2" and back.vision_config.patch_size == 8
    assert back.num_visual_tokens(9) == cfg.num_visual_tokens(9) == 5 * 16
    assert storm_vlm.StormConfig is StormConfig


def test_sub_configs_may_be_positional():
    from transformers import LlamaConfig, SiglipVisionConfig

    cfg = StormConfig(SiglipVisionConfig(image_size=64, patch_size=8),
                      LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64),
                      projector_type="mlp", temporal_pool_size=2)
    assert cfg.text_config.model_type == "llama" and cfg.projector_type == "mlp"
    assert cfg.vision_batch_size == 32  # untouched fields keep their defaults
    assert cfg.num_visual_tokens(8) == 4 * 16


def test_a_384px_siglip_grid_is_padded_to_whole_windows():
    """siglip-so400m-patch14-384: 27 x 27 patches -> 14 x 14 tokens after the 2 x 2 pixel shuffle."""
    from transformers import SiglipVisionConfig

    cfg = StormConfig(SiglipVisionConfig(image_size=384, patch_size=14), spatial_pool_stride=2)
    assert cfg.patch_grid_side == 27 and cfg.projector_tokens_per_frame == 196
    assert cfg.tokens_per_frame == 49 and cfg.num_visual_tokens(8) == 8 * 49
    with pytest.raises(ConfigError, match="spatial_pool_stride 4 does not divide the 14 x 14 token grid"):
        StormConfig(SiglipVisionConfig(image_size=384, patch_size=14), spatial_pool_stride=4)
