"""`storm-vlm plan` and `storm-vlm profile` as a user runs them: the plan's counts are the ones the
processor makes, odd flags end in one message, the reports a user reads line up and keep different
compressions apart."""

import json

import numpy as np
import pytest
import yaml
from helpers import TINY_CONFIG, video_question
from transformers import AutoProcessor

from storm_vlm import StormConfig
from storm_vlm.cli import main
from storm_vlm.perf.costmodel import real_config
from storm_vlm.perf.report import format_table
from storm_vlm.planner import plan

ANSWER = 8


@pytest.mark.parametrize("model", ["qwen2_mamba_dir", "qwen2_causal_dir"])  # pool 1 and trained pool 2
def test_every_option_counts_what_the_processor_makes(model, request):
    """Frame counts no pooling or stride divides included: the plan's total is the prompt the
    processor builds plus the answer budget, and an option fits a context of exactly its total."""
    path = request.getfixturevalue(model)
    processor, config = AutoProcessor.from_pretrained(path), StormConfig.from_pretrained(path)

    def prompt(frames, stride):
        ids = processor.apply_chat_template(video_question(np.zeros((frames, 16, 16, 3), np.uint8)),
                                            add_generation_prompt=True, tokenize=True, return_dict=True,
                                            temporal_sample_stride=stride)["input_ids"][0]
        return len(ids), int((ids == config.video_token_id).sum())

    length, visual = prompt(1, 1)
    text = length - visual
    result = plan(config, 4096, frames=[1, 7, 9, 33], strides=[1, 2, 3], text_tokens=text, answer_tokens=ANSWER)
    assert len(result.options) >= 8
    for o in result.options:
        assert prompt(o.frames, o.sample_stride) == (o.total_tokens - ANSWER, o.visual_tokens), o
    last = max(result.options, key=lambda o: o.total_tokens)
    exact = plan(config, last.total_tokens, frames=[last.frames], strides=[last.sample_stride], text_tokens=text,
                 answer_tokens=ANSWER)
    assert exact.chosen is not None and exact.chosen.total_tokens == exact.context
    short = plan(config, last.total_tokens - 1, frames=[last.frames], strides=[last.sample_stride],
                 text_tokens=text, answer_tokens=ANSWER)
    assert short.chosen is None


def test_real_width_boundary():
    """SigLIP-so400m + Qwen2-7B with temporal pool 4 (the long stage): 256 frames at s=1 are 16384
    visual tokens; a context one short of their total falls back to s=2."""
    config = real_config(temporal_pool_size=4)
    total = 16384 + 128 + 256
    assert plan(config, total, frames=[256]).chosen.sample_stride == 1
    assert plan(config, total - 1, frames=[256]).chosen.sample_stride == 2
    assert plan(config, 32768, frames=[255, 256, 257]).chosen.visual_tokens == 65 * 256  # 257 frames: 65 pooled


@pytest.mark.parametrize("argv,message", [
    (["--frames", "99999999999999999999"], "frames must be an integer between 1 and 1048576"),
    (["--max-frames", "2000000"], "max_frames must be an integer between 1 and 1048576"),
    (["--strides", "65"], "stride must be an integer between 1 and 64"),
    (["--minutes", "10", "--max-fps", "0"], "max_fps must be a finite number > 0"),
    (["--minutes", "10", "--max-fps", "nan"], "max_fps must be a finite number > 0"),
    (["--max-prefill-s", "-1"], "max_prefill_s must be a finite number > 0"),
    (["--temporal-pool", "0"], "--temporal-pool must be an integer >= 1, got 0"),
    (["--spatial-pool", "0"], "--spatial-pool must be an integer >= 1, got 0"),
])
def test_plan_refuses_odd_flags(argv, message, capsys):
    assert main(["plan", "--real-size", "--context", "32768", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--context", "300"], "the 128 text and 256 answer tokens alone fill the context of 300"),
    (["--context", "1000", "--frames", "64"], "616 positions are left for the video, and the fewest visual "
                                              "tokens of any option are 2048 (64 frames at s=8)"),
    (["--context", "32768", "--frames", "64", "--max-prefill-s", "1e-9"], "within --max-prefill-s 1e-09 s"),
])
def test_nothing_fits_says_why(argv, message, capsys):
    assert main(["plan", "--real-size", *argv]) == 1
    assert message in capsys.readouterr().err


