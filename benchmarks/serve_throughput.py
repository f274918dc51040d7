"""Answers per minute of `StormEngine` at 1, 4 and 8 concurrent clients, batched vs one at a time.

    python benchmarks/serve_throughput.py                  # a random model: LLM 512 wide x 8 layers
    python benchmarks/serve_throughput.py runs/demo/models/storm/final --frames 32

Each client is a thread that asks, one after the other, `--requests` questions about a video
(decoding included, as a server does) through `StormEngine.answer`; all clients of a row start
together. Both engines (`--max-batch-size 8` and 1) are loaded in this process and the rows
alternate between them, so the ratio compares like with like. Also printed: each row's mean
batch size and the answers it produced that differ from the one-at-a-time answers (greedy
decoding: in float32 there should be none; under `--precision bfloat16`, `auto`'s choice on CPUs with
native bf16, a padded batch's prefill rounds differently from a request's alone, and a random model's
near-tied tokens can then flip). These engines keep nothing from one request for the next
(`video_cache_mb=0`, `prefix_cache_mb=0`), so every question encodes and prefills its video, as
questions about different videos do.

A second table: one client asks `--requests` questions about one video, through an engine with
its caches (the default: `--video-cache-mb`, `--prefix-cache-mb`) and one without, alternating
question by question. With them the video is encoded and prefilled once, and each later question
prefills only its own tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from _profile_common import one_line_errors
from storm_vlm.commands import add_precision_argument, int_list, positive_int
from storm_vlm.demo.synth import pick_codec, write_mp4
from storm_vlm.demo.synth_tasks import render_transient
from storm_vlm.demo.tiny import build_tiny_model
from storm_vlm.perf.host import host_summary, load_line
from storm_vlm.serve.engine import StormEngine

# The default model: random weights, an LLM large enough that a decode step costs more than the
# per-request work around it (decoding the video, the processor), as at real size.
BENCH_PARTS = dict(image_size=64, patch_size=8, llm_hidden=512, llm_layers=8, llm_heads=8, llm_kv_heads=2,
                   llm_intermediate=1536)
QUESTIONS = ["A coloured square flashes for a single frame. What colour was the flash?",
             "What colour is the square?", "Which colour appears?", "Describe the video."]


def bench_model(model_dir: str | None, work: Path) -> Path:
    """`model_dir`, or a random model of BENCH_PARTS built in `work`."""
    if model_dir:
        return Path(model_dir)
    return build_tiny_model(work / "bench", parts_kwargs=BENCH_PARTS, projector_num_layers=2)


def run_row(engine: StormEngine, video: str, clients: int, requests: int, frames: int, max_new_tokens: int):
    answers: dict[tuple[int, int], str] = {}
    sizes: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for r in range(requests):
            result = engine.answer(video, QUESTIONS[(c + r) % len(QUESTIONS)], num_frames=frames,
                                   max_new_tokens=max_new_tokens)
            with lock:
                answers[c, r] = result["answer"]
                sizes.append(result["timings"].get("batch_size", 1))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return 60.0 * clients * requests / seconds, statistics.mean(sizes), answers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", help="a STORM model folder (default: random weights, see BENCH_PARTS)")
    p.add_argument("--clients", type=int_list, default=[1, 4, 8], help="concurrent clients per row (default: 1,4,8)")
    p.add_argument("--requests", type=positive_int, default=8, help="questions per client (default: 8)")
    p.add_argument("--frames", type=positive_int, default=32, help="frames per video (default: 32)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8)
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    add_precision_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the random model and the video go into `work`
    with tempfile.TemporaryDirectory(prefix="storm-serve-bench-") as work, one_line_errors():
        return run(args, Path(work))


def run(args, work: Path) -> int:
    model_dir = bench_model(args.model_dir, work)
    video = work / "flash.mp4"
    write_mp4(str(video), render_transient(np.random.default_rng(0), 128, 64, "A").frames, 8, pick_codec(None))

    print(f"# serve throughput: {model_dir}, {args.frames} frames, {args.max_new_tokens} new tokens, "
          f"{args.requests} questions per client, {args.threads} torch thread(s), precision {args.precision}")
    print("# " + host_summary().replace("\n", "\n# "), flush=True)
    engines = {name: StormEngine(model_dir, precision=args.precision, default_frames=args.frames, max_frames=args.frames,
                                 max_batch_size=size, video_cache_mb=0, prefix_cache_mb=0)
               for name, size in (("batched (8)", 8), ("one at a time", 1))}
    for engine in engines.values():  # warm-up
        engine.answer(video, QUESTIONS[0], num_frames=args.frames, max_new_tokens=args.max_new_tokens)
    rows = []
    for clients in args.clients:
        result = {}
        for name, engine in engines.items():
            result[name] = run_row(engine, str(video), clients, args.requests, args.frames, args.max_new_tokens)
        reference = result["one at a time"][2]
        differ = sum(result["batched (8)"][2][k] != v for k, v in reference.items())
        rows.append((clients, result, differ))
        print(f"  {clients} clients done", file=sys.stderr, flush=True)
    print()
    print("| clients | batched (8): answers/min | mean batch | one at a time: answers/min | speed-up | "
          "answers that differ |")
    print("|---:|---:|---:|---:|---:|---:|")
    for clients, result, differ in rows:
        (batched, size, _), (single, _, _) = result["batched (8)"], result["one at a time"]
        print(f"| {clients} | {batched:.1f} | {size:.2f} | {single:.1f} | {batched / single:.2f}x | {differ} |")
    for engine in engines.values():
        engine.close()
    conversation(model_dir, str(video), args)
    print(f"\n# {load_line()}")
    return 0


def conversation(model_dir, video: str, args) -> None:
    """One client, `args.requests` questions about one video: caches on vs off, alternating."""
    engines = {"caches on": StormEngine(model_dir, precision=args.precision, default_frames=args.frames,
                                        max_frames=args.frames, max_batch_size=1),
               "caches off": StormEngine(model_dir, precision=args.precision, default_frames=args.frames,
                                         max_frames=args.frames, max_batch_size=1, video_cache_mb=0, prefix_cache_mb=0)}
    seconds = dict.fromkeys(engines, 0.0)
    answers = {name: [] for name in engines}
    for r in range(args.requests):
        for name, engine in engines.items():
            t = time.perf_counter()
            answers[name].append(engine.answer(video, QUESTIONS[r % len(QUESTIONS)], num_frames=args.frames,
                                               max_new_tokens=args.max_new_tokens)["answer"])
            seconds[name] += time.perf_counter() - t
    on, off = (60.0 * args.requests / seconds[name] for name in engines)
    differ = sum(a != b for a, b in zip(answers["caches on"], answers["caches off"]))
    print(f"\n| {args.requests} questions about one video | answers/min |\n|---|---:|")
    print(f"| video and prefix caches on (the default) | {on:.1f} |\n| caches off | {off:.1f} |")
    print(f"| speed-up | {on / off:.2f}x |\n| answers that differ | {differ} |")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    raise SystemExit(main())
