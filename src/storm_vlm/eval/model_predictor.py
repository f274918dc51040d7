"""The model-backed `Predictor` and the in-process `evaluate` API.

``evaluate(model, processor, records, output_dir, num_frames=...)`` runs an already
loaded STORM model (the demo evaluates several variants in one process) and returns the
results dict that is also written to ``output_dir/results.json``. Raw-frame subsampling
is just a smaller ``num_frames``; test-time temporal sampling is ``temporal_sample_stride``.

Each prediction row carries ``latency_s`` (the wall time of one ``generate`` call) and
``prefill_s``: from the call to the first next-token logits, i.e. processor inputs on the
device -> vision tower -> projector/compression -> LLM prefill (timed at the first call of a
logits processor, with a CUDA synchronize there, so it costs no extra forward pass).
results.json reports their means; ``storm-vlm profile`` breaks latency down per module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from storm_vlm.eval.frames import load_record_frames
from storm_vlm.eval.prompts import build_prompt, describe_prompt
from storm_vlm.eval.records import Record
from storm_vlm.eval.runner import FrameLoader, evaluate_with_predictor
from storm_vlm.inference import GREEDY, Predictor
from storm_vlm.precision import Precision


def compression_settings(model) -> dict:
    """The model's token-compression settings (what decides how many visual tokens it reads)."""
    config = model.config
    return {**config.visual_token_layout.to_dict(), "projector_type": config.projector_type,
            "downsample_ratio": config.downsample_ratio, "projector_num_layers": config.projector_num_layers}


class ModelPredictor(Predictor):
    """A `Predictor` that answers benchmark records (the runner's `Predictor` protocol)."""

    def predict(self, record: Record, frames: np.ndarray) -> str:
        return self.reply(build_prompt(record), frames)

    def predict_batch(self, records: Sequence[Record], frames: Sequence[np.ndarray]) -> list[str]:
        return self.reply_batch([build_prompt(r) for r in records], frames)


def _dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def precision_settings(model, precision: Precision | None) -> dict:
    """The arithmetic the answers come from: the weights' dtype, the LLM's linear layers' where they
    differ, and the autocast dtype (None: none). `precision`: what the predictor runs under (None: no
    autocast, the model as it is)."""
    loaded = precision if precision is not None else getattr(model, "_storm_precision", None)
    return {
        "weights": _dtype_name(precision.weights if precision is not None else getattr(model, "dtype", None)),
        "llm_linears": _dtype_name(getattr(loaded, "llm_linears", None)),
        "autocast": _dtype_name(precision.autocast if precision is not None else None),
    }


def model_settings(model, benchmark: str, *, model_dir: str | None, num_frames: int, fps: float | None,
                   temporal_sample_stride: int | None, max_new_tokens: int,
                   precision: Precision | None = None) -> dict:
    """The settings block of results.json: enough to reproduce the number exactly."""
    name = model_dir or getattr(model.config, "_name_or_path", None) or type(model).__name__
    return {
        "benchmark": benchmark,
        "model": str(name),
        "num_frames": num_frames,
        "fps": fps,
        "temporal_sample_stride": temporal_sample_stride,
        "compression": compression_settings(model),
        "visual_tokens_at_num_frames": model.config.num_visual_tokens(num_frames, temporal_sample_stride),
        "max_new_tokens": max_new_tokens,
        "decoding": {**GREEDY, "max_new_tokens": max_new_tokens},
        "prompt": describe_prompt(benchmark),
        "dtype": str(getattr(model, "dtype", None)),
        "precision": precision_settings(model, precision),
        "device": str(getattr(model, "device", None)),
    }


def evaluate(model, processor, records: Sequence[Record], output_dir: str | Path, *, num_frames: int = 32,
             temporal_sample_stride: int | None = None, fps: float | None = None, limit: int | None = None,
             max_new_tokens: int = 16, progress: bool = True, model_dir: str | None = None,
             frame_loader: FrameLoader | None = None, print_table: bool = True,
             rank: int | None = None, world_size: int | None = None, retry_failed: bool = False,
             precision: Precision | None = None, batch_size: int = 1, reuse_prefix: bool = True,
             data_root: str | None = None) -> dict | None:
    """Evaluate a loaded model on `records`; writes predictions.jsonl, results.json, results.md
    into `output_dir` (resuming what is already there; `retry_failed` also redoes recorded decode
    failures) and returns the results (None on ranks > 0). `precision`: what the model was loaded
    with (its autocast applies); `batch_size`: questions answered per padded generate call;
    `reuse_prefix`: one question at a time, a video's next question continues from the previous
    one's KV cache of the video (`storm_vlm.inference.Predictor`); `data_root`: the benchmark folder
    `records` were read from, recorded with the settings (a resume from another folder is refused)."""
    records = list(records)
    benchmark = records[0].benchmark if records else "synthetic"
    settings = model_settings(model, benchmark, model_dir=model_dir, num_frames=num_frames, fps=fps,
                              temporal_sample_stride=temporal_sample_stride, max_new_tokens=max_new_tokens,
                              precision=precision)
    settings["reuse_prefix"] = reuse_prefix and batch_size == 1  # how, not what: not an identity key
    settings["data_root"] = data_root
    predictor = ModelPredictor(model, processor, temporal_sample_stride=temporal_sample_stride,
                               max_new_tokens=max_new_tokens, precision=precision, reuse_prefix=reuse_prefix)
    frame_loader = frame_loader or (lambda r: load_record_frames(r, num_frames, fps, processor.image_size))
    return evaluate_with_predictor(predictor, records, output_dir, benchmark=benchmark, settings=settings,
                                   num_frames=num_frames, fps=fps, limit=limit, frame_loader=frame_loader,
                                   progress=progress, print_table=print_table, rank=rank, world_size=world_size,
                                   retry_failed=retry_failed, batch_size=batch_size)
