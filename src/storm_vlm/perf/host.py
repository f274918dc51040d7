"""What the host is and what it can do: CPU model and ISA, threads, BLAS / oneDNN, load, /proc
readings (resident memory, minor faults, free memory) and the roofline it reaches.

Every benchmark prints `host_summary()` when it starts and `load_line()` when it ends, so a
figure always comes with the machine and the load it was taken on. Nothing here changes state.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import resource
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch
import transformers

from storm_vlm.huge_pages import huge_page_buffers, huge_pages_unavailable
from storm_vlm.model.matmul_backend import storm_linear
from storm_vlm.model.ssm import cpu_kernel
from storm_vlm.perf.costmodel import Hardware
from storm_vlm.precision import cpu_has_fast_bf16

__all__ = [
    "ISA_FLAGS",
    "cpu_model",
    "cpu_flags",
    "isa_flags",
    "l2_cache_bytes",
    "math_libraries",
    "load_average",
    "describe_host",
    "host_summary",
    "load_line",
    "proc_status_kb",
    "reset_peak_rss",
    "fma_peak",
    "page_faults",
    "measure_cpu_roofline",
    "best_gemm_rate",
]

# The instruction-set extensions that decide which matmul / elementwise kernels a CPU runs.
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
)


def _cpuinfo() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/cpuinfo").read_text()
    return ""


@lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, `platform.processor()` elsewhere)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """Every flag the kernel reports for the first CPU (empty where /proc/cpuinfo is absent)."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


_SIZE_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


