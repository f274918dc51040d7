"""`StormEngine`: one loaded STORM model answering many requests.

Requests are validated and rendered when they arrive (`prepare`: a bad request fails before it
waits), then queued. One worker thread takes the oldest request and every waiting request that
can share its generate call (same sampling settings and test-time stride; a request with a seed
runs alone) up to `max_batch_size`, and runs them as one padded batch: videos of different
lengths are padded with a frame mask and the prompts left-padded, which gives each request the
answer it gets alone. Tokens stream to each request as they are made (`RequestHandle.events`);
a request stops on its own token budget, one of its stop strings, the end-of-turn token, or
`RequestHandle.cancel()` (a client that hung up) without stopping the others. A full queue
raises `EngineBusy` (the HTTP server answers 503 with Retry-After).

Each video is encoded (vision tower and projector) once per batch. What a request computed is
kept for the next (`storm_vlm.serve.caches`): its videos' visual tokens, and, for a request that
ran alone, the LLM's KV cache, so the next turn of a conversation about the same video (a chat
client sends the whole conversation again; the web page sends the same clip) prefills only what
is new, and a seeded request's next choice starts at the LLM.

`StormEngine.answer` (the `/v1/answer` endpoint, `chat -q`, the web page) is one request through
the same queue. A question is asked exactly as `storm-vlm eval` asks it (`storm_vlm.inference`:
the video first in the user turn, greedy decoding unless told otherwise; with options, the
prompt of `storm_vlm.choices.format_question` and the reply read by `extract_choice`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from storm_vlm.choices import LETTERS, extract_choice, format_question, strip_letter
from storm_vlm.data.records import check_text
from storm_vlm.errors import StormError
from storm_vlm.inference import GREEDY, Predictor, build_messages, encode_each_video_once
from storm_vlm.model.kv_cache import StormKVCache
from storm_vlm.planner import fit_stride
from storm_vlm.serve.caches import PrefixCache, VideoTokenCache, video_keys
from storm_vlm.utils import check_int, check_model_dir
from storm_vlm.video import load_video

__all__ = ["StormEngine", "SamplingParams", "RequestHandle", "Completion", "EngineBusy", "RequestError",
           "ContextTooLong", "MAX_OPTIONS", "MAX_OPTION_CHARS", "MAX_QUESTION_CHARS"]

log = logging.getLogger("storm_vlm.serve")

MAX_QUESTION_CHARS = 8000
MAX_OPTIONS = 26
MAX_OPTION_CHARS = 1000
MAX_STOPS = 4
MAX_STOP_CHARS = 200


class EngineBusy(StormError):
    """The request queue is full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ContextTooLong(StormError):
    """The prompt (text and visual tokens) and the answer budget do not fit the LLM's positions
    (the OpenAI API answers this with code context_length_exceeded)."""


class RequestError(StormError):
    """This request's own inputs could not be built (a client error: the requests batched with it
    are answered); other errors of a batch are the server's."""


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    return check_int(name, value, lo, hi, error=StormError)


