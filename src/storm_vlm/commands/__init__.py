"""One module per `storm-vlm` subcommand: add_arguments(parser) and run(args) -> int.

Modules import only light things at the top (argparse, storm_vlm.errors, storm_vlm.precision's
names), so `storm-vlm COMMAND --help` starts at once; `run` imports torch and the model code.
"""

from __future__ import annotations

import argparse

from storm_vlm.errors import StormError
from storm_vlm.precision import PRECISION_HELP, PRECISIONS, parse_precision


def _precision(value: str) -> str:
    try:
        return parse_precision(value)
    except StormError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_precision_argument(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """`--precision` (alias `--dtype`), the vocabulary every command shares (storm_vlm.precision)."""
    parser.add_argument("--precision", "--dtype", dest="precision", type=_precision, default=default,
                        metavar="{" + ",".join(PRECISIONS) + "}", help=f"{PRECISION_HELP} (default: {default})")
