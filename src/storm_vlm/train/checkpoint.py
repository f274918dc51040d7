"""Crash-safe checkpoints: atomic folders, weights_only-safe optimizer files, JSON RNG states.

Layout of `output_dir/checkpoint-<step>/`:
    config.json, model.safetensors (or shards), processor files   a complete STORM model folder
    trainable.safetensors        LoRA runs only: the trainable parameters under their PEFT names
    optimizer.pt                 optimizer state (tensors + plain values; loaded with weights_only=True)
    scheduler.json               LR scheduler state
    rng_state_<rank>.json        python / numpy / torch (and CUDA) RNG states of every rank
    trainer_state.json           step, epoch, step_in_epoch, global batch, record count, world size,
                                 skipped-media count, config snapshot (a resume checks them against its own)
    manifest.json                every other file's size and SHA-256; written last

A checkpoint is first written to `checkpoint-<step>.tmp/` and renamed with os.replace once
every file (of every rank) is on disk and `manifest.json` lists them, so a folder named
`checkpoint-<step>` was complete when it was written; a half-written `.tmp` folder is never
picked up and is removed on the next start. Saving a step that already has a folder (after a
resume past a damaged checkpoint) moves the old one aside to `.old` first: a run killed between
that and the rename gets the folder back on `--resume` (`finish_interrupted_publish`).

A disk can still lose or damage a file after that (a full disk, a copy cut short, a bad
block), so `--resume` verifies before it trusts: `find_resume_checkpoint` walks the checkpoints
newest first and takes the first one that `verify_checkpoint` accepts, reporting each one it
skipped and why. Verification: trainer_state.json parses and names this step; every file the
manifest lists exists with its size, and with `checksums` its SHA-256 matches; the files a
resume reads are present and well-formed (small JSON files parse, each safetensors header covers
its file exactly, optimizer.pt is a complete zip archive). A checkpoint written before manifests
existed has no manifest.json: it is still accepted when those structural checks pass, and
reported as unverified.

Cost: the manifest's hashes take one extra read of every checkpoint file at save time (right
after writing it, usually from the page cache), and `--resume` reads every file once more to
check them; files are hashed in parallel threads (hashlib releases the GIL), so it runs at
about the disk's read rate or one core's SHA-256 rate per file, whichever is lower. The config
key `checkpoint_checksums: false` keeps sizes and structure only: no hashing at save or resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from storm_vlm.errors import StormError
from storm_vlm.utils import atomic_path, atomic_write_json, safetensors_problem

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
TRAINABLE_FILE = "trainable.safetensors"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
PRUNED_SUFFIX = ".pruned"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
_HASH_CHUNK = 8 * 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- files
def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class CheckpointInvalid(StormError):
    """A checkpoint that cannot be resumed from; the message is the reason."""


def _read_json_checked(path: Path, what: str = "") -> Any:
    """The JSON in `path`; CheckpointInvalid naming the file (missing, unreadable, not JSON)."""
    name = path.name if not what else what
    if not path.is_file():
        raise CheckpointInvalid(f"{name} is missing")
    try:
        return read_json(path)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 errors
        raise CheckpointInvalid(f"{name} is not readable JSON ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- RNG states (JSON)
def get_rng_state() -> dict:
    """All RNG states of this process as JSON-serialisable data (no pickles)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with `seed` (< 2**32)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- finding checkpoints
def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (folder renamed from .tmp and holding trainer_state.json), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / TRAINER_STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


# ----------------------------------------------------------------------------- manifest and verification
def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """SHA-256 of each path, files in parallel (hashlib releases the GIL on large buffers)."""
    if not paths:
        return []
    workers = max(1, min(len(paths), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))


