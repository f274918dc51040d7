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

The contract is the one lmms-eval's own video models (llava_vid, llava_onevision, qwen2_5_vl)
keep, so their published numbers can be reproduced:

- ``loglikelihood`` returns (mean negative log-likelihood per continuation token, is_greedy):
  the language-model *loss* those models return. lmms-eval's multiple-choice scoring (its
  ``multiple_choice`` output type and the *_mcppl tasks' process_results) takes the option with
  the *lowest* value; a sum of log-probabilities (lm-evaluation-harness' convention) would make
  it pick the least likely option.
- A task's gen_kwargs without ``max_new_tokens`` (lmms-eval's default is only ``until`` and
  ``do_sample``, e.g. NExT-QA, TempCompass, VideoMMMU) get `DEFAULT_MAX_NEW_TOKENS`, the llava
  models' default, not a short cap that would cut open-ended answers.
- Replies are cut at the task's ``until`` strings, but not at ``"\n\n"``: lmms-eval gives that
  (its few-shot delimiter) to every task whose gen_kwargs name no ``until``, and cutting there
  would keep only the first paragraph of open-ended answers (VideoChatGPT, detailed captions).
  qwen2_5_vl and qwen3_vl drop it too; the llava models cut at no ``until`` at all.
- A request whose video or images cannot be read (by the plugin, or by the task's own doc_to_visual,
  which may open the files itself) is answered with "" (loglikelihood: an infinite loss) and
  logged, and the run goes on, as llava_vid does; lmms-eval's response cache does not store an
  empty answer (it does store the loss), so a rerun asks again.
- The evaluator shards the documents over ranks; the model only reports rank / world size (from
  RANK / WORLD_SIZE, as the evaluator reads them) and runs each process on its own GPU
  (cuda:LOCAL_RANK).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from storm_vlm.eval.frames import load_frame_folder
from storm_vlm.inference import Predictor
from storm_vlm.video import VideoDecodeError, load_video, uniform_indices

try:  # the module must import without lmms-eval (the `lmms` extra)
    from lmms_eval.api.model import lmms as _LmmsBase

    HAVE_LMMS_EVAL, _IMPORT_ERROR = True, ""
except ImportError as exc:  # pragma: no cover - depends on the environment
    _LmmsBase = object
    HAVE_LMMS_EVAL, _IMPORT_ERROR = False, str(exc)

CLASS_PATH = "storm_vlm.eval.lmms_plugin.Storm"
# max_new_tokens for a task that sets none: llava_vid's and llava_onevision's default
DEFAULT_MAX_NEW_TOKENS = 1024
# what a request whose visuals cannot be read gets (lmms-eval scores it wrong, and does not cache it)
FAILED_REPLY = ""
FAILED_LOGLIKELIHOOD = (float("inf"), False)
# lmms-eval's TaskConfig.fewshot_delimiter: the `until` of every task that names none (module docstring)
FEWSHOT_DELIMITER = "\n\n"

log = logging.getLogger("storm_vlm.eval")


def _require_lmms_eval() -> None:
    if not HAVE_LMMS_EVAL:
        raise ImportError(f"lmms-eval cannot be imported ({_IMPORT_ERROR}): pip install 'storm-vlm[lmms]'")


def manifest():
    """lmms-eval's registration record for ``--model storm``."""
    _require_lmms_eval()
    # imported here: lmms_eval.models loads the entry points, and so this module, on import
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="storm", simple_class_path=CLASS_PATH)


def _as_frame(item: Any) -> np.ndarray:
    if isinstance(item, Image.Image):
        arr = np.asarray(item.convert("RGB"))
    elif isinstance(item, np.ndarray):
        arr = item
    else:
        raise ValueError(f"unsupported visual {type(item).__name__}: STORM reads video paths, frame folders "
                         "and images")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr.astype(np.uint8, copy=False)


