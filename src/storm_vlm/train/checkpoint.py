"""Crash-safe checkpoints: atomic folders, weights_only-safe optimizer files, JSON RNG states.

Layout of `output_dir/checkpoint-<step>/`:
    config.json, model.safetensors (or shards), processor files   a complete STORM model folder
    trainable.safetensors        LoRA runs only: the trainable parameters under their PEFT names
    optimizer.pt                 optimizer state (tensors + plain values; loaded with weights_only=True)
    scheduler.json               LR scheduler state
    rng_state_<rank>.json        python / numpy / torch (and CUDA) RNG states of every rank
    trainer_state.json           step, epoch, step_in_epoch, skipped-media count, config snapshot

A checkpoint is first written to `checkpoint-<step>.tmp/` and renamed with os.replace once
every file (of every rank) is on disk, so a folder named `checkpoint-<step>` is always
complete; a half-written `.tmp` folder is never picked up and is removed on the next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from storm_vlm.errors import StormError
from storm_vlm.utils import atomic_path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
TRAINABLE_FILE = "trainable.safetensors"


# ----------------------------------------------------------------------------- files
def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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


def remove_stale_tmp(output_dir: str | os.PathLike) -> list[Path]:
    """Delete half-written `*.tmp` / `*.old` folders a killed run left behind."""
    output_dir = Path(output_dir)
    removed = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> None:
    if not keep:
        return
    for _, p in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------- optimizer / scheduler files
def save_torch_state(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
