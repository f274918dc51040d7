"""Crash safety: a run SIGKILLed right after a checkpoint and resumed ends bitwise where an
uninterrupted run ends; half-written checkpoints are never picked up."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from storm_vlm.cli import main
from storm_vlm.train import checkpoint as ckpt
from storm_vlm.train import train
from storm_vlm.train.trainer import Trainer
from train_helpers import base_config, make_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_videos=6, num_images=2)


def assert_same_weights(a: Path, b: Path):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]


def losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_after_checkpoint_then_resume_is_bitwise_identical(data, tmp_path):
    cfg = base_config(tmp_path / "unused", data, max_steps=14, save_steps=2, gradient_accumulation_steps=2,
                      per_device_batch_size=1, max_grad_norm=0.5, weight_decay=0.01, warmup_ratio=0.2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))

    ref = tmp_path / "ref"
    assert main(["train", str(path), "--set", f"output_dir={ref}"]) == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "storm_vlm", "train", str(path), "--set", f"output_dir={killed}",
         "--set", "progress_bar=false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoint-2" / ckpt.TRAINER_STATE).exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists(), "killed too late: the run had finished"
    # A half-written checkpoint left by a crash must be ignored (and cleaned up on resume).
    (killed / "checkpoint-999.tmp").mkdir()
    (killed / "checkpoint-999.tmp" / "junk").write_text("partial")
    last = ckpt.latest_checkpoint(killed)
    assert last is not None and last.name != "checkpoint-999.tmp"

    assert main(["train", str(path), "--set", f"output_dir={killed}", "--resume"]) == 0
    assert not (killed / "checkpoint-999.tmp").exists()
    assert_same_weights(ref / "final", killed / "final")
    assert losses(killed) == losses(ref)  # the metrics log is continued, not duplicated
    opt_ref = torch.load(ref / "checkpoint-12" / ckpt.OPTIMIZER_FILE, weights_only=True)
    opt_res = torch.load(killed / "checkpoint-12" / ckpt.OPTIMIZER_FILE, weights_only=True)
    for name, state in opt_ref["state"].items():
        assert torch.equal(state["exp_avg_sq"], opt_res["state"][name]["exp_avg_sq"]), name


class Crash(RuntimeError):
    pass


def test_lora_crash_and_resume_in_process(data, tmp_path, monkeypatch):
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    cfg = base_config(tmp_path / "ref", data, max_steps=6, save_steps=3, lora=lora)
    ref = train(cfg)

    out = tmp_path / "crash"
    original = Trainer.save_checkpoint

    def save_then_crash(self, step):
        path = original(self, step)
        raise Crash(step)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(dict(cfg, output_dir=str(out)))
    monkeypatch.undo()
    assert (out / "checkpoint-3" / ckpt.TRAINABLE_FILE).is_file()
    state = json.loads((out / "checkpoint-3" / ckpt.TRAINER_STATE).read_text())
    assert state["global_step"] == 3 and state["lora"] is True
    rng = json.loads((out / "checkpoint-3" / "rng_state_0.json").read_text())
    assert {"python", "numpy", "torch"} <= set(rng)
    resumed = train(dict(cfg, output_dir=str(out)), resume=True)
    assert_same_weights(ref, resumed)  # LoRA dropout draws from the restored RNG state
    # Resuming a finished run is a no-op that returns its final model.
    mtime = (resumed / "model.safetensors").stat().st_mtime_ns
    assert train(dict(cfg, output_dir=str(out)), resume=True) == resumed
    assert (resumed / "model.safetensors").stat().st_mtime_ns == mtime
