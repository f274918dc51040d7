"""The demo's phases as plain functions of JSON-able specs (so they can run in worker processes).

- `make_data`: the synthetic benchmark (`storm_vlm.demo.synth.generate_synthetic_benchmark`), its
  train.json answering with the options' texts (`answers="text"`).
- `train_variant`: one model through the real training loop (`storm_vlm.train.train`,
  stage "sft"); the only addition is that each decoded + preprocessed training sample is kept
  in memory after its first use, so later epochs do not decode the same mp4 again.
- `evaluate_variant`: every table row of one trained model through `storm_vlm.eval.evaluate`
  (batched greedy generation + `extract_choice`); each video is decoded once and each row takes
  the frames `load_video` would return for its frame count. `train_and_evaluate` runs both.
- `measure_prefill`: latency of one prefill (vision tower + projector + compression + LLM over
  the whole prompt) per row.
- `answer_example`: one held-out question answered by a model, for the closing printout.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from storm_vlm.choices import LETTERS, extract_choice
from storm_vlm.demo.settings import ROWS, VARIANT_BY_NAME, DemoSettings, Row
from storm_vlm.demo.synth import generate_synthetic_benchmark
from storm_vlm.eval.model_predictor import evaluate
from storm_vlm.eval.predictions import read_predictions
from storm_vlm.eval.prompts import build_prompt
from storm_vlm.eval.readers import read_synthetic
from storm_vlm.inference import Predictor, build_messages, load_model
from storm_vlm.train import train
from storm_vlm.train.config import config_from_dict
from storm_vlm.video import load_video, uniform_indices

FINAL = "final"


def _settings(spec: dict) -> DemoSettings:
    d = dict(spec["settings"])
    d["train_parts"] = tuple(d["train_parts"])
    d["tasks"] = tuple(d["tasks"])
    return DemoSettings(**d)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))


# ----------------------------------------------------------------------------- data


def data_is_complete(data_dir: Path, settings: DemoSettings) -> bool:
    """True when `data_dir` holds a finished benchmark made with these settings (meta.json is written last)."""
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    kw = settings.synth_kwargs()
    return (meta.get("seed") == kw["seed"] and meta.get("num_videos") == kw["num_videos"]
            and meta.get("frames") == kw["num_frames"] and meta.get("size") == kw["size"]
            and meta.get("test_fraction") == kw["split"] and list(meta.get("tasks", [])) == kw["tasks"]
            and meta.get("answers") == kw["answers"])


def make_data(data_dir: Path, settings: DemoSettings, workers: int | None = None) -> dict:
    """Generate (or reuse) the synthetic benchmark; returns its meta dict."""

    data_dir = Path(data_dir)
    if data_is_complete(data_dir, settings):
        return json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))
    return generate_synthetic_benchmark(data_dir, workers=workers, **settings.synth_kwargs())


# ----------------------------------------------------------------------------- training


def train_config(spec: dict) -> dict:
    """The `storm_vlm.train` config (a plain dict) for one variant and seed."""
    settings = _settings(spec)
    variant = VARIANT_BY_NAME[spec["variant"]]
    data_dir = Path(spec["data_dir"])
    return {
        "stage": "sft",
        "description": f"storm-vlm demo: {variant.label}, seed {spec['seed']}",
        "output_dir": str(spec["output_dir"]),
        "train_file": str(data_dir / "train.json"),
        "media_root": str(data_dir),
        "num_frames": settings.trained_frames(variant),
        "max_steps": settings.steps,
        "save_steps": 0,
        "seed": int(spec["seed"]),
        "tiny": {
            "projector_type": variant.projector,
            "projector_num_layers": settings.projector_layers,
            **({} if variant.projector == "mlp" else {"projector_bidirectional": variant.bidirectional}),
            "parts_kwargs": settings.parts_kwargs(int(spec["seed"])),
        },
        "temporal_pool_size": variant.temporal_pool,
        "train_parts": list(settings.train_parts),
        "per_device_batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate,
        "warmup_ratio": settings.warmup_ratio,
        "lr_scheduler": settings.lr_scheduler,
        # float32: at these widths bf16 autocast on CPU is slower than fp32 (tiny matmuls).
        "precision": "float32",
        "num_workers": 0,
        "logging_steps": 1,
        "progress_bar": False,
        "tensorboard": False,
    }


class _MemoDataset:
    """Wraps a LlavaDataset: each index is encoded once (decode + preprocess), then served from memory."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._memo: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self._memo.get(index)
        if item is None:
            item = self._memo[index] = self.dataset[index]
        return item


