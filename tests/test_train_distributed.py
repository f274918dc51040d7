"""torchrun on CPU (gloo): 2 processes x batch b follow 1 process x batch 2b, with DDP and FSDP2
(also with LoRA and with different media on each rank); a rank that fails ends the whole job at once
with its error, naming what --resume continues from."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from storm_vlm.train import checkpoint as ckpt
from storm_vlm.train import train
from train_helpers import base_config, make_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two extra interpreters importing torch + transformers: over a minute here


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    data = make_dataset(tmp / "data", num_videos=8, num_images=2)
    cfg = base_config(tmp / "unused", data, max_steps=4, save_steps=2, per_device_batch_size=2,
                      gradient_accumulation_steps=1)
    ref = train(dict(cfg, output_dir=str(tmp / "single")))
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"tmp": tmp, "cfg": path, "ref": ref}


def torchrun(cfg: Path, out: Path, *sets: str, resume: bool = False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "storm_vlm", "train", str(cfg), "--set", f"output_dir={out}", "--set", "per_device_batch_size=1",
           "--set", "progress_bar=false"]
    for s in sets:
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def losses(out: Path):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def compare(ref_final: Path, out: Path, atol=1e-5):
    ref_out = ref_final.parent
    np.testing.assert_allclose(losses(out), losses(ref_out), rtol=1e-5, atol=1e-6)
    a, b = load_file(str(ref_final / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < atol, worst


def test_ddp_two_processes_match_one_process_with_double_batch(setup):
    out = torchrun(setup["cfg"], setup["tmp"] / "ddp", "distributed=ddp")
    compare(setup["ref"], out)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch_size"] == 2
    assert (out / "checkpoint-2" / "rng_state_1.json").is_file()


def test_fsdp2_two_processes_match_and_save_full_checkpoints(setup):
    out = torchrun(setup["cfg"], setup["tmp"] / "fsdp", "distributed=fsdp")
    compare(setup["ref"], out)
    ck = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    ref_ck = load_file(str(setup["ref"].parent / "checkpoint-2" / "model.safetensors"))
    assert ck.keys() == ref_ck.keys()
    assert max(float((ck[k] - ref_ck[k]).abs().max()) for k in ck) < 1e-5
    osd = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert any(k.startswith("projector.") for k in osd["state"])
    # Resume under FSDP2 from checkpoint-2 (as if killed after it): same final weights. A damaged
    # newer checkpoint-3 (only its trainer_state.json) is skipped by rank 0, and rank 1 follows it.
    first = load_file(str(out / "final" / "model.safetensors"))
    shutil.rmtree(out / "final")
    (out / "checkpoint-3").mkdir()
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(dict(state, global_step=3)))
    torchrun(setup["cfg"], out, "distributed=fsdp", resume=True)
    again = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_lora_with_different_media_on_each_rank_fsdp2_and_ddp(setup):
    """FSDP2 + LoRA where the ranks' micro-batches differ in media: videos and an image on one rank
    (two vision-path calls), text only on the other. Each rank must still run the same collectives
    (vision tower and projector in the root group; a dummy frame for a text-only batch); without that,
    gloo aborts with "Received data size doesn't match expected size" (NCCL would hang)."""
    tmp = setup["tmp"]
    data = make_dataset(tmp / "mixed", num_videos=4, num_images=2)
    video = [json.loads(line) for line in data["train"].read_text().splitlines()]
    image = json.loads(data["align"].read_text())
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Name a colour."},
                                              {"from": "gpt", "value": "Blue."}]} for i in range(6)]
    # Global batch 4 in order (shuffle off): rank 0 takes the first two of each row, rank 1 the last two.
    rows = [[video[0], image[0], text[0], text[1]],  # rank 0: video + image, rank 1: text only
            [text[2], video[1], video[2], image[1]],  # rank 0: text + video, rank 1: video + image
            [video[3], text[3], text[4], text[5]]]  # rank 0: text + video, rank 1: text only
    mixed = tmp / "mixed" / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for row in rows for r in row))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    cfg = base_config(tmp / "unused", {"train": mixed, "root": data["root"]}, max_steps=3, save_steps=2,
                      per_device_batch_size=4, shuffle=False, lora=lora)
    ref = train(dict(cfg, output_dir=str(tmp / "mixed_single")))
    path = tmp / "mixed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = torchrun(path, tmp / "mixed_fsdp", "distributed=fsdp", "per_device_batch_size=2")
    compare(ref, out)
    a = load_file(str(ref.parent / "checkpoint-2" / "trainable.safetensors"))
    b = load_file(str(out / "checkpoint-2" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # DDP copes through find_unused_parameters (no dummy frame there): same curve and weights.
    compare(ref, torchrun(path, tmp / "mixed_ddp", "distributed=ddp", "per_device_batch_size=2"))


def test_ranks_that_skip_different_records_stay_in_step(tmp_path):
    """Rank 1 skips an unreadable video at step 2 and rank 0 a record too long for max_length at
    step 4: both still run every step (a skip takes the next usable record), the run follows one
    process with double batch, and rank 0 logs both ranks' skips in skipped_media.jsonl."""
    data = make_dataset(tmp_path / "data", num_videos=6, num_images=0)
    video = [json.loads(line) for line in data["train"].read_text().splitlines()]
    (data["root"] / "videos" / "cut.mp4").write_bytes(b"not a video" * 40)
    cut = {**video[0], "id": "cut", "video": "videos/cut.mp4"}
    long = {**video[1], "id": "long", "conversations": [{"from": "human", "value": "word " * 300},
                                                        video[1]["conversations"][1]]}
    f = data["root"] / "skips.jsonl"  # global batch 2 in order: rank 0 takes records 0, 2, 4, 6; rank 1 1, 3, 5, 7
    records = [video[0], video[1], video[2], cut, video[3], video[4], long, video[5]]
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = base_config(tmp_path / "unused", {"train": f, "root": data["root"]}, max_steps=4, per_device_batch_size=2,
                      shuffle=False, max_length=160)
    ref = train(dict(cfg, output_dir=str(tmp_path / "single")))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = torchrun(path, tmp_path / "ddp", "distributed=ddp")
    compare(ref, out)

    def skipped(run: Path):
        return [json.loads(line) for line in (run / "skipped_media.jsonl").read_text().splitlines()]

    assert skipped(out) == skipped(ref.parent)
    assert [(r["step"], r["id"]) for r in skipped(out)] == [(2, "cut"), (4, "long")]