def write_manifest(folder: str | os.PathLike, checksums: bool = True) -> dict:
    """Write `folder/manifest.json`: every other file's size (and SHA-256 with `checksums`).

    Called last, once every file of the checkpoint is on disk and before the folder is renamed.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size} for p in files}
    if checksums:
        for p, digest in zip(files, _hash_all(files)):
            entries[p.relative_to(folder).as_posix()]["sha256"] = digest
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256" if checksums else None, "files": entries}
    atomic_write_json(folder / MANIFEST_FILE, manifest)
    return manifest


def _manifest_entries(folder: Path) -> dict[str, dict]:
    """The manifest's files, each checked to be a plain relative path inside `folder`."""
    data = _read_json_checked(folder / MANIFEST_FILE)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
        raise CheckpointInvalid(f"{MANIFEST_FILE} is not a format-{MANIFEST_FORMAT} manifest")
    entries = data["files"]
    for rel, entry in entries.items():
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or rel == MANIFEST_FILE:
            raise CheckpointInvalid(f"{MANIFEST_FILE} lists an invalid path {rel!r}")
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise CheckpointInvalid(f"{MANIFEST_FILE}: entry {rel!r} has no valid size")
        if digest is not None and not (isinstance(digest, str) and _SHA256_RE.match(digest)):
            raise CheckpointInvalid(f"{MANIFEST_FILE}: entry {rel!r} has an invalid sha256")
    return entries


def _check_trainer_state(folder: Path, step: int) -> dict:
    state = _read_json_checked(folder / TRAINER_STATE)
    if not isinstance(state, dict):
        raise CheckpointInvalid(f"{TRAINER_STATE} holds {type(state).__name__}, not an object")
    for key, minimum in (("global_step", 0), ("epoch", 0), ("step_in_epoch", 0), ("global_batch_size", 1),
                         ("world_size", 1), ("skipped_media", 0)):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise CheckpointInvalid(f"{TRAINER_STATE}: {key!r} is {value!r}, expected an integer >= {minimum}")
    if state["global_step"] != step:
        raise CheckpointInvalid(f"{TRAINER_STATE} is for step {state['global_step']}, not {step}")
    if not isinstance(state.get("lora", False), bool):
        raise CheckpointInvalid(f"{TRAINER_STATE}: 'lora' is {state['lora']!r}, expected true or false")
    return state


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise CheckpointInvalid(f"{path.name} is missing")
    if (problem := safetensors_problem(path)) is not None:
        raise CheckpointInvalid(f"{path.name} is not a complete safetensors file ({problem})")


def _weight_files(folder: Path) -> list[str]:
    """The model weight files: model.safetensors, or the shards its index names."""
    if (folder / WEIGHTS_INDEX).is_file():
        index = _read_json_checked(folder / WEIGHTS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) and v and "/" not in v and v != ".." for v in weight_map.values()):
            raise CheckpointInvalid(f"{WEIGHTS_INDEX} has no valid weight_map")
        return [WEIGHTS_INDEX] + sorted(set(weight_map.values()))
    return [WEIGHTS_FILE]


def _check_rng(folder: Path, rank: int) -> str:
    name = f"rng_state_{rank}.json"
    state = _read_json_checked(folder / name)
    ok = isinstance(state, dict)
    if ok:
        py, npy, tch = state.get("python"), state.get("numpy"), state.get("torch")
        ok = (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list) and len(py[1]) == 625
              and isinstance(npy, list) and len(npy) == 5 and isinstance(npy[1], list) and len(npy[1]) == 624
              and isinstance(tch, list) and len(tch) == torch.get_rng_state().numel()
              and all(isinstance(b, int) and 0 <= b < 256 for b in tch))
    if not ok:
        raise CheckpointInvalid(f"{name} is not an RNG state")
    return name


def _structure(folder: Path, state: dict) -> list[str]:
    """Check the files a resume reads; returns their names (relative to the folder)."""
    scheduler = _read_json_checked(folder / SCHEDULER_FILE)
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("last_epoch"), int) \
            or not isinstance(scheduler.get("lr_lambdas"), list):
        raise CheckpointInvalid(f"{SCHEDULER_FILE} is not an LR scheduler state")
    config = _read_json_checked(folder / CONFIG_FILE)
    if not isinstance(config, dict):
        raise CheckpointInvalid(f"{CONFIG_FILE} is not a model config")
    optimizer = folder / OPTIMIZER_FILE
    if not optimizer.is_file():
        raise CheckpointInvalid(f"{OPTIMIZER_FILE} is missing")
    try:
        with zipfile.ZipFile(optimizer) as z:  # torch.save's format; a cut file has no central directory
            z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointInvalid(f"{OPTIMIZER_FILE} is not a complete torch.save archive ({exc})") from None
    weights = _weight_files(folder)
    for name in weights:
        if name.endswith(".safetensors"):
            _check_safetensors(folder / name)
    needed = [TRAINER_STATE, SCHEDULER_FILE, CONFIG_FILE, OPTIMIZER_FILE, *weights]
    if state.get("lora"):
        _check_safetensors(folder / TRAINABLE_FILE)
        needed.append(TRAINABLE_FILE)
    needed += [_check_rng(folder, r) for r in range(state["world_size"])]
    return needed