def _trained_summary(output_dir: Path) -> dict | None:
    path = output_dir / FINAL / "training_summary.json"
    if not (output_dir / FINAL / "config.json").is_file() or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


_PATH_KEYS = ("output_dir", "train_file", "media_root")


def _same_run(old: dict, new: dict) -> bool:
    """Same training config apart from where the folders are (a demo folder may be moved or copied)."""
    strip = lambda d: {k: v for k, v in d.items() if k not in _PATH_KEYS}
    return strip(old) == strip(new)


def train_variant(spec: dict) -> dict:
    """Train one variant (or reuse a finished identical run); returns a summary dict.

    spec: settings (DemoSettings.to_dict()), variant, seed, data_dir, output_dir, threads.
    """
    _set_threads(spec.get("threads", 1))
    output_dir = Path(spec["output_dir"])
    raw = train_config(spec)
    cfg = config_from_dict(raw, source=f"demo variant {spec['variant']}")
    done = _trained_summary(output_dir)
    if done is not None and _same_run(done.get("config") or {}, cfg.to_dict()):
        return _summarise(spec, output_dir, reused=True, seconds=None)
    if output_dir.exists():
        # An unfinished or different earlier run: start this one afresh (the demo owns this folder).
        shutil.rmtree(output_dir)
    t0 = time.perf_counter()
    c0 = time.process_time()

    torch.manual_seed(cfg.seed)
    train(cfg, dataset_wrapper=_MemoDataset)
    return _summarise(spec, output_dir, reused=False, seconds=time.perf_counter() - t0,
                      cpu_seconds=time.process_time() - c0)


def _summarise(spec: dict, output_dir: Path, reused: bool, seconds: float | None,
               cpu_seconds: float | None = None) -> dict:
    losses = []
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                losses.append(float(json.loads(line)["loss"]))
            except (json.JSONDecodeError, KeyError):
                continue
    tail = losses[-10:]
    return {
        "variant": spec["variant"],
        "seed": int(spec["seed"]),
        "model_dir": str(output_dir / FINAL),
        "reused": reused,
        "train_seconds": None if seconds is None else round(seconds, 2),
        "train_cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 2),
        "first_loss": losses[0] if losses else None,
        "final_loss_last10": (sum(tail) / len(tail)) if tail else None,
        "steps_logged": len(losses),
    }


# ----------------------------------------------------------------------------- evaluation


class FrameCache:
    """`load_video` for many frame counts of the same files, decoding each file once.

    Decodes every frame of a video (`load_video` with num_frames = the file's frame count) and
    then picks, for T frames, the indices `storm_vlm.video.uniform_indices(n, T)` -- exactly
    what `load_video(path, num_frames=T)` returns (frames repeated evenly when T > n).
    """

    def __init__(self, source_frames: int):
        self.source_frames = int(source_frames)
        self._frames: dict[str, np.ndarray] = {}

    def all_frames(self, path: str) -> np.ndarray:
        frames = self._frames.get(path)
        if frames is None:
            clip = load_video(path, num_frames=self.source_frames)
            if clip.repeated or clip.num_source_frames != self.source_frames:
                # Not the file we generated: fall back to its real frame count.
                clip = load_video(path, num_frames=clip.num_source_frames)
            frames = self._frames[path] = clip.frames
        return frames

    def frames(self, path: str, num_frames: int) -> np.ndarray:
        frames = self.all_frames(path)
        idx, _ = uniform_indices(frames.shape[0], num_frames)
        return frames[idx]

    def loader(self, num_frames: int):
        return lambda record: self.frames(record.video, num_frames)


def load_test_records(data_dir: Path, limit: int | None = None):
    records = read_synthetic(Path(data_dir))
    return records if limit is None else records[:limit]


def rows_of(variant: str) -> list[Row]:
    return [r for r in ROWS if r.variant == variant]


