"""Several questions about one video, as Video-MME (3 per video) or MLVU ask them: each computed
from scratch against each continuing from the previous question's KV cache of the video
(`Predictor`'s `reuse_prefix`, what `storm-vlm eval --batch-size 1` does), in one run.

    python benchmarks/eval_reuse.py                        # a random model (serve_throughput's), 32 frames
    python benchmarks/eval_reuse.py runs/demo/models/storm/final --frames 64 --questions 5

Rounds alternate the two predictors over the same `--questions` questions (frames decoded once,
as the evaluation runner shares them); the first round is a warm-up. Printed: seconds per
question, the ratio, and how many answers differ (greedy: in float32 there should be none).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _profile_common import one_line_errors
from serve_throughput import QUESTIONS, bench_model
from storm_vlm.commands import add_precision_argument, positive_int
from storm_vlm.demo.synth_tasks import render_transient
from storm_vlm.inference import Predictor
from storm_vlm.perf.host import host_summary, load_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", help="a STORM model folder (default: random weights)")
    p.add_argument("--frames", type=positive_int, default=32, help="frames of the video (default: 32)")
    p.add_argument("--questions", type=positive_int, default=3, help="questions about it (default: 3)")
    p.add_argument("--rounds", type=positive_int, default=3, help="timed rounds (default: 3)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8)
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="torch threads")
    add_precision_argument(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="storm-eval-reuse-") as work, one_line_errors():  # the random model
        return run(args, Path(work))


def run(args, work: Path) -> int:
    model_dir = bench_model(args.model_dir, work)
    loaded = Predictor.from_pretrained(model_dir, "cpu", args.precision)

    def predictor(reuse: bool) -> Predictor:  # a new one per round: the video unseen
        return Predictor(loaded.model, loaded.processor, max_new_tokens=args.max_new_tokens,
                         precision=loaded.precision, reuse_prefix=reuse)

    frames = render_transient(np.random.default_rng(0), args.frames, loaded.processor.image_size, "A").frames
    questions = [f"{QUESTIONS[i % len(QUESTIONS)]} ({i + 1})" for i in range(args.questions)]

    print(f"# eval reuse: {model_dir}, {args.frames} frames, {args.questions} questions per video, "
          f"{args.max_new_tokens} new tokens, {args.threads} torch thread(s), precision {args.precision}")
    print("# " + host_summary().replace("\n", "\n# "), flush=True)
    seconds = {"reuse": [], "scratch": []}
    answers = {}
    for rnd in range(args.rounds + 1):
        for name, reuse in (("reuse", True), ("scratch", False)):
            asker = predictor(reuse)
            t = time.perf_counter()
            answers[name] = [asker.reply(q, frames) for q in questions]
            if rnd:
                seconds[name].append((time.perf_counter() - t) / len(questions))
    reuse, scratch_s = statistics.median(seconds["reuse"]), statistics.median(seconds["scratch"])
    differ = sum(a != b for a, b in zip(answers["reuse"], answers["scratch"]))
    print(f"\n| {args.questions} questions about one video | s per question |\n|---|---:|")
    print(f"| continuing from the video's KV cache (the default) | {reuse:.3f} |")
    print(f"| each from scratch (--no-prefix-reuse) | {scratch_s:.3f} |")
    print(f"| speed-up | {scratch_s / reuse:.2f}x |\n| answers that differ | {differ} |")
    print(f"\n# {load_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
