"""The training loop on accelerate: one optimizer step per global batch, crash-safe checkpoints, exact resume.

`train(config)` is the whole job (the CLI and the demo call it): build an `accelerate.Accelerator`
(process group, device, mixed precision), build the model from its source, apply the stage, let
accelerate prepare it (DDP, autocast) -- or shard it with FSDP2 `fully_shard` ourselves, see
below -- then run steps `start_step .. max_steps-1` and save the final model.

What accelerate owns here: process-group set-up and rank/world info, device placement, DDP
wrapping and autocast (`prepare`), `backward`, `clip_grad_norm_`, `no_sync`, `reduce` of the
step's counts, `wait_for_everyone`, `unwrap_model`. What we keep: the data order
(GlobalBatchSampler / StepBatchSampler, passed to a plain DataLoader that accelerate never
re-shards), the loss normalisation below, and the checkpoints (storm_vlm.train.checkpoint:
`checkpoint-N.tmp` + manifest.json (sizes, SHA-256) + rename, RNG states as JSON, optimizer loaded
with weights_only=True; `--resume` takes the newest checkpoint that verifies and names each one it
skips) -- accelerate's save_state writes in place and pickles. A resume whose config, global batch,
record count or (with dropout) split of the global batch over processes and micro-steps would make it
continue differently from how the run started is refused before anything loads (`_check_resume_config`,
`_check_resume_split`).

FSDP2: accelerate enables its FSDP plugin only for GPU-like devices; on CPU/gloo the plugin is
silently dropped and `prepare` wraps the model in DDP (a slow test notices if that changes). So with
`distributed: fsdp` the model is sharded here with `fully_shard` (on every device, one tested
path) and only registered with the Accelerator (`prepare_model(evaluation_mode=True)`: autocast).
Only the language model's decoder layers are sharded on their own; the vision tower and the
projector stay in the root group, gathered once per forward. Every rank must run the same
collectives, so a micro-batch without media still runs the vision path on one black frame in an
extra, fully ignored row (`_with_dummy_video`): otherwise one rank would reduce-scatter projector
gradients the other does not have (gloo aborts: "Received data size doesn't match expected size";
NCCL would hang). tests/test_train_distributed.py checks both with different media on each rank.

Loss: token-level cross entropy summed over every label token of the *global* batch (all
ranks, all accumulation micro-steps) and divided by their total count. Each rank back-propagates
its share times world_size, because DDP/FSDP average gradients over ranks; the result is the
same gradient a single process would compute on the whole global batch, so 2 processes x batch
b follow 1 process x batch 2b. The model computes logits only at the positions some row's loss
reads (`loss_positions`, the model's `logits_to_keep`): a video sample's visual tokens are most of
its sequence, and their logits (kept in float32 for the loss) would be the largest tensors of a
long-video step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from tqdm.auto import tqdm

from storm_vlm.data.collator import StormCollator
from storm_vlm.data.datasets import LlavaDataset
from storm_vlm.data.sampler import GlobalBatchSampler, StepBatchSampler
from storm_vlm.errors import ConfigError, StormError
from storm_vlm.train import checkpoint as ckpt
from storm_vlm.train.config import TrainConfig, config_from_dict, load_config, resolve_raw, resume_config_changes
from storm_vlm.train.launch import DistEnv, end_accelerator, fully_shard_model, make_accelerator
from storm_vlm.train.metrics import SKIPPED_FILE, MetricsLog
from storm_vlm.train.model_source import load_model_and_processor
from storm_vlm.train.stages import (apply_stage, draws_random_numbers, has_lora, merged_state_dict, parameter_groups,
                                   trainable_names)
from storm_vlm.utils import IGNORE_INDEX, atomic_write_json, publish_dir

logger = logging.getLogger("storm_vlm.train")
FINAL_DIR = "final"


# ----------------------------------------------------------------------------- schedule
def lr_lambda_factory(cfg: TrainConfig):
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    total = cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return float(step + 1) / float(warmup + 1) if warmup else 1.0
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


# ----------------------------------------------------------------------------- loss
def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is a label in some row: the only logits the loss reads.
    labels (B, L) -> (K,) int64, ascending. A video sample's visual tokens are most of its sequence
    and never labels, so the model computes (and keeps in float32) logits for far fewer positions
    (the model's `logits_to_keep`)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross entropy over label positions: logits (B, K, V) at `positions` (K,)
    of labels (B, L), each predicting the label after its position."""
    targets = labels[:, positions + 1].to(logits.device)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_label_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------- helpers
