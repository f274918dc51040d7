"""Multi-process jobs that stop and resume: a changed split of the global batch is exact or refused, and
a rank that fails ends the whole torchrun job at once with its error, naming what --resume continues from."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from storm_vlm.errors import ConfigError
from storm_vlm.train import checkpoint as ckpt
from storm_vlm.train import train
from storm_vlm.train import trainer as trainer_module
from train_helpers import base_config, make_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An uninterrupted 4-step run of 1 process x batch 1 x accumulation 2, with checkpoint 2."""
    base = tmp_path_factory.mktemp("split")
    data = make_dataset(base / "data", num_videos=4, num_images=0)
    cfg = base_config(base / "ref", data, max_steps=4, save_steps=2, per_device_batch_size=1,
                      gradient_accumulation_steps=2)
    return {"cfg": cfg, "data": data, "final": train(cfg)}


def killed_after_checkpoint_2(run, out: Path) -> Path:
    shutil.copytree(Path(run["cfg"]["output_dir"]), out)
    shutil.rmtree(out / "final")
    return out


def test_another_accumulation_split_resumes_exactly_or_is_refused_with_dropout(run, tmp_path, monkeypatch):
    """Batch 1 x accumulation 2 resumed as batch 2 x accumulation 1 (same processes, same global batch)
    ends where the uninterrupted run ends. With dropout the masks are drawn per micro-batch, so the
    same change would continue differently: it is refused like another number of processes (it used to
    go on silently), and resume_reseed_rng lets it continue."""
    split = {"per_device_batch_size": 2, "gradient_accumulation_steps": 1}
    out = killed_after_checkpoint_2(run, tmp_path / "exact")
    final = train(dict(run["cfg"], output_dir=str(out), **split), resume=True)
    a, b = load_file(str(final / "model.safetensors")), load_file(str(run["final"] / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    monkeypatch.setattr(trainer_module, "draws_random_numbers", lambda model: True)
    out = killed_after_checkpoint_2(run, tmp_path / "dropout")
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


FAULTY_RANK = """
import errno, sys, time
import torch.distributed as dist
from storm_vlm.train import trainer

def write(path, obj, original=trainer.atomic_write_json):
    if path.name == "rng_state_1.json" and path.parent.name == "checkpoint-4.tmp":
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return original(path, obj)

trainer.atomic_write_json = write
dist.destroy_process_group = lambda *args, **kwargs: time.sleep(3600)  # as NCCL's can, with a peer blocked
from storm_vlm.cli import main
raise SystemExit(main())
"""


@pytest.mark.slow
def test_a_rank_whose_write_fails_ends_the_job_at_once_naming_the_checkpoint_to_resume_from(run, tmp_path):
    """torchrun, 2 processes: rank 1 finds the disk full writing its RNG state into checkpoint-4 while rank
    0 waits for it. Rank 1 must print its error and exit at once -- not first tear the process group down,
    which waits on the blocked rank 0 (as NCCL's destroy can: the job then hung, silent, until the
    timeout) -- and the error must name checkpoint-2 as where --resume continues (rank 1 said "step 0":
    only rank 0 knew of the checkpoints saved)."""
    cfg = dict(run["cfg"], max_steps=6, per_device_batch_size=1, gradient_accumulation_steps=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "faulty_rank.py"
    script.write_text(FAULTY_RANK)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", str(path), "--set", f"output_dir={out}", "--set", "distributed=ddp"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun ends its ranks (each in a session of its own) on SIGTERM
        proc.communicate(timeout=120)
        pytest.fail("the job did not end after rank 1 failed")
    assert proc.returncode != 0
    assert (f"storm-vlm train: error: cannot write {out / 'checkpoint-4'} (OSError: [Errno 28] No space left on "
            f"device: '{out / 'checkpoint-4.tmp' / 'rng_state_1.json'}'); free space and run again with --resume: "
            "it continues from checkpoint-2") in stderr, stderr[-4000:]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2] and not (out / "final").exists()
    ckpt.verify_checkpoint(out / "checkpoint-2")
    state = json.loads((out / "checkpoint-2" / ckpt.TRAINER_STATE).read_text())
    assert state["world_size"] == 2 and state["global_step"] == 2
