"""The shipped recipes parse; the real-size ones instantiate on the meta device with the right
trainable parts and parameter groups per stage."""

import json
from pathlib import Path

import pytest

from storm_vlm.train.config import load_config
from storm_vlm.train.model_source import instantiate_on_meta
from storm_vlm.train.stages import count_parameters, parameter_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SIGLIP_SO400M_448 = {
    "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
    "num_attention_heads": 16, "image_size": 448, "patch_size": 14, "num_channels": 3,
}
QWEN2_7B = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-size-configs")
    out = {}
    for name, cfg in (("siglip", SIGLIP_SO400M_448), ("qwen2", QWEN2_7B)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
        out[name] = root / name
    return out


def real_size(stage, folders, *extra):
    sets = [f"build.vision={folders['siglip']}", f"build.llm={folders['qwen2']}", "build.projector=mamba",
            "build.projector_num_layers=2"]
    sets.append("init_from=null")  # these recipes chain from `storm-vlm build` / the previous stage's output
    return load_config(CONFIGS / f"storm-qwen2-7b-{stage}.yaml", sets + list(extra))


def test_real_size_recipes_chain_from_the_readme_build():
    """README step 1 writes the model align starts from; sft reads align's output, long sft's."""
    import re
    import shlex

    readme = (CONFIGS.parent / "README.md").read_text()
    block = readme.split("## Real-size workflow", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    build = shlex.split(re.search(r"storm-vlm build ([^\n]*)", block.replace("\\\n", " ")).group(1))
    previous = build[build.index("--out") + 1]
    for stage in ("align", "sft", "long"):
        cfg = load_config(CONFIGS / f"storm-qwen2-7b-{stage}.yaml")
        assert cfg.build is None and cfg.tiny is None
        assert cfg.init_from == previous, (stage, cfg.init_from, previous)
        assert f"storm-qwen2-7b-{stage}.yaml" in block
        previous = cfg.output_dir


@pytest.mark.parametrize("stage", ["align", "sft", "long"])
def test_real_size_recipes_instantiate_on_meta(stage, folders):
    cfg = real_size(stage, folders)
    assert cfg.stage == stage and cfg.lr_scheduler == "cosine" and cfg.warmup_ratio == pytest.approx(0.03)
    assert cfg.precision == "bfloat16" and cfg.gradient_checkpointing and cfg.distributed == "fsdp"
    model = instantiate_on_meta(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    assert 7.5e9 < total < 8.5e9  # Qwen2-7B (7.6B) + SigLIP-so400m (0.4B) + projector
    groups = {g["name"]: g for g in parameter_groups(model, cfg)}
    if stage == "align":
        assert cfg.learning_rate == pytest.approx(1e-3)
        assert counts["vision_tower"] == counts["language_model"] == 0 and counts["projector"] > 1e6
        assert set(groups) == {"projector"} and groups["projector"]["lr"] == pytest.approx(1e-3)
    else:
        assert cfg.learning_rate == pytest.approx(2e-5)
        assert all(counts[p] > 0 for p in counts) and sum(counts.values()) == total
        assert set(groups) == {"projector", "model"}
        assert all(g["lr"] == pytest.approx(2e-5) for g in groups.values())
    if stage == "long":
        assert cfg.num_frames == 128 and model.config.temporal_pool_size == 4
        assert model.config.num_visual_frames(128) == 32
        assert model.config.num_visual_tokens(128) < cfg.max_length
    else:
        assert model.config.temporal_pool_size == 1
    if stage == "sft":
        assert cfg.num_frames == 32 and model.config.num_visual_tokens(32) < cfg.max_length


def test_real_size_lora_sft_on_meta(folders):
    cfg = real_size("sft", folders, "lora.r=64", "lora.alpha=128")
    model = instantiate_on_meta(cfg)
    counts = count_parameters(model)
    assert counts["vision_tower"] == 0 and counts["projector"] > 1e6
    llm_trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
    assert llm_trainable and all("lora_" in n for n in llm_trainable)
    assert 1e7 < counts["language_model"] < 3e8  # adapters, not the 7B weights


def test_tiny_synthetic_config_has_all_stages():
    for stage, frames, source in (("align", 16, "tiny"), ("sft", 16, "init_from"), ("long", 32, "init_from")):
        cfg = load_config(CONFIGS / "tiny-synthetic.yaml", [f"stage={stage}"])
        assert cfg.stage == stage and cfg.num_frames == frames and getattr(cfg, source) is not None
        assert cfg.output_dir.endswith(stage)
    assert load_config(CONFIGS / "tiny-synthetic.yaml", ["stage=long"]).temporal_pool_size == 4
    assert load_config(CONFIGS / "tiny-synthetic.yaml", ["stage=align"]).parts_to_train() == ("projector",)


def test_unknown_model_source_options_are_config_errors(folders):
    from storm_vlm.errors import ConfigError

    with pytest.raises(ConfigError, match="build.projector_layers"):
        instantiate_on_meta(real_size("align", folders, "build.projector_layers=3"))
