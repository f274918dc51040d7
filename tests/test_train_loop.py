"""The training loop on a tiny model: loss goes down, stages train the right parts, skips are counted."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from storm_vlm.errors import ConfigError
from storm_vlm.train import train
from train_helpers import base_config, make_dataset, write_image, write_video


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_videos=8, num_images=8)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_steps_lower_the_loss_and_log_metrics(data, tmp_path):
    out = tmp_path / "sft"
    final = train(base_config(out, data, max_steps=8, projector_lr=5e-3, bf16=True))
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-2:]) < losses[0] - 0.3, losses
    first = rows[0]
    assert set(first["lr"]) == {"projector", "model"}
    assert first["lr"]["projector"] == pytest.approx(5e-3) and first["lr"]["model"] == pytest.approx(3e-3)
    assert rows[-1]["lr"]["model"] < first["lr"]["model"]  # cosine decay
    assert first["grad_norm"] > 0 and first["samples_per_s"] > 0 and first["skipped_media"] == 0
    assert final == out / "final" and (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(base_config(out, data))


def test_align_trains_only_the_projector_then_lora_sft_chains(data, tmp_path):
    align_out = tmp_path / "align"
    final = train(base_config(align_out, data, stage="align", train_file=str(data["align"]), max_steps=3,
                              learning_rate=1e-2))
    after = load_file(str(final / "model.safetensors"))
    ref = _reference_weights(data)
    changed = {k for k in after if not torch.equal(after[k], ref[k])}
    assert changed and all(k.startswith("projector.") for k in changed), sorted(changed)[:5]
    # sft with LoRA from the align output: the LLM changes only through merged LoRA deltas,
    # the projector trains fully, the vision tower stays frozen.
    sft_out = tmp_path / "sft"
    final2 = train(base_config(sft_out, data, build=None, init_from=str(align_out), max_steps=3,
                               lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}))
    merged = load_file(str(final2 / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    assert set(merged) == set(after)
    llm_changed = {k for k in merged if k.startswith("language_model.") and not torch.equal(merged[k], after[k])}
    assert llm_changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in llm_changed)
    assert any(not torch.equal(merged[k], after[k]) for k in merged if k.startswith("projector."))
    assert all(torch.equal(merged[k], after[k]) for k in merged if k.startswith("vision_tower."))


def _reference_weights(data):
    """The untrained model the build source gives (same seed as the runs)."""
    from storm_vlm.train.config import config_from_dict
    from storm_vlm.train.launch import DistEnv
    from storm_vlm.train.model_source import load_model_and_processor

    torch.manual_seed(0)
    cfg = config_from_dict(base_config("unused", data))
    model, _ = load_model_and_processor(cfg, DistEnv())
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_long_stage_pools_frames_and_counts_skipped_media(data, tmp_path):
    root = data["root"]
    frames = np.full((8, 32, 32, 3), 60, np.uint8)
    write_video(root / "videos" / "long.mp4", frames)
    (root / "videos" / "corrupt.mp4").write_bytes(b"garbage" * 100)
    recs = [{"id": "long", "video": "videos/long.mp4",
             "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "Nothing."}]},
            {"id": "corrupt", "video": "videos/corrupt.mp4",
             "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "Nothing."}]}]
    f = root / "long.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "long"
    final = train(base_config(out, data, stage="long", train_file=str(f), num_frames=8, temporal_pool_size=4,
                              per_device_batch_size=1, max_steps=4, save_steps=2, shuffle=False,
                              gradient_checkpointing=True))
    rows = metrics(out)
    assert rows[-1]["skipped_media"] == 2 and [r["skipped_media_step"] for r in rows] == [0, 1, 0, 1]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["skipped_media"] == 1 and state["epoch"] == 1 and state["step_in_epoch"] == 0
    config = json.loads((final / "config.json").read_text())
    assert config["temporal_pool_size"] == 4


def test_a_run_goes_on_past_a_record_too_long_for_max_length(data, tmp_path):
    """A record that does not fit max_length is met deep into a run: it is skipped and counted like
    unreadable media (the run used to stop there); a frame-folder video trains like a file."""
    root = data["root"]
    for i in range(4):
        write_image(root / "frames" / f"{i}.png", np.full((32, 32, 3), 50 * i, np.uint8))
    conv = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "Nothing."}]
    recs = [{"id": "folder", "video": "frames", "conversations": conv},
            {"id": "long", "video": "videos/v0.mp4",
             "conversations": [{"from": "human", "value": "word " * 300}, conv[1]]}]
    f = root / "too_long.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "run"
    train(base_config(out, data, train_file=str(f), max_length=160, per_device_batch_size=1, max_steps=2,
                      shuffle=False))
    assert [r["skipped_media_step"] for r in metrics(out)] == [0, 1]
    rows = [json.loads(line) for line in (out / "skipped_media.jsonl").read_text().splitlines()]
    assert rows == [{"step": 2, "record": f"{f}:2", "id": "long",
                     "cause": "too long: no assistant token left to learn from (max_length 160)"}]


def test_resume_across_skipped_records_is_exact_and_logs_each_skip_once(data, tmp_path):
    """A resumed run skips the same records at the same steps as an uninterrupted one and ends with
    the same weights; skipped_media.jsonl drops the rows logged past the checkpoint, as metrics.jsonl does."""
    root = data["root"]
    (root / "videos" / "cut.mp4").write_bytes((root / "videos" / "v1.mp4").read_bytes()[:300])
    conv = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "Nothing."}]
    recs = [{"id": "ok", "video": "videos/v0.mp4", "conversations": conv},
            {"id": "cut", "video": "videos/cut.mp4", "conversations": conv},
            {"id": "ok2", "video": "videos/v2.mp4", "conversations": conv},
            {"id": "long", "video": "videos/v3.mp4",
             "conversations": [{"from": "human", "value": "word " * 300}, conv[1]]}]
    f = root / "skips.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ref = tmp_path / "ref"
    cfg = base_config(ref, data, train_file=str(f), max_length=160, per_device_batch_size=1, max_steps=4,
                      save_steps=2, shuffle=False)
    train(cfg)
    skipped = [json.loads(line) for line in (ref / "skipped_media.jsonl").read_text().splitlines()]
    assert [(r["step"], r["id"]) for r in skipped] == [(2, "cut"), (4, "long")]
    assert skipped[0]["record"] == f"{f}:2" and skipped[0]["cause"].startswith("unreadable media:")

    resumed = tmp_path / "resumed"  # the ref run as a kill after checkpoint-2 would have left it
    shutil.copytree(ref, resumed, ignore=shutil.ignore_patterns("final"))
    train({**cfg, "output_dir": str(resumed)}, resume=True)
    for name in ("skipped_media.jsonl", "metrics.jsonl"):
        rows = [json.loads(line) for line in (resumed / name).read_text().splitlines()]
        ref_rows = [json.loads(line) for line in (ref / name).read_text().splitlines()]
        assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    assert metrics(resumed)[-1]["loss"] == metrics(ref)[-1]["loss"]
    a, b = load_file(str(ref / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_log_writes_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    """TensorBoard is optional (not installed here): a stand-in SummaryWriter records the calls."""
    import sys
    import types

    from storm_vlm.train.trainer import MetricsLog

    calls = []

    class Writer:
        def __init__(self, log_dir, purge_step):
            calls.append(("init", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def close(self):
            calls.append(("close",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "loss": 2.0}\n{"step": 5, "loss": 9.0}\n{"step": 6, "lo')
    log = MetricsLog(tmp_path, enabled=True, tensorboard=True, resume_step=4)
    log.log({"step": 5, "loss": 1.5, "lr": {"projector": 1e-3, "llm": 2e-5}, "stage": "sft"})
    log.close()
    assert calls == [("init", str(tmp_path / "tensorboard"), 5), ("train/loss", 1.5, 5),
                     ("lr/projector", 1e-3, 5), ("lr/llm", 2e-5, 5), ("close",)]
    # steps after the resumed checkpoint (and a line cut by the kill) are dropped, the new one appended
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(4, 2.0), (5, 1.5)]