def _check_sizes(folder: Path, entries: dict[str, dict]) -> None:
    """Every listed file exists with its size: a cut or missing file is found without reading anything."""
    for rel, entry in entries.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointInvalid(f"{rel} is missing (listed in {MANIFEST_FILE})")
        if path.stat().st_size != entry["size"]:
            raise CheckpointInvalid(f"{rel} has {path.stat().st_size} bytes, {MANIFEST_FILE} says {entry['size']}")


def _check_hashes(folder: Path, entries: dict[str, dict], checksums: bool) -> str:
    """Compare the SHA-256s (when asked and recorded); returns how the folder was checked."""
    hashed = sorted(rel for rel, e in entries.items() if "sha256" in e) if checksums else []
    for rel, digest in zip(hashed, _hash_all([folder / rel for rel in hashed])):
        if digest != entries[rel]["sha256"]:
            raise CheckpointInvalid(f"{rel} does not match its SHA-256 in {MANIFEST_FILE} (the file is damaged)")
    if hashed:
        return f"sizes and SHA-256 of all {len(entries)} files match {MANIFEST_FILE}"
    why = "checkpoint_checksums is false" if not checksums else f"{MANIFEST_FILE} holds no checksums"
    return f"sizes of all {len(entries)} files match {MANIFEST_FILE} ({why}: contents not hashed)"


