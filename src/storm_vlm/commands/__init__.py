"""One module per `storm-vlm` subcommand: add_arguments(parser) and run(args) -> int.

Modules import only light things at the top (argparse, storm_vlm.errors, storm_vlm.precision's
names), so `storm-vlm COMMAND --help` starts at once; `run` imports torch and the model code.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

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


def check_output_folder(path, flag: str, *, parent_only: bool = False) -> Path:
    """Create the output folder `path` with its parents (with `parent_only` only the parents: for a
    command that publishes the folder whole by renaming) and write a scratch file where the outputs
    go. A location that cannot be used (a file in the way, no permission, a read-only disk) is then
    one StormError naming the flag, the path and the cause before any model loads or job runs,
    not a traceback when the results are written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StormError(f"{flag} {path}: exists and is not a folder")
    where = path.parent if parent_only else path
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        blocking = next((p for p in (where, *where.parents) if p.exists()), None)
        cause = f"{blocking} is a file" if blocking is not None and not blocking.is_dir() else exc.strerror or exc
        raise StormError(f"{flag} {path}: cannot write there ({cause})") from None
    return path


def check_model_then_media(model: str, media: str, media_name: str) -> None:
    """The two positional arguments `MODEL_DIR <media_name>` in their order: a model folder given as
    the media, or the two swapped, is said so (the checks of either alone would only say that a video
    is not a folder, or that a folder holds no frames)."""
    if not os.path.isfile(os.path.join(media, "config.json")):
        return
    if os.path.isfile(model):
        raise StormError(f"{model} is not a model folder and {media} is: the model folder comes first "
                         f"(MODEL_DIR {media_name})")
    raise StormError(f"{media}: a model folder (it holds config.json), not a video ({media_name})")
