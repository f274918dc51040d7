"""Work reused across requests (`storm_vlm.serve.caches`, `Predictor.generate(reuse=...)`) gives the
answers computed from scratch, whatever the shared start, and holds no more memory than it counts."""

import contextlib

import pytest
import torch
from helpers import random_video
from transformers import LogitsProcessorList

from storm_vlm.errors import StormError
from storm_vlm.inference import Predictor, build_messages, load_model
from storm_vlm.model.kv_cache import StormKVCache
from storm_vlm.serve.caches import PrefixCache, VideoTokenCache
from storm_vlm.serve.engine import SamplingParams, StormEngine, _Rows

GREEDY8 = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def engine(qwen2_mamba_dir):
    engine = StormEngine(qwen2_mamba_dir, default_frames=4, max_frames=16, max_batch_size=4, precision="float32")
    yield engine
    engine.close()


def _submit(engine, question, frames, history=(), sampling=GREEDY8, stride=None, system=None):
    prepared = engine.prepare(build_messages(question, history, system), [len(frames)], sampling, stride)
    return engine.submit(prepared, [frames.copy()])


def _ask(engine, *args, **kwargs):
    return _submit(engine, *args, **kwargs).result()


@contextlib.contextmanager
def _no_caches(engine):
    """The engine computing everything from scratch (and keeping nothing) inside the block."""
    budget, videos = engine.prefix_cache.max_bytes, engine.video_cache
    engine.prefix_cache.max_bytes, engine.video_cache = 0, VideoTokenCache(0)
    try:
        yield
    finally:
        engine.prefix_cache.max_bytes, engine.video_cache = budget, videos


def _same_as_scratch(engine, *args, **kwargs):
    """The completion with the caches, after checking it is the one computed from scratch."""
    got = _ask(engine, *args, **kwargs)
    with _no_caches(engine):
        want = _ask(engine, *args, **kwargs)
    assert (got.text, got.completion_tokens, got.finish_reason) == (want.text, want.completion_tokens, want.finish_reason)
    return got


def test_reused_starts_answer_as_from_scratch(engine):
    """Starts that end anywhere (inside the last prompt, before a changed system prompt, at a
    strict prefix of the kept sequence, after a stop string or a cancelled answer, after an answer
    that grew the KV buffer) and settings that change the visual tokens give the scratch answer."""
    video, one_frame = random_video(4, seed=31), random_video(1, seed=32)
    first = _same_as_scratch(engine, "What colour is the square?", video)
    again = _same_as_scratch(engine, "What colour is the square?", video)  # a strict prefix of the kept sequence
    assert again.cached_tokens == again.prompt_tokens - 1
    history = [("What colour is the square?", first.text)]
    assert _same_as_scratch(engine, "And the background?", video, history).cached_tokens > first.prompt_tokens - 5
    assert _same_as_scratch(engine, "And the background?", video, history, system="Be terse.").cached_tokens == 0
    _same_as_scratch(engine, "And the background?", video, history, system="Be verbose.")
    assert _same_as_scratch(engine, "What colour is the square?", video, stride=2).cached_tokens == 0
    _same_as_scratch(engine, "What colour is the squares?", video, stride=2)
    _same_as_scratch(engine, "Describe the supercalifragilistic", video)  # shares the start of a longer word
    _same_as_scratch(engine, "Describe the supercalifragilisticexpialidocious", video)
    _same_as_scratch(engine, "What colour is the square?", one_frame)
    assert _same_as_scratch(engine, "What colour is the squares?", one_frame).cached_tokens > 0
    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    _same_as_scratch(engine, "Tell a story", video, sampling=seeded)
    assert _same_as_scratch(engine, "Tell a story", video, sampling=seeded).cached_tokens > 0
    stopped = _same_as_scratch(engine, "Describe it", video,
                               sampling=SamplingParams(max_new_tokens=12, stop=(first.text[2:4],)))
    assert stopped.finish_reason == "stop" and stopped.completion_tokens < 12
    _same_as_scratch(engine, "More?", video, [("Describe it", stopped.text)])
    handle, said = _submit(engine, "Describe it fully", video, sampling=SamplingParams(max_new_tokens=30)), ""
    for kind, payload in handle.events():
        handle.cancel()  # after the first piece of text
        said += payload if kind == "delta" else ""
    assert payload.finish_reason == "cancelled"
    _same_as_scratch(engine, "More?", video, [("Describe it fully", said)])
    long = SamplingParams(max_new_tokens=200)  # past the KV buffer's spare room (128 tokens)
    assert _same_as_scratch(engine, "Write a lot", video, sampling=long).completion_tokens == 200
    assert _same_as_scratch(engine, "Write a lot", video, sampling=long).cached_tokens > 0


