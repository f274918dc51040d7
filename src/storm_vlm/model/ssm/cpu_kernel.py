"""The fused CPU selective scan, forward and backward (``_scan_kernel.c``), compiled on first use.

The C source ships with the package and is compiled with the system C compiler (``$CC``, else
cc / gcc / clang) for this machine's CPU (``-march=native``) into a per-user cache, keyed by the
source, compiler and CPU flags; the build is written to a temporary name and renamed, so
concurrent processes never load a half-written library. Without a compiler, or when the build
fails, ``load()`` returns None once with a warning and the pure-PyTorch scan is used instead.
``STORM_VLM_SCAN_KERNEL=0`` turns the kernel off (the benchmarks use it to time both paths).

Why ctypes and not a torch C++ extension: the kernel needs no torch headers, so it builds in
about a second instead of a minute, and ctypes releases the GIL during the call, so channel
blocks scanned in worker threads really run in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["load", "enabled", "scan_forward", "scan_backward", "cache_dir"]

logger = logging.getLogger("storm_vlm.model.ssm")
SOURCE = Path(__file__).with_name("_scan_kernel.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]
ENV_SWITCH = "STORM_VLM_SCAN_KERNEL"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """False when ``STORM_VLM_SCAN_KERNEL`` is set to 0/false/off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    root = os.environ.get("STORM_VLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "storm_vlm")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in
                                    (source, version, " ".join(FLAGS), _cpu_flags(), platform.machine()))).hexdigest()
    target = cache_dir() / f"scan_{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None when unavailable or disabled."""
    global _lib, _tried
    if not enabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
            lib = ctypes.CDLL(str(_build(cc)))
            fn = lib.storm_scan_fwd_f32
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = ([i64] * 5 + [ptr, i64, i64, i64] * 3 + [ptr] * 5 + [ctypes.c_int] * 2
                           + [ptr, i64, i64, i64, ptr, i64, ptr, i64, i64])
            fn.restype = ctypes.c_int
            bwd = lib.storm_scan_bwd_f32
            bwd.argtypes = ([i64] * 5 + [ptr, i64, i64, i64] * 4 + [ptr] * 5 + [ctypes.c_int] * 2
                            + [ptr, i64, ptr] + [ptr, i64, i64, i64] * 3 + [ptr] * 5 + [i64, i64])
            bwd.restype = ctypes.c_int
            _lib = lib
        except Exception as exc:  # a missing or broken toolchain must never break the model
            logger.warning("storm_vlm: fused CPU scan kernel unavailable, using the PyTorch scan (%s)", exc)
            _lib = None
        _tried = True
    return _lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _strides(t: Tensor | None) -> tuple[int, int, int]:
    """(batch, time, channel) element strides of a (b, d, L) tensor."""
    if t is None:
        return 0, 0, 0
    sb, sc, st = t.stride()
    return sb, st, sc


def scan_forward(lib: ctypes.CDLL, u: Tensor, delta: Tensor, z: Tensor | None, A2: Tensor, BT: Tensor,
                 CT: Tensor, D: Tensor | None, bias: Tensor | None, softplus: bool, reverse: bool, out: Tensor,
                 states: Tensor | None, chunk: int, last: Tensor | None, c0: int, c1: int) -> None:
    """Scan channels [c0, c1) into ``out`` (and ``states`` / ``last`` when given).

    u, delta, z, out: (b, d, L) float32, any strides; A2 = A * log2(e): (d, N) contiguous;
    BT, CT: (b, L, g, N) contiguous; D, bias: (d,) contiguous; states: (L/chunk + 1, b, g, N, d/g)
    contiguous; last: (b, d, N) contiguous."""
    b, d, L = u.shape
    g, n = BT.shape[2], BT.shape[3]
    lib.storm_scan_fwd_f32(b, L, d, g, n, _ptr(u), *_strides(u), _ptr(delta), *_strides(delta), _ptr(z),
                           *_strides(z), _ptr(A2), _ptr(BT), _ptr(CT), _ptr(D), _ptr(bias), int(softplus),
                           int(reverse), _ptr(out), *_strides(out), _ptr(states), int(chunk), _ptr(last), c0, c1)


def scan_backward(lib: ctypes.CDLL, u: Tensor, delta: Tensor, z: Tensor | None, gout: Tensor, A2: Tensor,
                  BT: Tensor, CT: Tensor, D: Tensor | None, bias: Tensor | None, softplus: bool, reverse: bool,
                  states: Tensor, chunk: int, glast: Tensor | None, gu: Tensor, gdelta: Tensor, gz: Tensor | None,
                  gA: Tensor, gD: Tensor | None, gbias: Tensor | None, gBT: Tensor, gCT: Tensor, c0: int,
                  c1: int) -> None:
    """Gradients of channels [c0, c1), from the states the forward saved every ``chunk`` steps.

    u, delta, z, gout and the outputs gu, gdelta, gz: (b, d, L) float32, any strides; states:
    (L/chunk + 1, b, g, N, d/g); glast: (b, d, N) contiguous or None. gA (d, N), gD, gbias (d,) and
    gBT, gCT (b, L, g, N) are contiguous and accumulated into: pass zeros (gBT, gCT: one pair per
    concurrent call)."""
    b, d, L = u.shape
    g, n = BT.shape[2], BT.shape[3]
    rc = lib.storm_scan_bwd_f32(
        b, L, d, g, n, _ptr(u), *_strides(u), _ptr(delta), *_strides(delta), _ptr(z), *_strides(z), _ptr(gout),
        *_strides(gout), _ptr(A2), _ptr(BT), _ptr(CT), _ptr(D), _ptr(bias), int(softplus), int(reverse),
        _ptr(states), int(chunk), _ptr(glast), _ptr(gu), *_strides(gu), _ptr(gdelta), *_strides(gdelta), _ptr(gz),
        *_strides(gz), _ptr(gA), _ptr(gD), _ptr(gbias), _ptr(gBT), _ptr(gCT), c0, c1)
    if rc != 0:
        raise MemoryError(f"selective-scan backward kernel: out of memory for chunk {chunk} x d_state {n}")
