"""`storm-vlm profile [MODEL_DIR | --config CONFIG] --frames ... --compression ... --output OUT`.

Per-module latency (vision tower / projector + compression / LLM prefill / decode per token) and
peak memory for every frames x compression; writes OUT/profile.json, OUT/profile.txt and two PNG
plots, and prints the table. See `storm_vlm.perf.profiler` for what is timed and how.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from storm_vlm.commands import add_precision_argument, check_output_folder, int_list
from storm_vlm.errors import StormError
from storm_vlm.planner import MAX_FRAMES
from storm_vlm.utils import check_int, check_positive

COMPRESSION_HELP = (
    "compression settings, comma separated: 1 = none, 4 = temporal pool 4, 8 = temporal pool 4 + "
    "temporal sample 2, or FACTOR=POOL:SAMPLE[:SPATIAL] (e.g. 16=4:1:2) (default: 1,4,8)"
)


def _frame_list(text: str, flag: str) -> list[int]:
    """Frame counts (`int_list`, up to the planner's MAX_FRAMES) from the command line or the config,
    each once, in the order given."""
    try:
        values = list(dict.fromkeys(int_list(text)))
    except argparse.ArgumentTypeError as exc:
        raise StormError(f"{flag}: {exc}") from None
    for value in values:
        check_int(flag, value, 1, MAX_FRAMES, error=StormError)
    return values


def _check_sources(args) -> None:
    """Exactly one of MODEL_DIR and --config, each of its own kind: a saved model is a folder, a
    profile config a YAML file."""
    if (args.model_dir is None) == (args.config is None):
        raise StormError("give exactly one of MODEL_DIR or --config CONFIG")
    if args.config is not None and Path(args.config).is_dir():
        raise StormError(f"--config {args.config}: a folder; give a saved model folder as MODEL_DIR, without --config")
    if args.model_dir is not None and Path(args.model_dir).is_file():
        raise StormError(f"{args.model_dir}: a file, not a model folder; give a profile YAML as --config CONFIG")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="a saved STORM model folder")
    parser.add_argument("--config", metavar="CONFIG",
                        help="a profile YAML (e.g. configs/bench-cpu.yaml): build a random-weight model from it")
    parser.add_argument("--frames", default=None, help="frame counts (default: 4,8,16,32,64,128,256)")
    parser.add_argument("--compression", default=None, help=COMPRESSION_HELP)
    parser.add_argument("--output", required=True, metavar="OUT", help="folder for profile.json, profile.txt and plots")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row; medians are kept (default: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs per row (default: 1)")
    parser.add_argument("--decode-tokens", type=int, default=None, metavar="K",
                        help="tokens decoded per repeat after the prefill (default: 16, or the config's)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="prompt tokens around the visual tokens (default: 64, or the config's)")
    add_precision_argument(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip rows whose estimated activations exceed this (default: free memory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="CPU timer: wall time (default) or this process's CPU time (a shared machine: leaves "
                             "out time spent waiting for a core; with --threads 1 only)")
    parser.add_argument("--no-tune-malloc", action="store_true",
                        help="CPU: keep glibc's default allocator thresholds (by default freed memory is kept for "
                             "reuse, which saves the kernel faulting in fresh pages; see "
                             "storm_vlm.perf.allocator.tune_cpu_allocator)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="CPU: run the decode step through torch.compile (needs a C++ compiler; the warm-up "
                             "steps pay the compilation; see storm_vlm.model.fast_paths)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def run(args: argparse.Namespace) -> int:
    import torch

    from storm_vlm.model.fast_paths import enable_fast_paths
    from storm_vlm.perf.allocator import tune_cpu_allocator
    from storm_vlm.perf.costmodel import parse_compressions
    from storm_vlm.perf.host import host_summary, load_line
    from storm_vlm.perf.profiler import (
        ProfileSettings,
        build_random_model,
        load_model_config,
        load_saved_model,
        profile_model,
    )
    from storm_vlm.perf.report import format_table, plot_profile, write_profile
    from storm_vlm.precision import cpu_has_fast_bf16

    _check_sources(args)
    if args.max_memory_gb is not None:
        check_positive("--max-memory-gb", args.max_memory_gb, StormError)
    defaults: dict = {}
    config = None
    if args.config is not None:
        config, defaults = load_model_config(args.config)

    def pick(value, key, fallback):
        return value if value is not None else defaults.get(key, fallback)

    frames = pick(args.frames, "frames", "4,8,16,32,64,128,256")
    comp = pick(args.compression, "compression", "1,4,8")
    try:
        compressions = list(dict.fromkeys(parse_compressions(str(comp))))
    except ValueError as exc:
        raise StormError(f"--compression: {exc}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = ProfileSettings(
        frames=_frame_list(str(frames), "--frames"),
        compressions=compressions,
        repeats=pick(args.repeats, "repeats", 3),
        warmup=pick(args.warmup, "warmup", 1),
        decode_tokens=pick(args.decode_tokens, "decode_tokens", 16),
        text_tokens=pick(args.text_tokens, "text_tokens", 64),
        precision=args.precision,
        device=device,
        seed=args.seed,
        max_memory_gb=args.max_memory_gb,
        clock=args.clock,
    )
    settings.validate()
    if args.threads is not None:
        check_int("--threads", args.threads, error=StormError)
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    if settings.clock == "cpu" and device == "cpu" and threads != 1:
        # process CPU time adds up every thread's time: with N threads it reads up to N times the latency
        raise StormError(f"--clock cpu needs one torch thread (--threads 1); this run would use {threads}"
                         f"{'' if args.threads is not None else ' (torch default)'}")
    check_output_folder(args.output, "--output")  # before the model is built and profiled
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device == "cpu" and not args.no_tune_malloc:
        tune_cpu_allocator()

    if config is not None:
        model = build_random_model(config, seed=args.seed)
        source = f"random weights from {args.config}"
    else:
        model = load_saved_model(args.model_dir, settings)
        source = str(args.model_dir)
    if args.compile_decode:
        enable_fast_paths(model, compile_decode=True)
        source += " (compiled decode step)"
    print(host_summary())
    if settings.resolved.autocast == torch.bfloat16 and device == "cpu" and not cpu_has_fast_bf16():
        print("note: this CPU has no native bf16 (oneDNN's check): bfloat16 is emulated here and far slower than "
              "float32 (--precision auto picks float32 on it)", file=sys.stderr)
    result = profile_model(model, settings, source=source)
    path = write_profile(result, args.output)
    print(format_table(result))
    if not args.no_plots:
        for p in plot_profile(result, args.output):
            print(f"wrote {p}")
    print(f"wrote {path}")
    print(load_line())
    return 0
