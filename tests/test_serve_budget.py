"""`storm-vlm serve` as a client of vLLM's OpenAI-compatible server uses it: a request that names no
token budget is answered within the context its prompt leaves (vLLM's default max_tokens is the
rest of the context), a prompt that does not fit is OpenAI's context_length_exceeded error, and a
client that hangs up on a non-streamed request stops its generation however fast tokens come."""

import asyncio
import base64
import json
import time

import httpx
import pytest
from helpers import free_port, random_video, uvicorn_in_thread, write_mp4

from storm_vlm.serve import engine as engine_module
from storm_vlm.serve.api import create_app, on_disconnect

LONG = "hello " * 1340  # ~4060 tokens of the tiny tokenizer: fits the 4096 positions, not with 256 more


def _post(client, path, body):
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _context(engine) -> int:
    return engine.config.get_text_config().max_position_embeddings


@pytest.mark.parametrize("path,body,default", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 256),
    ("/v1/completions", {"prompt": LONG + "hello " * 22}, 16),
])
def test_a_default_budget_is_cut_to_the_context_the_prompt_leaves(client, engine, path, body, default):
    one = _post(client, path, {**body, "max_tokens": 1, "temperature": 0})
    assert one.status_code == 200, one.text
    prompt = one.json()["usage"]["prompt_tokens"]
    assert _context(engine) - default < prompt < _context(engine)  # the default budget does not fit
    r = _post(client, path, {**body, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= _context(engine) - prompt
    # a budget the client chose is not cut: OpenAI's (and vLLM's) context error, which clients match
    r = _post(client, path, {**body, "max_tokens": default})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == ("prompt" if "prompt" in body
                                                                              else "messages")
    assert f"maximum context length is {_context(engine)} tokens" in error["message"]


def test_a_default_budget_next_to_a_video_and_a_prompt_too_long_for_any(client, engine, tmp_path):
    video = write_mp4(tmp_path / "clip.mp4", random_video(4, seed=5))
    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "hello " * 1290}]
    r = _post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens_details"]["visual_tokens"] > 0
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= _context(engine)
    r = _post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG * 2}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_a_client_that_hangs_up_on_a_whole_answer_stops_its_generation(engine, monkeypatch):
    """Tokens coming faster than the disconnect check's period must not hide the hang-up: the
    request is cancelled, not generated to its budget for nobody."""
    import uvicorn

    put, emit, finished = engine_module._Rows.put, engine_module.RequestHandle.emit, []

    def slow_put(rows, value):
        time.sleep(0.03)  # a token every 30 ms: the answer takes ~2 s
        return put(rows, value)

    def record(handle, kind, payload):
        if kind == "done":
            finished.append(payload)
        return emit(handle, kind, payload)

    monkeypatch.setattr(engine_module._Rows, "put", slow_put)
    monkeypatch.setattr(engine_module.RequestHandle, "emit", record)
    port = free_port()
    with uvicorn_in_thread(uvicorn.Config(create_app(engine), "127.0.0.1", port, log_level="warning")):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=0.6)
        deadline = time.monotonic() + 10
        while not finished and time.monotonic() < deadline:
            time.sleep(0.05)
    (completion,) = finished
    assert completion.finish_reason == "cancelled" and completion.completion_tokens < 50, completion


def test_work_inside_on_disconnect_is_told_once_when_its_client_leaves():
    """The one mechanism behind a hang-up cancelling a decode (`until_disconnect`) and queued
    answers (`wait_or_cancel`): polled while the work inside runs, acted on once, stopped after."""
    class Client:  # a Request whose client leaves at its third check
        checks = 0

        async def is_disconnected(self):
            self.checks += 1
            return self.checks >= 3

    async def scenario():
        told, staying = [], Client()
        async with on_disconnect(Client(), lambda: told.append(1)):
            await asyncio.sleep(1.5)  # busy past the third check
        async with on_disconnect(staying, lambda: told.append(2)):
            await asyncio.sleep(0)  # done before the client could leave
        await asyncio.sleep(1.2)
        return told, staying.checks

    told, checks = asyncio.run(scenario())
    assert told == [1] and checks == 1
