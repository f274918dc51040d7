"""`storm-vlm demo`: the paper's claims tested on the synthetic benchmark (STORM vs the VILA baseline)."""

from __future__ import annotations

import argparse

from storm_vlm.commands import check_output_folder
from storm_vlm.errors import StormError
from storm_vlm.utils import check_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--seeds", type=int, default=3, metavar="N",
                        help="train every variant with seeds 0..N-1; intervals cover seeds and questions (default: 3)")
    parser.add_argument("--tiny", action="store_true",
                        help="a short smoke run with toy sizes (numbers mean nothing, the pipeline is real)")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="training steps per model")
    parser.add_argument("--train-per-task", type=int, default=None, metavar="N", help="training videos per task")
    parser.add_argument("--questions", type=int, default=None, metavar="N", help="held-out questions per task")
    parser.add_argument("--tasks", default=None, metavar="T1,T2",
                        help="synthetic tasks to train and test (default: flash_order,transient,static; all: "
                             "transient,order,direction,count,static,flash_order,step)")
    parser.add_argument("--jobs", type=int, default=None, metavar="J",
                        help="parallel worker processes for training and evaluation (default: CPU cores, at most 4)")
    parser.add_argument("--threads", type=int, default=1, metavar="T", help="torch threads per job (default: 1)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the demo's earlier data, models and results in --output and start over")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    from storm_vlm.demo.runner import run_demo
    from storm_vlm.demo.settings import DemoSettings

    overrides = {}
    for flag, key in (("--steps", "steps"), ("--train-per-task", "train_per_task"), ("--questions", "test_per_task")):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            overrides[key] = check_int(flag, value, error=StormError)
    if args.tasks is not None:
        overrides["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    settings = DemoSettings.tiny_preset(**overrides) if args.tiny else DemoSettings.default(**overrides)
    check_output_folder(args.output, "--output")
    run_demo(args.output, settings=settings, seeds=args.seeds, jobs=args.jobs, threads=args.threads,
             fresh=args.fresh, progress=not args.no_progress)
    return 0