def _move(batch: Mapping[str, Any], device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values_videos", "video_frame_mask", "pixel_values")


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """One training run on an `accelerate.Accelerator` (see the module docstring).

    `dataset_wrapper`, when given, is applied to the data set once it is built (the demo uses it
    to keep decoded samples in memory); it must keep indices and length.
    After `setup()`: `accelerator`, `model` (unwrapped), `wrapped` (what the step calls: the model
    accelerate prepared), `optimizer` / `scheduler` (accelerate's wrappers), `dataset`, `sampler`.
    """

    def __init__(self, cfg: TrainConfig, accelerator, resume: bool = False,
                 dataset_wrapper: Callable[[Any], Any] | None = None):
        self.cfg, self.resume = cfg, resume
        self.accelerator = accelerator
        self.env = DistEnv(accelerator)
        self.dataset_wrapper = dataset_wrapper
        self.output_dir = Path(cfg.output_dir)
        self.device = accelerator.device
        self.bf16 = accelerator.mixed_precision == "bf16"
        self.fsdp = self.env.is_distributed and cfg.distributed == "fsdp"
        self.skipped_total = 0
        self.start_step = 0
        self.resume_dir: Path | None = None
        self.last_checkpoint: Path | None = None  # the newest complete one: resumed from or saved
        self._rng_to_restore: dict | None = None  # this rank's RNG states from the checkpoint
        self._reseed: int | None = None  # or a seed, resuming on another number of processes

    # -------------------------------------------------------------- setup
    def finished_run(self) -> Path | None:
        """With --resume, a run whose final model is already written is done: its final folder.

        A final/ whose training_summary.json cannot be read, or whose files do not match its
        manifest.json, is not taken as done: training resumes from the checkpoints and writes
        final/ again. First, a folder the run was replacing when it stopped gets its name back
        (`checkpoint.finish_interrupted_publish`)."""
        if not self.resume:
            return None
        if self.env.is_main and self.output_dir.is_dir():
            for path in ckpt.finish_interrupted_publish(self.output_dir):
                logger.warning("--resume: %s was being replaced when the run stopped; it has its name back", path.name)
        self.env.barrier()  # every rank reads the output folder after this
        summary = self.output_dir / FINAL_DIR / "training_summary.json"
        if not summary.is_file():
            return None
        try:
            data = ckpt.read_json(summary)
        except (OSError, ValueError, RecursionError) as exc:
            data = exc
        if not isinstance(data, dict):
            if self.env.is_main:
                logger.warning("--resume: %s is unreadable (%s); resuming from the checkpoints instead", summary,
                               data if isinstance(data, Exception) else f"holds {type(data).__name__}")
            return None
        if data.get("steps") != self.cfg.max_steps:
            return None
        try:  # every rank reads the same files and reaches the same verdict
            ckpt.verify_manifest(summary.parent, self.cfg.checkpoint_checksums)
        except (ckpt.CheckpointInvalid, OSError) as exc:
            if self.env.is_main:
                logger.warning("--resume: %s is damaged (%s); resuming from the checkpoints to write it again",
                               summary.parent, exc)
            return None
        if self.env.is_main:
            logger.info("%s already finished (%d steps)", self.output_dir, self.cfg.max_steps)
        return self.output_dir / FINAL_DIR

    def _choose_resume_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies (rank 0 checks, every rank gets its step); logs each
        newer one skipped and why. None when there is none at all; StormError when there are
        checkpoints but none verifies (they are left for the user to inspect, never overwritten)."""
        env = self.env
        code, error = -1.0, None  # step of the chosen checkpoint; -1: none exists; -2: none verifies
        if env.is_main:
            path, how, skipped = ckpt.find_resume_checkpoint(self.output_dir, self.cfg.checkpoint_checksums)
            for bad, why in skipped:
                logger.warning("--resume: skipping %s: %s", bad.name, why)
            if path is not None:
                code = float(path.name.rsplit("-", 1)[1])
                if (path / ckpt.MANIFEST_FILE).is_file():
                    logger.info("--resume: %s verified: %s", path.name, how)
                else:
                    logger.warning("--resume: %s has %s", path.name, how)
            elif skipped:
                code = -2.0
                reasons = "; ".join(f"{bad.name}: {why}" for bad, why in skipped)
                error = StormError(f"--resume: none of the {len(skipped)} checkpoints in {self.output_dir} can be "
                                   f"resumed from ({reasons}); move them aside to start again from step 0")
            else:
                logger.warning("--resume: no checkpoint in %s; starting from step 0", self.output_dir)
        local = torch.tensor([code if env.is_main else 0.0], dtype=torch.float64)
        code = int(env.all_reduce_sum(local).item())
        if code == -2:
            raise error or StormError(f"--resume: no checkpoint in {self.output_dir} verifies (see rank 0's log)")
        return None if code == -1 else self.output_dir / f"checkpoint-{code}"

    def _check_output_dir(self) -> None:
        if self.resume:
            self.resume_dir = self.last_checkpoint = self._choose_resume_checkpoint()
        elif ckpt.list_checkpoints(self.output_dir) or (self.output_dir / FINAL_DIR).exists():
            raise ConfigError(
                f"key 'output_dir': {str(self.output_dir)!r} already holds a run "
                f"(checkpoints or {FINAL_DIR}/); pass --resume to continue it or choose another output_dir"
            )

    def setup(self) -> None:
        cfg, env, acc = self.cfg, self.env, self.accelerator
        self._check_output_dir()
        for key in ("train_file", "media_root"):  # before anything is written, or a model load of minutes
            if not Path(getattr(cfg, key)).exists():
                raise ConfigError(f"key {key!r}: {getattr(cfg, key)} does not exist")
        state = None
        if self.resume_dir is not None:  # before anything is written or loaded
            state = ckpt.read_json(self.resume_dir / ckpt.TRAINER_STATE)
            self._check_resume_config(self.resume_dir, state)
        if env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_tmp(self.output_dir)
            atomic_write_json(self.output_dir / "train_config.json", cfg.to_dict())
        env.barrier()

        torch.manual_seed(cfg.seed)
        model, processor = load_model_and_processor(cfg, env)
        apply_stage(model, cfg)
        if state is not None:
            self._check_resume_split(self.resume_dir, state, model)
            self._load_trainable(model, self.resume_dir)
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing also works when the embeddings are frozen (align, LoRA).
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.processor = processor
        self.trainable = trainable_names(model)

        dataset = LlavaDataset.from_config(cfg, processor)
        self.dataset = self.dataset_wrapper(dataset) if self.dataset_wrapper is not None else dataset
        if state is not None and state.get("num_samples", len(self.dataset)) != len(self.dataset):
            raise ConfigError(f"--resume: {self.resume_dir} was trained on {state['num_samples']} records, "
                              f"{cfg.train_file} now has {len(self.dataset)}: every epoch's order would differ "
                              "from the one the run started; resume with the same training file")
        self.collator = StormCollator(pad_token_id=_pad_id(processor))
        self.sampler = GlobalBatchSampler(
            num_samples=len(self.dataset),
            per_device_batch_size=cfg.per_device_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            world_size=env.world_size,
            rank=env.rank,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
        )
        self._log_epoch_remainder()

        if self.fsdp:
            model.to(self.device)
            fully_shard_model(model, self.bf16 and self.device.type == "cuda")
            # Sharded here (see the module docstring); accelerate adds autocast and tracks the model.
            self.wrapped = acc.prepare_model(model, device_placement=False, evaluation_mode=True)
        else:
            self.wrapped = acc.prepare(model)  # device placement, DDP when distributed, autocast
        self.model = acc.unwrap_model(self.wrapped)  # FSDP2 shards in place: the same module
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, cfg),
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(cfg))
        self.optimizer, self.scheduler = acc.prepare(optimizer, scheduler)
        if state is not None:
            self._load_training_state(self.resume_dir, state)

    def _log_epoch_remainder(self) -> None:
        """Say when a run that reaches an epoch's end trains only part of each epoch: the records
        left over after the last full global batch (a different few each shuffled epoch)."""
        s = self.sampler
        left = s.num_samples % s.global_batch_size
        if self.env.is_main and left and self.cfg.max_steps >= s.steps_per_epoch:
            logger.info("each epoch trains %d of the %d records in steps of global batch %d: the last %d of "
                        "each epoch's order are left out of that epoch", s.num_samples - left, s.num_samples,
                        s.global_batch_size, left)

    # -------------------------------------------------------------- checkpoint IO
    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """FSDP2: the gathered state dict (collective; full on every rank, on CPU)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _model_state_for_saving(self) -> dict[str, torch.Tensor] | None:
        """Full (LoRA-merged) state dict on rank 0 (None elsewhere); collective under FSDP."""
        if self.fsdp:
            sd = self._full_state_dict()
            if not self.env.is_main:
                return None
            return merged_state_dict(self.model, sd)
        if not self.env.is_main:
            return None
        model = self.accelerator.unwrap_model(self.wrapped)
        return {k: v.detach().cpu() for k, v in merged_state_dict(model).items()}

    def _trainable_state(self) -> dict[str, torch.Tensor] | None:
        """LoRA runs: trainable tensors under their (unmerged) names, for resuming."""
        if not has_lora(self.model):
            return None
        sd = self._full_state_dict() if self.fsdp else dict(self.model.named_parameters())
        if not self.env.is_main:
            return None
        return {k: sd[k].detach().cpu().contiguous().clone() for k in self.trainable}

    def _optimizer_state(self):
        return get_optimizer_state_dict(
            self.model, self.optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def save_model_folder(self, out: Path, state_dict: dict) -> None:
        """Write a complete model folder (safetensors + config + processor) to `out` (rank 0)."""
        self.model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        self.processor.save_pretrained(out)

    @contextlib.contextmanager
    def _writing(self, tmp: Path, what: str):
        """Around the writes of a checkpoint or final/ folder: a write that fails (a full disk, an I/O
        error) removes the half-written `tmp` -- it would only hold space the next try needs -- and
        stops the run with one message saying what --resume continues from. The folders written
        before are never touched: each is only replaced once its successor is complete."""
        try:
            yield
        except (OSError, SafetensorError) as exc:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            last = self.last_checkpoint.name if self.last_checkpoint else "step 0 (this run has no checkpoint yet)"
            raise StormError(f"cannot write {self.output_dir / what} ({type(exc).__name__}: {exc}); free space and "
                             f"run again with --resume: it continues from {last}") from exc

    def save_checkpoint(self, step: int) -> Path:
        env = self.env
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f"checkpoint-{step}.tmp"
        if env.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        env.barrier()
        sd = self._model_state_for_saving()
        trainable_sd = self._trainable_state()
        osd = self._optimizer_state()
        with self._writing(tmp, final.name):
            atomic_write_json(tmp / f"rng_state_{env.rank}.json", ckpt.get_rng_state())
            if env.is_main:
                self.save_model_folder(tmp, sd)
                if trainable_sd is not None:
                    save_file(trainable_sd, str(tmp / ckpt.TRAINABLE_FILE))
                ckpt.save_torch_state(osd, tmp / ckpt.OPTIMIZER_FILE)
                atomic_write_json(tmp / ckpt.SCHEDULER_FILE, ckpt.scheduler_state_to_json(self.scheduler.state_dict()))
                epoch, pos = self.sampler.position(step)
                atomic_write_json(
                    tmp / ckpt.TRAINER_STATE,
                    {
                        "global_step": step,
                        "epoch": epoch,
                        "step_in_epoch": pos,
                        "samples_seen": step * self.sampler.global_batch_size,
                        "global_batch_size": self.sampler.global_batch_size,
                        "num_samples": self.sampler.num_samples,
                        "world_size": env.world_size,
                        "skipped_media": self.skipped_total,
                        "lora": has_lora(self.model),
                        "config": self.cfg.to_dict(),
                    },
                )
            env.barrier()  # every rank's RNG file is on disk
            if env.is_main:
                ckpt.write_manifest(tmp, self.cfg.checkpoint_checksums)  # last: it vouches for every file above
                publish_dir(tmp, final)
                ckpt.prune_checkpoints(self.output_dir, self.cfg.save_total_limit, upto_step=step)
                logger.info("saved %s", final)
        env.barrier()
        self.last_checkpoint = final  # on every rank: any rank's failed write names it as what --resume takes
        return final

    def _load_trainable(self, model, ckpt_dir: Path) -> None:
        """Resume weights: trainable parameters from the checkpoint (frozen ones come from the source)."""
        names = trainable_names(model)
        try:
            if (ckpt_dir / ckpt.TRAINABLE_FILE).is_file():
                tensors = load_file(str(ckpt_dir / ckpt.TRAINABLE_FILE))
            else:
                tensors = ckpt.read_model_tensors(ckpt_dir, names)
        except Exception as exc:  # safetensors / OS / JSON errors: the file, not the run, is at fault
            raise StormError(f"--resume: cannot read the weights in {ckpt_dir} ({type(exc).__name__}: {exc})") from None
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in tensors]
        if missing:
            raise StormError(f"{ckpt_dir}: checkpoint lacks trainable parameters {missing[:5]}")
        wrong = [n for n in names if tensors[n].shape != params[n].shape]
        if wrong:
            n = wrong[0]
            raise StormError(f"--resume: {ckpt_dir}: {n} has shape {tuple(tensors[n].shape)}, this run's model "
                             f"{tuple(params[n].shape)} (the config changed since the checkpoint)")
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[n])

    def _check_resume_config(self, ckpt_dir: Path, state: dict) -> None:
        """Refuse a resume whose config would silently change what the remaining steps compute.

        The optimizer and scheduler files carry the checkpoint's learning rates and AdamW settings
        (they would win over the config's), the data order follows seed / shuffle / global batch,
        and the frozen weights come from the model source again: a change to any of these is a
        ConfigError listing each. max_steps, precision and the data paths may change and are
        logged (a new max_steps recomputes the LR schedule from this step on)."""
        cfg, env = self.cfg, self.env
        where = f"--resume: {ckpt_dir}"
        saved = state.get("config")
        refused, stated = resume_config_changes(saved, cfg) if isinstance(saved, dict) else ([], [])
        if refused:
            raise ConfigError(f"{where} was trained with a different config ({'; '.join(refused)}); resume "
                              f"with the checkpoint's values, or start a new run from its weights with "
                              f"init_from: {ckpt_dir}")
        step = state["global_step"]
        if step > cfg.max_steps:
            raise ConfigError(f"{where} is at step {step}, past max_steps {cfg.max_steps}; raise max_steps or "
                              f"move the checkpoints past step {cfg.max_steps} out of {self.output_dir}")
        global_batch = env.world_size * cfg.per_device_batch_size * cfg.gradient_accumulation_steps
        if state["global_batch_size"] != global_batch:
            per_process = state["global_batch_size"] / (env.world_size * cfg.gradient_accumulation_steps)
            hint = (f"; with {env.world_size} process(es) and gradient_accumulation_steps "
                    f"{cfg.gradient_accumulation_steps} that is per_device_batch_size={int(per_process)}"
                    if per_process == int(per_process) else "")
            raise ConfigError(
                f"{where} was trained with global batch {state['global_batch_size']} but this run has "
                f"{global_batch} (processes x per_device_batch_size x gradient_accumulation_steps); the data "
                f"position and the LR schedule count steps of the global batch, so keep it{hint}")
        if env.is_main:
            for change in stated:
                logger.warning("%s: %s since the checkpoint", where, change)
            old_steps = saved.get("max_steps", cfg.max_steps) if isinstance(saved, dict) else cfg.max_steps
            if old_steps != cfg.max_steps:
                before = lr_lambda_factory(dataclasses.replace(cfg, max_steps=old_steps))(step)
                after = lr_lambda_factory(cfg)(step)
                logger.warning("%s: the LR schedule is recomputed for %d steps: its factor at step %d goes from "
                               "%.4g to %.4g", where, cfg.max_steps, step, before, after)

    def _check_resume_split(self, ckpt_dir: Path, state: dict, model) -> None:
        """How the global batch is split (processes x per_device_batch_size x gradient_accumulation_steps)
        may change on resume: data order, optimizer, scheduler and step do not depend on it. The RNG
        streams do: a rank's stream cannot be split or merged over another number of processes, and
        dropout draws its masks per micro-batch, so another split on the same processes would draw
        other masks than the run it continues. So when the model draws random numbers (dropout) a
        changed split is refused unless `resume_reseed_rng` is set; then each rank is reseeded from
        (seed, step, rank). Without dropout the saved streams are restored where the number of
        processes is unchanged, and each rank is reseeded where it changed."""
        cfg, env = self.cfg, self.env
        saved_cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
        was = (state["world_size"], saved_cfg.get("per_device_batch_size", cfg.per_device_batch_size),
               saved_cfg.get("gradient_accumulation_steps", cfg.gradient_accumulation_steps))
        now = (env.world_size, cfg.per_device_batch_size, cfg.gradient_accumulation_steps)
        if was == now:
            return
        dropout = draws_random_numbers(model)
        if was[0] != now[0]:
            change = f"was saved by {was[0]} process(es), this run has {now[0]}"
            why, keep = "the saved per-process RNG streams cannot be carried over", f"{was[0]} process(es)"
        else:
            change = (f"was saved with per_device_batch_size {was[1]} x gradient_accumulation_steps {was[2]}, "
                      f"this run has {now[1]} x {now[2]}")
            why = "its masks are drawn per micro-batch"
            keep = f"per_device_batch_size={was[1]} and gradient_accumulation_steps={was[2]}"
        if dropout and not cfg.resume_reseed_rng:
            raise ConfigError(
                f"--resume: {ckpt_dir} {change}, and the model draws random numbers in training (dropout): {why}, "
                f"so the run would not continue as it started. Resume with {keep}, or pass --set "
                "resume_reseed_rng=true to continue with each process reseeded (data order, optimizer, LR schedule "
                "and step still carry over exactly)")
        if was[0] == now[0] and not dropout:
            return  # the saved streams are restored: nothing draws from them per micro-batch
        step, rank = state["global_step"], env.rank
        self._reseed = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{step}/{rank}".encode()).digest()[:4], "little")
        if env.is_main:
            logger.warning("--resume: %s %s: data order, optimizer, LR schedule and step carry over; each "
                           "process's RNG is reseeded from (seed, step, rank)", ckpt_dir, change)

    def _load_training_state(self, ckpt_dir: Path, state: dict) -> None:
        """Optimizer, scheduler, data position and RNG states from a checkpoint `_choose_resume_checkpoint`
        verified and `_check_resume_config` accepted; a file that still does not fit this run is a
        StormError naming it."""
        osd = ckpt.load_torch_state(ckpt_dir / ckpt.OPTIMIZER_FILE)
        # strict=False: trainable parameters that never got a gradient (e.g. the vision tower's last
        # layer, unused with vision_feature_layer=-2) have no AdamW state in either run.
        try:
            set_optimizer_state_dict(
                self.model, self.optimizer.optimizer, optim_state_dict=osd,
                options=StateDictOptions(full_state_dict=True, strict=False),
            )
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise StormError(f"--resume: {ckpt_dir / ckpt.OPTIMIZER_FILE} does not fit this run's optimizer "
                             f"({type(exc).__name__}: {exc})") from None
        sched = ckpt.read_json(ckpt_dir / ckpt.SCHEDULER_FILE)
        expected = set(self.scheduler.state_dict())
        if not isinstance(sched, dict) or set(sched) != expected:
            keys = sorted(set(sched) ^ expected) if isinstance(sched, dict) else type(sched).__name__
            raise StormError(f"--resume: {ckpt_dir / ckpt.SCHEDULER_FILE} is not this run's LR scheduler state "
                             f"(differs in {keys})")
        self.scheduler.load_state_dict(sched)
        self.start_step = int(state["global_step"])
        self.skipped_total = int(state.get("skipped_media", 0))
        if self._reseed is None:
            self._rng_to_restore = ckpt.read_json(ckpt_dir / f"rng_state_{self.env.rank}.json")
        if self.env.is_main:
            logger.info("resuming from %s (step %d, epoch %d)", ckpt_dir, self.start_step, state["epoch"])

    # -------------------------------------------------------------- the loop
    def _no_sync(self, last: bool):
        """Gradient sync only on the last accumulation micro-step (DDP through accelerate, FSDP2 by hand)."""
        if self.fsdp:
            self.wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.wrapped)

    def _with_dummy_video(self, batch: dict) -> dict:
        """FSDP2: give a micro-batch without media one extra row holding a one-black-frame video.

        The row's labels are all -100, so it adds nothing to the loss; but the vision tower and
        projector run (gradients of zero), so every rank reduce-scatters the same parameters.
        input_ids / attention_mask / labels (B, L) -> (B+1, max(L, n)); n = visual tokens of one frame.
        """
        if batch.get("pixel_values_videos") is not None or batch.get("pixel_values") is not None:
            return batch
        config = self.model.config
        n = config.num_visual_tokens(1)
        size = config.vision_config.image_size
        b, length = batch["input_ids"].shape
        width = max(length, n)

        def grow(t: torch.Tensor, fill: int) -> torch.Tensor:
            out = t.new_full((b + 1, width), fill)
            out[:b, :length] = t
            return out

        out = dict(batch)
        out["input_ids"] = grow(batch["input_ids"], self.collator.pad_token_id)
        out["input_ids"][b, :n] = config.video_token_id
        out["attention_mask"] = grow(batch["attention_mask"], 0)
        out["attention_mask"][b, :n] = 1
        out["labels"] = grow(batch["labels"], IGNORE_INDEX)
        out["pixel_values_videos"] = torch.zeros((1, 1, 3, size, size), dtype=torch.float32)
        out["video_frame_mask"] = torch.ones((1, 1), dtype=torch.bool)
        return out

    def make_loader(self) -> torch.utils.data.DataLoader:
        """This rank's micro-batches for steps start_step..max_steps-1 (never prepared by accelerate:
        its re-sharding would change which samples each rank sees)."""
        loader_gen = torch.Generator()
        loader_gen.manual_seed(self.cfg.seed)  # the loader must not draw from the global RNG
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=StepBatchSampler(self.sampler, self.start_step, self.cfg.max_steps),
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
            generator=loader_gen,
            persistent_workers=False,
        )

    def train(self) -> Path:
        cfg, env, acc = self.cfg, self.env, self.accelerator
        if self._reseed is not None:
            ckpt.seed_all(self._reseed)
        elif self._rng_to_restore is not None:
            ckpt.set_rng_state(self._rng_to_restore)

        loader = self.make_loader()
        metrics = MetricsLog(self.output_dir, env.is_main, cfg.tensorboard, self.start_step)
        skips = MetricsLog(self.output_dir, env.is_main, False, self.start_step, name=SKIPPED_FILE)
        bar = None
        if env.is_main and cfg.progress_bar:
            bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc=f"train {cfg.stage}", unit="step")
        accum = cfg.gradient_accumulation_steps
        params = [p for p in self.model.parameters() if p.requires_grad]
        it = iter(loader)
        step = self.start_step
        try:
            while step < cfg.max_steps:
                t0 = time.perf_counter()
                micro = [next(it) for _ in range(accum)]
                local_tokens = sum(count_label_tokens(b["labels"]) for b in micro)
                local_skipped = sum(int(b.get("num_skipped", 0)) for b in micro)
                counts = env.all_reduce_sum(torch.tensor([local_tokens, local_skipped], dtype=torch.float64))
                global_tokens, step_skipped = int(counts[0]), int(counts[1])
                self.skipped_total += step_skipped
                # every rank knows step_skipped, so all of them join this gather (or none does)
                skipped = env.gather_lists([r for b in micro for r in b.get("skipped", [])]) if step_skipped else []
                loss_sum = torch.zeros((), dtype=torch.float64)
                for a, batch in enumerate(micro):
                    if self.fsdp:
                        batch = self._with_dummy_video(batch)
                    batch = _move(batch, self.device)
                    with self._no_sync(a == accum - 1):
                        keep = loss_positions(batch["labels"])
                        out = self.wrapped(**{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None},
                                           logits_to_keep=keep)
                        s = token_loss_sum(out.logits, batch["labels"], keep)
                        acc.backward(s * (env.world_size / max(global_tokens, 1)))
                    loss_sum += s.detach().double().cpu()
                loss_sum = env.all_reduce_sum(loss_sum)
                grad_norm = self._clip(params)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
                self.scheduler.step()
                step += 1
                dt = time.perf_counter() - t0
                row = {
                    "step": step,
                    "epoch": round(step / self.sampler.steps_per_epoch, 4),
                    "loss": float(loss_sum) / max(global_tokens, 1),
                    "lr": lrs,
                    "grad_norm": grad_norm,
                    "samples_per_s": self.sampler.global_batch_size / dt,
                    "tokens": global_tokens,
                    "skipped_media": self.skipped_total,
                    "skipped_media_step": step_skipped,
                }
                if step % cfg.logging_steps == 0 or step == cfg.max_steps:
                    metrics.log(row)
                for r in skipped:
                    skips.log({"step": step, **r})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", skipped=self.skipped_total)
                if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
                    self.save_checkpoint(step)
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
            skips.close()
        return self.save_final()

    def _clip(self, params) -> float:
        if not any(p.grad is not None for p in params):
            return 0.0
        max_norm = self.cfg.max_grad_norm
        norm = self.accelerator.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def save_final(self) -> Path:
        """Write `output_dir/final/` atomically: a complete (LoRA-merged) STORM model folder."""
        env = self.env
        final = self.output_dir / FINAL_DIR
        tmp = self.output_dir / f"{FINAL_DIR}.tmp"
        sd = self._model_state_for_saving()
        with self._writing(tmp, FINAL_DIR):
            if env.is_main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                self.save_model_folder(tmp, sd)
                atomic_write_json(
                    tmp / "training_summary.json",
                    {"stage": self.cfg.stage, "steps": self.cfg.max_steps, "skipped_media": self.skipped_total,
                     "config": self.cfg.to_dict()},
                )
                ckpt.write_manifest(tmp, self.cfg.checkpoint_checksums)
                publish_dir(tmp, final)
                logger.info("saved final model to %s", final)
        env.barrier()
        return final


