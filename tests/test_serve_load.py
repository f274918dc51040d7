"""`storm-vlm serve` under load: many concurrent clients are each answered as alone or refused with
a 503, a client that leaves while its request waits frees its place at once, a request the model
fails on fails alone, and shutting down answers what runs and refuses what waits."""

import asyncio
import base64
import json
import threading
import time

import httpx
import pytest
from helpers import free_port, random_video, uvicorn_in_thread, write_mp4
from test_engine import _ask, _paused

from storm_vlm.errors import StormError
from storm_vlm.serve import engine as engine_module
from storm_vlm.serve.api import create_app
from storm_vlm.serve.caches import video_keys
from storm_vlm.serve.engine import EngineBusy, SamplingParams, StormEngine


@pytest.fixture(scope="module")
def engine(qwen2_mamba_dir):
    engine = StormEngine(qwen2_mamba_dir, default_frames=4, max_frames=16, max_batch_size=4, max_queue=4,
                         precision="float32")
    yield engine
    engine.close()


def _held(engine):
    """The worker held on a running request until the returned event is set (then it goes on)."""
    gate, running = _paused(engine)
    blocker = engine.submit(*_ask(engine, random_video(3), "hold"))
    running.wait(60)
    return gate, blocker


def test_many_concurrent_clients_are_answered_as_alone_or_refused_with_503(engine, tmp_path):
    """Twelve clients at once against a queue of four: each is answered with what it gets alone, or
    refused with a 503 and Retry-After (never a 500, never a hang)."""
    urls = ["data:video/mp4;base64," + base64.b64encode(write_mp4(tmp_path / f"{i}.mp4", random_video(
        4 + 2 * i, seed=30 + i)).read_bytes()).decode() for i in range(2)]

    def body(i):
        content = f"Say something {i}" if i % 3 == 2 else [{"type": "video_url", "video_url": {"url": urls[i % 3]}},
                                                         {"type": "text", "text": f"Question {i}?"}]
        return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0,
                "stream": i % 4 == 0}

    def text(r, i):
        if not body(i)["stream"]:
            return r.json()["choices"][0]["message"]["content"]
        events = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        assert r.text.endswith("data: [DONE]\n\n") and not any("error" in e for e in events), r.text
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events)

    async def run():
        app = create_app(engine, max_upload_mb=1, max_concurrent_bodies=16)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://storm",
                                     timeout=120) as client:
            post = lambda i: client.post("/v1/chat/completions", json=body(i))  # noqa: E731
            alone = [await post(i) for i in range(12)]
            return alone, await asyncio.wait_for(asyncio.gather(*(post(i) for i in range(12))), 120)

    alone, together = asyncio.run(run())
    assert all(r.status_code == 200 for r in alone)
    statuses = [r.status_code for r in together]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= engine.max_queue, statuses
    for i, r in enumerate(together):
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        else:
            assert text(r, i) == text(alone[i], i)


def test_a_request_cancelled_while_it_waits_frees_its_place_at_once(engine):
    """Clients that hang up while their requests wait leave the queue then, not when the worker
    reaches them: the next clients are not refused for requests nobody waits for."""
    gate, blocker = _held(engine)
    try:
        waiting = [engine.submit(*_ask(engine, random_video(2), "q", SamplingParams(max_new_tokens=1)))
                   for _ in range(engine.max_queue)]
        with pytest.raises(EngineBusy):
            engine.submit(*_ask(engine, random_video(2), "q"))
        for handle in waiting:
            handle.cancel()
            assert handle.result().finish_reason == "cancelled"  # told at once: the worker is still held
        after = [engine.submit(*_ask(engine, random_video(2), "q", SamplingParams(max_new_tokens=1)))
                 for _ in range(engine.max_queue)]
    finally:
        gate.set()
    blocker.result()
    assert [h.result().completion_tokens for h in after] == [1] * engine.max_queue


def test_the_frames_waiting_are_bounded_as_well_as_the_requests(engine):
    """Waiting requests hold their decoded frames: beyond max_queue_frames (default: max_queue
    requests of the default frames) a request is refused with a retry hint; frames shared by the
    choices of one request count once, and a request that finds no frames waiting is let in."""
    assert engine.max_queue_frames == engine.max_queue * engine.default_frames == 16
    sampling = SamplingParams(max_new_tokens=1)
    gate, blocker = _held(engine)
    try:
        big = _ask(engine, random_video(12, seed=1), "q", sampling)
        first = engine.submit(*big)  # 12 frames: nothing waits
        with pytest.raises(EngineBusy, match="12 video frames are waiting already .at most 16.") as info:
            engine.submit(*_ask(engine, random_video(6, seed=2), "q", sampling))
        assert info.value.retry_after >= 1
        choice = engine.submit(*big)  # another choice of the same request: no more frames
        small = engine.submit(*_ask(engine, random_video(4, seed=3), "q", sampling))  # 16 in all
    finally:
        gate.set()
    blocker.result()
    assert [h.result().completion_tokens for h in (first, choice, small)] == [1, 1, 1]


def test_a_streaming_client_that_leaves_while_queued_frees_its_place(engine):
    """Through the HTTP server: a stream closed while its request waits gives its place back."""
    port = free_port()
    import uvicorn

    with uvicorn_in_thread(uvicorn.Config(create_app(engine), "127.0.0.1", port, log_level="warning")):
        gate, blocker = _held(engine)
        try:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
            for _ in range(engine.max_queue):
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                                  timeout=10) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the role chunk: the request is queued; then the client leaves
            deadline = time.monotonic() + 10
            while engine._waiting and time.monotonic() < deadline:
                time.sleep(0.05)
            handle = engine.submit(*_ask(engine, random_video(2), "q", SamplingParams(max_new_tokens=1)))
        finally:
            gate.set()
        blocker.result()
        assert handle.result().completion_tokens == 1