def evaluate_variant(spec: dict) -> dict:
    """Evaluate one trained model on every row of its variant; returns {row name: results}.

    spec: settings, variant, seed, model_dir, data_dir, eval_dir, threads. Each row writes
    predictions.jsonl / results.json under eval_dir/<row>/ (a rerun resumes them).
    """
    _set_threads(spec.get("threads", 1))
    settings = _settings(spec)
    model, processor = load_model(spec["model_dir"], "cpu", "float32")
    records = load_test_records(Path(spec["data_dir"]))
    cache = FrameCache(settings.video_frames)
    out = {}
    for row in rows_of(spec["variant"]):
        frames = settings.input_frames(row)
        res = evaluate(model, processor, records, Path(spec["eval_dir"]) / row.name, num_frames=frames,
                       temporal_sample_stride=row.sample, max_new_tokens=settings.max_new_tokens,
                       progress=False, print_table=False, model_dir=spec.get("model_name", str(spec["model_dir"])),
                       frame_loader=cache.loader(frames), rank=0, world_size=1,
                       batch_size=settings.eval_batch_size)
        predictions = read_predictions(Path(spec["eval_dir"]) / row.name / "predictions.jsonl")
        out[row.name] = {
            "accuracy": res["accuracy"],
            "correct": {q: bool(p["correct"]) for q, p in predictions.items()},
            "tasks_of": {q: p["categories"]["task"] for q, p in predictions.items()},
            "replies": {"empty": int(res["counts"]["empty_replies"]), "unparsed": int(res["counts"]["unparsed"])},
            "input_frames": frames,
            "visual_tokens": int(model.config.num_visual_tokens(frames, row.sample)),
        }
    return out


def train_and_evaluate(spec: dict) -> dict:
    """`train_variant` then `evaluate_variant` for one (variant, seed): {"training": ..., "rows": ...}."""
    return {"training": train_variant(spec), "rows": evaluate_variant(spec)}


# ----------------------------------------------------------------------------- latency


def measure_prefill(model, processor, frames: np.ndarray, prompt: str, sample: int, repeats: int) -> dict:
    """Median wall time (ms) of one prefill forward (vision + projector + compression + LLM), 1 warm-up.

    Preprocessing (decode, resize) is excluded; threads are whatever torch is set to.
    """
    predictor = Predictor(model, processor, temporal_sample_stride=sample)
    inputs = predictor.encode(predictor.render(build_messages(prompt)), [frames])
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model(**inputs, use_cache=False, logits_to_keep=1)
            if i:
                times.append((time.perf_counter() - t0) * 1000.0)
    return {"prefill_ms": statistics.median(times), "prefill_ms_all": [round(t, 3) for t in times],
            "sequence_length": int(inputs["input_ids"].shape[1])}


def latency_variant(spec: dict) -> dict:
    """Prefill latency of every row of one trained model on the first held-out video."""
    _set_threads(spec.get("threads", 1))
    settings = _settings(spec)
    model, processor = load_model(spec["model_dir"], "cpu", "float32")
    record = load_test_records(Path(spec["data_dir"]))[0]
    cache = FrameCache(settings.video_frames)
    out = {}
    for row in rows_of(spec["variant"]):
        frames = cache.frames(record.video, settings.input_frames(row))
        out[row.name] = measure_prefill(model, processor, frames, build_prompt(record), row.sample,
                                        settings.latency_repeats)
    return out


# ----------------------------------------------------------------------------- the closing example


def answer_example(model_dir: str | Path, data_dir: Path, settings: DemoSettings, row: Row, task: str) -> dict:
    """The first held-out question of `task`, answered by the model in `row`'s setting."""
    model, processor = load_model(model_dir, "cpu", "float32")
    records = [r for r in load_test_records(Path(data_dir)) if r.categories.get("task") == task]
    record = records[0]
    frames = FrameCache(settings.video_frames).frames(record.video, settings.input_frames(row))
    predictor = Predictor(model, processor, temporal_sample_stride=row.sample, max_new_tokens=settings.max_new_tokens)
    reply = predictor.reply(build_prompt(record), frames)
    pred = extract_choice(reply, record.options)
    return {
        "row": row.name,
        "model_dir": str(model_dir),
        "id": record.id,
        "task": task,
        "video": record.video,
        "question": record.question,
        "options": [f"{LETTERS[i]}. {o}" for i, o in enumerate(record.options)],
        "reply": reply,
        "predicted": None if pred is None else LETTERS[pred],
        "truth": record.answer_letter,
        "correct": pred is not None and pred == record.answer,
        "input_frames": settings.input_frames(row),
        "temporal_sample_stride": row.sample,
    }
