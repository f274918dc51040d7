"""Small helpers every part of storm-vlm shares: atomic files, integer checks, the label and
placeholder conventions, the checks of a model folder. Nothing here imports torch (the CLI checks its
arguments with these before loading anything heavy)."""

from __future__ import annotations

import base64
import contextlib
import difflib
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError, safe_open

from storm_vlm.errors import StormError

__all__ = [
    "IGNORE_INDEX", "VIDEO_TOKEN", "IMAGE_TOKEN", "did_you_mean", "safetensors_problem", "check_positive",
    "check_int", "atomic_path", "atomic_write_text",
    "atomic_write_json", "fsync_dir", "publish_dir", "check_model_dir", "check_links_inside", "no_custom_code",
    "check_loaded_weights", "base64_bytes", "available_memory_bytes", "yaml_problem",
]

# Label of a position the loss ignores (PyTorch's and transformers' convention).
IGNORE_INDEX = -100
# Placeholder strings: where a video's / an image's visual tokens go in a prompt.
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"


def did_you_mean(word: str, choices) -> str:
    """" (did you mean x?)" with the choice closest to a misspelt `word`, else "" (for error messages)."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete safetensors file (a copy cut short, a Git LFS pointer, another
    format), or None. Opening it parses its header, whose tensors must cover the file exactly; no
    tensor is read."""
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except (SafetensorError, OSError, ValueError) as exc:
        return str(exc)


def check_positive(name: str, value, error: type[Exception] = ValueError) -> float:
    """`value` if it is a finite number > 0 (not a bool); else `error` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise error(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_int(name: str, value, minimum: int | None = 1, maximum: int | None = None,
              error: type[Exception] = ValueError) -> int:
    """`value` as an int if it is an integer (not a bool) within [minimum, maximum]; else `error`."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Integral)
    if ok and ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        ok = False
    if not ok:
        if minimum is None and maximum is None:
            bound = ""
        elif maximum is None:
            bound = f" >= {minimum}"
        elif minimum is None:
            bound = f" <= {maximum}"
        else:
            bound = f" between {minimum} and {maximum}"
        raise error(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def _fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder entry (best effort: some file systems refuse folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error the file written
    there is flushed to disk and renamed onto `path`, so readers see the old file or the whole new
    one, never a part. The temporary keeps `path`'s suffix (writers that infer the format from it
    work). On an error the temporary is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """Write `data` as JSON to `path` atomically (see `atomic_path`)."""
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush every file below a folder, and the folder entry, to disk."""
    path = Path(path)
    for p in path.rglob("*"):
        if p.is_file():
            _fsync_path(p)
    _fsync_path(path)


def publish_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Turn a fully written `tmp_dir` into `final_dir` by renaming, replacing an older one.

    The files are flushed first, so after a crash `final_dir` is the old folder or the whole new
    one (os.replace cannot overwrite a non-empty folder, so an old one is moved aside first).
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    fsync_dir(tmp_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_path(final_dir.parent)


def check_model_dir(model_dir) -> Path:
    """The folder as a Path if it holds a STORM model's config.json; StormError naming the cause otherwise.

    A training stage's output folder (whose model is in `final/`) is named as such.
    """
    path = Path(model_dir)
    if not path.exists():
        raise StormError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise StormError(f"model folder {path} is not a folder")
    config = path / "config.json"
    if not config.is_file():
        hint = ""
        if (path / "final" / "config.json").is_file():
            hint = f"; the trained model is in {path / 'final'}"
        elif any(path.glob("*/config.json")):
            found = sorted(p.parent.name for p in path.glob("*/config.json"))[:3]
            hint = f"; model folders inside it: {', '.join(found)}"
        raise StormError(f"model folder {path} has no config.json (expected a STORM model folder from "
                         f"`storm-vlm build` or training){hint}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise StormError(f"{config}: not a readable JSON config ({exc})") from None
    if model_type != "storm":
        raise StormError(f"{config}: model_type is {model_type!r}, expected 'storm' (a STORM model folder)")
    check_links_inside(path, "model folder")
    return path


def check_links_inside(folder: str | os.PathLike, what: str) -> None:
    """StormError when a symbolic link in `folder` other than a weight file leads out of it.

    The text files of a model folder (configs, tokenizer, chat template) are then read from the
    folder itself: a link out of an unpacked archive (a chat_template.jinja linked to ~/.ssh/id_rsa)
    would put another file's contents into every prompt. Weight files (*.safetensors: tensors, their
    header checked) may link anywhere, as they do when kept on shared storage; a folder that is
    itself a link is fine, and so is a Hugging Face cache snapshot, whose files link to its
    repository's blobs (snapshots/REV/NAME -> ../../blobs/HASH).
    """
    root = Path(os.path.realpath(folder))
    roots = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    for entry in sorted(root.iterdir()):
        if entry.is_symlink() and entry.suffix != ".safetensors":
            target = Path(os.path.realpath(entry))
            if not any(target.is_relative_to(r) for r in roots):
                raise StormError(f"{what} {folder}: {entry.name} is a symbolic link to {target}, outside the folder; "
                                 "a model folder's files are read from inside it only (copy the file in)")


def _auto_map_files(folder: Path) -> list[str]:
    """The JSON files of `folder` that name classes of their own (an `auto_map` key)."""
    named = []
    for path in sorted(folder.glob("*.json")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if '"auto_map"' in path.read_text(encoding="utf-8"):
                named.append(path.name)
    return named


@contextlib.contextmanager
def no_custom_code(folder: str | os.PathLike, what: str, error: type[Exception] = StormError):
    """Around transformers loads from `folder`, which pass trust_remote_code=False: code a folder names
    (`auto_map`, or a `tokenizer_class` / `processor_class` transformers does not have) is never run, and
    transformers' refusal (a ValueError asking for trust_remote_code=True, which storm-vlm has no way to
    give) becomes one `error` naming the folder and the files that name the code."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        files = ", ".join(_auto_map_files(Path(folder))) or "its configs"
        raise error(f"{what} {folder}: {files} names Python code of its own (auto_map), which storm-vlm never "
                    "runs (no trust_remote_code); use a folder whose classes transformers has") from None