@lru_cache(maxsize=None)
def l2_cache_bytes(caches: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The first CPU's level-2 data (or unified) cache in bytes, as Linux's sysfs reports it under
    `caches`; None where it does not (not Linux, a container hiding sysfs)."""
    for index in sorted(Path(caches).glob("index*")):
        with contextlib.suppress(OSError, ValueError):
            if (index / "level").read_text().strip() == "2" and (index / "type").read_text().strip() != "Instruction":
                size = (index / "size").read_text().strip().upper()
                match = re.fullmatch(r"(\d+)\s*([KMG]?)B?", size)
                if match:
                    return int(match[1]) * _SIZE_SUFFIX[match[2]]
    return None


def isa_flags() -> list[str]:
    """The members of ISA_FLAGS this CPU has, in ISA_FLAGS order."""
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


@lru_cache(maxsize=None)
def math_libraries() -> dict:
    """The BLAS and oneDNN torch was built with, the vector ISA its kernels dispatch to, and whether
    oneDNN runs bf16 natively here (`storm_vlm.precision.cpu_has_fast_bf16`)."""
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    onednn = re.search(r"MKL-DNN v([\d.]+)", config)
    return {
        "blas": (blas.group(1) if blas else "unknown") + (f" {mkl.group(1)}" if mkl else ""),
        "onednn": (f"oneDNN {onednn.group(1)}" if onednn else "none") if torch.backends.mkldnn.is_available() else "none",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_fast_bf16(),
    }


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


def _cpus_usable() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_host() -> dict:
    """The host as a dict (goes into every result file): CPU, ISA, threads, libraries, versions, load."""
    info = {
        "cpu": cpu_model(),
        "isa": isa_flags(),
        "l2_cache_bytes": l2_cache_bytes(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": _cpus_usable(),
        "torch_threads": torch.get_num_threads(),
        **math_libraries(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": load_average(),
    }
    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_mb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**20)
    return info


def _bytes_text(n) -> str:
    return "n/a" if not n else f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def _load_text(load) -> str:
    return "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load)


def host_summary(info: dict | None = None) -> str:
    """Three lines naming the host, for the top of a benchmark's output."""
    info = info or describe_host()
    lines = [
        f"host: {info['cpu']}; ISA {' '.join(info['isa']) or 'n/a'} (torch kernels: {info['cpu_capability']}); "
        f"{info['usable_cpus']} of {info['logical_cpus']} CPUs usable, torch threads {info['torch_threads']}, "
        f"L2 {_bytes_text(info.get('l2_cache_bytes'))}",
        f"      BLAS {info['blas']}, {info['onednn']}, native bf16: {'yes' if info['native_bf16'] else 'no'}; "
        f"torch {info['torch']}, transformers {info.get('transformers', 'n/a')}, Python {info['python']}",
        f"      load average at start (1/5/15 min): {_load_text(info['load_average'])}",
    ]
    if "gpu" in info:
        lines.append(f"      GPU: {info['gpu']} ({info['gpu_memory_mb']} MiB)")
    return "\n".join(lines)


def load_line() -> str:
    """One line with the load average now, for the end of a benchmark's output."""
    return f"load average at end (1/5/15 min): {_load_text(load_average())}"


# ---- /proc readings ------------------------------------------------------------------------


def proc_status_kb(key: str) -> int | None:
    """A kB field of /proc/self/status (VmRSS, VmHWM, ...); None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) through /proc/self/clear_refs; False where unsupported."""
    if proc_status_kb("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's resident-set high-water mark (VmHWM, or getrusage's lifetime peak) in MiB."""
    hwm = proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def page_faults() -> int:
    """Minor faults of this process so far (getrusage): pages the kernel had to map and zero."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---- what the CPU can do ---------------------------------------------------------------------


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_gemm_rate(m: int, k: int, n: int, repeats: int = 5, dtype: torch.dtype = torch.float32) -> dict:
    """The best rate of an (m x k) @ (k x n) product in `dtype` (float32, or bfloat16 as bf16 autocast
    multiplies) on this host, in GFLOP/s, per backend.

    Backends: "blas" (torch's default, `F.linear` with the weight stored (n, k)), "blas_kn" (the
    weight stored transposed, (k, n) contiguous), where torch has oneDNN "onednn" (a prepacked
    oneDNN linear) and, in float32 with the C kernels built, "storm" (`ssm/_linear_kernel.c`, the
    matmul backend's own kernel, on its packed weight). Best-of `repeats`, not median: a bound is
    what the machine can do, and other jobs only slow it. Returns {backend: GFLOP/s, "best": the
    highest}.
    """
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    w_kn = w.t().contiguous().t()
    fns = {
        "blas": lambda: torch.nn.functional.linear(x, w),
        "blas_kn": lambda: torch.nn.functional.linear(x, w_kn),
    }
    if torch.backends.mkldnn.is_available():
        with contextlib.suppress(RuntimeError, AttributeError):
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    lib = cpu_kernel.load_library() if dtype == torch.float32 else None
    if lib is not None:
        fns["storm"] = lambda: storm_linear(x, w, None, lib)
    rates = {}
    with torch.inference_mode():
        for name, fn in fns.items():
            rates[name] = 2.0 * m * k * n / _best_seconds(fn, repeats) / 1e9
    rates["best"] = max(rates.values())
    return rates


def fma_peak(repeats: int = 5) -> float | None:
    """This core's float32 multiply-add peak in GFLOP/s: 12 independent chains of vector FMAs of the
    C kernels' width (`storm_fma_chains`: nothing but multiply-adds on registers), best of
    `repeats`. Every float32 kernel of a module is bounded by it; None without the C kernels."""
    lib = cpu_kernel.load_library()
    if lib is None:
        return None
    steps = 1 << 22
    seconds = _best_seconds(lambda: lib.storm_fma_chains(steps), repeats)
    return 2.0 * 12 * lib.storm_lanes * steps / seconds / 1e9


def measure_cpu_roofline(matmul_size: int = 1024, stream_mb: int = 256, repeats: int = 5) -> Hardware:
    """This CPU's roofline with the current torch threads: a `costmodel.Hardware` with mfu 1.

    peak_flops: the best of `repeats` fp32 (n x n) @ (n x n) products; bandwidth: the best of
    `repeats` streaming reads (a sum) of a `stream_mb` MB fp32 tensor, as a decode step streams its
    weights, on 4 KiB pages and, where the kernel offers them, on 2 MiB transparent huge pages (where
    the loaders put a CPU model's weights: `storm_vlm.huge_pages.place_in_huge_pages`), the
    faster of the two. Best-of, not median: a bound is what the machine can do, and other jobs only
    slow it.
    """
    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    n = stream_mb * 2**20 // 4
    streams = [torch.ones(n)]
    if huge_pages_unavailable() is None:
        streams.append(huge_page_buffers([4 * n])[0].view(torch.float32).fill_(1.0))
    mm = _best_seconds(lambda: a @ b, repeats)
    rd = min(_best_seconds(x.sum, repeats) for x in streams)
    flops = 2 * matmul_size**3 / mm
    bandwidth = n * 4 / rd
    return Hardware(f"this CPU (fp32, {torch.get_num_threads()} thread(s): {flops / 1e9:.0f} GFLOP/s, "
                    f"{bandwidth / 1e9:.1f} GB/s)", peak_flops=flops, bandwidth=bandwidth, mfu=1.0)