def _read(item: Any, num_frames: int, fps: float | None, min_side: int | None) -> np.ndarray:
    """Frames (T, H, W, 3) from one visual: a video file, a folder of frame images, or an image."""
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        if os.path.isdir(path):  # llava_vid reads a folder as its frames
            return load_frame_folder(path, num_frames, min_side=min_side)
        return load_video(path, num_frames=num_frames, fps=fps, min_side=min_side).frames
    return _as_frame(item)[None]


def visuals_to_frames(visuals: Sequence[Any] | Any, num_frames: int, fps: float | None = None,
                      min_side: int | None = None) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 from what a task's doc_to_visual returned.

    A video path (lmms-eval video tasks return ``[path]``) is sampled with `load_video`, a folder
    with `load_frame_folder`; several videos share the `num_frames`; images (PIL, arrays or image
    files: a task's frames one by one, as MVBench's frame subsets give them) are the frames in
    order, `num_frames` of them spread uniformly when there are more. Every frame is resized to
    the first one's size. Raises VideoDecodeError (or OSError from a lazily read PIL image) when
    a file cannot be read, ValueError when there is nothing to read.
    """
    if visuals is None:
        raise ValueError("this request has no visual input; STORM answers questions about videos")
    items = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
    while len(items) == 1 and isinstance(items[0], (list, tuple)):
        items = list(items[0])
    if not items:
        raise ValueError("this request has no visual input; STORM answers questions about videos")
    if len(items) > num_frames:
        items = [items[i] for i in uniform_indices(len(items), num_frames)[0]]
    per = max(1, num_frames // len(items))
    frames = [f for item in items for f in _read(item, per, fps, min_side)]
    h, w = frames[0].shape[:2]
    return np.stack([f if f.shape[:2] == (h, w) else np.asarray(Image.fromarray(f).resize((w, h)))
                     for f in frames])


def generation_kwargs(gen_kwargs: dict | None,
                      default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> tuple[dict, list[str]]:
    """(kwargs for generate, stop strings) from lmms-eval's per-task gen_kwargs.

    Greedy unless sampling is asked: ``do_sample`` true, or (without ``do_sample``, as llava_vid
    and qwen2_5_vl read it) a temperature above 0; temperature 0 is always greedy. top_p / top_k
    apply to sampling only. Keys for other models (image_aspect_ratio, ...) are ignored; ``null``
    values mean the default.
    """
    g = dict(gen_kwargs or {})
    until = g.get("until")
    if until is None:
        stops = []
    elif isinstance(until, str):
        stops = [until]
    elif isinstance(until, (list, tuple)):
        stops = [str(s) for s in until if s]
    else:
        raise ValueError(f"gen_kwargs 'until' must be a string or a list of strings, got {type(until).__name__}")
    temperature = None if g.get("temperature") is None else float(g["temperature"])
    do_sample = g.get("do_sample")
    sample = bool(do_sample) if do_sample is not None else (temperature or 0.0) > 0
    if temperature == 0:
        sample = False
    out: dict = {"max_new_tokens": int(g.get("max_new_tokens") or default_max_new_tokens), "do_sample": sample,
                 "num_beams": int(g.get("num_beams") or 1)}
    if sample:
        for key, cast in (("temperature", float), ("top_p", float), ("top_k", int)):
            if g.get(key) is not None:
                out[key] = cast(g[key])
    if g.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(g["repetition_penalty"])
    return out, stops


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop string, stripped (the whitespace before a stop is no part of
    the answer: exact-match metrics would count "B\n" wrong)."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut].strip()


def _optional(value, cast):
    """`value` as lmms-eval's model_args parser leaves it (int, float, bool or str) cast, or None for
    None / "" / "none" / "null"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return cast(value)


