"""Accuracy on a long video under a token budget: early vs recent events, streamed vs one-shot.

    PYTHONPATH=src python benchmarks/stream_accuracy.py --train runs/stream-acc   # train, then measure
    PYTHONPATH=src python benchmarks/stream_accuracy.py --model runs/stream-acc/storm_pool4_causal/final

`--train OUT` first trains a tiny causal STORM with the demo's recipe (`storm_vlm.demo`: its
synthetic benchmark, the "STORM + temporal pool k=4" variant on 128-frame videos, 250 steps, with
`projector_bidirectional=False`); it takes minutes on a CPU. An untrained model's accuracy means
nothing, so without a trained model there is nothing to measure here.

The test: a long video (--frames, default 512: eight and a half minutes at 1 fps, four times the
frames the model was trained on) in which a large coloured square flashes for a single frame,
either early (within the first --window frames, the first minute at 1 fps) or recent (within the
last --window frames); the question asks which colour flashed (4 options, chance 25 %). The LLM
reads at most --budget visual tokens (default: what the model was trained with, 128 frames'
worth), read in one of these ways:

- stream + resample / uniform / window: `StormStream` fed 16 frames at a time with that memory
  policy (`storm_vlm.streaming.memory`), asked at the end;
- one-shot, all frames, test-time sampling: every frame through the projector, then every s-th
  pooled frame kept (s the smallest that fits the budget; the paper's operation);
- one-shot, uniformly sampled frames: as many raw frames as fit the budget, spread evenly (what a
  video-LLM without streaming does with a long video);
- reference, all frames, no budget: every pooled frame (4x the budget's tokens) — what a stream
  without a memory limit answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from storm_vlm.commands import positive_int


def train(out: Path) -> Path:
    """Train the tiny causal model with the demo's recipe; returns its final folder."""
    import torch

    from storm_vlm.demo.phases import _MemoDataset, make_data, train_config
    from storm_vlm.demo.settings import DemoSettings
    from storm_vlm.train import train as run_training
    from storm_vlm.train.config import config_from_dict

    settings = DemoSettings.default()
    make_data(out / "data", settings, workers=1)
    spec = dict(settings=settings.to_dict(), variant="storm_pool4", seed=0, data_dir=str(out / "data"),
                output_dir=str(out / "storm_pool4_causal"))
    raw = train_config(spec)
    raw["tiny"]["projector_bidirectional"] = False
    cfg = config_from_dict(raw, source="stream_accuracy")
    torch.manual_seed(cfg.seed)
    return run_training(cfg, dataset_wrapper=_MemoDataset)


def flash_video(rng, num_frames: int, size: int, where: str, window: int, answer: str):
    """(frames, options, flash frame index): render_transient until the flash is early / recent."""
    from storm_vlm.demo.synth_tasks import render_transient

    while True:
        rendered = render_transient(rng, num_frames, size, answer)
        f = rendered.frames.astype(np.int16)
        saturated = (f.max(-1) - f.min(-1) > 80).any(axis=(1, 2))
        t = int(np.flatnonzero(saturated)[0])
        if (where == "early" and t < window) or (where == "recent" and t >= num_frames - window):
            return rendered.frames, rendered.options, t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a trained STORM model folder with a causal projector")
    src.add_argument("--train", metavar="OUT", help="train the tiny causal model under OUT first")
    p.add_argument("--frames", type=positive_int, default=512, help="frames of each long video (default 512)")
    p.add_argument("--window", type=positive_int, default=60,
                   help="early / recent: within this many frames of an end (60)")
    p.add_argument("--videos", type=positive_int, default=40, help="videos per position, early and recent (default 40)")
    p.add_argument("--budget", type=positive_int, default=None, help="visual tokens (default: 128 frames' worth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)

    import torch

    from storm_vlm.choices import extract_choice, format_question
    from storm_vlm.demo.synth_tasks import QUESTIONS
    from storm_vlm.inference import Predictor
    from storm_vlm.planner import fit_stride
    from storm_vlm.streaming.stream import StormStream
    from storm_vlm.video import uniform_indices

    torch.set_num_threads(1)
    model_dir = train(Path(args.train)) if args.train else Path(args.model)
    predictor = Predictor.from_pretrained(model_dir, "cpu", "float32", max_new_tokens=4)
    config = predictor.model.config
    budget = args.budget or config.num_visual_tokens(128)
    stride = fit_stride(config, [args.frames], 0, context=budget)
    raw_frames = max(n for n in range(1, args.frames + 1) if config.num_visual_tokens(n) <= budget)
    sampled = Predictor(predictor.model, predictor.processor, temporal_sample_stride=stride, max_new_tokens=4)
    size = config.vision_config.image_size

    def streamed(policy):
        def run(frames, prompt):
            stream = StormStream(predictor, max_visual_tokens=budget, memory_policy=policy)
            for i in range(0, len(frames), 16):
                stream.feed(frames[i:i + 16])
            return stream.ask(prompt, max_new_tokens=4).text
        return run

    methods = {
        "stream + resample (default policy)": streamed("resample"),
        "stream + uniform": streamed("uniform"),
        "stream + window": streamed("window"),
        f"one-shot, all frames, test-time sampling s={stride}": lambda fr, pr: sampled.reply(pr, fr),
        f"one-shot, {raw_frames} uniformly sampled frames": lambda fr, pr: predictor.reply(
            pr, fr[uniform_indices(len(fr), raw_frames)[0]]),
        f"reference: all frames, no budget ({config.num_visual_tokens(args.frames)} tokens)":
            lambda fr, pr: predictor.reply(pr, fr),
    }
    rng = np.random.default_rng(args.seed)
    correct = {m: {"early": 0, "recent": 0} for m in methods}
    start = time.perf_counter()
    for where in ("early", "recent"):
        for i in range(args.videos):
            frames, options, _ = flash_video(rng, args.frames, size, where, args.window, "ABCD"[i % 4])
            prompt = format_question(QUESTIONS["transient"], options)
            for name, run in methods.items():
                choice = extract_choice(run(frames, prompt), options)
                correct[name][where] += int(choice == i % 4)
    wall = time.perf_counter() - start
    print(f"model {model_dir}; {args.frames}-frame videos, a one-frame flash within the first / last {args.window} "
          f"frames, {args.videos} videos each; budget {budget} visual tokens; chance 25 %; {wall:.0f} s")
    print("| read as | visual tokens | early event % | recent event % |")
    print("|---|---:|---:|---:|")
    out = []
    for name in methods:
        tokens = config.num_visual_tokens(args.frames) if name.startswith("reference") else budget
        e, r = (100.0 * correct[name][w] / args.videos for w in ("early", "recent"))
        out.append({"method": name, "visual_tokens": tokens, "early": e, "recent": r})
        print(f"| {name} | <= {tokens} | {e:.1f} | {r:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model_dir), "args": vars(args), "rows": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
