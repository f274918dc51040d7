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

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from storm_vlm.errors import StormError
from storm_vlm.eval.prompts import GENERATION, build_prompt, describe_prompt
from storm_vlm.eval.records import Record
from storm_vlm.eval.runner import FrameLoader, evaluate_with_predictor


def load_model(model_dir: str, device: str | None = None, dtype: str | None = None):
    """(model, processor) from a saved folder, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import storm_vlm  # noqa: F401  (registers the STORM classes with the Auto classes)

    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if device == "cpu" and dtype == "float16":
        raise StormError("dtype float16 on CPU is ~200x slower than float32; use float32 or bfloat16")
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        processor = AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise StormError(f"{model_dir}: cannot load the model ({exc})") from None
    return model.to(device).eval(), processor


def compression_settings(model) -> dict:
    """The model's token-compression settings (what decides how many visual tokens it reads)."""
    config = getattr(model, "config", None)
    out: dict = {}
    if config is None:
        return out
    counting = getattr(config, "counting_fields", None)
    if callable(counting):
        out.update(counting())
    for key in ("projector_type", "temporal_pool_size", "spatial_pool_stride", "temporal_sample_stride",
                "downsample_ratio", "projector_num_layers"):
        if hasattr(config, key) and key not in out:
            out[key] = getattr(config, key)
    return {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


class _FirstLogits:
    """A pass-through logits processor that notes when the first logits (after prefill) arrive."""

    def __init__(self, device):
        self.device = device
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            _sync(self.device)
            self.at = time.perf_counter()
        return scores


class ModelPredictor:
    """Greedy answers from a StormForConditionalGeneration + StormProcessor pair."""

    def __init__(self, model, processor, temporal_sample_stride: int | None = None, max_new_tokens: int = 16):
        self.model = model
        self.processor = processor
        self.temporal_sample_stride = temporal_sample_stride
        self.max_new_tokens = int(max_new_tokens)
        self.last_timing: dict = {}

    def _inputs(self, prompt: str, frames: np.ndarray) -> dict:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(text=text, videos=[frames], temporal_sample_stride=self.temporal_sample_stride,
                                return_tensors="pt")
        device, dtype = self.model.device, self.model.dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if hasattr(v, "to") else v
                for k, v in inputs.items()}

    def reply(self, prompt: str, frames: np.ndarray, max_new_tokens: int | None = None, **generation) -> str:
        """The model's reply to `prompt` about `frames` (T, H, W, 3) uint8; greedy unless told otherwise."""
        import torch
        from transformers import LogitsProcessorList

        t0 = time.perf_counter()
        inputs = self._inputs(prompt, frames)
        kwargs = {**GENERATION, **generation, "max_new_tokens": max_new_tokens or self.max_new_tokens}
        first = _FirstLogits(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, temporal_sample_stride=self.temporal_sample_stride,
                                      logits_processor=LogitsProcessorList([first]), **kwargs)
        _sync(self.model.device)
        end = time.perf_counter()
        self.last_timing = {"prefill_s": round((first.at or end) - t0, 4), "generate_s": round(end - t0, 4)}
        new_tokens = out[0, inputs["input_ids"].shape[1]:]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def loglikelihood(self, prompt: str, continuation: str, frames: np.ndarray) -> tuple[float, bool]:
        """(log P(continuation | video, prompt), whether greedy decoding would produce it).

        The continuation follows the assistant-turn opening of the chat template, tokenized
        on its own (no special tokens)."""
        import torch

        inputs = self._inputs(prompt, frames)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        cont = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.model.device)
        n = cont.shape[1]
        if n == 0:
            return 0.0, True
        ids = torch.cat([inputs["input_ids"], cont], dim=1)
        batch = {**inputs, "input_ids": ids}
        if "attention_mask" in inputs:
            batch["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)
        with torch.inference_mode():
            logits = self.model(**batch, temporal_sample_stride=self.temporal_sample_stride).logits
        logp = logits[0, -n - 1:-1].float().log_softmax(-1)
        target = cont[0]
        return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def predict(self, record: Record, frames: np.ndarray) -> str:
        return self.reply(build_prompt(record), frames)

    def visual_tokens(self, num_frames: int) -> int | None:
        count = getattr(self.model.config, "num_visual_tokens", None)
        return count(num_frames, self.temporal_sample_stride) if callable(count) else None


def model_settings(model, benchmark: str, *, model_dir: str | None, num_frames: int, fps: float | None,
                   temporal_sample_stride: int | None, max_new_tokens: int) -> dict:
    """The settings block of results.json: enough to reproduce the number exactly."""
    name = model_dir or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    count = getattr(getattr(model, "config", None), "num_visual_tokens", None)
    visual_tokens = None
    if callable(count):
        try:
            visual_tokens = count(num_frames, temporal_sample_stride)
        except Exception:  # counting is informative only
            visual_tokens = None
    return {
        "benchmark": benchmark,
        "model": str(name),
        "num_frames": num_frames,
        "fps": fps,
        "temporal_sample_stride": temporal_sample_stride,
        "compression": compression_settings(model),
        "visual_tokens_at_num_frames": visual_tokens,
        "max_new_tokens": max_new_tokens,
        "decoding": {**GENERATION, "max_new_tokens": max_new_tokens},
        "prompt": describe_prompt(benchmark),
        "dtype": str(getattr(model, "dtype", None)),
        "device": str(getattr(model, "device", None)),
    }


def evaluate(model, processor, records: Sequence[Record], output_dir: str | Path, *, num_frames: int = 32,
             temporal_sample_stride: int | None = None, fps: float | None = None, limit: int | None = None,
             max_new_tokens: int = 16, progress: bool = True, model_dir: str | None = None,
             frame_loader: FrameLoader | None = None, print_table: bool = True,
             rank: int | None = None, world_size: int | None = None, retry_failed: bool = False) -> dict | None:
    """Evaluate a loaded model on `records`; writes predictions.jsonl, results.json, results.md
    into `output_dir` (resuming what is already there; `retry_failed` also redoes recorded decode
    failures) and returns the results (None on ranks > 0)."""
    records = list(records)
    benchmark = records[0].benchmark if records else "synthetic"
    settings = model_settings(model, benchmark, model_dir=model_dir, num_frames=num_frames, fps=fps,
                              temporal_sample_stride=temporal_sample_stride, max_new_tokens=max_new_tokens)
    predictor = ModelPredictor(model, processor, temporal_sample_stride=temporal_sample_stride,
                               max_new_tokens=max_new_tokens)
    return evaluate_with_predictor(predictor, records, output_dir, benchmark=benchmark, settings=settings,
                                   num_frames=num_frames, fps=fps, limit=limit, frame_loader=frame_loader,
                                   progress=progress, print_table=print_table, rank=rank, world_size=world_size,
                                   retry_failed=retry_failed)
