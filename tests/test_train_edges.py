"""Resuming under changed circumstances: another config, another number of processes or split of the
global batch, a checkpoint write that fails. Each is either exact or refused with one message naming the checkpoint and the
cause -- never a run that silently continues differently from how it started."""

import copy
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from storm_vlm.errors import ConfigError, StormError
from storm_vlm.train import checkpoint as ckpt
from storm_vlm.train import train
from storm_vlm.train import trainer as trainer_module
from storm_vlm.train.config import config_from_dict
from storm_vlm.train.stages import apply_stage, draws_random_numbers
from train_helpers import base_config, make_dataset, processor_and_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An uninterrupted 6-step run (accumulation 2, warm-up then cosine) with checkpoints 2 and 4."""
    base = tmp_path_factory.mktemp("edges")
    data = make_dataset(base / "data", num_videos=4, num_images=0)
    cfg = base_config(base / "ref", data, max_steps=6, save_steps=2, per_device_batch_size=1,
                      gradient_accumulation_steps=2, warmup_ratio=0.34)
    return {"cfg": cfg, "data": data, "ref": base / "ref", "final": train(cfg)}


def killed_after(run, tmp_path, step: int, keep_final: bool = False) -> Path:
    """What a run killed right after checkpoint-<step> leaves behind (the reference run, cut)."""
    out = tmp_path / "out"
    shutil.copytree(run["ref"], out)
    for s, path in ckpt.list_checkpoints(out):
        if s > step:
            shutil.rmtree(path)
    if not keep_final:
        shutil.rmtree(out / "final")
    return out


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_config_is_refused_naming_each_key_and_the_checkpoint(run, tmp_path):
    """The checkpoint's optimizer and scheduler files carry its learning rates (they used to win over a
    changed config without a word), and seed / global batch / record count fix the data order."""
    out = killed_after(run, tmp_path, 4)
    cfg = dict(run["cfg"], output_dir=str(out))
    with pytest.raises(ConfigError) as e:
        train(dict(cfg, learning_rate=1e-3, seed=1), resume=True)
    msg = str(e.value)
    assert str(out / "checkpoint-4") in msg and "learning_rate: 0.003 -> 0.001" in msg and "seed: 0 -> 1" in msg
    assert f"init_from: {out / 'checkpoint-4'}" in msg
    assert json.loads((out / "train_config.json").read_text())["learning_rate"] == 3e-3  # refused before writing
    with pytest.raises(ConfigError, match=r"global batch 2 but this run has 4 .*per_device_batch_size=1"):
        train(dict(cfg, per_device_batch_size=2), resume=True)
    with pytest.raises(ConfigError, match=r"checkpoint-4 is at step 4, past max_steps 3"):
        train(dict(cfg, max_steps=3), resume=True)
    grown = tmp_path / "grown.jsonl"  # the same records plus one: every epoch's permutation changes
    lines = run["data"]["train"].read_text().splitlines()
    grown.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(ConfigError, match=r"trained on 4 records, .*grown.jsonl now has 5"):
        train(dict(cfg, train_file=str(grown)), resume=True)
    assert not (out / "final").exists() and [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]


def test_a_shorter_max_steps_ends_at_the_checkpoint_not_at_the_old_final(run, tmp_path, caplog):
    """max_steps lowered to a checkpoint's step: the final model is that checkpoint's, not the longer
    run's final/ still on disk (which used to be returned as if it were this run's)."""
    out = killed_after(run, tmp_path, 4, keep_final=True)
    with caplog.at_level(logging.WARNING, logger="storm_vlm.train"):
        final = train(dict(run["cfg"], output_dir=str(out), max_steps=4), resume=True)
    assert "max_steps: 6 -> 4 since the checkpoint" in caplog.text
    assert same(weights(final), weights(out / "checkpoint-4"))
    assert not same(weights(final), weights(run["final"]))
    assert json.loads((final / "training_summary.json").read_text())["steps"] == 4


def test_a_longer_max_steps_is_stated_with_the_lr_jump(run, tmp_path, caplog):
    out = killed_after(run, tmp_path, 4)
    with caplog.at_level(logging.WARNING, logger="storm_vlm.train"):
        train(dict(run["cfg"], output_dir=str(out), max_steps=5), resume=True)
    assert "max_steps: 6 -> 5 since the checkpoint" in caplog.text
    assert "LR schedule is recomputed for 5 steps: its factor at step 4 goes from" in caplog.text


def saved_by_two_processes(folder: Path) -> None:
    """Rewrite a 1-process checkpoint as 2 processes x half the batch would have saved it."""
    state = json.loads((folder / ckpt.TRAINER_STATE).read_text())
    state["world_size"] = 2
    state["config"]["gradient_accumulation_steps"] = 1
    (folder / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    shutil.copy(folder / "rng_state_0.json", folder / "rng_state_1.json")
    ckpt.write_manifest(folder)


def test_another_number_of_processes_resumes_exactly_or_is_refused(run, tmp_path, monkeypatch, caplog):
    """Data order, optimizer, scheduler and step do not depend on the number of processes, so a model
    without dropout resumes exactly; one that draws random numbers cannot carry the ranks' RNG streams
    over and is refused unless resume_reseed_rng is set (it used to restore rank 0's stream silently)."""
    out = killed_after(run, tmp_path, 2)
    saved_by_two_processes(out / "checkpoint-2")
    cfg = dict(run["cfg"], output_dir=str(out))
    with caplog.at_level(logging.WARNING, logger="storm_vlm.train"):
        final = train(cfg, resume=True)
    assert "saved by 2 process(es), this run has 1" in caplog.text
    assert same(weights(final), weights(run["final"]))

    out = killed_after(run, tmp_path / "dropout", 2)
    saved_by_two_processes(out / "checkpoint-2")
    monkeypatch.setattr(trainer_module, "draws_random_numbers", lambda model: True)
    cfg = dict(run["cfg"], output_dir=str(out), max_steps=2)
    with pytest.raises(ConfigError, match=r"checkpoint-2 was saved by 2 process\(es\), this run has 1, .*dropout.*"
                                          r"resume_reseed_rng=true"):
        train(cfg, resume=True)
    assert not (out / "final").exists()
    assert train(dict(cfg, resume_reseed_rng=True), resume=True) == out / "final"


def test_another_accumulation_split_resumes_exactly_or_is_refused_with_dropout(run, tmp_path, monkeypatch):
    """Batch 1 x accumulation 2 resumed as batch 2 x accumulation 1 (same processes, same global batch)
    ends where the uninterrupted run ends. With dropout the masks are drawn per micro-batch, so the
    same change would continue differently: it is refused like another number of processes, and
    resume_reseed_rng lets it continue."""
    split = {"per_device_batch_size": 2, "gradient_accumulation_steps": 1}
    out = killed_after(run, tmp_path / "exact", 2)
    final = train(dict(run["cfg"], output_dir=str(out), **split), resume=True)
    a, b = weights(final), weights(run["final"])
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    monkeypatch.setattr(trainer_module, "draws_random_numbers", lambda model: True)
    out = killed_after(run, tmp_path / "dropout", 2)
    cfg = dict(run["cfg"], output_dir=str(out), max_steps=2, **split)
    with pytest.raises(ConfigError, match=r"checkpoint-2 was saved with per_device_batch_size 1 x "
                                          r"gradient_accumulation_steps 2, this run has 2 x 1, .*dropout.*Resume "
                                          r"with per_device_batch_size=1 and gradient_accumulation_steps=2.*"
                                          r"resume_reseed_rng=true"):
        train(cfg, resume=True)
    assert not (out / "final").exists()
    assert train(dict(cfg, resume_reseed_rng=True), resume=True) == out / "final"
    # the checkpoint's own split still restores the saved RNG streams, dropout or not
    shutil.rmtree(out / "final")
    assert train(dict(cfg, per_device_batch_size=1, gradient_accumulation_steps=2), resume=True) == out / "final"


def test_dropout_anywhere_counts_as_drawing_random_numbers(run):
    _, model = processor_and_model()
    assert not draws_random_numbers(model)
    for rate, expected in ((0.0, False), (0.1, True)):
        lora = {"r": 2, "alpha": 4, "dropout": rate, "target_modules": ["q_proj"]}
        m = apply_stage(copy.deepcopy(model), config_from_dict(dict(run["cfg"], lora=lora)))
        assert draws_random_numbers(m) is expected
    m = copy.deepcopy(model)
    m.language_model.config.attention_dropout = 0.1
    next(mod for mod in m.modules() if hasattr(mod, "attention_dropout")).attention_dropout = 0.1
    assert draws_random_numbers(m)


def test_a_failing_checkpoint_write_keeps_the_last_one_and_the_resume_is_exact(run, tmp_path, monkeypatch):
    """A full disk while checkpoint-4 is written: one message saying what --resume continues from, no
    half-written folder left holding the space, checkpoint-2 untouched; the resume ends bit-identical."""
    out = killed_after(run, tmp_path, 2)
    cfg = dict(run["cfg"], output_dir=str(out))
    original = ckpt.save_torch_state

    def disk_full(obj, path):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(obj, path)

    monkeypatch.setattr(ckpt, "save_torch_state", disk_full)
    with pytest.raises(StormError, match=r"cannot write .*checkpoint-4 \(OSError: .*No space left.*continues from "
                                         r"checkpoint-2"):
        train(cfg, resume=True)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    ckpt.verify_checkpoint(out / "checkpoint-2")
    assert same(weights(train(cfg, resume=True)), weights(run["final"]))


def torchrun(cfg: Path, out: Path, nproc: int, *sets: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "storm_vlm", "train", str(cfg), "--set", f"output_dir={out}",
           "--set", "progress_bar=false", "--resume"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "final"


def close(a: Path, b: Path, atol: float = 2e-6) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < atol, worst
    return worst


@pytest.mark.slow
def test_ddp_checkpoint_resumes_on_one_process_and_back_under_fsdp2(tmp_path):
    """Real runs: a 2-process DDP run resumed on 1 process ends where the 2-process run ends, and a
    1-process run resumed under 2-process FSDP2 ends where the 1-process run ends (float rounding of
    the cross-rank reduction apart)."""
    data = make_dataset(tmp_path / "data", num_videos=6, num_images=0)
    cfg = base_config(tmp_path / "unused", data, max_steps=6, save_steps=2, per_device_batch_size=2)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    two = torchrun(path, tmp_path / "two", 2, "per_device_batch_size=1", "distributed=ddp")
    one = torchrun(path, tmp_path / "one", 1)
    for src, dst, nproc, sets, ref in ((two, "two_to_one", 1, (), two),
                                       (one, "one_to_two", 2, ("per_device_batch_size=1", "distributed=fsdp"), one)):
        out = tmp_path / dst
        shutil.copytree(src.parent, out)
        shutil.rmtree(out / "final")
        shutil.rmtree(out / "checkpoint-4")
        close(torchrun(path, out, nproc, *sets), ref)