def test_a_request_that_fails_mid_answer_leaves_the_caches_as_they_were(engine, monkeypatch):
    video = random_video(4, seed=33)
    _ask(engine, "What colour is the square?", video)
    before = (dict(engine.prefix_cache._items), engine.prefix_cache.bytes)
    original, seen = _Rows._add, []

    def failing(rows, i, token):
        seen.append(token)
        if len(seen) == 3:
            raise RuntimeError("broken mid-answer")
        return original(rows, i, token)

    monkeypatch.setattr(_Rows, "_add", failing)
    with pytest.raises(StormError, match="broken mid-answer"):
        _ask(engine, "What colour is the square now?", video)
    monkeypatch.setattr(_Rows, "_add", original)
    assert (dict(engine.prefix_cache._items), engine.prefix_cache.bytes) == before
    assert _same_as_scratch(engine, "What colour is the square now?", video).cached_tokens > 0


def _held_bytes(cache: StormKVCache) -> int:
    """The bytes of every distinct tensor storage the cache's layers keep alive."""
    storages = {}
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def test_the_prefix_cache_counts_all_the_memory_its_entries_hold(engine):
    """The decode step keeps a transposed copy of the keys beside the buffers: a kept entry drops it
    (never read again), so what is counted against --prefix-cache-mb is what is held."""
    _ask(engine, "How many squares?", random_video(4, seed=34))
    entries = list(engine.prefix_cache._items.values())
    assert entries and engine.prefix_cache.bytes == sum(size for _, size in entries)
    assert [_held_bytes(cache) for cache, _ in entries] == [size for _, size in entries]


def test_the_previous_turn_is_not_kept_beside_the_turn_that_continues_it():
    V = 9  # the placeholder id

    def kv(length):
        cache = StormKVCache()
        cache.update(torch.zeros(1, 1, length, 2), torch.zeros(1, 1, length, 2), 0)
        return cache

    prefix = PrefixCache(10**6, None, {V})
    prefix.put([1, V, V, 2, 3], ["video"], kv(4))
    prefix.put([1, V, V, 2, 3, 4, 5], ["another video"], kv(6))
    prefix.put([1, V, V, 2, 3, 4, 5], ["video"], kv(6))  # the next turn: the first entry gives nothing more
    branch = kv(5)
    prefix.put([1, V, V, 2, 7, 8], ["video"], branch)  # another branch of the conversation stays
    assert sorted((len(ids), keys) for ids, keys in prefix._items) == [(5, ("video",)), (6, ("another video",)),
                                                                       (6, ("video",))]
    assert prefix.bytes == sum(size for _, size in prefix._items.values())
    assert prefix.take([1, V, V, 2, 3, 6], ["video"])[1] == 5
    assert prefix.take([1, V, V, 2, 7, 8, 6], ["video"])[1] == 5


def test_a_view_is_counted_as_the_tensor_it_keeps_alive():
    cache = VideoTokenCache(10**6)
    cache.put("video", torch.zeros(1000, 8)[:10])
    assert cache.bytes == 1000 * 8 * 4


def test_closing_the_engine_frees_what_its_caches_hold(qwen2_mamba_dir):
    engine = StormEngine(qwen2_mamba_dir, default_frames=4, max_frames=4, precision="float32")
    _ask(engine, "What colour?", random_video(4, seed=35))
    assert len(engine.prefix_cache) and len(engine.video_cache)
    engine.close()
    assert (len(engine.prefix_cache), engine.prefix_cache.bytes, len(engine.video_cache), engine.video_cache.bytes) \
        == (0, 0, 0, 0)
    engine.video_cache.put("late", torch.zeros(4))  # a batch finishing after close keeps nothing
    assert len(engine.video_cache) == 0


def test_a_kept_predictor_cache_answers_as_from_scratch_after_chunks_beams_and_errors(qwen2_mamba_dir):
    model, processor = load_model(qwen2_mamba_dir, "cpu", "float32")
    reusing, scratch = (Predictor(model, processor, max_new_tokens=6, reuse_prefix=r) for r in (True, False))
    video = random_video(4, seed=36)

    def same(question, **generation):
        got = reusing.reply(question, video.copy(), **generation)
        assert got == scratch.reply(question, video, **generation)

    same("What colour is the square?")
    same("What colour is the square?", prefill_chunk_size=5)  # the whole prompt but its last token kept
    same("Where is the thing?", prefill_chunk_size=3)
    same("Where is the thing?", num_beams=2)  # beams start over and leave the kept cache alone
    assert reusing._kept is not None
    same("Where is the thing now?")

    steps = []

    def fail(input_ids, scores):
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("broken mid-answer")
        return scores

    with pytest.raises(RuntimeError, match="broken mid-answer"):
        reusing.reply("Where is the thing now?", video, logits_processor=LogitsProcessorList([fail]))
    assert reusing._kept is None  # a cache cut and grown halfway is not kept
    same("Where is the thing now?")
