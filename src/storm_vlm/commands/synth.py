"""`storm-vlm synth OUT_DIR [--videos N] [--frames T] [--size PX] [--seed S] [--answers text]`: the synthetic benchmark.

Writes OUT_DIR/videos/*.mp4, train.json (LLaVA conversations; `--answers text` makes the
assistant turns the option's text instead of its letter), test.json (evaluation records),
images/*.png + align.json (image-caption pairs) and meta.json.
"""

from __future__ import annotations

import argparse
import time

from storm_vlm.commands import check_output_folder

_FLAG_NAMES = {"num_videos": "--videos", "num_frames": "--frames", "size": "--size", "seed": "--seed",
               "split": "--test-fraction", "tasks": "--tasks", "num_images": "--images", "fps": "--fps",
               "answers": "--answers"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from storm_vlm.demo.synth_tasks import TASKS

    parser.add_argument("out_dir", help="output folder (created if missing)")
    parser.add_argument("--videos", type=int, default=200, help="number of videos/questions (default 200)")
    parser.add_argument("--frames", type=int, default=128, help="frames per video, 16..512 (default 128)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels, multiple of 8 (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same files")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of each task's videos held out for test.json (default 0.2)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated subset of {','.join(TASKS)} (default: all {len(TASKS)})")
    parser.add_argument("--images", type=int, default=None, help="image-caption pairs (default: --videos)")
    parser.add_argument("--fps", type=float, default=8, help="frame rate written in the files (default 8)")
    parser.add_argument("--answers", choices=("letter", "text"), default="letter",
                        help="train.json's answers: the option's letter (default) or its text ('red'), which a "
                             "model trained from scratch learns far sooner; test.json is the same either way")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")


def run(args) -> int:
    from storm_vlm.demo.synth import generate_synthetic_benchmark, validate_synth_args
    from storm_vlm.errors import StormError

    num_images = args.videos if args.images is None else args.images
    tasks = validate_synth_args(args.videos, args.frames, args.size, args.seed, args.test_fraction, args.tasks,
                                num_images, args.fps, names=_FLAG_NAMES, answers=args.answers)
    if args.workers is not None and args.workers < 1:
        raise StormError(f"--workers={args.workers}: must be >= 1")
    check_output_folder(args.out_dir, "OUT_DIR")
    start = time.perf_counter()
    meta = generate_synthetic_benchmark(args.out_dir, num_videos=args.videos, num_frames=args.frames,
                                        size=args.size, seed=args.seed, split=args.test_fraction, tasks=tasks,
                                        num_images=num_images, fps=args.fps, workers=args.workers,
                                        answers=args.answers)
    seconds = time.perf_counter() - start
    print(f"wrote {meta['num_videos']} videos ({meta['frames']} frames, {meta['size']}px, {meta['codec']}), "
          f"{meta['num_train']} train / {meta['num_test']} test questions and {meta['num_images']} captioned "
          f"images to {args.out_dir} in {seconds:.1f} s"
          + (" (train.json answers are the options' texts)" if meta["answers"] == "text" else ""))
    for task, c in meta["task_counts"].items():
        print(f"  {task:<10} train {c['train']:>5}  test {c['test']:>5}")
    return 0
