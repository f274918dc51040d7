"""`StormStream`: a video that keeps arriving, encoded once as it comes, and questions about it.

STORM's causal (unidirectional) projector makes this possible: its Mamba state summarises every
frame seen so far, so frames can go through the vision tower and the projector chunk by chunk,
with each layer's conv and SSM state carried from one chunk to the next, and the compressed
tokens can be appended to the LLM's KV cache as they are made. Nothing is ever encoded twice.

What `feed(frames)` does with a chunk of T_c frames:

1. vision tower + pixel shuffle + the projector's Linear and LayerNorms, frame by frame; the Mamba
   mixers continue from the states the previous chunk left (`model.encode_video_chunk`). The
   sweep order is frame after frame, so a chunk is a contiguous piece of the whole video's
   sequence: the outputs equal those of encoding the whole video at once.
2. temporal pooling k across chunk boundaries: frames of a pooling window that is not complete
   yet wait in a buffer (at most k - 1 frames) until the window's last frame arrives; then
   spatial pooling p; then test-time sampling s by the pooled frame's global index (0, s, 2s, ...).
3. the LLM prefill runs over the new visual tokens only, appended to the KV cache after the
   prompt's opening (system prompt, user turn, up to where the `<video>` placeholder stands); their
   positions continue from the cache.

`ask(question)` appends the rest of the user turn (the text after `<video>`: the question) and the
assistant turn's opening, generates, and then crops the cache back to the video part: the
question turn never stays in the cache, so the video part keeps growing cleanly and every
question is asked as the first (and only) one about the video so far. A pooling window that is
not complete when a question comes is answered with, as a one-shot pass over the frames seen so
far would (its last group is averaged over the frames it has): the partial window's average is
appended for the question only and dropped with it; the window goes on filling afterwards.

Until the memory budget is reached, an answer is the one a one-shot pass over the same frames
gives (same prompt tokens, same features, same KV cache up to floating-point rounding; the tests
check greedy answers token for token). Past the budget (`max_visual_tokens`), a memory policy
(`storm_vlm.streaming.memory`) chooses which pooled frames stay; the kept frames' compressed
features (what the projector and pooling made, never pixels) are held for that, and the KV cache
is rebuilt from them: a prefill over at most `max_visual_tokens` tokens, once per about a quarter
of the budget of new tokens. Memory is then bounded: the KV cache and the kept features for
`max_visual_tokens` tokens, one pooling window of projector outputs, and the Mamba states (a fixed
size per layer), whatever the video's length.

Shapes: frames (T, H, W, 3) uint8; N tokens per frame leaving the projector, N' after spatial
pooling; D the LLM width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessorList

from storm_vlm.errors import StormError
from storm_vlm.inference import Predictor, Reply, _FirstLogits, as_text, build_messages, decoding
from storm_vlm.model.compression import spatial_pool, temporal_pool
from storm_vlm.model.kv_cache import StormKVCache
from storm_vlm.model.processing import _frames_of
from storm_vlm.streaming.memory import DEFAULT_POLICY, check_policy, select_kept
from storm_vlm.utils import check_int

__all__ = ["StormStream", "ChunkStats", "check_streamable", "ROOM_FOR_TEXT"]

# Positions the default budget leaves for the question, the template around it and the answer.
ROOM_FOR_TEXT = 1024
# Visual tokens per LLM forward when a chunk or a rebuild is appended (bounds activation memory).
PREFILL_TOKENS = 2048


def check_streamable(config) -> None:
    """StormError unless the model's projector can encode a video chunk by chunk."""
    if config.projector_type == "mamba" and config.projector_bidirectional:
        raise StormError(
            "this model's projector is bidirectional (projector_bidirectional=True): each token depends on "
            "frames that have not arrived yet, so it cannot encode a stream chunk by chunk. Streaming needs a "
            "model trained with the causal projector, projector_bidirectional=False (the paper's unidirectional "
            "variant); ask a bidirectional model about a finished video with `storm-vlm chat` instead")


@dataclass
class ChunkStats:
    """What one `feed` did. Times in seconds: encode_s (vision tower + projector + pooling),
    prefill_s (the LLM over the new visual tokens), rebuild_s (a memory-policy rebuild, 0 if none)."""

    frames: int
    new_visual_tokens: int
    visual_tokens: int
    encode_s: float
    prefill_s: float
    rebuild_s: float

    @property
    def seconds(self) -> float:
        return self.encode_s + self.prefill_s + self.rebuild_s


