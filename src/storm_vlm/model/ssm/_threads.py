"""Worker threads for the selective scan, the bidirectional mixer and the C element-wise kernels.

The scan splits channels over threads, ``BiMambaMixer`` runs its two directions in two threads, and
the one-pass C kernels (GELU, conv + SiLU, the vision layers' norm and attention) split their
tensors into pieces (``spans``, ``run_all``) (ctypes and most torch kernels release the GIL, so they
really run in parallel). PyTorch keeps grad mode, inference mode and autocast per thread: a worker
started plainly runs without the caller's ``torch.autocast`` (a bf16 input then meets an fp32 weight
in ``x_proj``) and outside the caller's ``torch.inference_mode()`` (in-place writes to the caller's
inference tensors then fail). ``submit`` therefore runs every job under the state of the thread
that submitted it.

All jobs share one pool whose workers run with one intra-op thread each: the parallelism comes from
the jobs, and nested OpenMP teams inside them only slow the scan's many small ops down. A process
forked after the pool started (a multiprocessing or DataLoader worker, a pre-forking server) gets a
pool of its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

__all__ = ["ThreadState", "run_all", "spans", "submit"]

_AUTOCAST_DEVICES = ("cpu", "cuda")
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@dataclass(frozen=True)
class ThreadState:
    """The calling thread's grad mode, inference mode and autocast settings."""

    grad: bool
    inference: bool
    autocast: tuple  # ((device_type, dtype), ...) for every device type where autocast is on
    autocast_cache: bool

    @classmethod
    def capture(cls) -> "ThreadState":
        on = tuple((dev, torch.get_autocast_dtype(dev)) for dev in _AUTOCAST_DEVICES
                   if torch.is_autocast_enabled(dev))
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), on, torch.is_autocast_cache_enabled())

    @contextlib.contextmanager
    def applied(self):
        """Enter this state in the current thread (a worker's state starts at PyTorch's defaults)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(self.inference))
            stack.enter_context(torch.set_grad_enabled(self.grad))
            for dev, dtype in self.autocast:
                stack.enter_context(torch.autocast(dev, dtype=dtype, cache_enabled=self.autocast_cache))
            yield


def _forget_pool():
    """In a forked child: the parent's workers do not exist there, yet its pool would count them as
    idle and queue jobs for them forever; the child starts a pool of its own."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _worker_init():
    torch.set_num_threads(1)  # OpenMP's thread count is per thread: this worker's ops stay serial


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            _pool = ThreadPoolExecutor(max_workers=max(workers, os.cpu_count() or 1), initializer=_worker_init,
                                       thread_name_prefix="storm-ssm")
        return _pool


def submit(fn, *args, workers: int = 1) -> Future:
    """Run ``fn(*args)`` in a pool worker under the calling thread's grad, inference-mode and
    autocast state; ``workers``: how many jobs the caller is about to have in flight at once."""
    state = ThreadState.capture()

    def job():
        with state.applied():
            return fn(*args)

    return _get_pool(workers).submit(job)


def run_all(fn, calls: list[tuple]) -> list:
    """``fn(*args)`` for every ``args`` in ``calls``, at once: the first in this thread, the others in
    pool workers (for C kernels over disjoint pieces of one tensor; ctypes releases the GIL); their
    results, in order."""
    futures = [submit(fn, *args, workers=len(calls) - 1) for args in calls[1:]]
    first = fn(*calls[0])
    return [first, *(f.result() for f in futures)]


def spans(n: int, min_size: int, multiple: int = 1) -> list[tuple[int, int]]:
    """[0, n) in at most ``torch.get_num_threads()`` contiguous pieces of at least ``min_size``, each
    a multiple of ``multiple`` long but the last (so that where a piece ends does not change results)."""
    if n <= 0:
        return [(0, 0)]
    parts = max(1, min(torch.get_num_threads(), n // max(min_size, 1)))
    per = -(-n // parts)
    step = -(-per // multiple) * multiple
    return [(i, min(i + step, n)) for i in range(0, n, step)]