ACCELERATE_PROBE = """
import json, os, sys, torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
model = acc.prepare(torch.nn.Linear(2, 2))
if acc.is_main_process:
    json.dump({"processes": acc.num_processes, "type": acc.distributed_type.name, "fsdp2": acc.is_fsdp2,
               "wrapper": type(model).__name__}, open(sys.argv[1], "w"))
"""


def test_accelerate_still_drops_fsdp2_on_cpu(tmp_path):
    """Why the trainer shards with fully_shard itself (README): accelerate keeps MULTI_CPU and wraps in
    DDP when given an FSDP2 plugin on CPU. If this starts failing, accelerate can do it: use the plugin."""
    if torch.cuda.is_available():
        pytest.skip("about CPU-only machines")
    script = tmp_path / "probe.py"
    script.write_text(ACCELERATE_PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "out.json")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads((tmp_path / "out.json").read_text())
    assert found == {"processes": 2, "type": "MULTI_CPU", "fsdp2": False, "wrapper": "DistributedDataParallel"}


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


def test_a_rank_whose_write_fails_ends_the_job_at_once_naming_the_checkpoint_to_resume_from(tmp_path):
    """torchrun, 2 processes: rank 1 finds the disk full writing its RNG state into checkpoint-4 while rank
    0 waits for it. Rank 1 must print its error and exit at once -- not first tear the process group down,
    which waits on the blocked rank 0 (as NCCL's destroy can: the job then hung, silent, until the
    timeout) -- and the error must name checkpoint-2 as where --resume continues (rank 1 said "step 0":
    only rank 0 knew of the checkpoints saved)."""
    data = make_dataset(tmp_path / "data", num_videos=4, num_images=0)
    cfg = base_config(tmp_path / "unused", data, max_steps=6, save_steps=2, per_device_batch_size=1,
                      gradient_accumulation_steps=1)
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