def _check_float(name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise StormError(f"{name} must be a number between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 is greedy (the default, as in evaluation)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def batch_key(self, request_id: int) -> tuple:
        """Requests with equal keys can share one generate call (a seeded request runs alone)."""
        if self.seed is not None:
            return ("seeded", request_id)
        return ("greedy",) if self.temperature == 0 else ("sample", self.temperature, self.top_p)

    def generate_kwargs(self) -> dict:
        """What generate is told: these settings only, none inherited from the model's generation
        config (a repetition penalty there would apply to every answer, which the API says it
        does not)."""
        if self.temperature == 0:
            return dict(GREEDY)
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0,
                "repetition_penalty": 1.0}


@dataclass
class Completion:
    """The finished answer of one request. finish_reason: "stop" (end of turn or a stop string),
    "length" (token budget), "cancelled". Times in seconds."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int
    timings: dict
    temporal_sample_stride: int | None = None  # the stride applied
    stride_planned: bool = False  # True: the request's frames did not fit at the stride asked for
    cached_tokens: int = 0  # prompt tokens whose KV cache came from an earlier request (`PrefixCache`)


@dataclass
class _Prepared:
    prompt: str
    videos: list
    stride: int | None
    sampling: SamplingParams
    text_tokens: int
    visual_tokens: int
    planned: bool = False  # the stride was raised by `storm_vlm.planner.fit_stride` so the videos fit
    cache_salt: str | None = None  # only requests with the same salt share cached work (vLLM's cache_salt)

    @property
    def frames(self) -> int:
        return sum(len(v) for v in self.videos)


def _frames(videos) -> int:
    """Frames of `videos`, each array counted once (a request's choices share its videos)."""
    return sum(len(v) for v in {id(v): v for v in videos}.values())


def _request_error(exc: Exception) -> RequestError:
    if isinstance(exc, StormError):
        return RequestError(str(exc))
    return RequestError(f"the request's inputs could not be built ({type(exc).__name__}: {exc})")


class RequestHandle:
    """One queued request. Iterate `events()` (or `aevents()` in asyncio code) for
    ("delta", text) items followed by ("done", Completion) or ("error", exception);
    `result()` waits for the Completion; `cancel()` stops it."""

    _ids = itertools.count()

    def __init__(self, prepared: _Prepared, loop: asyncio.AbstractEventLoop | None = None, on_cancel=None):
        self.id = next(self._ids)
        self.prepared = prepared
        self.submitted = time.perf_counter()
        self._cancel = threading.Event()
        self._on_cancel = on_cancel  # called with the handle by `cancel()` (the engine's queue lets it go)
        self._loop = loop
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._outcome: Completion | Exception | None = None
        self.finished = False  # its "done" or "error" has been emitted
        self.streamed = False  # a "delta" has been emitted

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    def emit(self, kind: str, payload) -> None:
        self.finished = self.finished or kind in ("done", "error")
        self.streamed = self.streamed or kind == "delta"
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, payload))
            except RuntimeError:  # the client's event loop is gone
                self._cancel.set()
        else:
            self._queue.put((kind, payload))

    def events(self) -> Iterator[tuple[str, object]]:
        while True:
            kind, payload = self._queue.get()
            yield kind, payload
            if kind in ("done", "error"):
                return

    async def next_event(self) -> tuple[str, object]:
        """The next event (asyncio; safe to cancel, e.g. by a timeout)."""
        return await self._queue.get()

    async def aevents(self):
        while True:
            kind, payload = await self.next_event()
            yield kind, payload
            if kind in ("done", "error"):
                return

    def result(self) -> Completion:
        """The Completion, once it is there (raises the request's error); may be called again."""
        if self._outcome is None:
            for kind, payload in self.events():
                if kind in ("done", "error"):
                    self._outcome = payload
        if isinstance(self._outcome, Exception):
            raise self._outcome
        return self._outcome


class _Rows(BaseStreamer):
    """Streams a batch's new tokens to each request as text, and knows which rows are finished.

    Text is decoded from each row's tokens so far (held back while it ends in an incomplete
    UTF-8 sequence, or could be the start of one of the request's stop strings).
    """

    def __init__(self, tokenizer, handles: list[RequestHandle], eos_ids: set[int]):
        self.tokenizer = tokenizer
        self.handles = handles
        self.eos_ids = eos_ids
        self.tokens: list[list[int]] = [[] for _ in handles]
        self.generated = [0] * len(handles)  # tokens each request produced, its end-of-turn token included
        self.text = [""] * len(handles)
        self.sent = [0] * len(handles)
        self.finish: list[str | None] = [None] * len(handles)
        self.first_token_at: float | None = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids
            self._prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        for i, token in enumerate(value.reshape(len(self.handles), -1)[:, -1].tolist()):
            if self.finish[i] is None:
                self._add(i, int(token))

    def _add(self, i: int, token: int) -> None:
        handle = self.handles[i]
        if handle.cancelled:
            self.finish[i] = "cancelled"
            return
        self.generated[i] += 1
        if token in self.eos_ids:
            self._flush(i, len(self.text[i]))
            self.finish[i] = "stop"
            return
        self.tokens[i].append(token)
        text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        last = len(self.tokens[i]) >= handle.prepared.sampling.max_new_tokens
        if text.endswith("\ufffd") and not last:  # a character split across tokens: wait for the rest
            return
        self.text[i] = text
        stops = handle.prepared.sampling.stop
        for stop in stops:
            at = text.find(stop, max(0, self.sent[i] - len(stop)))
            if at >= 0:
                self.text[i] = text[:at]
                self._flush(i, at)
                self.finish[i] = "stop"
                return
        if last:
            self._flush(i, len(text))
            self.finish[i] = "length"
            return
        hold = max((len(s) - 1 for s in stops), default=0)
        self._flush(i, len(text) - hold)

    def _flush(self, i: int, upto: int) -> None:
        if upto > self.sent[i]:
            self.handles[i].emit("delta", self.text[i][self.sent[i]:upto])
            self.sent[i] = upto

    def end(self) -> None:
        for i in range(len(self.handles)):
            if self.finish[i] is None:
                self.text[i] = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
                self._flush(i, len(self.text[i]))
                self.finish[i] = "cancelled" if self.handles[i].cancelled else "length"