def check_loaded_weights(folder, what: str, info: dict) -> None:
    """StormError unless a transformers load (its `output_loading_info`) filled every weight from the
    folder: missing weights, or weights whose shapes do not fit the config.json (an edited
    image_size, another checkpoint's config), would silently stay random."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise StormError(f"{what} {folder}: the checkpoint lacks {len(missing)} weights ({shown})")
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise StormError(f"{what} {folder}: {len(mismatched)} of its weights do not fit its config.json "
                         f"(e.g. {key} is stored as {tuple(stored)}, the config makes it {tuple(expected)})")


def base64_bytes(text: str) -> bytes:
    """The bytes of base64 `text` (a data URL's payload); line breaks and spaces in it are skipped
    (MIME base64, as Python's base64.encodebytes writes it, breaks lines every 76 characters).
    ValueError when it is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error is one
        return base64.b64decode("".join(text.split()), validate=True)


def available_memory_bytes() -> float:
    """MemAvailable of /proc/meminfo in bytes (inf where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return math.inf


def array_key(array) -> tuple:
    """A key naming an array by its content: (SHA-256 of its bytes, shape, dtype). What a kept
    computation about decoded frames is found by: another array of the same frames has the same key."""
    data = memoryview(array.tobytes() if not array.flags.c_contiguous else array).cast("B")
    return hashlib.sha256(data).hexdigest(), tuple(array.shape), str(array.dtype)


def numbered_name_key(name: str) -> list:
    """Sort key for file names whose runs of digits are numbers, padded or not: frame_2 before
    frame_10, seg_999 before seg_1000 (the name split into text and whole numbers)."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", name)]  # isdigit: also "²"


def yaml_problem(exc: Exception) -> str:
    """A YAML parser error as one line, where and what ("line 2, column 1: expected ',' or ']', but got
    '<stream end>'"), for a message that names the file; PyYAML's own text spans several lines and
    quotes the source."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem or exc).split())