def _row(frames, factor, pool, sample, spatial, ms):
    return {"frames": frames, "compression": factor, "temporal_pool": pool, "temporal_sample": sample,
            "spatial_pool": spatial, "visual_tokens": 64, "vision_tower_ms": ms, "projector_ms": ms / 3,
            "llm_prefill_ms": 2 * ms, "decode_ms_per_token": 0.5, "total_ms": ms * (1 + 1 / 3 + 2) + 1.0,
            "peak_memory_mb": 1234.5}


def test_profile_table_lines_up_and_names_each_compression():
    rows = [_row(8, 1, 1, 1, 1, 1234.5), _row(8, 16, 4, 1, 2, 3.0), _row(8, 16, 16, 1, 1, 0.0),
            {**_row(256, 4, 4, 1, 1, 0.0), "skipped": True, "note": "skipped: exceeds memory"}]
    rows[2]["total_ms"] = 0.0
    result = {"settings": {"device": "cpu", "compute_dtype": "float32", "repeats": 1, "warmup": 0,
                           "decode_tokens": 2}, "peak_memory_kind": "rss", "rows": rows}
    header, cols, rule, *lines = format_table(result).splitlines()
    bars = [i for i, c in enumerate(cols) if c == "|"]
    for line in lines[:3]:
        assert [i for i, c in enumerate(line) if c == "|"] == bars, line
        assert len(line) == len(cols) == len(rule)
    assert lines[3].index("|") == bars[0]
    labels = [line[: bars[0]].split()[1:-1] for line in lines]
    assert labels == [["1", "(none)"], ["16=4:1:2"], ["16=16:1:1"], ["4x"]]


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_CONFIG, "profile": {"text_tokens": 4, "decode_tokens": 1}}))
    return path


@pytest.mark.parametrize("argv,message", [
    (["--config", "{cfg}", "--frames", "99999999999999999999"], "--frames must be an integer between 1 and 1048576"),
    (["--config", "{cfg}", "--max-memory-gb", "-1"], "--max-memory-gb must be a finite number > 0"),
    (["--config", "{cfg}", "--max-memory-gb", "nan"], "--max-memory-gb must be a finite number > 0"),
    (["--config", "{folder}"], "a folder; give a saved model folder as MODEL_DIR"),
    (["{cfg}"], "a file, not a model folder; give a profile YAML as --config"),
])
def test_profile_refuses_odd_flags(argv, message, tiny_yaml, tmp_path, capsys):
    argv = [a.format(cfg=tiny_yaml, folder=tmp_path) for a in argv]
    assert main(["profile", *argv, "--output", str(tmp_path / "out"), "--threads", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "profile.json").exists()


def test_profile_each_row_once_and_emulated_bf16_is_named(tiny_yaml, tmp_path, capsys, monkeypatch):
    from storm_vlm import precision

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    out = tmp_path / "out"
    assert main(["profile", "--config", str(tiny_yaml), "--frames", "2,2", "--compression", "4,4=4:1",
                 "--repeats", "1", "--warmup", "0", "--output", str(out), "--threads", "1", "--no-plots",
                 "--device", "cpu", "--dtype", "bf16"]) == 0
    assert "this CPU has no native bf16" in capsys.readouterr().err
    result = json.loads((out / "profile.json").read_text())
    assert [(r["frames"], r["compression"]) for r in result["rows"]] == [(2, 4)]
    assert "bfloat16 autocast" in result["settings"]["compute_dtype"]
