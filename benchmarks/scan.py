"""Selective-scan benchmark: sequential reference vs the chunked fast path, against two floors.

For d_inner in {1024, 2048} x L in {1024, 4096, 16384} (N = 16, batch 1, fp32, the mixer's
configuration: D, z, delta_bias, delta_softplus=True; inputs in mamba-ssm's (batch, dim, L)
layout), at the default thread count and at 1 thread, it prints:

- forward and forward+backward wall time of ``selective_scan_reference`` and ``selective_scan``
  (min over repeats; the reference gets fewer repeats at large L) and their ratios;
- max abs error of the fast output (and of d u, d delta, d A) against the reference;
- peak memory of one forward+backward: the growth of the process's peak resident set (VmHWM,
  reset through /proc/self/clear_refs just before the call) over its resident size once the
  inputs exist, each measurement in a fresh subprocess, so it counts everything the call
  allocates (autograd graph, temporaries, the gradients);
- two floors measured in the same run: bytes the scan must read and write (u, delta, z, B, C in,
  out out; for fwd+bwd also the output gradient in and the input gradients out) over the host's
  measured copy bandwidth; and its L*D*N exponentials plus ~6 flops each (fwd) over the measured
  single-thread exp2 rate (cache-resident exp2) and FMA rate, divided by the thread count.
  The rates are re-measured next to every configuration (the machine may be shared); the
  header shows the first measurement.
- mambapy's pscan when it is installed.
- the host: CPU model, its vector-ISA flags, CPU count, torch threads and the load average at the
  start and the end (the table's ratios are measured in one run, each pair alternately in one
  process, so they hold on a shared machine; absolute times do not); which kernel path ran
  (``cpu_kernel``'s instruction set and vector width, detected or forced with ``--isa``). A path
  forced with ``--isa`` runs with torch's and MKL's kernels held to the same instruction set
  (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS), so its floor is the one a CPU with only that
  set has.

Usage: python benchmarks/scan.py [--quick] [--dims 1024 2048] [--lengths 1024 4096 16384]
       [--threads default 1] [--isa avx2 generic] [--floor-check-only] [--json out.json] [--timeout 900]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _profile_common  # noqa: F401  (puts src/ on sys.path)
from storm_vlm.commands import positive_int
from storm_vlm.perf.host import host_summary, load_line, proc_status_kb, reset_peak_rss
from storm_vlm.perf.profiler import Clock

N_STATE = 16


# ----------------------------------------------------------------------------- worker side
def _inputs(d, L, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    u = torch.randn(1, d, L, generator=g)
    delta = torch.randn(1, d, L, generator=g) * 0.5
    A = -torch.exp(torch.log(torch.arange(1, N_STATE + 1, dtype=torch.float32)).repeat(d, 1))
    B = torch.randn(1, N_STATE, L, generator=g)
    C = torch.randn(1, N_STATE, L, generator=g)
    D = torch.ones(d)
    z = torch.randn(1, d, L, generator=g)
    # Mamba's dt init: softplus(delta_bias) log-uniform in [1e-3, 1e-1]
    dt = torch.exp(torch.rand(d, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes():
    hwm = proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(spec):
    """One measurement in a fresh process. spec: impl, mode, d, L, threads, repeats, save/compare dir."""
    import numpy as np
    import torch

    if spec["threads"] != "default":
        torch.set_num_threads(int(spec["threads"]))
    from storm_vlm.model.ssm import selective_scan, selective_scan_reference

    impl = spec["impl"]
    if impl == "floorcheck":
        _floorcheck(spec)
        return
    if impl == "mambapy":
        from mambapy.pscan import pscan  # noqa: F401  (only reached when installed)

        raise SystemExit("mambapy measurement not implemented")
    fn = selective_scan_reference if impl == "reference" else selective_scan
    t = _inputs(spec["d"], spec["L"])
    grad = spec["mode"] == "fwdbwd"
    leaves = ("u", "delta", "A")
    if grad:
        for k in leaves:
            t[k].requires_grad_()
    gout = torch.randn(1, spec["d"], spec["L"], generator=torch.Generator().manual_seed(1))

    def once():
        if grad:
            out = fn(**t, delta_softplus=True)
            out.backward(gout)
            return out
        with torch.no_grad():
            return fn(**t, delta_softplus=True)

    import gc

    gc.collect()
    reset = reset_peak_rss()
    base = _rss_bytes()
    peak_before = _peak_bytes()
    start = time.perf_counter()
    out = once()
    times = [time.perf_counter() - start]  # the first call is timed too (the only one for slow cases)
    peak = max(0, _peak_bytes() - max(base, peak_before if not reset else base))
    result = {"peak_bytes": peak, "peak_reset": reset}
    grads = {k: t[k].grad.detach().clone() for k in leaves} if grad else {}
    deadline = time.perf_counter() + spec.get("time_budget", 1e9)
    for _ in range(spec["repeats"] - 1):
        for k in leaves:
            t[k].grad = None
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    result["time"] = min(times)
    result["repeats"] = len(times)
    # errors against the reference's saved results
    tensors = {"out": out.detach(), **{"d_" + k: v for k, v in grads.items()}}
    path = spec["dir"]
    if impl == "reference":
        for k, v in tensors.items():
            np.save(os.path.join(path, f"{spec['mode']}_{k}.npy"), v.float().numpy(), allow_pickle=False)
    else:
        errs = {}
        for k, v in tensors.items():
            f = os.path.join(path, f"{spec['mode']}_{k}.npy")
            if os.path.exists(f):
                ref = torch.from_numpy(np.load(f, allow_pickle=False))
                errs[k] = float((v.float() - ref).abs().max())
        result["max_abs_err"] = errs
    print("RESULT " + json.dumps(result), flush=True)


def _floorcheck(spec):
    """Fast forward (the fused C kernel, and the pure-PyTorch chunked path with the kernel switched
    off) and its exp2 floor, timed alternately in one process (same machine state), on the wall
    clock or, with clock "cpu", the process's CPU time (see ``storm_vlm.perf.profiler.Clock``)."""
    import torch

    from storm_vlm.model.ssm import cpu_kernel, selective_scan

    clock = Clock("cpu", spec.get("clock", "wall"))

    t = _inputs(spec["d"], spec["L"])
    ldn = spec["d"] * spec["L"] * N_STATE
    threads = torch.get_num_threads()
    x = torch.randn(64 * 1024)  # cache-resident
    o = torch.empty_like(x)
    a, b, c = torch.randn(256, 256), torch.randn(256, 256), torch.empty(256, 256)
    reps = max(1, ldn // x.numel())
    has_kernel = cpu_kernel.load() is not None

    def scan(kernel: bool):
        os.environ[cpu_kernel.ENV_SWITCH] = "1" if kernel else "0"
        try:
            return _timed(lambda: selective_scan(**t, delta_softplus=True), clock)
        finally:
            os.environ[cpu_kernel.ENV_SWITCH] = "1"

    fast, torch_path, floor = [], [], []
    with torch.no_grad():
        selective_scan(**t, delta_softplus=True)
        for _ in range(spec["repeats"]):
            if has_kernel:
                fast.append(scan(True))
            torch_path.append(scan(False))
            prev = torch.get_num_threads()
            torch.set_num_threads(1)
            e = _timed(lambda: [torch.exp2(x, out=o) for _ in range(reps)], clock)
            f = _timed(lambda: [torch.mm(a, b, out=c) for _ in range(20)], clock)
            torch.set_num_threads(prev)
            flop_s = 6 * ldn / (2 * 256**3 * 20 / f)
            floor.append((e + flop_s) / threads)
    lib = cpu_kernel.load()
    result = {"fast_fwd": min(fast or torch_path), "pytorch_fwd": min(torch_path), "floor": min(floor),
              "threads": threads, "kernel": has_kernel, "torch_isa": torch.backends.cpu.get_cpu_capability(),
              "isa": f"{lib.storm_isa} x{lib.storm_lanes}" if lib is not None else "none"}
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- floors
def measure_floors():
    """Copy bandwidth (bytes/s), single-thread exp2 rate (1/s, cache-resident) and FMA rate (flop/s)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.randn(64 * 1024 * 1024 // 4 * 4)  # 256 MiB
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
        bandwidth = 2 * src.numel() * 4 / best
        del src, dst
        x = torch.randn(64 * 1024)  # 256 KiB: stays in L2
        o = torch.empty_like(x)
        reps = 200
        best = min(_timed(lambda: [torch.exp2(x, out=o) for _ in range(reps)]) for _ in range(5))
        exp2_rate = x.numel() * reps / best
        a = torch.randn(256, 256)
        b = torch.randn(256, 256)
        c = torch.empty(256, 256)
        best = min(_timed(lambda: [torch.mm(a, b, out=c) for _ in range(20)]) for _ in range(5))
        fma_rate = 2 * 256**3 * 20 / best
    finally:
        torch.set_num_threads(prev)
    return {"copy_bandwidth_Bps": bandwidth, "exp2_per_s": exp2_rate, "flops_per_s": fma_rate}


def _timed(f, clock=None):
    """Seconds f() takes: wall time, or on ``clock`` (a ``storm_vlm.perf.profiler.Clock``)."""
    if clock is None:
        t = time.perf_counter()
        f()
        return time.perf_counter() - t
    t = clock.mark()
    f()
    return clock.ms(t, clock.mark()) / 1000.0


def floors_for(d, L, threads, rates):
    n = N_STATE
    dl, nl = d * L, n * L
    fwd_bytes = 4 * (3 * dl + 2 * nl + dl)  # u, delta, z, B, C in; out out
    fb_bytes = fwd_bytes + 4 * (4 * dl + 2 * nl + 3 * dl + 2 * nl)  # read again + gout; write du, ddelta, dz, dB, dC
    ldn = L * d * n
    compute_fwd = ldn / rates["exp2_per_s"] + 6 * ldn / rates["flops_per_s"]
    compute_fwd /= threads
    return {
        "floor_mem_fwd_s": fwd_bytes / rates["copy_bandwidth_Bps"],
        "floor_mem_fwdbwd_s": fb_bytes / rates["copy_bandwidth_Bps"],
        "floor_compute_fwd_s": compute_fwd,
    }


# ----------------------------------------------------------------------------- host
def kernel_description() -> str:
    from storm_vlm.model.ssm import cpu_kernel

    lib = cpu_kernel.load()
    forced = os.environ.get(cpu_kernel.ENV_ISA)
    if lib is None:
        return "pure PyTorch (the C kernel is off or did not build)"
    return (f"the fused C kernel, path {lib.storm_isa} ({lib.storm_lanes} lanes, built "
            f"{lib.storm_scan_vector_isa().decode()}; CPU detected {cpu_kernel.detect_isa()}"
            f"{f', forced {cpu_kernel.ENV_ISA}={forced}' if forced else ''}); from {lib.storm_origin}")


# ----------------------------------------------------------------------------- driver
# torch's and MKL's settings for each kernel path (see the module docstring)
_TORCH_ISA = {"avx512bf16": ("avx512", "AVX512"), "avx512": ("avx512", "AVX512"), "avx2": ("avx2", "AVX2"),
              "generic": ("default", "SSE4_2")}


def _run_worker(spec, timeout, isa=None):
    env = dict(os.environ)
    if isa:
        env["STORM_VLM_SCAN_ISA"] = isa
        env["ATEN_CPU_CAPABILITY"], env["MKL_ENABLE_INSTRUCTIONS"] = _TORCH_ISA[isa]
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}


def _mambapy_installed():
    try:
        import mambapy.pscan  # noqa: F401
    except Exception:
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=positive_int, nargs="+", default=[1024, 2048])
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--threads", nargs="+", default=["default", "1"])
    p.add_argument("--quick", action="store_true", help="d_inner 1024 and 2048 at L 1024 only")
    p.add_argument("--json", help="also write the results here (atomically)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--floor-check-only", action="store_true",
                   help="only time the fast forward against its exp2 floor, alternately in one process")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="floor table: time on the wall clock or with the process's CPU time (1 thread; on a "
                        "shared machine CPU time leaves out waiting for a core)")
    p.add_argument("--isa", nargs="+", default=[None], choices=list(_TORCH_ISA),
                   help="kernel paths for the floor table (STORM_VLM_SCAN_ISA: avx512bf16, avx512, avx2, generic); "
                        "default: the one this CPU selects")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    if args.quick:
        args.lengths = [1024]
    import torch

    default_threads = torch.get_num_threads()
    print(f"# selective scan benchmark: N={N_STATE}, batch 1, fp32, torch {torch.__version__}", flush=True)
    print("\n".join(f"# {line.strip()}" for line in host_summary().splitlines()), flush=True)
    rates = measure_floors()
    print(f"# copy bandwidth {rates['copy_bandwidth_Bps'] / 1e9:.2f} GB/s, exp2 {rates['exp2_per_s'] / 1e9:.3f} G/s "
          f"(1 thread, cache-resident), fma {rates['flops_per_s'] / 1e9:.1f} GFLOP/s (1 thread)", flush=True)
    print(f"# fast path, forward and backward: {kernel_description()}", flush=True)
    if args.floor_check_only:
        _floor_table(args)
        print(f"# {load_line()}", flush=True)
        return 0
    mambapy = _mambapy_installed()
    print(f"# mambapy pscan: {'installed (not measured)' if mambapy else 'not installed'}", flush=True)
    rows = []
    from tqdm import tqdm

    grid = [(th, d, L) for th in args.threads for d in args.dims for L in args.lengths]
    with tempfile.TemporaryDirectory(prefix="scanbench_") as tmp:
        for th, d, L in tqdm(grid, desc="configs", file=sys.stderr):
            nthreads = default_threads if th == "default" else int(th)
            row = {"threads": nthreads, "threads_setting": th, "d_inner": d, "L": L}
            for mode in ("fwd", "fwdbwd"):
                for impl in ("reference", "fast"):
                    reps = 4 if impl == "fast" else (2 if L <= 1024 else 1)
                    spec = dict(impl=impl, mode=mode, d=d, L=L, threads=th, repeats=reps, dir=tmp,
                                time_budget=120)
                    row[f"{impl}_{mode}"] = _run_worker(spec, args.timeout)
            row["rates"] = measure_floors()  # measured next to each config: the machine is shared
            row.update(floors_for(d, L, nthreads, row["rates"]))
            rows.append(row)
            _print_row(row, header=len(rows) == 1)
    print()
    _floor_table(args)
    print(f"# {load_line()}", flush=True)
    if args.json:
        tmp_path = args.json + ".tmp"
        with open(tmp_path, "w") as f:
            json.dump({"rates": rates, "mambapy": "installed" if mambapy else "not installed", "rows": rows}, f, indent=1)
        os.replace(tmp_path, args.json)
    return 0


def _floor_table(args):
    """Fast forward vs the compute floor (L*D*N exp2 + 6 flops each), all timed in one process."""
    print(f"# fast forward vs compute floor, timed alternately in one process (min of 5 each, {args.clock} clock);")
    print("# fast = the fused C kernel on the path shown (else the PyTorch path), pytorch = the chunked PyTorch path")
    print("# path: the kernel's instruction set and width, and the one torch's own kernels (the floor's) ran")
    print(" thr  d_inner      L  path                       | fast fwd s  pytorch s  floor s  fast/floor"
          "  pytorch/floor")
    for isa in args.isa:
        for th in args.threads:
            for d in args.dims:
                for L in args.lengths:
                    r = _run_worker(dict(impl="floorcheck", d=d, L=L, threads=th, repeats=5, clock=args.clock),
                                    args.timeout, isa)
                    if "fast_fwd" in r:
                        path = f"{r['isa']} (torch {r['torch_isa']})"
                        print(f"{r['threads']:4d} {d:8d} {L:6d}  {path:<26} | {r['fast_fwd']:10.3f} "
                              f"{r['pytorch_fwd']:10.3f} {r['floor']:8.3f} {r['fast_fwd'] / r['floor']:10.2f}x "
                              f"{r['pytorch_fwd'] / r['floor']:13.2f}x"
                              + ("" if r["kernel"] else "  (no C kernel: fast = pytorch)"), flush=True)
                    else:
                        print(f"{th:>4} {d:8d} {L:6d}  {isa or '':<26} | {r.get('error')}", flush=True)
    return 0


def _fmt_t(r):
    return f"{r['time']:9.3f}" if "time" in r else f"{r.get('error', '?')[:9]:>9}"


def _ratio(a, b):
    return f"{a['time'] / b['time']:7.1f}x" if "time" in a and "time" in b else "      - "


def _print_row(row, header):
    if header:
        print(
            "\n thr  d_inner      L |  ref fwd s  fast fwd s  speedup |  ref f+b s  fast f+b s  speedup |"
            " ref peak MB fast peak MB  ref/fast | err out   err grads | floor mem s floor cmp s fast/cmp"
        )
    rf, ff, rb, fb = (row[k] for k in ("reference_fwd", "fast_fwd", "reference_fwdbwd", "fast_fwdbwd"))
    errs = {**ff.get("max_abs_err", {}), **fb.get("max_abs_err", {})}
    err_out = errs.get("out", float("nan"))
    err_grad = max([v for k, v in errs.items() if k.startswith("d_")], default=float("nan"))
    rpk = rb.get("peak_bytes", float("nan")) / 2**20
    fpk = fb.get("peak_bytes", float("nan")) / 2**20
    mem_ratio = f"{rpk / fpk:8.1f}x" if fpk >= 1 else "      - "
    vs_floor = ff["time"] / row["floor_compute_fwd_s"] if "time" in ff else float("nan")
    print(
        f"{row['threads']:4d} {row['d_inner']:8d} {row['L']:6d} | {_fmt_t(rf)}  {_fmt_t(ff)}   {_ratio(rf, ff)} |"
        f" {_fmt_t(rb)}  {_fmt_t(fb)}   {_ratio(rb, fb)} | {rpk:11.0f} {fpk:12.0f} {mem_ratio} |"
        f" {err_out:7.1e} {err_grad:9.1e} | {row['floor_mem_fwd_s']:11.4f} {row['floor_compute_fwd_s']:11.4f}"
        f" {vs_floor:7.2f}x",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