# ----------------------------------------------------------------------------- module helpers
def _pad_id(processor) -> int:
    tok = getattr(processor, "tokenizer", processor)
    pad = tok.pad_token_id
    if pad is None:
        pad = tok.eos_token_id
    return int(pad if pad is not None else 0)


def train(config: TrainConfig | Mapping | str | os.PathLike, overrides: list[str] | None = None,
          resume: bool = False, dataset_wrapper: Callable[[Any], Any] | None = None) -> Path:
    """Train one stage; returns the final model folder (`output_dir/final`).

    `config`: a TrainConfig, a plain dict with the config keys, or a YAML path. Works alone or
    under torchrun (the Accelerator starts the process group and it is ended here).
    `dataset_wrapper`: see `Trainer`.
    """
    source = None
    if isinstance(config, (str, os.PathLike)):
        source = str(config)
        cfg = load_config(config, overrides)
    elif isinstance(config, TrainConfig):
        cfg = config_from_dict(resolve_raw(config.to_dict(), overrides)) if overrides else config
    else:
        cfg = config_from_dict(resolve_raw(dict(config), overrides))
    try:
        accelerator, owns_group = make_accelerator(cfg)
        failed = True
        try:
            trainer = Trainer(cfg, accelerator, resume=resume, dataset_wrapper=dataset_wrapper)
            final = trainer.finished_run()
            if final is None:
                trainer.setup()
                final = trainer.train()
            failed = False
            return final
        finally:
            end_accelerator(accelerator, owns_group, failed)
    except ConfigError as exc:
        # Checks made after loading (output_dir, build/init_from folders, precision) name the key;
        # name the file too, as load_config's own errors do.
        if source is None or str(exc).startswith(f"{source}: "):
            raise
        raise ConfigError(f"{source}: {exc}") from None