def verify_manifest(folder: str | os.PathLike, checksums: bool = True) -> str | None:
    """Check a folder against its manifest.json (sizes, and SHA-256 with `checksums`); None when it
    has no manifest. CheckpointInvalid with the reason when it does not match."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file():
        return None
    entries = _manifest_entries(folder)
    _check_sizes(folder, entries)
    return _check_hashes(folder, entries, checksums)


def check_model_files(folder: str | os.PathLike) -> None:
    """Check a model folder's weight files without hashing them: each has the size its manifest.json
    lists (final/ and checkpoints have one) and a safetensors header that covers the file. Catches a
    copy cut short before a long model load does; CheckpointInvalid naming the file otherwise. The
    small files (config.json, the processor's) may have been edited by hand and are not compared."""
    folder = Path(folder)
    names = [n for n in _weight_files(folder) if n.endswith(".safetensors")]
    if (folder / MANIFEST_FILE).is_file():
        entries = _manifest_entries(folder)
        _check_sizes(folder, {n: entries[n] for n in names if n in entries})
    for name in names:
        _check_safetensors(folder / name)


def verify_checkpoint(folder: str | os.PathLike, checksums: bool = True) -> str:
    """Check that `folder` (output_dir/checkpoint-<step>) can be resumed from; returns how it was
    checked, raises CheckpointInvalid with the reason otherwise (see the module docstring)."""
    folder = Path(folder)
    m = CHECKPOINT_RE.match(folder.name)
    if m is None or not folder.is_dir():
        raise CheckpointInvalid(f"{folder} is not a checkpoint folder")
    if not (folder / TRAINER_STATE).is_file():
        raise CheckpointInvalid(f"{TRAINER_STATE} is missing (the checkpoint is incomplete)")
    state = _check_trainer_state(folder, int(m.group(1)))
    entries = _manifest_entries(folder) if (folder / MANIFEST_FILE).is_file() else None
    if entries is not None:
        _check_sizes(folder, entries)
    needed = _structure(folder, state)
    if entries is None:
        return (f"no {MANIFEST_FILE} (written by an older storm-vlm): its {len(needed)} files are present and "
                "well-formed, their contents unverified")
    unlisted = [n for n in needed if n not in entries]
    if unlisted:
        raise CheckpointInvalid(f"{MANIFEST_FILE} does not list {unlisted[0]}")
    return _check_hashes(folder, entries, checksums)


def find_resume_checkpoint(output_dir: str | os.PathLike, checksums: bool = True
                           ) -> tuple[Path | None, str, list[tuple[Path, str]]]:
    """The newest checkpoint in `output_dir` that verifies: (folder or None, how it was checked,
    [(skipped folder, reason)] for each newer one that did not)."""
    output_dir = Path(output_dir)
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    skipped: list[tuple[Path, str]] = []
    for _, path in sorted(found, reverse=True):
        try:
            return path, verify_checkpoint(path, checksums), skipped
        except CheckpointInvalid as exc:
            skipped.append((path, str(exc)))
        except OSError as exc:  # a file that cannot be opened or read to the end (permissions, I/O error)
            skipped.append((path, f"cannot read {Path(exc.filename).name if exc.filename else 'a file'} "
                                  f"({exc.strerror or exc})"))
    return None, "", skipped


def finish_interrupted_publish(output_dir: str | os.PathLike) -> list[Path]:
    """Folders a run killed inside `publish_dir` left without their name: killed after the old `X`
    was moved aside to `X.old` and before the finished `X.tmp` became `X` (a step saved again after
    a resume past a damaged checkpoint, or final/ written again). `publish_dir` starts only once
    `X.tmp` is written, so `X.tmp` becomes `X`; without one, `X.old` comes back. Resume verifies
    them like any checkpoint. Returns the folders given back their names."""
    restored = []
    for old in sorted(Path(output_dir).glob("*.old")):
        final = old.with_name(old.name[: -len(".old")])
        if not old.is_dir() or final.exists():
            continue
        tmp = final.with_name(final.name + ".tmp")
        os.replace(tmp if tmp.is_dir() else old, final)
        restored.append(final)
    return restored


def remove_stale_tmp(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written `*.tmp`, replaced `*.old` and half-deleted `*.pruned` folders a killed run
    left behind."""
    output_dir = Path(output_dir)
    removed = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.is_dir() and p.name.endswith((".tmp", ".old", PRUNED_SUFFIX)):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None, upto_step: int | None = None) -> None:
    """Delete all but the `keep` newest checkpoints at or before `upto_step` (the one just saved).

    Checkpoints past `upto_step` are left by an earlier run (e.g. damaged ones a resume skipped):
    they are neither counted nor deleted, so they can never push out the checkpoint just written;
    the run replaces each when it saves that step again. Each folder is renamed to `.pruned` before
    it is deleted: a run killed while deleting leaves a folder the next start removes, never a
    `checkpoint-N` with part of its files gone (nor one that has lost trainer_state.json and would
    no longer be counted, so never pruned)."""
    if not keep:
        return
    ckpts = [(s, p) for s, p in list_checkpoints(output_dir) if upto_step is None or s <= upto_step]
    for _, p in ckpts[:-keep]:
        doomed = p.with_name(p.name + PRUNED_SUFFIX)
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# ----------------------------------------------------------------------------- optimizer / scheduler files
def save_torch_state(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically; a failed write (a full disk, an I/O error) is the
    OSError naming `path`. Given a file name, torch.save's own writer reports a failed write as a
    RuntimeError that has lost its cause ("unexpected pos ..."), so it writes through a Python
    file here, whose OSError torch keeps as the RuntimeError's context."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except RuntimeError as exc:
            cause = exc.__context__
            if not isinstance(cause, OSError):
                raise
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from exc


def load_torch_state(path: str | os.PathLike) -> Any:
    """Load our own optimizer file. weights_only=True: no arbitrary unpickling, ever."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pragma: no cover - corrupted/foreign file
        raise StormError(f"{path}: cannot load optimizer state ({exc})") from None


def scheduler_state_to_json(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if k == "lr_lambdas":
            v = [None] * len(v)  # plain functions are not saved (LambdaLR stores None); rebuilt from the config
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        out[k] = v
    return out


def read_model_tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the given tensors from a (possibly sharded) safetensors model folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({weight_map[n] for n in names if n in weight_map})
    else:
        files = ["model.safetensors"]
    out = {}
    wanted = set(names)
    for f in files:
        for k, v in load_file(str(folder / f)).items():
            if k in wanted:
                out[k] = v
    return out
