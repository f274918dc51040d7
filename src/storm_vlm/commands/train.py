"""`storm-vlm train CONFIG.yaml [--set key=value ...] [--resume]` (alone or under torchrun)."""

from __future__ import annotations

import argparse
import logging
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (nested with dots, YAML-typed value); repeatable",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest complete checkpoint in output_dir"
    )


def run(args: argparse.Namespace) -> int:
    from storm_vlm.train import train

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    final = train(args.config, overrides=args.overrides, resume=args.resume)
    if rank == 0:
        print(f"final model: {final}")
    return 0
