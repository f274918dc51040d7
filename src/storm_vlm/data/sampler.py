"""Deterministic global-batch sharding (a DistributedSampler that also knows about steps).

Every optimizer step consumes one *global batch* of G = world_size * per_device_batch_size *
gradient_accumulation_steps dataset indices, taken in order from a per-epoch permutation
seeded by (seed, epoch). The global batch is cut into accumulation micro-steps, and each
micro-step into one contiguous block per rank. The sequence of global batches does not depend
on how it is split, so 2 processes x batch b see exactly the samples 1 process x batch 2b sees,
and the data position of a run is fully described by (epoch, step_in_epoch).
The last incomplete global batch of an epoch is dropped (every step has the same size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from storm_vlm.errors import ConfigError


@dataclass(frozen=True)
class GlobalBatchSampler:
    num_samples: int
    per_device_batch_size: int
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        if self.num_samples < self.global_batch_size:
            raise ConfigError(
                f"the dataset has {self.num_samples} records, fewer than one global batch "
                f"({self.world_size} processes x per_device_batch_size {self.per_device_batch_size} x "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps} = {self.global_batch_size})"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.per_device_batch_size * self.gradient_accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def position(self, global_step: int) -> tuple[int, int]:
        """Data position (epoch, step_in_epoch) of the batch that optimizer step `global_step` (0-based) uses."""
        return divmod(global_step, self.steps_per_epoch)

    def micro_batches(self, epoch: int, step_in_epoch: int, order: list[int] | None = None) -> list[list[int]]:
        """This rank's index lists, one per accumulation micro-step, for one optimizer step."""
        order = self.epoch_order(epoch) if order is None else order
        start = step_in_epoch * self.global_batch_size
        b, w = self.per_device_batch_size, self.world_size
        out = []
        for a in range(self.gradient_accumulation_steps):
            lo = start + (a * w + self.rank) * b
            out.append(order[lo : lo + b])
        return out

    def global_batch(self, epoch: int, step_in_epoch: int) -> list[int]:
        order = self.epoch_order(epoch)
        start = step_in_epoch * self.global_batch_size
        return order[start : start + self.global_batch_size]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's micro-batches (index lists) for optimizer steps start..max_steps-1."""

    def __init__(self, sampler: GlobalBatchSampler, start_step: int, max_steps: int):
        self.sampler, self.start_step, self.max_steps = sampler, start_step, max_steps

    def __iter__(self):
        cached_epoch, order = None, None
        for step in range(self.start_step, self.max_steps):
            epoch, pos = self.sampler.position(step)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.sampler.epoch_order(epoch)
            yield from self.sampler.micro_batches(epoch, pos, order)

    def __len__(self):
        return (self.max_steps - self.start_step) * self.sampler.gradient_accumulation_steps
