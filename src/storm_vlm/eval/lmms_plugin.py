"""lmms-eval plugin: ``lmms_eval --model storm --model_args pretrained=DIR,num_frames=32 --tasks ...``.

Install with the ``lmms`` extra (``pip install storm-vlm[lmms]``); lmms-eval finds the
model through the ``lmms_eval.models`` entry point. lmms-eval (>= 0.5) calls an entry
point's payload with no arguments and expects a ``ModelManifest``: the entry point names
`manifest`, which returns one pointing at the `Storm` class.

The adapter logic that does not need lmms-eval lives in plain functions:
`visuals_to_frames` (a request's visuals -> frames (T, H, W, 3) uint8), `generation_kwargs`
(lmms-eval's gen_kwargs -> ours) and `cut_at_stops` (lmms-eval's ``until`` strings). The
prompt is lmms-eval's task text as given (each task writes its own options and
instructions), placed after the video in one user turn.

``loglikelihood`` (multiple choice by likelihood, e.g. egoschema_subset_mcppl) scores the
continuation after the assistant-turn opening, with the same video and prompt placement.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from storm_vlm.inference import Predictor
from storm_vlm.video import load_video

try:  # the module must import without lmms-eval (the `lmms` extra)
    from lmms_eval.api.model import lmms as _LmmsBase

    HAVE_LMMS_EVAL = True
except ImportError:  # pragma: no cover - depends on the environment
    _LmmsBase = object
    HAVE_LMMS_EVAL = False

CLASS_PATH = "storm_vlm.eval.lmms_plugin.Storm"


def manifest():
    """lmms-eval's registration record for ``--model storm``."""
    if not HAVE_LMMS_EVAL:
        raise ImportError("lmms-eval is not installed: pip install 'storm-vlm[lmms]'")
    # imported here: lmms_eval.models loads the entry points, and so this module, on import
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="storm", simple_class_path=CLASS_PATH)


def _as_frame(item: Any) -> np.ndarray:
    if isinstance(item, np.ndarray):
        arr = item
    else:  # PIL image
        arr = np.asarray(item.convert("RGB"))
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr.astype(np.uint8, copy=False)


def visuals_to_frames(visuals: Sequence[Any] | Any, num_frames: int, fps: float | None = None,
                      min_side: int | None = None) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 from what a task's doc_to_visual returned.

    A video path (lmms-eval video tasks return ``[path]``) is sampled with `load_video`;
    several paths are each sampled and concatenated; images (PIL or arrays) become the
    frames in order, resized to the first one's size.
    """
    if visuals is None:
        raise ValueError("this request has no visual input; STORM answers questions about videos")
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    while len(items) == 1 and isinstance(items[0], (list, tuple)):
        items = list(items[0])
    if not items:
        raise ValueError("this request has no visual input; STORM answers questions about videos")
    if all(isinstance(v, (str, os.PathLike)) for v in items):
        per = max(1, num_frames // len(items))
        return np.concatenate([load_video(os.fspath(p), num_frames=per, fps=fps, min_side=min_side).frames
                               for p in items])
    frames = [_as_frame(v) for v in items]
    h, w = frames[0].shape[:2]
    if any(f.shape[:2] != (h, w) for f in frames):
        frames = [f if f.shape[:2] == (h, w) else np.asarray(Image.fromarray(f).resize((w, h))) for f in frames]
    return np.stack(frames)


def generation_kwargs(gen_kwargs: dict | None, default_max_new_tokens: int = 16) -> tuple[dict, list[str]]:
    """(kwargs for generate, stop strings) from lmms-eval's per-task gen_kwargs.

    temperature 0 (lmms-eval's usual setting) or do_sample false means greedy.
    """
    g = dict(gen_kwargs or {})
    until = g.pop("until", None)
    stops = [until] if isinstance(until, str) else list(until or [])
    temperature = float(g.get("temperature", 0) or 0)
    do_sample = bool(g.get("do_sample", False)) and temperature > 0
    out: dict = {"max_new_tokens": int(g.get("max_new_tokens", default_max_new_tokens)), "do_sample": do_sample,
                 "num_beams": int(g.get("num_beams", 1) or 1)}
    if do_sample:
        out["temperature"] = temperature
        if g.get("top_p") is not None:
            out["top_p"] = float(g["top_p"])
    return out, stops


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def _parse_optional_int(value) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return int(value)


class Storm(_LmmsBase):
    """STORM for lmms-eval (a "simple" model: the task's text plus the raw visuals).

    model_args: pretrained (model folder, required), num_frames (32), fps (None),
    temporal_sample_stride (model default), max_new_tokens (16), device, dtype (a precision name,
    storm_vlm.precision; default auto).
    """

    is_simple = True

    def __init__(self, pretrained: str, num_frames: int = 32, fps: float | None = None,
                 temporal_sample_stride: int | None = None, max_new_tokens: int = 16,
                 device: str | None = None, dtype: str | None = None, batch_size: int = 1, **kwargs) -> None:
        if not HAVE_LMMS_EVAL:
            raise ImportError("lmms-eval is not installed: pip install 'storm-vlm[lmms]'")
        super().__init__()

        if int(batch_size) != 1:
            raise ValueError("the storm lmms-eval model runs batch_size=1")
        self.pretrained = str(pretrained)
        self.num_frames = int(num_frames)
        self.fps = None if fps in (None, "", "None") else float(fps)
        self.default_max_new_tokens = int(max_new_tokens)
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.predictor = Predictor.from_pretrained(
            self.pretrained, device, dtype or "auto", temporal_sample_stride=_parse_optional_int(temporal_sample_stride),
            max_new_tokens=self.default_max_new_tokens)

    def _visuals(self, request) -> tuple[str, dict, Any]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if callable(doc_to_visual) else doc_to_visual
        return context, gen_kwargs, visuals

    def generate_until(self, requests) -> list[str]:
        replies = []
        for request in tqdm(requests, desc="storm", disable=self.rank != 0):
            context, gen_kwargs, visuals = self._visuals(request)
            frames = visuals_to_frames(visuals, self.num_frames, self.fps, self.predictor.processor.image_size)
            kwargs, stops = generation_kwargs(gen_kwargs, self.default_max_new_tokens)
            max_new = kwargs.pop("max_new_tokens")
            text = cut_at_stops(self.predictor.reply(context, frames, max_new_tokens=max_new, **kwargs), stops)
            replies.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return replies

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log P(continuation | video, context), is_greedy) per request: multiple choice by likelihood."""
        out = []
        for request in tqdm(requests, desc="storm loglikelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = request.args[:6]
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
            frames = visuals_to_frames(visuals, self.num_frames, self.fps, self.predictor.processor.image_size)
            result = self.predictor.loglikelihood(context, continuation, frames)
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("storm: multi-round generation is not supported")
