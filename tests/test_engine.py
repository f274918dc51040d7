"""StormEngine's queue: batched requests answer as they do alone, each stops on its own budget,
stop string or cancellation, a full queue is refused; and /v1/answer's input bounds."""

import threading

import numpy as np
import pytest
import torch
from helpers import random_video, write_mp4

from storm_vlm.errors import StormError
from storm_vlm.inference import build_messages
from storm_vlm.serve.caches import VideoTokenCache, video_keys
from storm_vlm.serve.engine import EngineBusy, RequestError, SamplingParams, StormEngine


@pytest.fixture(scope="module")
def engine(qwen2_mamba_dir):
    engine = StormEngine(qwen2_mamba_dir, default_frames=4, max_frames=16, max_batch_size=4, max_queue=8,
                         precision="float32")
    yield engine
    engine.close()


def _ask(engine, frames, question, sampling=SamplingParams(max_new_tokens=5), stride=None):
    prepared = engine.prepare(build_messages(question), [len(frames)], sampling, stride)
    return prepared, [frames]


def _paused(engine):
    """Hold the worker between batches until the returned event is set."""
    gate, running = threading.Event(), threading.Event()
    original = engine._run

    def run(handles, started):
        running.set()
        gate.wait(60)
        engine._run = original
        return original(handles, started)

    engine._run = run
    return gate, running


