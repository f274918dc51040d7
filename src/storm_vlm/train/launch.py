"""Process-group wiring through `accelerate.Accelerator`: the same code runs alone or under torchrun.

`make_accelerator(cfg)` builds the Accelerator a training run uses: it reads torchrun's
environment (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT), starts the process
group (nccl on CUDA, gloo on CPU), picks the device and the mixed precision, and wraps the
model in DDP (`find_unused_parameters=True`: a text-only micro-batch leaves the vision path
unused on that rank). `DistEnv` is the small rank/world view the rest of `storm_vlm.train`
needs (`is_main`, `barrier`, `all_reduce_sum`); it works without an Accelerator too (one
process), which is how tests load a model.

Two accelerate details this module handles:
- on a machine without CUDA, `Accelerator()` under torchrun does *not* start a process group
  (its torchrun branch only knows accelerators; a multi-CPU run needs `cpu=True`) -- every
  rank would train alone. We pass `cpu=True` when CUDA is absent.
- AcceleratorState / GradientState are process-wide singletons that refuse a second, different
  set-up; `train()` may run several times in one process (tests, the demo), so each run resets
  them on entry and exit (as accelerate's own `AccelerateTestCase` does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from storm_vlm import precision
from storm_vlm.errors import ConfigError, StormError
from storm_vlm.precision import resolve_precision
from storm_vlm.train.config import TrainConfig

logger = logging.getLogger("storm_vlm.train")


def mixed_precision(cfg: TrainConfig, device_type: str) -> str:
    """accelerate's mixed_precision ("no", "bf16", "fp16") for the config's `precision` on this device.

    Master weights stay float32; "bfloat16"/"float16" train under autocast. An explicit bfloat16 on
    a CPU without native bf16 warns and trains in float32 (emulated bf16 is far slower there).
    """
    try:
        resolved = resolve_precision(cfg.precision, device_type)
    except StormError as exc:
        raise ConfigError(f"key 'precision': {exc}") from None
    if resolved.name == "float32":
        return "no"
    if device_type == "cpu" and not precision.cpu_has_fast_bf16():
        logger.warning("precision %s asked for, but this CPU has no native bf16 (AVX512-BF16/AMX): training in "
                       "float32", cfg.precision)
        return "no"
    return "fp16" if resolved.name == "float16" else "bf16"


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons (the process group itself is left alone)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_accelerator(cfg: TrainConfig, timeout_s: float = 1800.0) -> tuple[Accelerator, bool]:
    """The Accelerator of one training run, and whether it started the process group (ours to end)."""
    cpu = not torch.cuda.is_available()
    mixed = mixed_precision(cfg, "cpu" if cpu else "cuda")
    had_group = dist.is_available() and dist.is_initialized()
    reset_accelerate_state()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed,
        # Accumulation is ours: the loss is normalised by the global label-token count of all
        # micro-steps, so accelerate must not divide it again (backward divides by this number).
        gradient_accumulation_steps=1,
        # AcceleratedScheduler would otherwise step num_processes times per optimizer step.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
        ],
    )
    owns_group = not had_group and dist.is_available() and dist.is_initialized()
    return accelerator, owns_group


def end_accelerator(accelerator: Accelerator | None, owns_group: bool, failed: bool = False) -> None:
    """Release a run's Accelerator, and the process group it started -- unless the run `failed`.

    After a failure on one rank the others may be blocked in a collective; tearing the group down
    then can wait on them (NCCL's destroy does), so the failing process would neither exit nor
    print its error, and torchrun, which ends the other ranks once one exits, would never see it.
    The process exit releases the group instead."""
    if accelerator is not None:
        accelerator.free_memory()
    if owns_group and not failed and dist.is_initialized():
        dist.destroy_process_group()
    reset_accelerate_state()


@dataclass
class DistEnv:
    """Rank / world / device of this process; backed by an Accelerator during training.

    `DistEnv()` is a single CPU process (no Accelerator), enough to load a model.
    """

    accelerator: Accelerator | None = None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def local_rank(self) -> int:
        return self.accelerator.local_process_index if self.accelerator is not None else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def device(self) -> torch.device:
        return self.accelerator.device if self.accelerator is not None else torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator is None or not self.is_distributed:
            return t
        return self.accelerator.reduce(t.to(self.device), reduction="sum")

    def gather_lists(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (a collective: every rank must call it)."""
        if self.accelerator is None or not self.is_distributed:
            return items
        return gather_object(items)


def _fsdp_blocks(model) -> list:
    """Modules sharded on their own under FSDP2: the language model's decoder layers.

    The vision tower and projector stay in the root group: a rank may run them twice in one
    forward (videos and images) or in a different number of chunks than another rank, and
    each separately sharded call would be a collective the other rank does not join.
    """
    names = set(getattr(model.language_model, "_no_split_modules", None) or [])
    return [m for m in model.language_model.modules() if type(m).__name__ in names]


def fully_shard_model(model, bf16_params: bool) -> None:
    """FSDP2 in place: each decoder layer, then the root (everything else)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params \
        else MixedPrecisionPolicy()
    for block in _fsdp_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
