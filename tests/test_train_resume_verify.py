"""--resume verifies before it trusts: every checkpoint carries a manifest.json
(sizes and SHA-256, written last); a damaged newest checkpoint is skipped, with the reason logged, and
training resumes from the newest one that verifies and ends bit-identical to an uninterrupted run.
Checkpoints written before manifests existed still resume (reported as unverified)."""

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

from storm_vlm.errors import StormError
from storm_vlm.train import checkpoint as ckpt
from storm_vlm.train import train
from train_helpers import base_config, make_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints 2, 4, 6: copied and stripped of final/, it is
    exactly what a run killed after checkpoint-6 leaves behind."""
    base = tmp_path_factory.mktemp("resume-verify")
    data = make_dataset(base / "data", num_videos=4, num_images=0)
    cfg = base_config(base / "ref", data, max_steps=8, save_steps=2, per_device_batch_size=1,
                      gradient_accumulation_steps=2, weight_decay=0.01)
    final = train(cfg)
    return {"cfg": cfg, "ref": base / "ref", "final": final}


def crashed_copy(run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run["ref"], out)
    shutil.rmtree(out / "final")
    return out


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def only_trainer_state(folder: Path) -> None:
    for p in folder.iterdir():
        if p.name != ckpt.TRAINER_STATE:
            p.unlink()


def test_every_checkpoint_and_final_carry_a_manifest_written_last(run):
    for name in ("checkpoint-2", "checkpoint-4", "checkpoint-6", "final"):
        folder = run["ref"] / name
        manifest = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {ckpt.MANIFEST_FILE}
        assert set(manifest["files"]) == files and manifest["algorithm"] == "sha256"
        for rel, entry in manifest["files"].items():
            assert entry["size"] == (folder / rel).stat().st_size
            assert entry["sha256"] == ckpt.sha256_file(folder / rel)
    assert "optimizer.pt" in json.loads((run["ref"] / "checkpoint-2" / ckpt.MANIFEST_FILE).read_text())["files"]


DAMAGE = {
    "truncated model.safetensors": (lambda c: truncate(c / "model.safetensors"), "model.safetensors has"),
    "garbage trainer_state.json": (lambda c: (c / ckpt.TRAINER_STATE).write_text("{garbage"),
                                   "trainer_state.json is not readable JSON"),
    "trainer_state.json for another step": (
        lambda c: (c / ckpt.TRAINER_STATE).write_text(json.dumps(
            dict(json.loads((c / ckpt.TRAINER_STATE).read_text()), global_step=2))), "is for step 2, not 6"),
    "missing scheduler.json": (lambda c: (c / ckpt.SCHEDULER_FILE).unlink(), "scheduler.json is missing"),
    "only trainer_state.json": (only_trainer_state, "is missing"),
    "same-size damage to optimizer.pt": (lambda c: flip_last_byte(c / ckpt.OPTIMIZER_FILE),
                                         "optimizer.pt does not match its SHA-256"),
    "garbage manifest.json": (lambda c: (c / ckpt.MANIFEST_FILE).write_text("[1, 2]"), "not a format-1 manifest"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_bit_identical(run, tmp_path, caplog, damage):
    out = crashed_copy(run, tmp_path)
    corrupt, reason = DAMAGE[damage]
    corrupt(out / "checkpoint-6")
    with caplog.at_level(logging.INFO, logger="storm_vlm.train"):
        final = train(dict(run["cfg"], output_dir=str(out)), resume=True)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint-6" in r.getMessage()]
    assert len(skipped) == 1 and reason in skipped[0], caplog.text
    assert "--resume: checkpoint-4 verified: sizes and SHA-256 of all" in caplog.text
    assert "resuming from" in caplog.text and "(step 4," in caplog.text
    assert same_weights(run["final"], final)
    # the damaged folder was replaced when the run saved step 6 again
    assert ckpt.verify_checkpoint(out / "checkpoint-6").startswith("sizes and SHA-256")


LEGACY_DAMAGE = {
    "truncated model.safetensors": (lambda c: truncate(c / "model.safetensors"),
                                    "model.safetensors is not a complete safetensors file"),
    "truncated optimizer.pt": (lambda c: truncate(c / ckpt.OPTIMIZER_FILE),
                               "optimizer.pt is not a complete torch.save archive"),
    "missing scheduler.json": (lambda c: (c / ckpt.SCHEDULER_FILE).unlink(), "scheduler.json is missing"),
    "only trainer_state.json": (only_trainer_state, "is missing"),
    "garbage rng state": (lambda c: (c / "rng_state_0.json").write_text('{"python": 1}'),
                          "rng_state_0.json is not an RNG state"),
}


@pytest.mark.parametrize("damage", list(LEGACY_DAMAGE))
def test_checkpoints_from_before_manifests_resume_and_are_checked_for_structure(run, tmp_path, caplog, damage):
    out = crashed_copy(run, tmp_path)
    for folder in out.glob("checkpoint-*"):
        (folder / ckpt.MANIFEST_FILE).unlink()  # what today's main writes
    corrupt, reason = LEGACY_DAMAGE[damage]
    corrupt(out / "checkpoint-6")
    with caplog.at_level(logging.INFO, logger="storm_vlm.train"):
        final = train(dict(run["cfg"], output_dir=str(out)), resume=True)
    assert f"skipping checkpoint-6: {reason}" in caplog.text or (
        "skipping checkpoint-6" in caplog.text and reason in caplog.text), caplog.text
    assert "checkpoint-4 has no manifest.json (written by an older storm-vlm)" in caplog.text
    assert "contents unverified" in caplog.text
    assert same_weights(run["final"], final)


def test_checksums_catch_what_sizes_cannot_and_the_opt_out_skips_them(run, tmp_path, caplog):
    out = crashed_copy(run, tmp_path)
    weights = out / "checkpoint-6" / "model.safetensors"
    flip_last_byte(weights)  # same size, valid header: only the hash sees it
    with pytest.raises(ckpt.CheckpointInvalid, match="model.safetensors does not match its SHA-256"):
        ckpt.verify_checkpoint(out / "checkpoint-6")
    how = ckpt.verify_checkpoint(out / "checkpoint-6", checksums=False)
    assert how.startswith("sizes of all") and "checkpoint_checksums is false" in how
    path, _, skipped = ckpt.find_resume_checkpoint(out, checksums=False)
    assert path.name == "checkpoint-6" and skipped == []
    # a run with the opt-out writes sizes only, and --resume then reads no file contents
    cfg = dict(run["cfg"], output_dir=str(tmp_path / "nosum"), max_steps=2, save_steps=1, checkpoint_checksums=False)
    train(cfg)
    manifest = json.loads((tmp_path / "nosum" / "checkpoint-1" / ckpt.MANIFEST_FILE).read_text())
    assert manifest["algorithm"] is None and all(set(e) == {"size"} for e in manifest["files"].values())


def test_no_checkpoint_verifies_is_one_error_naming_each_and_deletes_nothing(run, tmp_path):
    out = crashed_copy(run, tmp_path)
    for folder in out.glob("checkpoint-*"):
        (folder / ckpt.SCHEDULER_FILE).unlink()
    with pytest.raises(StormError) as info:
        train(dict(run["cfg"], output_dir=str(out)), resume=True)
    msg = str(info.value)
    assert "none of the 3 checkpoints" in msg and msg.count("scheduler.json is missing") == 3
    assert "checkpoint-2:" in msg and "move them aside" in msg
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_pruning_never_deletes_the_checkpoint_just_saved_for_a_stale_newer_one(run, tmp_path, caplog):
    """A skipped checkpoint-6 stays (for inspection) until step 6 is saved again; with
    save_total_limit it must not push out the checkpoints this run writes."""
    out = crashed_copy(run, tmp_path)
    truncate(out / "checkpoint-6" / "model.safetensors")
    shutil.rmtree(out / "checkpoint-4")
    cfg = dict(run["cfg"], output_dir=str(out), save_total_limit=1, save_steps=3, max_steps=5)
    train(cfg, resume=True)  # from checkpoint-2: saves checkpoint-3 while the stale 6 exists
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_unreadable_summary_and_metrics_do_not_stop_a_resume(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["ref"], out)
    (out / "final" / "training_summary.json").write_text("[]")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n"text"\n{"step": "x"}\n\xff\n')
    final = train(dict(run["cfg"], output_dir=str(out)), resume=True)  # resumes from checkpoint-6
    assert same_weights(run["final"], final)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


@pytest.mark.slow
def test_resume_falls_back_in_a_real_process(run, tmp_path):
    """`storm-vlm train --resume` in its own interpreter: two damaged checkpoints skipped and named on
    stderr, the run resumes from checkpoint-2 and ends bit-identical; with nothing usable it exits 2
    with one message and no traceback."""
    out = crashed_copy(run, tmp_path)
    truncate(out / "checkpoint-6" / "model.safetensors")
    only_trainer_state(out / "checkpoint-4")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dict(run["cfg"], output_dir=str(out))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "storm_vlm", "train", str(path), "--resume"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping checkpoint-6: model.safetensors has" in proc.stderr
    assert "skipping checkpoint-4: scheduler.json is missing" in proc.stderr
    assert "checkpoint-2 verified" in proc.stderr
    assert same_weights(run["final"], out / "final")

    shutil.rmtree(out / "final")
    for folder in out.glob("checkpoint-*"):
        (folder / ckpt.TRAINER_STATE).write_text("garbage")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "storm-vlm train: error: --resume: none of the 3 checkpoints" in proc.stderr


def test_a_file_that_cannot_be_read_is_a_skip_with_its_name(run, tmp_path, monkeypatch):
    out = crashed_copy(run, tmp_path)
    real = ckpt.sha256_file

    def failing(path):
        if Path(path).parent.name == "checkpoint-6" and Path(path).name == ckpt.OPTIMIZER_FILE:
            raise OSError(5, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(ckpt, "sha256_file", failing)
    path, how, skipped = ckpt.find_resume_checkpoint(out)
    assert path.name == "checkpoint-4" and how.startswith("sizes and SHA-256")
    assert [(p.name, why) for p, why in skipped] == [("checkpoint-6", "cannot read optimizer.pt (Input/output error)")]


def test_a_damaged_final_model_is_trained_again_not_returned(run, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(run["ref"], out)
    truncate(out / "final" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="storm_vlm.train"):
        final = train(dict(run["cfg"], output_dir=str(out)), resume=True)
    assert "final is damaged (model.safetensors has" in caplog.text
    assert same_weights(run["final"], final)  # rebuilt from checkpoint-6


def test_a_run_killed_while_replacing_a_checkpoint_resumes_from_it(run, tmp_path, caplog):
    """Killed inside publish_dir (old checkpoint-6 moved aside to .old, the new one still .tmp):
    the finished .tmp gets the name back and the run resumes from step 6, not from step 4; with
    only the .old left, the old folder comes back."""
    out = crashed_copy(run, tmp_path)
    os.replace(out / "checkpoint-6", out / "checkpoint-6.old")
    shutil.copytree(out / "checkpoint-6.old", out / "checkpoint-6.tmp")
    (out / "checkpoint-6.old" / ckpt.TRAINER_STATE).write_text("{}")  # the copy being replaced: not this one
    with caplog.at_level(logging.INFO, logger="storm_vlm.train"):
        final = train(dict(run["cfg"], output_dir=str(out)), resume=True)
    assert "checkpoint-6 was being replaced when the run stopped" in caplog.text
    assert "(step 6," in caplog.text
    assert same_weights(run["final"], final)
    assert not list(out.glob("*.old")) and not list(out.glob("*.tmp"))
    os.replace(out / "checkpoint-4", out / "checkpoint-4.old")
    assert ckpt.finish_interrupted_publish(out) == [out / "checkpoint-4"]
    assert ckpt.verify_checkpoint(out / "checkpoint-4").startswith("sizes and SHA-256")
