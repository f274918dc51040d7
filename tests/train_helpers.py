"""Shared helpers for the training/data tests: a tiny model on disk and a small LLaVA data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write (T, H, W, 3) uint8 frames as an mp4 (PyAV, libx264 or mpeg4)."""
    from helpers import write_mp4

    from storm_vlm.demo.synth import pick_codec

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_mp4(path, frames, fps, pick_codec(None))


def write_image(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (220, 220, 30)}


def make_dataset(root: Path, num_videos: int = 8, num_images: int = 4, frames: int = 4, size: int = 32,
                 seed: int = 0) -> dict:
    """Videos whose answer is the colour of a flash frame, plus colour images; returns file paths."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    video_records, image_records = [], []
    for i in range(num_videos):
        colour = names[i % len(names)]
        arr = np.full((frames, size, size, 3), 40, dtype=np.uint8)
        arr[int(rng.integers(frames))] = COLOURS[colour]
        write_video(root / "videos" / f"v{i}.mp4", arr)
        video_records.append({
            "id": f"v{i}",
            "video": f"videos/v{i}.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat colour flashed?"},
                {"from": "gpt", "value": f"It was {colour}."},
            ],
        })
    for i in range(num_images):
        colour = names[i % len(names)]
        write_image(root / "images" / f"i{i}.png", np.full((size, size, 3), COLOURS[colour], dtype=np.uint8))
        image_records.append({
            "id": f"i{i}",
            "image": f"images/i{i}.png",
            "conversations": [
                {"from": "human", "value": "Describe the picture."},
                {"from": "gpt", "value": f"A {colour} square."},
            ],
        })
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in video_records))
    align = root / "align.json"
    align.write_text(json.dumps(image_records))
    return {"root": root, "train": train, "align": align}


def tiny_parts(root: Path) -> tuple[Path, Path]:
    from storm_vlm.demo.tiny import make_tiny_parts

    return make_tiny_parts(root, image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                           llm_hidden=32, llm_layers=2, llm_heads=2, llm_kv_heads=1, llm_intermediate=64,
                           vocab_size=400)


_CACHE: dict = {}


def cached_tiny_parts() -> tuple[Path, Path]:
    """Tiny SigLIP + tiny Qwen2 folders, built once per test session (in a temp dir removed at exit)."""
    if "parts" not in _CACHE:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="storm-train-parts-"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE["parts"] = tiny_parts(root)
    return _CACHE["parts"]


def build_source(**extra) -> dict:
    vision, llm = cached_tiny_parts()
    return {"vision": str(vision), "llm": str(llm), "projector": "mamba", "projector_num_layers": 1, **extra}


def base_config(out: Path, data: dict, **overrides) -> dict:
    cfg = dict(
        stage="sft", output_dir=str(out), train_file=str(data["train"]), media_root=str(data["root"]),
        num_frames=4, max_steps=6, save_steps=0, seed=0, build=build_source(), per_device_batch_size=2,
        learning_rate=3e-3, warmup_ratio=0.0, progress_bar=False, tensorboard=False,
    )
    if "bf16" not in overrides:
        # fp32 unless a test asks: tests compare runs exactly (resume, DDP vs one process), and
        # precision "auto" picks bf16 autocast on CPUs with native bf16
        cfg["precision"] = "float32"
    cfg.update(overrides)
    return cfg


def processor_and_model():
    """(StormProcessor, StormForConditionalGeneration) of the tiny parts, built once per session."""
    from storm_vlm.train.config import config_from_dict
    from storm_vlm.train.launch import DistEnv
    from storm_vlm.train.model_source import load_model_and_processor

    if "pm" not in _CACHE:
        cfg = config_from_dict(dict(stage="sft", output_dir="unused", train_file="unused", media_root=".",
                                    num_frames=4, max_steps=1, save_steps=0, seed=0, build=build_source()))
        model, processor = load_model_and_processor(cfg, DistEnv())
        _CACHE["pm"] = (processor, model.eval())
    return _CACHE["pm"]
