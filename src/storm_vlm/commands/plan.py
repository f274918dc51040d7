"""`storm-vlm plan --model DIR --context 32768 --minutes 60`: which frames x (pool, sample) choices fit.

Reads the model's config (no weights), enumerates frame counts and test-time sampling strides,
and prints for each the visual tokens (`StormConfig.num_visual_tokens`), whether visual + text +
answer tokens fit the context, the predicted prefill time and memory (`storm_vlm.perf.costmodel`
on a stated roofline) and the option it would pick: the most frames that fit, then the smallest
stride (`storm_vlm.planner`). `--real-size` plans for the paper's size (SigLIP-so400m + Qwen2-7B)
without a model folder.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from storm_vlm.commands import check_output_folder, int_list
from storm_vlm.errors import StormError
from storm_vlm.utils import check_int, check_model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="MODEL_DIR", help="a STORM model folder (only its config.json is read)")
    src.add_argument("--real-size", action="store_true",
                     help="plan for the paper's size: SigLIP-so400m-patch14-448 + Qwen2-7B, Mamba projector")
    parser.add_argument("--temporal-pool", type=int, default=None, metavar="K",
                        help="with --real-size: the trained temporal pooling k (default 1); a model folder has its own")
    parser.add_argument("--spatial-pool", type=int, default=None, metavar="P",
                        help="with --real-size: the trained spatial pooling p (default 1)")
    parser.add_argument("--context", type=int, default=None, metavar="TOKENS",
                        help="LLM positions to fill (default and most: the LLM's max_position_embeddings)")
    parser.add_argument("--minutes", type=float, default=None, metavar="M",
                        help="the video's length: frame counts are capped at --max-fps over it, and fps is shown")
    parser.add_argument("--frames", type=int_list, default=None, metavar="N,N,...",
                        help="frame counts to consider (default: powers of two from 8 to --max-frames)")
    parser.add_argument("--max-frames", type=int, default=1024, metavar="N", help="most frames considered (default 1024)")
    parser.add_argument("--max-fps", type=float, default=2.0, metavar="F",
                        help="with --minutes: never more frames than F per second of video (default 2)")
    parser.add_argument("--strides", type=int_list, default=[1, 2, 4, 8], metavar="S,S,...",
                        help="test-time temporal sampling strides (default 1,2,4,8)")
    parser.add_argument("--text-tokens", type=int, default=128, metavar="N",
                        help="prompt text: template + question (default 128)")
    parser.add_argument("--answer-tokens", type=int, default=256, metavar="N", help="room for the answer (default 256)")
    parser.add_argument("--max-prefill-s", type=float, default=None, metavar="S",
                        help="also require the predicted prefill to take at most S seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                        help="roofline: peak TFLOP/s of the accelerator (default: A100-80GB bf16, 312)")
    parser.add_argument("--bandwidth-gbs", type=float, default=None, metavar="G",
                        help="roofline: memory bandwidth in GB/s (default: A100-80GB, 2039)")
    parser.add_argument("--mfu", type=float, default=None, metavar="U", help="roofline: achieved share of the peak (default 0.5)")
    parser.add_argument("--bytes-per-element", type=int, default=2, choices=[1, 2, 4],
                        help="weights and activations: 2 for bf16/fp16 (default), 4 for fp32")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")


def _hardware(args):
    from storm_vlm.perf.costmodel import A100_80GB, Hardware

    if args.peak_tflops is None and args.bandwidth_gbs is None and args.mfu is None:
        return A100_80GB
    peak = A100_80GB.peak_flops if args.peak_tflops is None else args.peak_tflops * 1e12
    bandwidth = A100_80GB.bandwidth if args.bandwidth_gbs is None else args.bandwidth_gbs * 1e9
    mfu = A100_80GB.mfu if args.mfu is None else args.mfu
    if not (0 < peak < math.inf and 0 < bandwidth < math.inf and 0 < mfu <= 1):
        raise StormError("--peak-tflops and --bandwidth-gbs must be finite numbers > 0 and --mfu in (0, 1]")
    return Hardware(f"custom ({peak / 1e12:g} TFLOP/s, {bandwidth / 1e9:g} GB/s, {mfu:.0%} MFU)", peak, bandwidth, mfu)


def load_config(args):
    if args.real_size:
        from storm_vlm.perf.costmodel import real_config

        pools = {flag: check_int(flag, 1 if value is None else value, error=StormError)
                 for flag, value in (("--temporal-pool", args.temporal_pool), ("--spatial-pool", args.spatial_pool))}
        return real_config(temporal_pool_size=pools["--temporal-pool"], spatial_pool_stride=pools["--spatial-pool"])
    if args.temporal_pool is not None or args.spatial_pool is not None:
        raise StormError("--temporal-pool / --spatial-pool go with --real-size: a model folder's pooling is trained")
    path = check_model_dir(args.model)
    from storm_vlm.model.configuration import StormConfig

    try:
        return StormConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise StormError(f"{path}: cannot read the model's config ({exc})") from None


def _nothing_fits(result, args) -> str:
    """Why no option was picked, and which flag to change."""
    room = result.context - result.text_tokens - result.answer_tokens
    least = min(result.options, key=lambda o: o.visual_tokens, default=None)
    if room <= 0:
        return (f"nothing fits: the {result.text_tokens} text and {result.answer_tokens} answer tokens alone fill the "
                f"context of {result.context}; lower --text-tokens / --answer-tokens or raise --context")
    if least is not None and least.visual_tokens > room:
        return (f"nothing fits: {room} positions are left for the video, and the fewest visual tokens of any option "
                f"are {least.visual_tokens} ({least.frames} frames at s={least.sample_stride}); fewer frames, a larger "
                "stride, or a larger context")
    return (f"nothing fits: no option that fits the context predicts a prefill within --max-prefill-s "
            f"{args.max_prefill_s:g} s on {result.hardware}; raise it or give faster hardware figures")


def run(args: argparse.Namespace) -> int:
    for flag in ("max_frames", "text_tokens", "answer_tokens"):
        check_int("--" + flag.replace("_", "-"), getattr(args, flag), 0 if flag != "max_frames" else 1,
                  error=StormError)
    if args.context is not None:
        check_int("--context", args.context, error=StormError)
    if args.json:
        if Path(args.json).is_dir():
            raise StormError(f"--json {args.json}: a folder; name the file to write")
        check_output_folder(Path(args.json).parent, "--json's folder")
    from storm_vlm.planner import format_bytes, plan

    config = load_config(args)
    result = plan(config, args.context, minutes=args.minutes, frames=args.frames, strides=args.strides,
                  text_tokens=args.text_tokens, answer_tokens=args.answer_tokens, max_frames=args.max_frames,
                  max_fps=args.max_fps, hardware=_hardware(args), bytes_per_el=args.bytes_per_element,
                  max_prefill_s=args.max_prefill_s)
    source = "paper size (SigLIP-so400m + Qwen2-7B)" if args.real_size else args.model
    print(f"model: {source}; {config.tokens_per_frame} visual tokens per frame after pooling, trained temporal "
          f"pool k={config.temporal_pool_size}, spatial pool p={config.spatial_pool_stride}")
    print(f"context {result.context} = visual + {result.text_tokens} text + {result.answer_tokens} answer tokens; "
          f"prefill and memory predicted on {result.hardware} "
          f"(cost model, {args.bytes_per_element} bytes per element; memory = weights + peak activations + KV)")
    print(result.table())
    if result.chosen is None:
        print(_nothing_fits(result, args), file=sys.stderr)
    else:
        c = result.chosen
        fps = "" if c.fps is None else f" ({c.fps:.3g} fps over {args.minutes:g} min)"
        print(f"picked: {c.frames} frames{fps}, temporal sampling s={c.sample_stride}: {c.visual_tokens} visual tokens, "
              f"prefill ~{c.prefill_s:.3g} s, memory ~{format_bytes(c.memory_bytes)}")
    if args.json:
        from storm_vlm.utils import atomic_write_json

        atomic_write_json(args.json, {"model": source, **result.as_dict()})
    return 0 if result.chosen is not None else 1
