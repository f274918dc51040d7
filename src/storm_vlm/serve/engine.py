"""`StormEngine`: one loaded STORM model answering questions about videos, one request at a time.

The HTTP API (`storm_vlm.serve.api`) and the web demo (`storm_vlm.serve.web`) both call
`StormEngine.answer`. A question is asked exactly as `storm-vlm eval` asks it
(`storm_vlm.eval.ModelPredictor`: the video first in the user turn, greedy decoding; with
options, the benchmark prompt "question / A. ... / Answer with the option's letter ..." and
the reply read by `storm_vlm.eval.extract_choice`).

Precision ("auto"): on CUDA bfloat16 weights; on CPU float32 weights, under bfloat16
autocast only where the CPU has native bf16 (`storm_vlm.precision.cpu_has_fast_bf16`).
float16 is never used on CPU.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Sequence

from storm_vlm.errors import StormError
from storm_vlm.precision import cpu_has_fast_bf16

__all__ = ["StormEngine", "check_model_dir", "DTYPES"]

DTYPES = ("auto", "float32", "bfloat16")
MAX_QUESTION_CHARS = 8000
MAX_OPTIONS = 26


def check_model_dir(model_dir) -> Path:
    """The folder as a Path if it holds a STORM model's config.json; StormError naming the cause otherwise."""
    path = Path(model_dir)
    if not path.exists():
        raise StormError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise StormError(f"model folder {path} is not a folder")
    config = path / "config.json"
    if not config.is_file():
        raise StormError(f"model folder {path} has no config.json (expected a STORM model folder "
                         "from `storm-vlm build` or training)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise StormError(f"{config}: not a readable JSON config ({exc})") from None
    if model_type != "storm":
        raise StormError(f"{config}: model_type is {model_type!r}, expected 'storm' (a STORM model folder)")
    return path


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise StormError(f"{name} must be an integer {bound}, got {value!r}")
    return value


class StormEngine:
    """A STORM model + processor loaded once from `model_dir`.

    Args:
        model_dir: a STORM model folder (config.json, weights, processor files).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda if available).
        dtype: "auto" (bfloat16 on CUDA; float32 weights on CPU, with bfloat16 autocast where
            the CPU has native bf16),
            "float32" or "bfloat16" (weights in that dtype, no autocast).
        default_frames: frames sampled when a request names none.
        max_frames: the most frames a request may ask for.
        max_new_tokens_limit: the longest answer a request may ask for.

    `answer` may be called from several threads; generation runs under one lock.
    """

    def __init__(self, model_dir, *, device: str | None = None, dtype: str = "auto", default_frames: int = 32,
                 max_frames: int = 256, max_new_tokens_limit: int = 1024):
        self.model_dir = check_model_dir(model_dir)
        if dtype not in DTYPES:
            raise StormError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.max_frames = _check_int("max_frames", max_frames, 1)
        self.default_frames = _check_int("frames", default_frames, 1, self.max_frames)
        self.max_new_tokens_limit = _check_int("max_new_tokens_limit", max_new_tokens_limit, 1)

        import torch

        from storm_vlm.eval import load_model

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            torch_device = torch.device(device)
        except RuntimeError as exc:
            raise StormError(f"invalid device {device!r} ({exc})") from None
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise StormError(f"device {device!r} asked for, but CUDA is not available")
        on_cpu = torch_device.type == "cpu"
        weights = ("float32" if on_cpu else "bfloat16") if dtype == "auto" else dtype
        fast_bf16 = dtype == "auto" and on_cpu and cpu_has_fast_bf16()
        self.autocast_dtype = torch.bfloat16 if fast_bf16 else None
        self.model, self.processor = load_model(str(self.model_dir), device=str(torch_device), dtype=weights)
        self.config = self.model.config
        self.device = torch_device
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ description

    def info(self) -> dict:
        """What /health reports: model folder, device, precision and the token-compression settings."""
        cfg = self.config
        text = getattr(cfg, "text_config", None)
        return {
            "model_dir": str(self.model_dir),
            "device": str(self.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "autocast": None if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", ""),
            "config": {
                "projector_type": cfg.projector_type,
                "projector_num_layers": cfg.projector_num_layers,
                "llm": getattr(text, "model_type", None),
                "image_size": cfg.vision_config.image_size,
                "downsample_ratio": cfg.downsample_ratio,
                "temporal_pool_size": cfg.temporal_pool_size,
                "spatial_pool_stride": cfg.spatial_pool_stride,
                "temporal_sample_stride": cfg.temporal_sample_stride,
                "tokens_per_frame": cfg.tokens_per_frame,
                "max_position_embeddings": getattr(text, "max_position_embeddings", None),
            },
            "defaults": {
                "frames": self.default_frames,
                "visual_tokens": cfg.num_visual_tokens(self.default_frames),
            },
            "limits": {"max_frames": self.max_frames, "max_new_tokens": self.max_new_tokens_limit},
        }

    # ------------------------------------------------------------------ one question

    def prompt(self, question: str, options: Sequence[str] | None = None) -> str:
        """The user text sent with the video: the question, or the eval prompt with lettered options."""
        if not options:
            return question
        from storm_vlm.eval import Record, build_prompt
        from storm_vlm.eval.records import strip_letter

        # "A. Apples" -> "Apples": the prompt letters options itself
        record = Record(id="request", benchmark="synthetic", video="", question=question,
                        options=tuple(strip_letter(o, i) for i, o in enumerate(options)), answer=None)
        return build_prompt(record)

    def check_request(self, question, options=None, num_frames=None, temporal_sample_stride=None,
                      max_new_tokens=64) -> tuple[str, list[str] | None, int, int | None, int]:
        """Validated (question, options, num_frames, temporal_sample_stride, max_new_tokens); StormError if not."""
        if not isinstance(question, str) or not question.strip():
            raise StormError("question must be a non-empty string")
        if len(question) > MAX_QUESTION_CHARS:
            raise StormError(f"question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}")
        if options is not None:
            if isinstance(options, str) or not all(isinstance(o, str) for o in options):
                raise StormError("options must be a list of strings")
            options = [o.strip() for o in options]
            if not options:
                options = None
            elif not 2 <= len(options) <= MAX_OPTIONS:
                raise StormError(f"give between 2 and {MAX_OPTIONS} options, got {len(options)}")
            elif not all(options):
                raise StormError("options must not be empty strings")
            else:
                from storm_vlm.eval.records import strip_letter

                options = [strip_letter(o, i) or o for i, o in enumerate(options)]
        num_frames = self.default_frames if num_frames is None else num_frames
        _check_int("frames", num_frames, 1, self.max_frames)
        if temporal_sample_stride is not None:
            _check_int("temporal_sample_stride", temporal_sample_stride, 1)
        _check_int("max_new_tokens", max_new_tokens, 1, self.max_new_tokens_limit)
        return question.strip(), options, num_frames, temporal_sample_stride, max_new_tokens

    def _check_context(self, prompt: str, visual_tokens: int, max_new_tokens: int) -> int:
        """Positions the request needs (prompt with expanded video placeholder + answer); StormError if
        the LLM has fewer."""
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text_tokens = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1
        needed = text_tokens + visual_tokens + max_new_tokens
        limit = getattr(getattr(self.config, "text_config", None), "max_position_embeddings", None)
        if limit and needed > limit:
            raise StormError(
                f"the request needs {needed} positions ({visual_tokens} visual tokens + {text_tokens} text tokens "
                f"+ {max_new_tokens} new tokens) but the LLM has {limit}; ask for fewer frames, a larger "
                "temporal_sample_stride or fewer new tokens")
        return text_tokens

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def answer(self, video_path, question: str, options: Sequence[str] | None = None, num_frames: int | None = None,
               temporal_sample_stride: int | None = None, max_new_tokens: int = 64, start: float | None = None,
               end: float | None = None) -> dict:
        """Answer `question` about the video at `video_path` (greedy decoding).

        num_frames frames (T) are sampled uniformly (from [start, end) seconds when given);
        the LLM reads `config.num_visual_tokens(T, temporal_sample_stride)` visual tokens.
        With `options`, `choice` is the 0-based option the reply names (None when it names none).

        Returns a JSON-ready dict: answer, choice, choice_letter, options, visual_tokens, frames
        (T), visual_frames (T' after pooling/sampling), temporal_sample_stride (effective),
        text_tokens, video (duration_s, native_fps, repeated), timings in seconds: decode_s
        (video decoding), wait_s (queued behind other requests), prefill_s (processor + vision
        tower + projector + LLM prefill, to the first logits), generate_s (the whole generate
        call, prefill included), total_s.
        Raises StormError for bad parameters and VideoDecodeError (a StormError) for a bad video.
        """
        t0 = time.perf_counter()
        question, options, num_frames, stride, max_new_tokens = self.check_request(
            question, options, num_frames, temporal_sample_stride, max_new_tokens)
        effective_stride = self.config.temporal_sample_stride if stride is None else stride
        visual_tokens = self.config.num_visual_tokens(num_frames, stride)
        prompt = self.prompt(question, options)
        text_tokens = self._check_context(prompt, visual_tokens, max_new_tokens)

        from storm_vlm.eval import ModelPredictor, extract_choice
        from storm_vlm.eval.records import LETTERS
        from storm_vlm.video import load_video

        t_decode = time.perf_counter()
        clip = load_video(video_path, num_frames=num_frames, start=start, end=end)
        t_decoded = time.perf_counter()
        frames = len(clip)  # a still image gives one frame
        with self._lock:
            t_locked = time.perf_counter()
            predictor = ModelPredictor(self.model, self.processor, temporal_sample_stride=stride,
                                       max_new_tokens=max_new_tokens)
            with self._autocast():
                text = predictor.reply(prompt, clip.frames)
            timing = dict(predictor.last_timing)
        choice = extract_choice(text, options) if options else None
        return {
            "answer": text,
            "choice": choice,
            "choice_letter": None if choice is None else LETTERS[choice],
            "options": options,
            "visual_tokens": self.config.num_visual_tokens(frames, stride),
            "frames": frames,
            "visual_frames": self.config.num_visual_frames(frames, stride),
            "temporal_sample_stride": effective_stride,
            "text_tokens": text_tokens,
            "video": {
                "duration_s": round(float(clip.duration), 3),
                "native_fps": None if clip.native_fps is None else round(float(clip.native_fps), 3),
                "repeated": bool(clip.repeated),
            },
            "timings": {
                "decode_s": round(t_decoded - t_decode, 4),
                "wait_s": round(t_locked - t_decoded, 4),
                "prefill_s": timing.get("prefill_s"),
                "generate_s": timing.get("generate_s"),
                "total_s": round(time.perf_counter() - t0, 4),
            },
        }
