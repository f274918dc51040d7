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


def int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1 (frame counts, strides)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"  # argparse names the type in its errors
    return parse


positive_int = _int_at_least(1)  # argparse types: counts (threads, repeats, frames, tokens)
non_negative_int = _int_at_least(0)  # warm-up runs, prompt tokens
