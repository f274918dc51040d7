"""Training config: YAML + --set overrides, per-stage sections, errors naming the key."""

import pytest

from storm_vlm.errors import ConfigError
from storm_vlm.train.config import load_config, parse_override

BASE = """\
stage: sft
output_dir: runs/x
train_file: data/train.json
media_root: data
num_frames: 8
max_steps: 10
save_steps: 5
seed: 0
tiny: {projector_type: mamba}
learning_rate: 1.0e-4
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_overrides_are_yaml_typed_and_nested(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        ["max_steps=3", "bf16=true", "projector_lr=1e-3", "lora.r=4", "lora.target_modules=[q_proj]", "seed=7"],
    )
    assert cfg.max_steps == 3 and cfg.precision == "bfloat16" and cfg.seed == 7
    assert cfg.projector_lr == pytest.approx(1e-3) and cfg.effective_projector_lr == pytest.approx(1e-3)
    assert cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj"]
    assert cfg.learning_rate == pytest.approx(1e-4)
    # with LoRA the LLM trains through its adapters and the vision tower stays frozen
    assert cfg.parts_to_train() == ("projector", "language_model")
    assert load_config(write(tmp_path, BASE)).parts_to_train() == ("vision_tower", "projector", "language_model")


def test_stage_sections_merge_and_set_wins(tmp_path):
    text = BASE + """
stages:
  align: {train_file: data/align.json, learning_rate: 1.0e-3}
  long: {num_frames: 32, temporal_pool_size: 4, tiny: null, init_from: runs/sft}
"""
    p = write(tmp_path, text)
    assert load_config(p).train_file == "data/train.json"  # stage sft: no section
    align = load_config(p, ["stage=align"])
    assert align.train_file == "data/align.json" and align.learning_rate == pytest.approx(1e-3)
    assert align.parts_to_train() == ("projector",)
    long = load_config(p, ["stage=long", "num_frames=64"])
    assert long.num_frames == 64 and long.temporal_pool_size == 4 and long.init_from == "runs/sft"
    assert long.tiny is None


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["stage=pretrain"], "stage"),
        (["num_frames=0"], "num_frames"),
        (["max_steps=ten"], "max_steps"),
        (["learning_rate=fast"], "learning_rate"),
        (["bogus_key=1"], "bogus_key"),
        (["lora.rank=8"], "lora.rank"),
        (["bf16=maybe"], "bf16"),
        (["precision=int8"], "precision"),
        (["precision=float32", "bf16=true"], "contradicts"),
        (["distributed=deepspeed"], "distributed"),
        (["train_parts=[projector, eyes]"], "train_parts"),
        (["init_from=runs/a"], "init_from"),  # two model sources
        (["seed=null"], "seed"),
        (["build.llm=x"], "build"),
        (["learning_rate=.inf"], "learning_rate"),
        (["adam_epsilon=.nan"], "adam_epsilon"),
        (["weight_decay=1e999"], "weight_decay"),
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.split(".")[0]) as info:
        load_config(write(tmp_path, BASE), overrides)
    assert key in str(info.value)


def test_align_rejects_lora_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="lora"):
        load_config(write(tmp_path, BASE), ["stage=align", "lora.r=4"])
    with pytest.raises(ConfigError, match="missing required key 'save_steps'"):
        load_config(write(tmp_path, BASE.replace("save_steps: 5\n", "")))
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(write(tmp_path, "stage: [unclosed\n"))
    assert "(line 2, column 1: expected ',' or ']'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    video = tmp_path / "clip.mp4"  # `storm-vlm train clip.mp4`
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42\xff\xfe\x80")
    with pytest.raises(ConfigError, match="clip.mp4: not a YAML config"):
        load_config(video)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("novalue")


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    from storm_vlm.cli import main

    assert main(["train", str(write(tmp_path, BASE)), "--set", "warmup_ratio=2"]) == 2
    err = capsys.readouterr().err
    assert "warmup_ratio" in err and "Traceback" not in err


def test_an_unknown_stage_is_named_before_anything_else(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: align\nstages:\n  align: {output_dir: o, max_steps: 1}\n")
    with pytest.raises(ConfigError, match="key 'stage': 'foo' is not a stage"):
        load_config(path, ["stage=foo"])


def _build_config(tmp_path, out, vision="no-such-siglip", llm="no-such-llm"):
    """A config whose data exists and whose model parts do not."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    return write(tmp_path, BASE.replace("output_dir: runs/x", f"output_dir: {out}").replace(
        "tiny: {projector_type: mamba}", f"build: {{vision: {tmp_path / vision}, llm: {tmp_path / llm}}}").replace(
        "train_file: data/train.json", f"train_file: {tmp_path / 'data' / 'train.json'}").replace(
        "media_root: data", f"media_root: {tmp_path / 'data'}"))


def test_errors_found_after_loading_name_the_config_file(tmp_path):
    from storm_vlm.train import train

    path = _build_config(tmp_path, tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        train(path)
    assert str(info.value).startswith(f"{path}: key 'build': vision folder ") and "does not exist" in str(info.value)

    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(ConfigError) as info:
        train(path)
    assert str(info.value).startswith(f"{path}: key 'output_dir': ") and "already holds a run" in str(info.value)


def test_cli_train_error_is_one_line(tmp_path):
    """No transformers warning (SiglipImageProcessor without torchvision) before the error."""
    import subprocess
    import sys

    path = _build_config(tmp_path, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "storm_vlm", "train", str(path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and f"{path}: key 'build': vision folder" in lines[0], lines
