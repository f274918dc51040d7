"""What a job that dies, or a user who mistypes, leaves behind: a real failed write inside
torch.save, a SIGKILL in the middle of a checkpoint, a deletion cut short by rotation, a damaged
`init_from` folder, and config files with misspelt or repeated keys. Each ends in one message naming
the file and the field, or in a resume from the last complete checkpoint."""

import contextlib
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from storm_vlm.errors import ConfigError, StormError
from storm_vlm.train import checkpoint as ckpt
from storm_vlm.train import train
from storm_vlm.train.config import config_from_dict, load_config, read_yaml
from storm_vlm.train.model_source import check_source_keys
from test_train_config import BASE
from train_helpers import base_config, make_dataset, processor_and_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), num_videos=4, num_images=0)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past `nbytes` fail with a real EFBIG from the kernel (as a full disk fails with ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_that_fails_inside_torch_save_is_an_oserror_naming_the_file(tmp_path):
    """torch.save given a file name reports a failed write as RuntimeError("unexpected pos ..."),
    which the trainer's full-disk handling (it catches OSError) let through as a traceback."""
    path = tmp_path / ckpt.OPTIMIZER_FILE
    with file_size_limit(4096), pytest.raises(OSError) as info:
        ckpt.save_torch_state({"exp_avg": torch.zeros(100_000)}, path)
    assert info.value.filename == str(path) and "File too large" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no temporary left


def test_a_full_disk_while_the_optimizer_is_saved_stops_with_one_message(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = ckpt.save_torch_state

    def save_on_a_full_disk(obj, path):
        with file_size_limit(4096):
            real(obj, path)

    monkeypatch.setattr(ckpt, "save_torch_state", save_on_a_full_disk)
    with pytest.raises(StormError, match=r"cannot write .*checkpoint-1 \(OSError: \[Errno 27\] File too large: "
                                         r"'.*optimizer\.pt'\).*continues from step 0"):
        train(base_config(out, data, max_steps=2, save_steps=1))
    assert not [p.name for p in out.iterdir() if p.name.startswith("checkpoint")]  # no half-written folder


class Payload:
    """Unpickling this runs code (here: touches a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_optimizer_file_holding_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / ckpt.OPTIMIZER_FILE
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, path)
    with pytest.raises(StormError, match=f"{path}: cannot load optimizer state"):
        ckpt.load_torch_state(path)
    assert not marker.exists()


def _fake_checkpoint(output_dir: Path, step: int) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / ckpt.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    (folder / ckpt.OPTIMIZER_FILE).write_bytes(b"x" * 64)
    return folder


def test_rotation_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A deletion cut short used to leave `checkpoint-1` with some files gone; once trainer_state.json
    was among them, rotation no longer counted the folder and it held its space for good."""
    for step in (1, 2):
        _fake_checkpoint(tmp_path, step)

    def killed_while_deleting(path, ignore_errors=False):
        os.unlink(Path(path) / ckpt.TRAINER_STATE)  # the first file gone, then the process dies
        raise SystemExit("killed")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(SystemExit):
        ckpt.prune_checkpoints(tmp_path, keep=1, upto_step=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1.pruned", "checkpoint-2"]
    ckpt.remove_stale_tmp(tmp_path)  # the next start
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


@pytest.fixture
def model_folder(tmp_path):
    processor, model = processor_and_model()
    folder = tmp_path / "sft-final"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_init_from_folder_is_named_before_the_model_loads(data, tmp_path, model_folder):
    """A previous stage's final/ copied only in part used to end in safetensors' "incomplete
    metadata, file not fully covered", naming neither the file nor the key."""
    cfg = base_config(tmp_path / "out", data, build=None, init_from=str(model_folder))
    weights = model_folder / "model.safetensors"
    size = weights.stat().st_size
    ckpt.write_manifest(model_folder)  # as final/ carries one
    _cut(weights)
    with pytest.raises(ConfigError, match=rf"key 'init_from': {re.escape(str(model_folder))} is damaged: model.safetensors has "
                                          rf"{size // 2} bytes, manifest.json says {size}"):
        train(cfg)
    config = json.loads((model_folder / "config.json").read_text())
    (model_folder / "config.json").write_text(json.dumps(config))  # edited by hand: not compared
    with pytest.raises(ConfigError, match=r"is damaged: model.safetensors has"):
        train(cfg)
    (model_folder / ckpt.MANIFEST_FILE).unlink()  # a folder without a manifest: the header is checked
    with pytest.raises(ConfigError, match=r"is damaged: model.safetensors is not a complete safetensors file"):
        train(cfg)
    (model_folder / "config.json").write_text(json.dumps(dict(config, model_type="qwen2")))
    with pytest.raises(ConfigError, match=r"key 'init_from': .*model_type is 'qwen2', expected 'storm'"):
        train(cfg)


@pytest.mark.parametrize("text, overrides, message", [
    (BASE + "learning_rate: 3.0e-4\n", [], r"c.yaml: line 11: key 'learning_rate' is given twice \(first on line 10\)"),
    (BASE + "lora:\n  r: 4\n  r: 8\n", [], r"c.yaml: line 13: key 'r' is given twice \(first on line 12\)"),
    (BASE, ["learnig_rate=1e-3"], r"c.yaml: unknown key 'learnig_rate' \(did you mean learning_rate\?\)"),
    (BASE + "stages:\n  long: {num_frame: 32}\n", [],
     r"c.yaml: unknown key 'stages.long.num_frame' \(did you mean num_frames\?\)"),
    (BASE, ["lora.dropuot=0.1"], r"key 'lora.dropuot': unknown LoRA option \(did you mean dropout\?\)"),
    (BASE, ["adam_beta2=1"], r"c.yaml: key 'adam_beta2': must be below 1, got 1.0"),
    (BASE, ["seed=4294967296"], r"c.yaml: key 'seed': must be an integer between 0 and 4294967295"),
])
def test_config_mistakes_are_one_message_naming_the_file_and_key(tmp_path, text, overrides, message):
    """A repeated key used to win silently (PyYAML keeps the last); adam_beta = 1 passed and failed in
    torch's AdamW after the model had loaded, as a seed from about 2**43 on did in the data sampler
    (seeds are numpy's 32-bit ones)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_keys_a_merge_brings_in_may_still_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("common: &c {learning_rate: 1.0e-3, seed: 3}\nrun:\n  <<: *c\n  learning_rate: 2.0e-4\n")
    assert read_yaml(path)["run"] == {"learning_rate": 2e-4, "seed": 3}


def test_a_misspelt_model_source_option_gets_a_suggestion():
    cfg = config_from_dict(dict(stage="sft", output_dir="o", train_file="t", media_root=".", num_frames=4,
                                max_steps=1, save_steps=0, seed=0, tiny={"projector_typ": "mlp"}))
    with pytest.raises(ConfigError, match=r"key 'tiny.projector_typ': unknown option \(did you mean projector_type\?\)"):
        check_source_keys(cfg)


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_resumes_from_the_last_complete_one(data, tmp_path, caplog):
    """A real `storm-vlm train` process killed while checkpoint-4's optimizer file is half written:
    the previous checkpoint stays usable, --resume continues from it (the half-written folder is
    never picked up, and removed) and ends bit-identical to an uninterrupted run."""
    cfg = base_config(tmp_path / "ref", data, max_steps=6, save_steps=2, per_device_batch_size=1,
                      gradient_accumulation_steps=2)
    ref = train(cfg)
    out = tmp_path / "killed"
    inside = tmp_path / "inside-the-write"
    child = f"""
import sys, time, yaml
from pathlib import Path
from storm_vlm.train import checkpoint as ckpt, train
real = ckpt.save_torch_state
def slow(obj, path):
    if Path(path).parent.name == "checkpoint-4.tmp":
        Path(path).write_bytes(b"PK" + bytes(1000))  # half of a file, then the process hangs
        Path({str(inside)!r}).touch()
        time.sleep(600)
    real(obj, path)
ckpt.save_torch_state = slow
train(yaml.safe_load(open(sys.argv[1])))
"""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(dict(cfg, output_dir=str(out))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "tests")]))
    proc = subprocess.Popen([sys.executable, "-c", child, str(path)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not inside.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before checkpoint-4"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert (out / "checkpoint-4.tmp" / ckpt.OPTIMIZER_FILE).is_file() and not (out / "checkpoint-4").exists()
    assert ckpt.verify_checkpoint(out / "checkpoint-2").startswith("sizes and SHA-256")
    with caplog.at_level(logging.INFO, logger="storm_vlm.train"):
        final = train(dict(cfg, output_dir=str(out)), resume=True)
    assert "(step 2," in caplog.text and "skipping" not in caplog.text
    assert not list(out.glob("*.tmp"))
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key", ["train_file", "media_root"])
def test_a_missing_data_path_is_named_before_the_model_loads(data, tmp_path, monkeypatch, key):
    import storm_vlm.train.trainer as trainer

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data paths were checked")

    monkeypatch.setattr(trainer, "load_model_and_processor", no_loading)
    with pytest.raises(ConfigError, match=rf"key '{key}': .*missing.* does not exist"):
        train(base_config(tmp_path / "out", data, **{key: str(tmp_path / "missing")}))
