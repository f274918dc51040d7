"""`storm-vlm eval MODEL_DIR --benchmark NAME --data-root DIR --output OUT`: evaluate on a benchmark.

Predictions are appended to OUT/predictions.jsonl as they are made, so an interrupted run
resumes where it stopped when rerun with the same arguments. Under torchrun each rank
takes a disjoint shard and rank 0 writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from storm_vlm.commands import add_precision_argument, check_output_folder
from storm_vlm.errors import StormError
from storm_vlm.utils import check_model_dir, check_positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from storm_vlm.eval.readers import READERS

    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a saved STORM model folder (config.json + safetensors + processor)")
    parser.add_argument("--benchmark", required=True, choices=sorted(READERS), help="which benchmark layout to read")
    parser.add_argument("--data-root", required=True,
                        help="the benchmark's folder, as released or as the Hub copy unpacks (docs/evaluation.md)")
    parser.add_argument("--output", required=True, help="output folder (predictions.jsonl, results.json, results.md)")
    parser.add_argument("--frames", type=int, default=32, help="frames sampled per video (default 32)")
    parser.add_argument("--fps", type=float, default=None, help="sample at this rate instead (capped at --frames)")
    parser.add_argument("--temporal-sample", type=int, default=None, metavar="S",
                        help="test-time temporal sampling stride (default: the model's setting)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy decoding budget (default 16)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="questions answered per padded generate call (default 1)")
    parser.add_argument("--no-prefix-reuse", action="store_true",
                        help="compute every question from scratch; by default (--batch-size 1) a video's next question "
                             "continues from the previous one's KV cache of the video, which answers the same up to "
                             "float rounding in a fraction of the time")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add_precision_argument(parser)
    parser.add_argument("--retry-failed", action="store_true",
                        help="on a rerun, also try again the videos that failed to decode before "
                             "(questions the model failed on are always tried again)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check(args) -> None:
    if args.frames < 1:
        raise StormError(f"--frames must be >= 1, got {args.frames}")
    if args.fps is not None:
        check_positive("--fps", args.fps, StormError)
    if args.temporal_sample is not None and args.temporal_sample < 1:
        raise StormError(f"--temporal-sample must be >= 1, got {args.temporal_sample}")
    if args.limit is not None and args.limit < 1:
        raise StormError(f"--limit must be >= 1, got {args.limit}")
    if args.max_new_tokens < 1:
        raise StormError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise StormError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model_dir(args.model_dir)


def _init_distributed(world_size: int) -> None:
    import torch.distributed as dist

    if world_size > 1 and not dist.is_initialized():
        # gloo only carries the barrier: long shards need a generous timeout
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))


def run(args) -> int:
    import torch.distributed as dist

    from storm_vlm.eval.model_predictor import evaluate
    from storm_vlm.eval.readers import load_benchmark
    from storm_vlm.eval.runner import dist_env
    from storm_vlm.inference import load_model, resolve_device
    from storm_vlm.precision import resolve_precision

    _check(args)
    records = load_benchmark(args.benchmark, args.data_root)
    if not records:
        raise StormError(f"{args.data_root}: its {args.benchmark} annotations hold no questions")
    check_output_folder(args.output, "--output")  # before the model loads
    rank, world_size = dist_env()
    _init_distributed(world_size)
    try:
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        model, processor = load_model(args.model_dir, device, precision, verbose=True)
        results = evaluate(model, processor, records, args.output, num_frames=args.frames, precision=precision,
                           temporal_sample_stride=args.temporal_sample, fps=args.fps, limit=args.limit,
                           max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
                           model_dir=str(Path(args.model_dir).resolve()), rank=rank, world_size=world_size,
                           retry_failed=args.retry_failed, batch_size=args.batch_size,
                           reuse_prefix=not args.no_prefix_reuse,
                           data_root=str(Path(args.data_root).expanduser().resolve()))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if results is not None:
        print(f"results: {Path(args.output) / 'results.json'}")
    return 0
