"""`StormEngine`: one loaded STORM model answering questions about videos, one request at a time.

The HTTP API (`storm_vlm.serve.api`) and the web demo (`storm_vlm.serve.web`) both call
`StormEngine.answer`. A question is asked exactly as `storm-vlm eval` asks it (through
`storm_vlm.inference`: the video first in the user turn, greedy decoding; with options, the
prompt of `storm_vlm.choices.format_question` and the reply read by `extract_choice`).
Precision: `storm_vlm.precision` ("auto": bfloat16 on CUDA; on CPU float32, with bfloat16
autocast only where the CPU has native bf16).
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from storm_vlm.choices import LETTERS, extract_choice, format_question, strip_letter
from storm_vlm.errors import StormError
from storm_vlm.inference import Predictor, build_messages
from storm_vlm.utils import check_model_dir
from storm_vlm.utils import check_int
from storm_vlm.video import load_video

__all__ = ["StormEngine"]

MAX_QUESTION_CHARS = 8000
MAX_OPTIONS = 26


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    return check_int(name, value, lo, hi, error=StormError)


class StormEngine:
    """A STORM model + processor loaded once from `model_dir`.

    Args:
        model_dir: a STORM model folder (config.json, weights, processor files).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda if available).
        precision: a name of `storm_vlm.precision.PRECISIONS` ("auto" by default).
        default_frames: frames sampled when a request names none.
        max_frames: the most frames a request may ask for.
        max_new_tokens_limit: the longest answer a request may ask for.

    `answer` may be called from several threads; generation runs under one lock.
    """

    def __init__(self, model_dir, *, device: str | None = None, precision: str = "auto", default_frames: int = 32,
                 max_frames: int = 256, max_new_tokens_limit: int = 1024, verbose: bool = False):
        self.model_dir = check_model_dir(model_dir)
        self.max_frames = _check_int("max_frames", max_frames, 1)
        self.default_frames = _check_int("frames", default_frames, 1, self.max_frames)
        self.max_new_tokens_limit = _check_int("max_new_tokens_limit", max_new_tokens_limit, 1)
        self.predictor = Predictor.from_pretrained(self.model_dir, device, precision, verbose=verbose)
        self.model, self.processor = self.predictor.model, self.predictor.processor
        self.config = self.model.config
        self.device = self.model.device
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ description

    def info(self) -> dict:
        """What /health reports: model folder, device, precision and the token-compression settings."""
        cfg = self.config
        text = cfg.get_text_config()
        precision = self.predictor.precision
        return {
            "model_dir": str(self.model_dir),
            "device": str(self.device),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "autocast": None if precision.autocast is None else str(precision.autocast).replace("torch.", ""),
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

    @staticmethod
    def prompt(question: str, options: Sequence[str] | None = None) -> str:
        """The user text sent with the video: the question, or the evaluation prompt with lettered options."""
        return format_question(question, options) if options else question

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
                options = [strip_letter(o, i) or o for i, o in enumerate(options)]
        num_frames = self.default_frames if num_frames is None else num_frames
        _check_int("frames", num_frames, 1, self.max_frames)
        if temporal_sample_stride is not None:
            _check_int("temporal_sample_stride", temporal_sample_stride, 1)
        _check_int("max_new_tokens", max_new_tokens, 1, self.max_new_tokens_limit)
        return question.strip(), options, num_frames, temporal_sample_stride, max_new_tokens

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
        layout = self.config.visual_token_layout.with_sample_stride(stride)
        prompt = self.predictor.render(build_messages(self.prompt(question, options)))
        text_tokens = self.predictor.check_context(prompt, layout.num_tokens(num_frames), max_new_tokens)

        t_decode = time.perf_counter()
        clip = load_video(video_path, num_frames=num_frames, start=start, end=end)
        t_decoded = time.perf_counter()
        frames = len(clip)  # a still image gives one frame
        with self._lock:
            t_locked = time.perf_counter()
            inputs = self.predictor.encode(prompt, [clip.frames], stride)
            reply = self.predictor.generate(inputs, max_new_tokens, started=t_locked)
        choice = extract_choice(reply.text, options) if options else None
        return {
            "answer": reply.text,
            "choice": choice,
            "choice_letter": None if choice is None else LETTERS[choice],
            "options": options,
            "visual_tokens": layout.num_tokens(frames),
            "frames": frames,
            "visual_frames": layout.num_frames(frames),
            "temporal_sample_stride": layout.temporal_sample_stride,
            "text_tokens": text_tokens,
            "video": {
                "duration_s": round(float(clip.duration), 3),
                "native_fps": None if clip.native_fps is None else round(float(clip.native_fps), 3),
                "repeated": bool(clip.repeated),
            },
            "timings": {
                "decode_s": round(t_decoded - t_decode, 4),
                "wait_s": round(t_locked - t_decoded, 4),
                "prefill_s": reply.prefill_s,
                "generate_s": reply.generate_s,
                "total_s": round(time.perf_counter() - t0, 4),
            },
        }