def _positive(name: str, value, cast):
    """model_args `name` as a positive finite `cast` (int or float), or a ValueError naming it: a bad
    value fails at load, not as every video "unreadable" (fps=0) or at the first request."""
    try:
        number = cast(value)
        ok = not isinstance(value, bool) and math.isfinite(number) and number > 0 and number == float(value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        kind = "an integer >= 1" if cast is int else "a positive number"
        raise ValueError(f"storm model_args: {name} must be {kind}, got {value!r}")
    return number


class Storm(_LmmsBase):
    """STORM for lmms-eval (a "simple" model: the task's text plus the raw visuals).

    model_args: pretrained (model folder, required), num_frames (32), fps (None), temporal_sample_stride
    (model default), max_new_tokens (for tasks that set none: DEFAULT_MAX_NEW_TOKENS), device,
    dtype (a precision name, storm_vlm.precision; default auto). An unknown argument is an error, as
    in lmms-eval's models (a misspelt num_frames must not run with the default). batch_size and
    max_batch_size come from lmms-eval's command line; requests run one at a time (batch_size 1).
    """

    is_simple = True

    def __init__(self, pretrained: str, num_frames: int = 32, fps: float | None = None,
                 temporal_sample_stride: int | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None) -> None:
        _require_lmms_eval()
        super().__init__()
        if str(batch_size).strip() != "1":
            raise ValueError(f"the storm lmms-eval model answers one request at a time: batch_size must be 1, "
                             f"got {batch_size!r}")
        self.pretrained = str(pretrained)
        self.num_frames = _positive("num_frames", num_frames, int)
        self.fps = _optional(fps, lambda v: _positive("fps", v, float))
        self.default_max_new_tokens = _positive("max_new_tokens", max_new_tokens, int)
        # lmms-eval's evaluator shards by these (RANK / WORLD_SIZE) and sets them again itself
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.predictor = Predictor.from_pretrained(
            self.pretrained, _optional(device, str), _optional(dtype, str) or "auto",
            temporal_sample_stride=_optional(temporal_sample_stride, int), max_new_tokens=self.default_max_new_tokens)
        self._last_visuals: tuple = (None, None)  # (request key, frames), within one call: see _frames

    @property
    def device(self) -> torch.device:
        """The model's device (lmms-eval's evaluator gathers request counts on it in multi-process runs)."""
        return self.predictor.model.device

    def _doc(self, task: str, split: str, doc_id):
        return self.task_dict[task][split][doc_id]

    def _frames(self, doc_to_visual, doc, key) -> np.ndarray | None:
        """A request's frames, or None (logged) when its video or images cannot be read, by the plugin or
        the task's doc_to_visual (a missing frame folder, an image file it opens). Within one call the
        last request's frames are reused for the same document (its other choices, its repeats)."""
        if self._last_visuals[0] == key:
            return self._last_visuals[1]
        try:
            visuals = doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual
            frames = visuals_to_frames(visuals, self.num_frames, self.fps, self.predictor.processor.image_size)
        except (VideoDecodeError, OSError) as exc:
            log.warning("storm: %s/%s document %s: cannot read its visuals (%s); it is scored as a failed answer",
                        *key, exc)
            frames = None
        self._last_visuals = (key, frames)
        return frames

    def generate_until(self, requests) -> list[str]:
        """One reply per request, in the order given."""
        replies, self._last_visuals = [], (None, None)
        for request in tqdm(requests, desc="storm", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            kwargs, stops = generation_kwargs(gen_kwargs, self.default_max_new_tokens)
            stops = [s for s in stops if s != FEWSHOT_DELIMITER]
            frames = self._frames(doc_to_visual, self._doc(task, split, doc_id), (task, split, doc_id))
            if frames is None:
                replies.append(FAILED_REPLY)
                continue
            text = cut_at_stops(self.predictor.reply(context, frames, **kwargs), stops)
            replies.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return replies

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood per continuation token, is_greedy) per request: the loss
        lmms-eval's models return and its multiple-choice scoring minimises (module docstring)."""
        out, self._last_visuals = [], (None, None)
        for request in tqdm(requests, desc="storm loglikelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            frames = self._frames(doc_to_visual, doc, (task, split, doc_id))
            if frames is None:
                out.append(FAILED_LOGLIKELIHOOD)
                continue
            logprob, greedy = self.predictor.loglikelihood(context, continuation, frames)
            # the continuation's tokens as Predictor.loglikelihood scores them (on their own)
            n = len(self.predictor.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            result = (-logprob / n if n else 0.0, greedy)
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("storm: multi-round generation is not supported (nor by lmms-eval's llava_vid)")