class _RowsDone(StoppingCriteria):
    """Per-row stop: the streamer's verdict, or a cancelled request."""

    def __init__(self, rows: _Rows):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        done = [f is not None or h.cancelled for f, h in zip(self.rows.finish, self.rows.handles)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class StormEngine:
    """A STORM model + processor loaded once from `model_dir`, serving a queue of requests.

    Args:
        model_dir: a STORM model folder (config.json, weights, processor files).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda if available).
        precision: a name of `storm_vlm.precision.PRECISIONS` ("auto" by default).
        default_frames: frames sampled when a request names none.
        max_frames: the most frames a request may ask for.
        max_new_tokens_limit: the longest answer a request may ask for.
        max_batch_size: requests answered by one generate call at most (1: one at a time).
        max_batch_frames: video frames in one generate call at most (bounds the vision tower's
            memory; a request with more frames runs alone); default: max_batch_size requests of
            default_frames, at least max_frames.
        max_queue: requests waiting at most; beyond, `submit` raises EngineBusy.
        max_queue_frames: video frames waiting at most (each is held decoded in memory until its
            batch runs; the choices of one request share theirs); beyond, `submit` raises
            EngineBusy, except for a request that finds no frames waiting. Default: max_queue
            requests of default_frames.
        decode_timeout_s: the longest a request's video may take to decode (DecodeTimeout).
        video_cache_mb: memory (on the model's device) for the visual tokens of recent videos, so
            a video asked about again is not encoded again (`VideoTokenCache`; 0: off).
        prefix_cache_mb: memory (on the model's device) for the KV caches of recent requests that
            ran alone, so a request that continues one prefills only what is new (`PrefixCache`; 0: off).
    """

    def __init__(self, model_dir, *, device: str | None = None, precision: str = "auto", default_frames: int = 32,
                 max_frames: int = 256, max_new_tokens_limit: int = 1024, max_batch_size: int = 8,
                 max_batch_frames: int | None = None, max_queue: int = 64, max_queue_frames: int | None = None,
                 decode_timeout_s: float = 60.0,
                 video_cache_mb: float = 512, prefix_cache_mb: float = 1024, verbose: bool = False):
        self.model_dir = check_model_dir(model_dir)
        self.max_frames = _check_int("max_frames", max_frames, 1)
        self.default_frames = _check_int("frames", default_frames, 1, self.max_frames)
        self.max_new_tokens_limit = _check_int("max_new_tokens_limit", max_new_tokens_limit, 1)
        self.max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
        self.max_batch_frames = _check_int(
            "max_batch_frames", max_batch_frames or max(self.max_frames, self.max_batch_size * self.default_frames), 1)
        self.max_queue = _check_int("max_queue", max_queue, 1)
        self.max_queue_frames = _check_int("max_queue_frames",
                                           max_queue_frames or self.max_queue * self.default_frames, 1)
        self.decode_timeout_s = _check_float("decode_timeout_s", decode_timeout_s, 0.001, 86400)
        self.video_cache = VideoTokenCache(int(_check_float("video_cache_mb", video_cache_mb, 0, 2**30) * 2**20))
        self.predictor = Predictor.from_pretrained(self.model_dir, device, precision, verbose=verbose)
        self.model, self.processor = self.predictor.model, self.predictor.processor
        self.config = self.model.config
        self.device = self.model.device
        generation = self.model.generation_config
        eos = generation.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        tokenizer = self.processor.tokenizer
        self._pad = generation.pad_token_id if generation.pad_token_id is not None else tokenizer.pad_token_id
        self._text_config = self.config.get_text_config(decoder=True)
        self.prefix_cache = PrefixCache(int(_check_float("prefix_cache_mb", prefix_cache_mb, 0, 2**30) * 2**20),
                                        self._text_config, {self.config.video_token_id, self.config.image_token_id})
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._wakeup = threading.Condition()
        self._recent_s = collections.deque(maxlen=16)  # durations of recent batches, for Retry-After
        self._closed = False
        # Held while the model runs a batch; other users of the model (streaming sessions,
        # `storm_vlm.serve.sessions`) take it too, so only one computation uses it at a time.
        self.model_lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="storm-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------ description

    def info(self) -> dict:
        """What /health reports: model folder, device, precision, compression settings, limits, what
        the caches hold."""
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
            "defaults": {"frames": self.default_frames, "visual_tokens": cfg.num_visual_tokens(self.default_frames)},
            "limits": {"max_frames": self.max_frames, "max_new_tokens": self.max_new_tokens_limit,
                       "max_batch_size": self.max_batch_size, "max_batch_frames": self.max_batch_frames,
                       "max_queue": self.max_queue, "max_queue_frames": self.max_queue_frames,
                       "max_options": MAX_OPTIONS, "max_option_chars": MAX_OPTION_CHARS,
                       "max_question_chars": MAX_QUESTION_CHARS},
            "video_cache": {"max_mb": round(self.video_cache.max_bytes / 2**20, 3),
                            "used_mb": round(self.video_cache.bytes / 2**20, 3), "videos": len(self.video_cache)},
            "prefix_cache": {"max_mb": round(self.prefix_cache.max_bytes / 2**20, 3),
                             "used_mb": round(self.prefix_cache.bytes / 2**20, 3), "entries": len(self.prefix_cache)},
        }

    # ------------------------------------------------------------------ requests

    def default_sampling(self) -> tuple[float, float]:
        """(temperature, top_p) a request gets when it names none: the model's generation config
        (as vLLM does), greedy when that config does not sample."""
        generation = self.model.generation_config
        if not generation.do_sample:
            return 0.0, 1.0
        return float(generation.temperature or 1.0), float(generation.top_p or 1.0)

    def check_sampling(self, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None,
                       stop: Sequence[str] | str | None = None) -> SamplingParams:
        """Validated SamplingParams; StormError naming the bad value."""
        _check_int("max_new_tokens", max_new_tokens, 1, self.max_new_tokens_limit)
        temperature = _check_float("temperature", temperature, 0.0, 2.0)
        top_p = _check_float("top_p", top_p, 0.0, 1.0)
        if top_p == 0:
            raise StormError("top_p must be greater than 0")
        if seed is not None:
            _check_int("seed", seed, 0, 2**63 - 1)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise StormError(f"stop must be up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return SamplingParams(max_new_tokens, temperature, top_p, seed, tuple(stops))

    def prepare(self, messages: list[dict], frame_counts: Sequence[int] = (), sampling: SamplingParams | None = None,
                temporal_sample_stride: int | None = None, fit_answer: bool = False) -> _Prepared:
        """Render `messages` (the model's chat template, with a {"type": "video"} item per video,
        in order; `frame_counts` gives each video's frames) once and check the request fits the
        LLM with its answer budget; StormError otherwise (ContextTooLong when it does not fit).
        Texts are read as text (`literal`): only the video items become placeholders. When the
        videos do not fit at the stride asked for (or the model's), the smallest larger test-time
        sampling stride that fits is applied instead of failing (`storm_vlm.planner.fit_stride`;
        `planned` says so). `fit_answer`: the answer budget is a default, not the client's choice,
        and is cut to the positions the prompt leaves rather than refused. `submit` takes it with
        the decoded videos."""
        sampling = sampling or SamplingParams()
        if temporal_sample_stride is not None:
            _check_int("temporal_sample_stride", temporal_sample_stride, 1, 64)
        prompt = self.predictor.render(self._literal_messages(messages))
        placeholders = prompt.count(self.processor.video_token)
        if placeholders != len(frame_counts) or self.processor.image_token in prompt:
            raise StormError(f"the rendered messages hold {placeholders} {self.processor.video_token} and "
                             f"{prompt.count(self.processor.image_token)} {self.processor.image_token} placeholders "
                             f"for {len(frame_counts)} videos")
        limit = self._context()
        text_tokens = self.predictor.text_tokens(prompt)
        planned = False
        if frame_counts and limit:
            fitted = self._plan_stride(frame_counts, text_tokens, sampling.max_new_tokens, temporal_sample_stride,
                                       limit, fit_answer)
            planned = fitted != (temporal_sample_stride or self.config.temporal_sample_stride)
            temporal_sample_stride = fitted if planned else temporal_sample_stride
        layout = self.config.visual_token_layout.with_sample_stride(temporal_sample_stride)
        visual = sum(layout.num_tokens(t) for t in frame_counts)
        sampling = self._fit(sampling, text_tokens, visual, limit, fit_answer)
        return _Prepared(prompt, [], temporal_sample_stride, sampling, text_tokens, visual, planned)

    def prepare_text(self, text: str, sampling: SamplingParams | None = None, fit_answer: bool = False) -> _Prepared:
        """A raw prompt (OpenAI's text completions: no chat template, no video), read as text
        (`literal`); StormError when it is empty, ContextTooLong when it does not fit the LLM with
        its answer (`fit_answer`: see `prepare`)."""
        sampling = sampling or SamplingParams()
        prompt = self.literal(text)
        text_tokens = self.predictor.text_tokens(prompt)
        if text_tokens == 0:
            raise StormError("the prompt holds no tokens")
        sampling = self._fit(sampling, text_tokens, 0, self._context(), fit_answer)
        return _Prepared(prompt, [], None, sampling, text_tokens, 0)

    def _context(self) -> int | None:
        """The LLM's positions (None: unbounded)."""
        return getattr(self.config.get_text_config(), "max_position_embeddings", None)

    def _plan_stride(self, frame_counts, text_tokens: int, max_new_tokens: int, stride: int | None, limit: int,
                     fit_answer: bool) -> int:
        """`fit_stride` for the videos next to the text and the answer budget; with `fit_answer`,
        next to one answer token when the whole budget fits at no stride (`_fit` then shrinks it)."""
        for budget in (max_new_tokens, 1) if fit_answer else (max_new_tokens,):
            try:
                return fit_stride(self.config, frame_counts, text_tokens + budget, stride, limit)
            except StormError as exc:
                error = exc
        raise ContextTooLong(f"This model's maximum context length is {limit} tokens: {error}")

    @staticmethod
    def _fit(sampling: SamplingParams, text_tokens: int, visual_tokens: int, limit: int | None,
             fit_answer: bool) -> SamplingParams:
        """`sampling` when the prompt and its answer budget fit `limit` positions; with
        `fit_answer` (a budget the client did not choose), the budget cut to the positions left, as
        vLLM's default max_tokens is; ContextTooLong when not even one answer token fits, or the
        budget the client chose does not."""
        prompt = text_tokens + visual_tokens
        if limit and fit_answer and prompt < limit:
            sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, limit - prompt))
        if limit and prompt + sampling.max_new_tokens > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens and the request has {prompt} input tokens "
                f"({visual_tokens} visual + {text_tokens} text) and asks for up to {sampling.max_new_tokens} new "
                "tokens; send less text, fewer frames or a larger temporal_sample_stride, or ask for fewer new tokens")
        return sampling

    def literal(self, text: str) -> str:
        """`text` with the processor's placeholders as text (`StormProcessor.literal`)."""
        return self.processor.literal(text)

    def _literal_messages(self, messages: list[dict]) -> list[dict]:
        """`messages` with every text `literal`; adjacent text items are joined first (the template
        joins them too: "<vid" + "eo>" must not spell a placeholder)."""
        out = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = self.literal(content)
            else:
                joined: list[dict] = []
                for item in content:
                    if item.get("type") == "text" and joined and joined[-1].get("type") == "text":
                        joined[-1] = {**joined[-1], "text": joined[-1]["text"] + item["text"]}
                    else:
                        joined.append(item)
                content = [{**item, "text": self.literal(item["text"])} if item.get("type") == "text" else item
                           for item in joined]
            out.append({**message, "content": content})
        return out

    def submit(self, prepared: _Prepared, videos: Sequence[np.ndarray] = (),
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a prepared request with its videos ((T, H, W, 3) uint8 each, no more frames than
        `prepare` was told); EngineBusy when `max_queue` requests are already waiting, or when its
        frames would take the frames waiting past `max_queue_frames`."""
        layout = self.config.visual_token_layout.with_sample_stride(prepared.stride)
        prepared.videos = list(videos)
        prepared.visual_tokens = sum(layout.num_tokens(len(v)) for v in prepared.videos)
        handle = RequestHandle(prepared, loop, on_cancel=self._withdraw)
        with self._wakeup:
            if self._closed:
                raise StormError("the engine is shut down")
            self._check_room(1, prepared.videos)
            self._waiting.append(handle)
            self._wakeup.notify()
        return handle

    def check_room(self, frames: int, requests: int = 1) -> None:
        """EngineBusy when the queue cannot take `requests` more requests holding `frames` more video
        frames now (what `submit` checks), so a request is turned away before its videos are
        decoded; `submit` checks again, with the frames decoded."""
        with self._wakeup:
            self._check_room(requests, frames=frames)

    def _check_room(self, requests: int, videos: Sequence[np.ndarray] = (), frames: int = 0) -> None:
        """EngineBusy unless `requests` more fit `max_queue` and their `videos` (arrays already
        waiting counted once) and `frames` fit `max_queue_frames`; a request that finds no frames
        waiting is taken whatever its frames. Called holding `_wakeup`."""
        if len(self._waiting) + requests > self.max_queue:
            raise EngineBusy(f"{len(self._waiting)} requests are waiting already; try again later",
                             retry_after=self._retry_after())
        waiting = [v for h in self._waiting for v in h.prepared.videos]
        if waiting and _frames(waiting + list(videos)) + frames > self.max_queue_frames:
            raise EngineBusy(f"{_frames(waiting)} video frames are waiting already (at most "
                             f"{self.max_queue_frames}); try again later", retry_after=self._retry_after())

    def _withdraw(self, handle: RequestHandle) -> None:
        """A cancelled request that is still waiting (its client hung up) leaves the queue at once:
        its place is free for the next request and its frames are no longer held for nobody."""
        with self._wakeup:
            try:
                self._waiting.remove(handle)
            except ValueError:  # the worker has it already, or it is done
                return
        handle.emit("done", Completion("", "cancelled", 0, 0, 0, {}))

    def _retry_after(self) -> int:
        per_batch = sum(self._recent_s) / len(self._recent_s) if self._recent_s else 1.0
        batches = math.ceil((len(self._waiting) + 1) / self.max_batch_size)
        return max(1, math.ceil(per_batch * batches))

    def close(self) -> None:
        """Stop the worker after the batch it is running; waiting requests are cancelled; the caches
        let go of what they hold (on the model's device: the engine object may outlive its use)."""
        with self._wakeup:
            self._closed = True
            for handle in self._waiting:
                handle.emit("error", StormError("the engine is shutting down"))
            self._waiting.clear()
            self._wakeup.notify()
        self._worker.join(timeout=60)
        self.video_cache.close()
        self.prefix_cache.close()

    # ------------------------------------------------------------------ the worker

    def _next_batch(self) -> list[RequestHandle] | None:
        with self._wakeup:
            while not self._waiting and not self._closed:
                self._wakeup.wait()
            if self._closed:
                return None
            first = self._waiting.popleft()
            key = (first.prepared.sampling.batch_key(first.id), first.prepared.stride)
            batch, frames = [first], first.prepared.frames
            for handle in list(self._waiting):
                if len(batch) >= self.max_batch_size:
                    break
                if (handle.prepared.sampling.batch_key(handle.id), handle.prepared.stride) == key \
                        and frames + handle.prepared.frames <= self.max_batch_frames:
                    self._waiting.remove(handle)
                    batch.append(handle)
                    frames += handle.prepared.frames
        return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            if self._run_or_fail(batch, started):
                self._recent_s.append(time.perf_counter() - started)

    def _run_or_fail(self, handles: list[RequestHandle], started: float) -> bool:
        """Run the requests of `handles` not cancelled as one batch (False: all were). When that
        raises, each request that has shown nothing yet runs again alone, so one request the model
        cannot take (or a batch too large for the device's memory) fails only itself; the others are
        told the error (the server's, a 503). The worker goes on either way; an error that is not a
        StormError goes to the log with its traceback."""
        live = []
        for handle in handles:
            if handle.cancelled:
                handle.emit("done", Completion("", "cancelled", 0, 0, 0, {}))
            else:
                live.append(handle)
        if not live:
            return False
        try:
            with self.model_lock:
                self._run(live, started)
            return True
        except StormError as exc:
            error = exc
        except Exception as exc:
            log.error("a batch of %d requests failed", len(live), exc_info=exc)
            error = StormError(f"generation failed ({type(exc).__name__}: {exc})")
        for handle in live:
            if handle.finished:
                continue
            if len(live) > 1 and not handle.streamed:
                self._run_or_fail([handle], started)
            else:
                handle.emit("error", error)
        return True

    def _encode(self, handles: list[RequestHandle]):
        """The processor's inputs of `handles` as one batch (videos padded, prompts left-padded)."""
        return self.processor(text=[h.prepared.prompt for h in handles],
                              videos=[v for h in handles for v in h.prepared.videos] or None,
                              temporal_sample_stride=handles[0].prepared.stride, padding_side="left",
                              return_tensors="pt")

    def _inputs(self, handles: list[RequestHandle]):
        """(handles, their inputs). When the batch's inputs cannot be built, each request is built
        alone: one that fails is answered with a RequestError and left out, so a request never
        fails the ones it was batched with."""
        try:
            return handles, self._encode(handles)
        except Exception as exc:
            if len(handles) == 1:
                raise _request_error(exc) from exc
        kept = []
        for handle in handles:
            try:
                self._encode([handle])
                kept.append(handle)
            except Exception as exc:
                handle.emit("error", _request_error(exc))
        return kept, (self._encode(kept) if kept else None)

    def _run(self, handles: list[RequestHandle], started: float) -> None:
        handles, inputs = self._inputs(handles)
        if not handles:
            return
        first = handles[0].prepared
        device, dtype = self.model.device, self.model.dtype
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        rows = _Rows(self.processor.tokenizer, handles, self._eos)
        if first.sampling.seed is not None:
            torch.manual_seed(first.sampling.seed)
        kept = self.video_cache.max_bytes or self.prefix_cache.max_bytes  # keys must then name the frames
        salts = [h.prepared.cache_salt for h in handles for _ in h.prepared.videos]
        keys = [(*key, salt) for key, salt in zip(video_keys([v for h in handles for v in h.prepared.videos],
                                                             first.stride, by_content=bool(kept)), salts)]
        alone = (len(handles) == 1 and self.prefix_cache.max_bytes > 0
                 and self.model.generation_config.cache_implementation is None)  # a static cache is generate's own
        prefix_keys = [*keys, ("cache_salt", first.cache_salt)]  # a text-only prompt is salted too
        cache, reused = self.prefix_cache.take(inputs["input_ids"][0].tolist(), prefix_keys) if alone else (None, 0)
        with torch.inference_mode(), self.predictor._context():
            if reused:  # the cached start holds every video: generate reads only the ids after it
                inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
            else:
                inputs = encode_each_video_once(self.model, inputs, keys, self.video_cache)
                cache = StormKVCache(config=self._text_config) if alone else None
            out = self.model.generate(**inputs, **first.sampling.generate_kwargs(), streamer=rows,
                                      max_new_tokens=max(h.prepared.sampling.max_new_tokens for h in handles),
                                      stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]), pad_token_id=self._pad,
                                      **({} if cache is None else {"cache": cache}))
        if alone:
            self.prefix_cache.put(getattr(out, "sequences", out)[0].tolist(), prefix_keys, cache)
        rows.end()
        end = time.perf_counter()
        prompt_lengths = inputs["attention_mask"].sum(1).tolist()
        for i, handle in enumerate(handles):
            p = handle.prepared
            handle.emit("done", Completion(
                text=rows.text[i], finish_reason=rows.finish[i], prompt_tokens=int(prompt_lengths[i]),
                completion_tokens=rows.generated[i],
                visual_tokens=p.visual_tokens,
                timings={"wait_s": round(started - handle.submitted, 4),
                         "prefill_s": round((rows.first_token_at or end) - started, 4),
                         "generate_s": round(end - started, 4), "batch_size": len(handles)},
                temporal_sample_stride=self.config.visual_token_layout.with_sample_stride(p.stride).temporal_sample_stride,
                stride_planned=p.planned, cached_tokens=reused))

    # ------------------------------------------------------------------ one question (/v1/answer, chat, web)

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
        check_text(question, "question", "the text")  # the tokenizer takes neither NUL nor a lone surrogate
        if options is not None:
            if isinstance(options, str) or not isinstance(options, (list, tuple)) \
                    or not all(isinstance(o, str) for o in options):
                raise StormError("options must be a list of strings")
            if len(options) > MAX_OPTIONS:
                raise StormError(f"give between 2 and {MAX_OPTIONS} options, got {len(options)}")
            options = [o.strip() for o in options]
            if not options:
                options = None
            elif len(options) < 2:
                raise StormError(f"give between 2 and {MAX_OPTIONS} options, got {len(options)}")
            elif not all(options):
                raise StormError("options must not be empty strings")
            elif max(len(o) for o in options) > MAX_OPTION_CHARS:
                raise StormError(f"each option must be at most {MAX_OPTION_CHARS} characters")
            else:
                options = [strip_letter(check_text(o, "options", "an option"), i) or o for i, o in enumerate(options)]
        num_frames = self.default_frames if num_frames is None else num_frames
        _check_int("frames", num_frames, 1, self.max_frames)
        if temporal_sample_stride is not None:
            _check_int("temporal_sample_stride", temporal_sample_stride, 1, 64)
        _check_int("max_new_tokens", max_new_tokens, 1, self.max_new_tokens_limit)
        return question.strip(), options, num_frames, temporal_sample_stride, max_new_tokens

    def prepare_question(self, question: str, options: Sequence[str] | None = None, num_frames: int | None = None,
                         temporal_sample_stride: int | None = None, max_new_tokens: int = 64):
        """Validate a one-turn question about one video and render it: (prepared, options, frames)."""
        question, options, num_frames, stride, max_new_tokens = self.check_request(
            question, options, num_frames, temporal_sample_stride, max_new_tokens)
        prepared = self.prepare(build_messages(self.prompt(question, options)), [num_frames],
                                self.check_sampling(max_new_tokens), stride)
        return prepared, options, num_frames

    def read_video(self, video_path, num_frames: int, start: float | None = None, end: float | None = None,
                   fps: float | None = None, cancel=None):
        """`load_video` for a request: frames scaled while decoding to the model's input size,
        at most `decode_timeout_s`, stopped when `cancel` (a threading.Event) is set; the decode
        time is in `clip.extra["decode_s"]`."""
        t0 = time.perf_counter()
        clip = load_video(video_path, num_frames=num_frames, fps=fps, start=start, end=end,
                          min_side=self.processor.image_size, timeout_s=self.decode_timeout_s, cancel=cancel)
        clip.extra["decode_s"] = round(time.perf_counter() - t0, 4)
        return clip

    def answer_body(self, completion: Completion, clip, options, prepared: _Prepared, started: float) -> dict:
        """The JSON of `answer` / `/v1/answer` for a finished one-video question."""
        layout = self.config.visual_token_layout.with_sample_stride(prepared.stride)
        frames = len(clip)  # a still image gives one frame
        choice = extract_choice(completion.text, options) if options else None
        return {
            "answer": completion.text,
            "choice": choice,
            "choice_letter": None if choice is None else LETTERS[choice],
            "options": options,
            "visual_tokens": layout.num_tokens(frames),
            "frames": frames,
            "visual_frames": layout.num_frames(frames),
            "temporal_sample_stride": layout.temporal_sample_stride,
            "stride_planned": prepared.planned,
            "text_tokens": prepared.text_tokens,
            "video": {
                "duration_s": round(float(clip.duration), 3),
                "native_fps": None if clip.native_fps is None else round(float(clip.native_fps), 3),
                "repeated": bool(clip.repeated),
            },
            "timings": {"decode_s": clip.extra.get("decode_s"),
                        **{k: completion.timings.get(k) for k in ("wait_s", "prefill_s", "generate_s", "batch_size")},
                        "total_s": round(time.perf_counter() - started, 4)},
        }

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
        tower + projector + LLM prefill, to the first token), generate_s (the whole generate
        call, prefill included), total_s.
        Raises StormError for bad parameters and VideoDecodeError (a StormError) for a bad video.
        """
        started = time.perf_counter()
        prepared, options, num_frames = self.prepare_question(question, options, num_frames, temporal_sample_stride,
                                                              max_new_tokens)
        clip = self.read_video(video_path, num_frames, start, end)
        completion = self.submit(prepared, [clip.frames]).result()
        return self.answer_body(completion, clip, options, prepared, started)
