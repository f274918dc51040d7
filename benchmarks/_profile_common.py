"""Shared plumbing of the latency benchmarks (prefill.py, decode.py, beams.py, memory.py, peers.py); its
`one_line_errors` also serves the other scripts that read a model folder or a config.

Every benchmark measures the bench-cpu model (configs/bench-cpu.yaml, random weights, the real
model's proportions) by default, or a saved model folder; it measures the settings it compares in
one run and prints ratios, because absolute times on a shared machine drift; and it prints the
host (CPU model, ISA, threads, BLAS / oneDNN, load average) when it starts and the load when it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from storm_vlm.commands import non_negative_int, positive_int  # noqa: E402
from storm_vlm.errors import StormError  # noqa: E402
from storm_vlm.perf.allocator import allocator_state, tune_cpu_allocator  # noqa: E402
from storm_vlm.perf.host import describe_host, host_summary, load_average, load_line  # noqa: E402
from storm_vlm.perf.profiler import (  # noqa: E402
    PeakMemory,
    ProfileSettings,
    build_random_model,
    load_model_config,
    load_saved_model,
    prepare_model,
    profile_row,
)
from storm_vlm.precision import PRECISION_HELP, parse_precision  # noqa: E402
from storm_vlm.utils import atomic_write_json  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "bench-cpu.yaml"
MODULE_FIELDS = ("vision_tower_ms", "projector_ms", "llm_prefill_ms", "decode_ms_per_token")


def precision_name(value: str) -> str:
    try:
        return parse_precision(value)
    except StormError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser(description: str, repeats: int, warmup: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("model_dir", nargs="?", help="a saved STORM model (default: random bench-cpu model)")
    p.add_argument("--config", default=None, help=f"profile YAML (default: {DEFAULT_CONFIG.relative_to(ROOT)})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", "--dtype", dest="precision", type=precision_name, default="float32",
                   help=f"{PRECISION_HELP} (default: float32)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: figures from a shared machine compare best single-threaded)")
    p.add_argument("--repeats", type=positive_int, default=repeats)
    p.add_argument("--warmup", type=non_negative_int, default=warmup)
    p.add_argument("--text-tokens", type=non_negative_int, default=None,
                   help="prompt tokens (default: the config's, 4 for bench-cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows, ratios and host here")
    p.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                   help="CPU timer: this process's CPU time (default; leaves out the time spent waiting for a core "
                        "on a shared machine, the same as wall time on an idle one with one thread) or wall time")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="CPU: keep glibc's default allocator thresholds (default: freed memory is kept for reuse, "
                        "see storm_vlm.perf.allocator.tune_cpu_allocator)")
    return p


def load(args):
    """(model, source, profile defaults) from the arguments; sets threads and the allocator. A model
    folder or config that cannot be used stops the script with its one-line error (`one_line_errors`)."""
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        if not args.no_tune_malloc:
            tune_cpu_allocator()
    with one_line_errors():
        if args.model_dir:
            s = ProfileSettings(precision=args.precision, device=args.device)
            return load_saved_model(args.model_dir, s), args.model_dir, {}
        path = Path(args.config) if args.config else DEFAULT_CONFIG
        config, defaults = load_model_config(path)
    return build_random_model(config), f"random weights from {path}", defaults


@contextlib.contextmanager
def one_line_errors():
    """A StormError inside (a config or model folder that cannot be used; the message names the file)
    stops the script as the CLI stops: "<script>: error: <message>" on stderr, exit 2, no traceback."""
    try:
        yield
    except StormError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def settings(args, defaults, frames, compressions, decode_tokens) -> ProfileSettings:
    s = ProfileSettings(
        frames=list(frames),
        compressions=list(compressions),
        repeats=args.repeats,
        warmup=args.warmup,
        decode_tokens=decode_tokens,
        text_tokens=args.text_tokens if args.text_tokens is not None else defaults.get("text_tokens", 64),
        precision=args.precision,
        device=args.device,
        clock=args.clock,
    )
    s.validate()
    return s




def header(name: str, source: str, s: ProfileSettings) -> dict:
    """Print what runs and on what host; returns the host description (for the JSON)."""
    host = describe_host()
    alloc = "tuned (freed memory reused)" if allocator_state().get("tuned") else "glibc defaults"
    print(f"== {name} ==")
    print(f"model: {source}")
    print(f"device {s.device}, {s.resolved.describe()}, repeats {s.repeats} (+{s.warmup} warm-up), text tokens "
          f"{s.text_tokens}; allocator {alloc}; clock {'CPU time of this process' if s.clock == 'cpu' else 'wall'}")
    print(host_summary(host))
    return host


def footer() -> None:
    print(load_line())


def interleaved(model, combos, s: ProfileSettings, label: bool = True, after_round=None) -> dict:
    """Measure (frames, Compression) combos round-robin: `s.warmup` untimed rounds, then `s.repeats`
    timed rounds of one run per combo, so load drift on a shared machine hits every combo alike;
    `after_round()`, where given, runs after each timed round (a reference timed beside the rows).
    Returns {(frames, factor): row} with per-module medians over the rounds (peak memory: max) and
    the rounds' own figures in row["per_round"] (for ratios taken within a round)."""
    one = dataclasses.replace(s, repeats=1, warmup=0)
    # No heap trim between runs: each run here is a single timed one, and a trimmed heap would make
    # it pay for mapping fresh pages like a cold process (peak memory is then an upper bound: max over rows).
    memory = PeakMemory(s.device, trim=False)
    runs = {(f, c.factor): [] for f, c in combos}
    for rnd in range(s.warmup + s.repeats):
        timed = rnd >= s.warmup
        for frames, comp in combos:
            row = profile_row(model, frames, comp, one, memory=memory)
            if row.get("skipped"):
                return {(frames, comp.factor): row}
            if timed:
                runs[(frames, comp.factor)].append(row)
            if label:
                what = "timed" if timed else "warm-up"
                print(f"  round {rnd + 1} ({what}) {frames:>4} frames {comp.factor}x: vision "
                      f"{row['vision_tower_ms']:.0f} ms, projector {row['projector_ms']:.0f} ms, LLM prefill "
                      f"{row['llm_prefill_ms']:.0f} ms, decode {row['decode_ms_per_token']:.1f} ms/token", flush=True)
        if timed and after_round is not None:
            after_round()
    out = {}
    for key, rows in runs.items():
        merged = dict(rows[0])
        for name in MODULE_FIELDS:
            merged[name] = round(statistics.median(r[name] for r in rows), 3)
        merged["peak_memory_mb"] = max(r["peak_memory_mb"] for r in rows)
        merged["total_ms"] = round(merged["vision_tower_ms"] + merged["projector_ms"] + merged["llm_prefill_ms"]
                                   + s.decode_tokens * merged["decode_ms_per_token"], 3)
        merged["rounds"] = len(rows)
        merged.pop("samples_ms", None)
        merged["per_round"] = [{name: r[name] for name in MODULE_FIELDS} for r in rows]
        out[key] = merged
    return out


def round_ratio(a: dict, b: dict, fn) -> float:
    """Median over rounds of fn(a's round) / fn(b's round): each ratio compares runs made
    seconds apart, so a change of machine load between rounds cancels out."""
    return statistics.median(fn(x) / fn(y) for x, y in zip(a["per_round"], b["per_round"]))


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "MET" if ok else "MISSED"


def write_json(path, payload: dict, host: dict | None = None) -> None:
    if not path:
        return
    payload = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "host": host or describe_host(),
               "load_average_end": load_average(), **payload}
    atomic_write_json(path, payload, indent=2)
    print(f"wrote {path}")
