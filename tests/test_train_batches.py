"""Training correctness on unequal samples: loss normalisation over accumulation and ranks, the
records an epoch leaves out, and which parameters weight decay reaches."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from storm_vlm.data.sampler import GlobalBatchSampler
from storm_vlm.model import StormForConditionalGeneration
from storm_vlm.train import train
from storm_vlm.train.config import config_from_dict
from storm_vlm.train.stages import parameter_groups
from storm_vlm.train.trainer import IGNORE_INDEX, loss_positions, token_loss_sum
from test_train_distributed import compare, losses, torchrun
from train_helpers import base_config, make_dataset, processor_and_model


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """7 video records whose answers run from 1 to 43 words: token counts differ per sample."""
    data = make_dataset(tmp_path_factory.mktemp("uneven"), num_videos=7, num_images=0)
    records = [json.loads(line) for line in data["train"].read_text().splitlines()]
    for i, r in enumerate(records):
        r["conversations"][1]["value"] = " ".join(["word"] * (1 + 7 * i))
    data["train"].write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


def test_accumulated_micro_batches_step_like_one_batch_and_the_epoch_remainder_is_stated(uneven, tmp_path, caplog):
    """4 micro-batches of 1 give the loss and gradient of one batch of 4 (the mean over all target
    tokens of the step, not a mean of per-micro-batch means), and 7 records in global batches of 4
    leave 3 out of each epoch: the run says so."""
    runs = {}
    for name, batch, accum in (("batch4", 4, 1), ("accum4", 1, 4)):
        out = tmp_path / name
        with caplog.at_level(logging.INFO, logger="storm_vlm.train"):
            train(base_config(out, uneven, max_steps=2, per_device_batch_size=batch,
                              gradient_accumulation_steps=accum, max_grad_norm=None))
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["batch4"], runs["accum4"]):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # the whole step's gradient
    assert "each epoch trains 4 of the 7 records in steps of global batch 4: the last 3 of" in caplog.text


def test_mamba_state_matrices_get_no_weight_decay_also_after_loading(tmp_path):
    """A_log (2-D) is never decayed, as in mamba_ssm: decay would pull A = -exp(A_log) to -1. The
    sft and long stages load their model with from_pretrained, which drops the Parameter attribute
    the mixer marks it with, so the groups must not depend on it."""
    _, built = processor_and_model()
    built.save_pretrained(tmp_path / "model")
    cfg = config_from_dict(dict(stage="sft", output_dir="unused", train_file="unused", media_root=".", num_frames=4,
                                max_steps=1, save_steps=0, seed=0, init_from=str(tmp_path / "model"),
                                weight_decay=0.1))
    for model in (built, StormForConditionalGeneration.from_pretrained(tmp_path / "model")):
        model.requires_grad_(True)
        decay = {id(p): g["weight_decay"] for g in parameter_groups(model, cfg) for p in g["params"]}
        params = dict(model.projector.named_parameters())
        state = [n for n in params if n.endswith(("A_log", "A_b_log"))]
        assert len(state) == 2 * model.config.projector_num_layers
        assert all(decay[id(params[n])] == 0.0 for n in state), {n: decay[id(params[n])] for n in state}
        assert decay[id(params["in_proj.weight"])] == pytest.approx(0.1)
        assert decay[id(params["in_proj.bias"])] == 0.0


def test_ranks_share_each_epoch_without_overlap_when_they_do_not_divide_the_records():
    """7 records, 2 ranks x batch 1 x accumulation 2: each epoch's first 4 records in its order,
    each on one rank once; the remaining 3 wait for another epoch."""
    ranks = [GlobalBatchSampler(7, 1, 2, world_size=2, rank=r, seed=3) for r in range(2)]
    for epoch in range(3):
        seen = [i for s in ranks for pos in range(s.steps_per_epoch) for mb in s.micro_batches(epoch, pos) for i in mb]
        assert sorted(seen) == sorted(ranks[0].epoch_order(epoch)[:4])


@pytest.mark.slow
def test_ddp_with_a_record_count_the_ranks_do_not_divide_follows_one_process(uneven, tmp_path):
    """torchrun 2 x batch 1 over 7 records of unequal length for two epochs follows 1 process x batch
    2 (same losses and weights): the loss is the mean over both ranks' target tokens."""
    cfg = base_config(tmp_path / "unused", uneven, max_steps=6, per_device_batch_size=2)
    ref = train(dict(cfg, output_dir=str(tmp_path / "single")))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = torchrun(path, tmp_path / "ddp", "distributed=ddp")
    # padded batch vs single samples: rounding that Adam amplifies over 6 steps (a step moves weights ~3e-3)
    compare(ref, out, atol=5e-5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2], abs=1e-4)
    assert len({r["tokens"] for r in rows}) > 1 and np.all(np.isfinite(losses(out)))


def test_the_loss_reads_logits_only_where_labels_are_and_equals_the_full_cross_entropy():
    """The step asks the model for logits only at positions followed by a label (`logits_to_keep`):
    a video's visual tokens, most of a sequence, never are. Loss and gradients equal the cross
    entropy over every position's logits."""
    processor, model = processor_and_model()
    model = copy.deepcopy(model).float().train()
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8) for _ in range(2)]
    batch = processor(text=["<video> What colour flashed? red", "<video> Which? a much longer answer here"],
                      videos=videos, padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[0, -3:-1] = batch["input_ids"][0, -3:-1]
    labels[1, -5:] = batch["input_ids"][1, -5:]
    keep = loss_positions(labels)
    assert 0 < len(keep) < batch["input_ids"].shape[1] // 4
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values_videos", "video_frame_mask")
              if batch.get(k) is not None}

    def loss_and_grads(**extra):
        model.zero_grad()
        out = model(**inputs, **extra)
        loss = (token_loss_sum(out.logits, labels, keep) if extra else
                F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum"))
        loss.backward()
        return out.logits.shape[1], loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    kept, loss, grads = loss_and_grads(logits_to_keep=keep)
    everywhere, full_loss, full_grads = loss_and_grads()
    assert (kept, everywhere) == (len(keep), batch["input_ids"].shape[1])
    torch.testing.assert_close(loss, full_loss)
    assert len(grads) == len(full_grads) > 0
    for g, f in zip(grads, full_grads):
        torch.testing.assert_close(g, f, rtol=1e-4, atol=1e-6)