def _failing_generate(engine, monkeypatch, fails):
    """The model's generate raises (as a device error would) for a batch of which `fails(handles)`."""
    generate = engine.model.generate

    def maybe_fail(*args, streamer, **kwargs):
        if fails(streamer.handles):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return generate(*args, streamer=streamer, **kwargs)

    monkeypatch.setattr(engine.model, "generate", maybe_fail)


def test_a_request_the_model_fails_on_fails_alone(engine, monkeypatch):
    """A request that makes the model raise gets the error (a 503 over HTTP); the requests batched
    with it are answered as alone, and the caches hold nothing wrong for later requests."""
    requests = [_ask(engine, random_video(4, seed=40 + i), q) for i, q in enumerate(["What colour?", "poison?",
                                                                                     "How many?"])]
    alone = [engine.submit(p, v).result().text for p, v in requests]
    _failing_generate(engine, monkeypatch, lambda handles: any("poison" in h.prepared.prompt for h in handles))
    gate, blocker = _held(engine)
    handles = [engine.submit(p, v) for p, v in requests]
    gate.set()
    blocker.result()
    with pytest.raises(StormError, match="generation failed .RuntimeError: CUDA error"):
        handles[1].result()
    answered = [handles[0].result(), handles[2].result()]
    assert [c.text for c in answered] == [alone[0], alone[2]]
    monkeypatch.undo()
    assert [engine.submit(p, v).result().text for p, v in requests] == alone


def test_a_batch_too_large_for_the_device_runs_its_requests_alone(engine, monkeypatch):
    """A batch that fails as a whole (out of memory) is answered one request at a time."""
    requests = [_ask(engine, random_video(4, seed=50 + i), f"Question {i}?") for i in range(3)]
    alone = [engine.submit(p, v).result().text for p, v in requests]
    _failing_generate(engine, monkeypatch, lambda handles: len(handles) > 1)
    gate, blocker = _held(engine)
    handles = [engine.submit(p, v) for p, v in requests]
    gate.set()
    blocker.result()
    assert [h.result().text for h in handles] == alone
    assert [h.result().timings["batch_size"] for h in handles] == [1, 1, 1]


def test_a_request_that_fails_after_streaming_is_not_answered_twice(engine, monkeypatch):
    """A failure after a request's first words reached its client is that request's error: it is not
    run again (its client would read the start of the answer twice)."""
    put, calls = engine_module._Rows.put, []

    def fail_late(rows, value):
        calls.append(len(rows.handles))
        if len(rows.handles) == 2 and calls.count(2) == 6:  # the batch's prompt, five tokens, then the failure
            raise RuntimeError("device lost")
        return put(rows, value)

    monkeypatch.setattr(engine_module._Rows, "put", fail_late)
    gate, blocker = _held(engine)
    handles = [engine.submit(*_ask(engine, random_video(4, seed=i), f"Q{i}?", SamplingParams(max_new_tokens=8)))
               for i in range(2)]
    gate.set()
    blocker.result()
    failed = 0
    for handle in handles:
        events = list(handle.events())
        deltas = "".join(payload for kind, payload in events if kind == "delta")
        kind, payload = events[-1]
        if kind == "error":
            failed += 1
            assert deltas and "device lost" in str(payload)
        else:  # nothing had reached its client: it ran again alone
            assert payload.text == deltas and payload.timings["batch_size"] == 1
    assert failed >= 1


def test_video_keys_hash_an_array_shared_by_choices_once(monkeypatch):
    """The n choices of a request share its videos: each array is hashed once per batch."""
    from storm_vlm.serve import caches

    hashed, real = [], caches.array_key
    monkeypatch.setattr(caches, "array_key", lambda a: hashed.append(1) or real(a))
    video, other = random_video(2, seed=1), random_video(2, seed=2)
    keys = video_keys([video, other, video, video.copy()], 2)
    assert keys[0] == keys[2] == keys[3] != keys[1] and len(hashed) == 3


def test_shutting_down_answers_the_running_batch_and_refuses_the_waiting(qwen2_mamba_dir):
    engine = StormEngine(qwen2_mamba_dir, default_frames=4, max_frames=16, precision="float32")
    gate, blocker = _held(engine)
    waiting = engine.submit(*_ask(engine, random_video(2), "q"))
    closer = threading.Thread(target=engine.close)
    closer.start()
    with pytest.raises(StormError, match="shutting down"):
        waiting.result()
    gate.set()
    closer.join(60)
    assert not closer.is_alive() and blocker.result().finish_reason in ("stop", "length")
    with pytest.raises(StormError, match="shut down"):
        engine.submit(*_ask(engine, random_video(2), "q"))
    assert engine.info()["video_cache"]["used_mb"] == engine.info()["prefix_cache"]["used_mb"] == 0



def test_more_choices_than_the_queue_holds_is_a_400_not_a_503(qwen2_mamba_dir):
    """n choices are queued all at once: more than --max-queue could never be, so a retry (503) is no answer."""
    small = StormEngine(qwen2_mamba_dir, default_frames=4, max_batch_size=4, max_queue=2, precision="float32")

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(small)),
                                     base_url="http://storm") as client:
            return await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "n": 3})

    try:
        r = asyncio.run(run())
    finally:
        small.close()
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "--max-queue" in r.text, r.text