def test_a_batch_answers_as_each_request_alone(engine):
    requests = [_ask(engine, random_video(t, seed=t), q) for t, q in
                [(4, "What colour?"), (7, "How many squares are there?"), (2, "Which way?")]]
    alone = [engine.submit(p, v).result() for p, v in requests]
    gate, running = _paused(engine)
    blocker = engine.submit(*_ask(engine, random_video(3), "hold"))
    running.wait(60)  # the worker is busy: the next three wait and then run together
    handles = [engine.submit(p, v) for p, v in requests]
    gate.set()
    blocker.result()
    together = [h.result() for h in handles]
    assert [c.timings["batch_size"] for c in together] == [3, 3, 3]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [(c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in together] == \
        [(c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in alone]


def test_a_video_asked_about_again_is_not_encoded_again(engine, monkeypatch):
    """The next turn about the same clip (another array of the same frames) starts at the LLM; another
    stride encodes again; answers are those of an engine without the cache."""
    video, seen = random_video(4, seed=11), []
    monkeypatch.setattr(engine.prefix_cache, "max_bytes", 0)  # else the LLM's cache of the first turn is reused
    encode = engine.model._vision_features
    monkeypatch.setattr(engine.model, "_vision_features", lambda frames: seen.append(len(frames)) or encode(frames))
    first = engine.submit(*_ask(engine, video, "What colour?")).result()
    again = engine.submit(*_ask(engine, video.copy(), "What colour is it?")).result()
    assert sum(seen) == 4
    cached = engine.info()["video_cache"]
    assert cached["videos"] >= 1 and 0 < cached["used_mb"] <= cached["max_mb"] == 512
    engine.submit(*_ask(engine, video, "What colour?", stride=2)).result()
    assert sum(seen) == 8
    monkeypatch.setattr(engine, "video_cache", VideoTokenCache(0))
    assert engine.submit(*_ask(engine, video, "What colour?")).result().text == first.text
    assert engine.submit(*_ask(engine, video, "What colour is it?")).result().text == again.text
    assert sum(seen) == 16


def test_the_next_turn_of_a_conversation_prefills_only_what_is_new(engine, monkeypatch):
    """A request that starts with an earlier request's conversation (its video included) reuses
    that request's KV cache: the LLM reads only the new tokens, the video is not encoded, and the
    answer is the one computed from scratch. Another video, or an earlier start, reuses nothing."""
    video, other, sampling = random_video(4, seed=12), random_video(4, seed=13), SamplingParams(max_new_tokens=5)
    prefilled, seen = [], []
    llm, encode = engine.model.language_model.forward, engine.model._vision_features
    monkeypatch.setattr(engine.model.language_model, "forward",
                        lambda *a, **k: (k["inputs_embeds"].shape[1] > 1 and prefilled.append(k["inputs_embeds"].shape[1]))
                        or llm(*a, **k))
    monkeypatch.setattr(engine.model, "_vision_features", lambda frames: seen.append(len(frames)) or encode(frames))

    def ask(question, history=(), frames=video):
        prepared = engine.prepare(build_messages(question, history), [len(frames)], sampling)
        return engine.submit(prepared, [frames.copy()]).result()

    first = ask("What colour is the square?")
    history = [("What colour is the square?", first.text)]
    second = ask("And the background?", history)
    assert first.cached_tokens == 0 and second.cached_tokens > first.prompt_tokens - 5
    assert prefilled[-1] == second.prompt_tokens - second.cached_tokens < second.prompt_tokens // 2
    assert sum(seen) == 4  # the second turn's video came with the reused cache
    assert engine.info()["prefix_cache"]["entries"] >= 2
    assert ask("And the background?", history, frames=other).cached_tokens == 0  # another video
    monkeypatch.setattr(engine.prefix_cache, "max_bytes", 0)
    monkeypatch.setattr(engine, "video_cache", VideoTokenCache(0))
    scratch = ask("And the background?", history)
    assert scratch.cached_tokens == 0 and prefilled[-1] == scratch.prompt_tokens
    assert (scratch.text, scratch.completion_tokens) == (second.text, second.completion_tokens)


def test_the_video_token_cache_keeps_the_most_recent_within_its_bytes():
    cache = VideoTokenCache(max_bytes=3 * 400)
    frames = [np.full((2, 4, 4, 3), i, np.uint8) for i in range(4)]
    keys = video_keys(frames, None)
    assert video_keys([frames[0].copy()], None) == keys[:1]  # the frames decide, not the array
    assert video_keys([frames[0]], 2) != keys[:1] and video_keys([frames[0].reshape(4, 2, 4, 3)], None) != keys[:1]
    assert video_keys(frames[:1], None, by_content=False) == [(id(frames[0]), None)]
    for key in keys[:3]:
        cache.put(key, torch.zeros(100))  # 400 bytes each
    assert cache.get(keys[0]) is not None  # used last: the second is the oldest now
    cache.put(keys[3], torch.zeros(100))
    assert cache.get(keys[1]) is None and all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.bytes == 1200
    cache.put(("big",), torch.zeros(301))  # more than the whole cache: not kept, nothing evicted
    assert cache.get(("big",)) is None and cache.bytes == 1200
    off = VideoTokenCache(0)
    off.put(keys[0], torch.zeros(1))
    assert off.get(keys[0]) is None and off.bytes == 0


def test_a_batch_holds_at_most_max_batch_frames(engine):
    gate, running = _paused(engine)
    blocker = engine.submit(*_ask(engine, random_video(3), "hold"))
    running.wait(60)
    saved, engine.max_batch_frames = engine.max_batch_frames, 10
    try:
        handles = [engine.submit(*_ask(engine, random_video(t, seed=t), "q", SamplingParams(max_new_tokens=1)))
                   for t in (6, 4, 5)]
        gate.set()
        blocker.result()
        assert [h.result().timings["batch_size"] for h in handles] == [2, 2, 1]  # 6 + 4 frames, then 5
    finally:
        engine.max_batch_frames = saved


def test_a_request_that_cannot_be_built_fails_alone(engine):
    """One request whose inputs the processor refuses gets a RequestError (a 4xx); the requests
    batched with it are answered as they are alone."""
    requests = [_ask(engine, random_video(4, seed=i), f"Question {i}?") for i in range(3)]
    alone = [engine.submit(p, v).result().text for p, v in requests]
    broken, videos = _ask(engine, random_video(4), "q")
    broken.prompt += engine.processor.image_token  # a placeholder no image goes with
    gate, running = _paused(engine)
    blocker = engine.submit(*_ask(engine, random_video(3), "hold"))
    running.wait(60)
    handles = [engine.submit(*requests[0]), engine.submit(broken, videos), *(engine.submit(*r) for r in requests[1:])]
    gate.set()
    blocker.result()
    with pytest.raises(RequestError, match="placeholders"):
        handles[1].result()
    answered = [handles[0].result(), handles[2].result(), handles[3].result()]
    assert [c.text for c in answered] == alone and [c.timings["batch_size"] for c in answered] == [3, 3, 3]
    with pytest.raises(RequestError):  # alone, too
        engine.submit(broken, videos).result()


def test_each_request_stops_on_its_own_budget_and_stop_string(engine):
    base = engine.submit(*_ask(engine, random_video(4), "What colour?", SamplingParams(max_new_tokens=8))).result()
    assert len(base.text) > 2
    stop = base.text[2:4]
    gate, running = _paused(engine)
    blocker = engine.submit(*_ask(engine, random_video(3), "hold"))
    running.wait(60)
    short = engine.submit(*_ask(engine, random_video(4), "What colour?", SamplingParams(max_new_tokens=2)))
    stopped = engine.submit(*_ask(engine, random_video(4), "What colour?", SamplingParams(8, stop=(stop,))))
    full = engine.submit(*_ask(engine, random_video(4), "What colour?", SamplingParams(max_new_tokens=8)))
    gate.set()
    blocker.result()
    assert short.result().completion_tokens == 2 and short.result().finish_reason == "length"
    assert stopped.result().text == base.text[:base.text.find(stop)]
    assert stopped.result().finish_reason == "stop"
    assert full.result().text == base.text


def test_a_cancelled_request_stops_without_stopping_the_others(engine):
    gate, running = _paused(engine)
    blocker = engine.submit(*_ask(engine, random_video(3), "hold"))
    running.wait(60)
    cancelled = engine.submit(*_ask(engine, random_video(4), "What colour?", SamplingParams(max_new_tokens=20)))
    other = engine.submit(*_ask(engine, random_video(4), "What colour?", SamplingParams(max_new_tokens=6)))
    gate.set()
    blocker.result()
    for kind, payload in cancelled.events():
        if kind == "delta":
            cancelled.cancel()
        if kind == "done":
            assert payload.finish_reason == "cancelled" and payload.completion_tokens < 20
    assert other.result().finish_reason in ("stop", "length") and other.result().completion_tokens >= 1


def test_streamed_deltas_add_up_to_the_answer(engine):
    handle = engine.submit(*_ask(engine, random_video(4), "What colour?", SamplingParams(max_new_tokens=8)))
    deltas, completion = [], None
    for kind, payload in handle.events():
        if kind == "delta":
            deltas.append(payload)
        elif kind == "done":
            completion = payload
    assert "".join(deltas) == completion.text and completion.completion_tokens >= 1


def test_a_full_queue_is_refused_with_a_retry_hint(engine):
    gate, running = _paused(engine)
    blocker = engine.submit(*_ask(engine, random_video(3), "hold"))
    running.wait(60)
    queued = [engine.submit(*_ask(engine, random_video(2), "q", SamplingParams(max_new_tokens=1)))
              for _ in range(engine.max_queue)]
    with pytest.raises(EngineBusy) as info:
        engine.submit(*_ask(engine, random_video(2), "q"))
    assert info.value.retry_after >= 1
    gate.set()
    blocker.result()
    assert all(h.result().completion_tokens == 1 for h in queued)


def test_seeded_sampling_repeats_and_bad_sampling_is_refused(engine):
    sampling = engine.check_sampling(6, temperature=1.0, top_p=0.9, seed=3)
    a = engine.submit(*_ask(engine, random_video(4), "What colour?", sampling)).result().text
    b = engine.submit(*_ask(engine, random_video(4), "What colour?", sampling)).result().text
    assert a == b
    for kwargs, needle in [({"temperature": float("inf")}, "temperature"), ({"top_p": 0}, "top_p"),
                           ({"stop": [""]}, "stop"), ({"seed": -1}, "seed"), ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(StormError, match=needle):
            engine.check_sampling(**{"max_new_tokens": 4, **kwargs})


# ---------------------------------------------------------------- /v1/answer bounds (never a 500)

@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    return TestClient(create_app(engine), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("engine") / "clip.mp4", random_video(8, seed=3)).read_bytes()


@pytest.mark.parametrize("fields,needle", [
    ({"start": "1e308"}, "start"),
    ({"end": "1e308"}, "end"),
    ({"start": "nan"}, "start"),
    ({"options": "[" * 100_000}, "nested too deeply"),
    ({"options": ["x" * 2000, "y"]}, "options"),
    ({"options": [str(i) for i in range(40)]}, "options"),
    ({"temporal_sample_stride": "1000000000000"}, "temporal_sample_stride"),
])
def test_hostile_answer_fields_are_422(client, video_bytes, fields, needle):
    r = client.post("/v1/answer", files={"video": ("clip.mp4", video_bytes, "video/mp4")},
                    data={"question": "What?", **fields})
    assert r.status_code == 422 and needle in r.text, r.text[:500]


def test_a_full_queue_answers_503_with_retry_after(engine, client, video_bytes):
    gate, running = _paused(engine)
    blocker = engine.submit(*_ask(engine, random_video(3), "hold"))
    running.wait(60)
    queued = [engine.submit(*_ask(engine, random_video(2), "q", SamplingParams(max_new_tokens=1)))
              for _ in range(engine.max_queue)]
    try:
        r = client.post("/v1/answer", files={"video": ("clip.mp4", video_bytes, "video/mp4")},
                        data={"question": "What?"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    finally:
        gate.set()
        blocker.result()
        for h in queued:
            h.result()


def test_request_videos_are_scaled_to_the_model_input_and_can_be_stopped(engine, tmp_path):
    from storm_vlm.video import DecodeCancelled

    big = write_mp4(tmp_path / "big.mp4", random_video(6, height=480, width=640, seed=2))
    clip = engine.read_video(big, 4)
    side = engine.processor.image_size
    assert min(clip.frames.shape[1:3]) >= side and max(clip.frames.shape[1:3]) < 640  # scaled while decoding
    stop = threading.Event()
    stop.set()
    with pytest.raises(DecodeCancelled):
        engine.read_video(big, 4, cancel=stop)


def test_a_slow_decode_answers_503(engine, client, video_bytes, monkeypatch):
    from storm_vlm.video import DecodeTimeout

    def slow(path, *args, **kwargs):
        raise DecodeTimeout(f"{path}: decoding took longer than 60 s")

    monkeypatch.setattr(engine, "read_video", slow)
    r = client.post("/v1/answer", files={"video": ("clip.mp4", video_bytes, "video/mp4")}, data={"question": "q"})
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["detail"].startswith("clip.mp4: ")


def test_eight_concurrent_clients_all_get_their_answers(engine, tmp_path):
    video = write_mp4(tmp_path / "clip.mp4", random_video(6, seed=5))
    questions = [f"Question number {i}?" for i in range(8)]
    alone = [engine.answer(video, q, num_frames=4, max_new_tokens=4)["answer"] for q in questions]
    results = [None] * 8

    def client(i):
        results[i] = engine.answer(video, questions[i], num_frames=4, max_new_tokens=4)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [r["answer"] for r in results] == alone
    assert max(r["timings"]["batch_size"] for r in results) > 1  # some of them shared a generate call


def test_the_prefix_cache_reuses_only_a_start_that_holds_every_placeholder():
    from storm_vlm.model.kv_cache import StormKVCache
    from storm_vlm.serve.caches import PrefixCache

    V = 9  # the placeholder id
    prefix = PrefixCache(10**6, None, {V})
    cache = StormKVCache()
    for layer in range(2):
        cache.update(torch.arange(6.0).reshape(1, 1, 6, 1), -torch.arange(6.0).reshape(1, 1, 6, 1), layer)
    prefix.put([1, 2, V, V, 3, 4, 5], ["video"], cache)  # generate's ids: the cache holds the first 6
    copy, n = prefix.take([1, 2, V, V, 3, 7, 8], ["video"])
    assert n == 5 and copy.get_seq_length() == 5 and copy.layers[1].values[0, 0, :, 0].tolist() == [0, -1, -2, -3, -4]
    assert cache.get_seq_length() == 6  # the kept entry is not cut
    assert prefix.take([1, 2, V, V, 3, 4, 5, 6, 7], ["video"])[1] == 6  # all it holds
    assert prefix.take([1, 2, V, V, 3, 7], ["another video"]) == (None, 0)
    assert prefix.take([1, 2, V, 3], ["video"]) == (None, 0)  # cut inside the placeholders
    assert prefix.take([1, 2, V, V], ["video"]) == (None, 0)  # nothing left to prefill after them


def test_a_cache_salt_keeps_a_videos_tokens_apart(engine, monkeypatch):
    video, seen = random_video(4, seed=14), []
    encode = engine.model._vision_features
    monkeypatch.setattr(engine.model, "_vision_features", lambda frames: seen.append(len(frames)) or encode(frames))

    def ask(salt):
        prepared = engine.prepare(build_messages("What colour?"), [4], SamplingParams(max_new_tokens=2))
        prepared.cache_salt = salt
        return engine.submit(prepared, [video.copy()]).result()

    assert ask("alice").cached_tokens == 0 and sum(seen) == 4
    assert ask("bob").cached_tokens == 0 and sum(seen) == 8  # neither its KV cache nor its visual tokens
    assert ask("alice").cached_tokens > 0 and sum(seen) == 8


@pytest.mark.parametrize("question,options,needle", [("what\ud800", None, "question: the text holds an unpaired"),
                                                     ("what?", ["red", "bl\x00ue"], "options: an option holds a NUL")])
def test_text_the_tokenizer_cannot_take_is_refused_by_name(engine, question, options, needle):
    """A Python caller gets the error the HTTP API gives, not the tokenizer's TypeError."""
    with pytest.raises(StormError, match=needle):
        engine.check_request(question, options)
