"""Shared plumbing of the latency benchmarks (prefill.py, decode.py, memory.py).

Every benchmark measures the bench-cpu model (configs/bench-cpu.yaml, random weights, the real
model's proportions) by default, or a saved model folder; it prints ratios measured in one run,
because absolute times on a shared machine drift.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_CONFIG = ROOT / "configs" / "bench-cpu.yaml"


def parser(description: str, repeats: int, warmup: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("model_dir", nargs="?", help="a saved STORM model (default: random bench-cpu model)")
    p.add_argument("--config", default=None, help=f"profile YAML (default: {DEFAULT_CONFIG.relative_to(ROOT)})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", "--dtype", dest="precision", default="float32",
                   help="a storm_vlm.precision name: auto, float32, bfloat16 (default: float32)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the machine is shared; oversubscribed OpenMP threads "
                        "were ~10x slower here)")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default: the config's, 4 for bench-cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the measured rows and ratios here")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="CPU timer: wall time (default) or this process's CPU time, which leaves out the time spent "
                        "waiting for a core on a shared machine (meaningful with --threads 1)")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="CPU: keep glibc's default allocator thresholds (default: freed memory is kept for reuse, "
                        "see storm_vlm.perf.allocator.tune_cpu_allocator)")
    return p


def load(args):
    """(model, source, profile defaults) from the arguments; sets threads."""
    import torch

    from storm_vlm.perf.profiling import build_random_model, load_model, load_model_config, tune_cpu_allocator

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        if not args.no_tune_malloc:
            tune_cpu_allocator()
    if args.model_dir:
        return load_model(args.model_dir), args.model_dir, {}
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    config, defaults = load_model_config(path)
    return build_random_model(config), f"random weights from {path}", defaults


def settings(args, defaults, frames, compressions, decode_tokens):
    from storm_vlm.perf.profiling import ProfileSettings

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


def prepare(model, s):
    import torch

    return model.to(device=s.device, dtype=s.resolved.weights).eval()


def header(name: str, source: str, s) -> None:
    import torch

    print(f"== {name} ==")
    print(f"model: {source}")
    from storm_vlm.perf.profiling import _ALLOCATOR_STATE

    alloc = "tuned (freed memory reused)" if _ALLOCATOR_STATE.get("tuned") else "glibc defaults"
    print(f"device {s.device}, {s.dtype}, torch threads {torch.get_num_threads()}, repeats {s.repeats} "
          f"(+{s.warmup} warm-up), text tokens {s.text_tokens}; allocator {alloc}; clock "
          f"{'CPU time of this process' if s.clock == 'cpu' else 'wall'}; load average {_load()}")


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def interleaved(model, combos, s, label=True) -> dict:
    """Measure (frames, Compression) combos round-robin: `s.warmup` untimed rounds, then `s.repeats`
    timed rounds of one run per combo, so load drift on a shared machine hits every combo alike.
    Returns {(frames, factor): row} with per-module medians over the rounds (peak memory: max) and
    the rounds' own figures in row["per_round"] (for ratios taken within a round)."""
    import dataclasses
    import statistics

    from storm_vlm.perf.profiling import _Memory, profile_row

    one = dataclasses.replace(s, repeats=1, warmup=0)
    # No heap trim between runs: each run here is a single timed one, and a trimmed heap would make
    # it pay the page faults of a cold process (peak memory is then an upper bound: max over rows).
    memory = _Memory(s.device, trim=False)
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
    out = {}
    for key, rows in runs.items():
        merged = dict(rows[0])
        for field in ("vision_tower_ms", "projector_ms", "llm_prefill_ms", "decode_ms_per_token"):
            merged[field] = round(statistics.median(r[field] for r in rows), 3)
        merged["peak_memory_mb"] = max(r["peak_memory_mb"] for r in rows)
        merged["total_ms"] = round(merged["vision_tower_ms"] + merged["projector_ms"] + merged["llm_prefill_ms"]
                                   + s.decode_tokens * merged["decode_ms_per_token"], 3)
        merged["rounds"] = len(rows)
        merged.pop("samples_ms", None)
        merged["per_round"] = [{f: r[f] for f in ("vision_tower_ms", "projector_ms", "llm_prefill_ms",
                                                 "decode_ms_per_token")} for r in rows]
        out[key] = merged
    return out


def round_ratio(a: dict, b: dict, fn) -> float:
    """Median over rounds of fn(a's round) / fn(b's round): each ratio compares runs made
    seconds apart, so a change of machine load between rounds cancels out."""
    import statistics

    return statistics.median(fn(x) / fn(y) for x, y in zip(a["per_round"], b["per_round"]))


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "MET" if ok else "MISSED"


def write_json(path, payload: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": _load(), **payload}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")