class StormStream:
    """A video arriving chunk by chunk into a model with a causal projector, and questions about it.

    Args:
        predictor: a `storm_vlm.inference.Predictor` (model, processor, precision).
        temporal_sample_stride: s, keep pooled frames 0, s, 2s, ... (None: the model's default).
        max_visual_tokens: the memory budget in visual tokens (None: the LLM's positions less the
            prompt's opening and `ROOM_FOR_TEXT` for the question and the answer).
        memory_policy: what to keep of the past once the budget is reached (see
            `storm_vlm.streaming.memory`): "resample" (default), "uniform" or "window".
        system: a system prompt (None: the chat template's default).

    Not thread-safe: one caller at a time (the server holds a lock per session and the model's lock).
    """

    def __init__(self, predictor: Predictor, *, temporal_sample_stride: int | None = None,
                 max_visual_tokens: int | None = None, memory_policy: str = DEFAULT_POLICY,
                 system: str | None = None):
        self.predictor = predictor
        self.model = predictor.model
        self.processor = predictor.processor
        config = self.model.config
        check_streamable(config)
        if temporal_sample_stride is None:
            temporal_sample_stride = predictor.temporal_sample_stride
        self.layout = config.visual_token_layout.with_sample_stride(temporal_sample_stride)
        self.k = self.layout.temporal_pool_size
        self.p = self.layout.spatial_pool_stride
        self.s = self.layout.temporal_sample_stride
        self.tokens_per_frame = self.layout.tokens_per_frame
        self.memory_policy = check_policy(memory_policy)
        self.system = system
        self.video_token_id = self.processor.video_token_id
        self.limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        self._prefix_ids, _ = self._split_prompt("?")
        room = (self.limit or 0) - len(self._prefix_ids)
        if max_visual_tokens is None:
            if self.limit is None:
                raise StormError("the LLM does not say how many positions it has (max_position_embeddings): "
                                 "give max_visual_tokens")
            max_visual_tokens = (room - ROOM_FOR_TEXT) // self.tokens_per_frame * self.tokens_per_frame
        check_int("max_visual_tokens", max_visual_tokens, 1, error=StormError)
        if max_visual_tokens < self.tokens_per_frame:
            raise StormError(f"max_visual_tokens {max_visual_tokens} is less than one frame's "
                             f"{self.tokens_per_frame} visual tokens (the LLM has {self.limit} positions)")
        if self.limit is not None and max_visual_tokens + self.tokens_per_frame > room - 16:
            raise StormError(
                f"max_visual_tokens {max_visual_tokens} (+ {self.tokens_per_frame} for a partial pooling window) "
                f"leaves no room for a question in the LLM's {self.limit} positions ({len(self._prefix_ids)} "
                "of them for the prompt's opening)")
        self.max_visual_tokens = int(max_visual_tokens)
        self.budget_frames = self.max_visual_tokens // self.tokens_per_frame
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget the video (states, buffers, kept features, KV cache); the settings stay."""
        self.frames_seen = 0
        self.pooled_frames = 0  # complete pooling windows so far (the global index of the next one)
        self.rebuilds = 0
        self._states = None
        self._window: list[torch.Tensor] = []  # projector outputs (N, D) of the incomplete pooling window
        self._kept: list[tuple[int, torch.Tensor]] = []  # (pooled index, features (N', D)), oldest first
        self._cache = None
        self._stale = False  # the cache does not hold the kept features (an append failed): rebuild it

    @property
    def visual_tokens(self) -> int:
        """Visual tokens in the KV cache (the kept pooled frames; a partial window is not counted)."""
        return len(self._kept) * self.tokens_per_frame

    @property
    def kept_indices(self) -> list[int]:
        """Global indices of the pooled frames the stream keeps (frame j pools input frames j·k ... j·k + k - 1)."""
        return [j for j, _ in self._kept]

    def features(self) -> torch.Tensor:
        """The kept visual tokens as the LLM reads them: (T', N', D) (T' = 0 before any frame)."""
        if not self._kept:
            return torch.zeros(0, self.tokens_per_frame, self.model.config.text_config.hidden_size)
        return torch.stack([f for _, f in self._kept])

    def memory_bytes(self) -> dict:
        """Bytes held for this stream: KV cache (its buffers' capacity), kept features, pooling window, states."""
        kv = 0
        if self._cache is not None:
            for layer in self._cache.layers:
                for name in ("_key_buf", "_value_buf", "keys", "values"):
                    t = getattr(layer, name, None)
                    if isinstance(t, torch.Tensor):
                        kv += t.untyped_storage().nbytes()
                        if name == "_value_buf":
                            break
        feats = sum(f.numel() * f.element_size() for _, f in self._kept)
        window = sum(f.numel() * f.element_size() for f in self._window)
        states = sum(t.numel() * t.element_size() for st in (self._states or []) for t in st)
        return {"kv_cache": kv, "features": feats, "window": window, "states": states,
                "total": kv + feats + window + states}

    def stats(self) -> dict:
        return {"frames": self.frames_seen, "pooled_frames": self.pooled_frames, "kept_frames": len(self._kept),
                "visual_tokens": self.visual_tokens, "max_visual_tokens": self.max_visual_tokens,
                "memory_policy": self.memory_policy, "rebuilds": self.rebuilds,
                "temporal_pool_size": self.k, "spatial_pool_stride": self.p, "temporal_sample_stride": self.s,
                "cache_tokens": 0 if self._cache is None else self._cache.get_seq_length()}

    # ------------------------------------------------------------------ prompt

    def _split_prompt(self, question: str) -> tuple[list[int], list[int]]:
        """(ids before the video's tokens, ids after them) of the one-shot prompt for `question`,
        tokenized exactly as the processor tokenizes it (the video's run of placeholders cut out)."""
        p = self.predictor
        prompt = p.render(build_messages(question, system=self.system))
        if prompt.count(self.processor.video_token) != 1:
            raise StormError("the chat template does not put exactly one <video> in the first user turn")
        ids = self.processor(text=prompt, videos=[np.zeros((1, 2, 2, 3), np.uint8)], temporal_sample_stride=self.s,
                             return_tensors=None)["input_ids"][0]
        where = [i for i, t in enumerate(ids) if t == self.video_token_id]
        return list(ids[: where[0]]), list(ids[where[-1] + 1:])

    def _context(self):
        return self.predictor._context()

    # ------------------------------------------------------------------ the LLM's cache

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        tensor = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        return self.model.get_input_embeddings()(tensor)

    def _append(self, embeds: torch.Tensor) -> None:
        """Run the LLM over embeds (1, L, D) after what the cache holds, in pieces of PREFILL_TOKENS."""
        decoder = self.model.get_decoder()
        dtype = self.model.get_input_embeddings().weight.dtype
        for i in range(0, embeds.shape[1], PREFILL_TOKENS):
            decoder(inputs_embeds=embeds[:, i:i + PREFILL_TOKENS].to(dtype), cache=self._cache, use_cache=True)

    def _new_cache(self) -> None:
        self._cache = StormKVCache(config=self.model.config.get_text_config(decoder=True))
        self._append(self._embed_ids(self._prefix_ids))

    def _rebuild(self) -> None:
        """A fresh KV cache: the prompt's opening, then the kept frames' tokens at their new positions."""
        self._stale = True
        self._new_cache()
        if self._kept:
            self._append(self.features().to(self.model.device)[None].flatten(1, 2))
        self._stale = False
        self.rebuilds += 1

    def _cached_length(self) -> int:
        return len(self._prefix_ids) + self.visual_tokens

    # ------------------------------------------------------------------ feeding

    def _pixels(self, frames) -> torch.Tensor:
        try:
            frames = _frames_of(frames, 0)
        except StormError as exc:
            raise StormError(f"feed: {str(exc).removeprefix('video 0: ')}") from None
        pixels = self.processor._pixels(list(frames))
        return pixels.to(self.model.device, self.model.dtype)

    def _pool(self, frames: torch.Tensor) -> torch.Tensor:
        """Temporal (over the frames given: one window) and spatial pooling: (F, N, D) -> (N', D)."""
        pooled, _ = temporal_pool(frames[None], frames.shape[0])
        pooled, _ = spatial_pool(pooled, self.p)
        return pooled[0, 0]

    def feed(self, frames) -> ChunkStats:
        """Encode the next frames ((T, H, W, 3) uint8, a list of (H, W, 3) frames or a clip with
        `.frames`) and append their visual tokens to the cache; returns what it did."""
        t0 = time.perf_counter()
        pixels = self._pixels(frames)
        with torch.inference_mode(), self._context():
            if self._stale:
                self._rebuild()
            out, self._states = self.model.encode_video_chunk(pixels, self._states)
            self.frames_seen += out.shape[0]
            window = self._window + list(out.unbind(0))
            new = []
            while len(window) >= self.k:
                group, window = window[: self.k], window[self.k:]
                j = self.pooled_frames
                self.pooled_frames += 1
                if j % self.s == 0:
                    new.append((j, self._pool(torch.stack(group))))
            self._window = [f.clone() for f in window]  # a view would hold the whole chunk's outputs
            t1 = time.perf_counter()
            self._kept.extend(new)
            rebuild_s = 0.0
            try:
                if self._cache is None:
                    self._new_cache()
                if len(self._kept) > self.budget_frames:
                    keep = select_kept(len(self._kept), self.budget_frames, self.memory_policy)
                    self._kept = [self._kept[i] for i in keep]
                    t2 = time.perf_counter()
                    self._rebuild()
                    rebuild_s = time.perf_counter() - t2
                elif new:
                    self._append(torch.stack([f for _, f in new])[None].flatten(1, 2))
            except BaseException:
                # the kept features are complete; a cache left half-appended (out of memory, an
                # interrupt) is rebuilt from them before it is used again
                self._stale = True
                raise
        end = time.perf_counter()
        tokens = len(new) * self.tokens_per_frame
        return ChunkStats(frames=int(pixels.shape[0]), new_visual_tokens=tokens, visual_tokens=self.visual_tokens,
                          encode_s=round(t1 - t0, 6), prefill_s=round(end - t1 - rebuild_s, 6),
                          rebuild_s=round(rebuild_s, 6))

    # ------------------------------------------------------------------ asking

    def ask(self, question: str, max_new_tokens: int = 64, streamer=None, **generation) -> Reply:
        """Answer `question` from the frames seen so far (greedy unless `generation` says otherwise).

        Nothing is encoded again: the question and the answer run after the cached video, and are
        cropped off afterwards (also when generating fails), so a question never changes what the
        next one sees. The question is text (`storm_vlm.inference.as_text`). StormError before any
        frame, or when the question and the answer would not fit the LLM's positions.
        """
        if not isinstance(question, str) or not question.strip():
            raise StormError("the question must be a non-empty string")
        check_int("max_new_tokens", max_new_tokens, 1, error=StormError)
        if self.frames_seen == 0:
            raise StormError("no frames have arrived yet: feed the stream before asking about it")
        prefix, suffix = self._split_prompt(as_text(self.processor, question))
        if prefix != self._prefix_ids:
            raise StormError("this chat template renders the prompt before the video differently for each question, "
                             "so a stream cannot keep it cached")
        partial = None
        if self._window and self.pooled_frames % self.s == 0:
            partial = self._pool(torch.stack(self._window))
        visual = self.visual_tokens + (self.tokens_per_frame if partial is not None else 0)
        needed = len(prefix) + visual + len(suffix) + max_new_tokens
        if self.limit and needed > self.limit:
            raise StormError(f"the question needs {needed} positions ({visual} visual tokens, "
                             f"{len(prefix) + len(suffix)} text tokens, {max_new_tokens} new tokens) but the LLM has "
                             f"{self.limit}; ask a shorter question, fewer new tokens, or stream with a smaller "
                             "max_visual_tokens")
        ids = prefix + [self.video_token_id] * visual + suffix
        cached = self._cached_length()
        t0 = time.perf_counter()
        p = self.predictor
        first = _FirstLogits(self.model.device)
        processors = LogitsProcessorList([*generation.pop("logits_processor", []), first])
        kwargs = {**decoding(generation), "max_new_tokens": max_new_tokens}
        if self._stale:
            with torch.inference_mode(), self._context():
                self._rebuild()
        try:
            with torch.inference_mode(), self._context():
                if partial is not None:
                    self._append(partial[None])
                input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          cache=self._cache, logits_processor=processors, streamer=streamer,
                                          **kwargs)
        finally:
            extra = self._cache.get_seq_length() - cached
            if extra > 0:
                self._cache.crop(-extra)  # drop the partial window, the question and the answer
        end = time.perf_counter()
        new = out[0, len(ids):].tolist()
        text = p.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Reply(text=text, token_ids=new, prompt_tokens=len(ids), visual_tokens=visual,
                     prefill_s=round((first.at or end) - t0, 4), generate_s=round(end - t0, 4))
