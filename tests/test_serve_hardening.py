"""`storm-vlm serve` under hostile or unusual input (FastAPI TestClient on a tiny STORM model, one
in-process uvicorn for the connection limits): typed placeholders are text, text is bounded and
rendered off the event loop, input that is not Unicode is a 4xx, OpenAI's no-op fields are accepted,
errors name their field, request bodies and request heads are bounded."""

import asyncio
import base64
import io
import json
import socket
import threading
import time

import pytest
from helpers import SERVE_FRAMES as FRAMES
from helpers import free_port, random_video, uvicorn_in_thread, write_mp4
from PIL import Image

TEXT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def local(engine):
    """A client of a server started with --allow-local-paths."""
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    return TestClient(create_app(engine, max_upload_mb=0.2, allow_local_paths=True))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("hardening") / "my clip.mp4", random_video(6, seed=4))


def _chat(client, body: dict):
    """POST a chat completion whose JSON may hold lone surrogates (json.dumps escapes them)."""
    return client.post("/v1/chat/completions", content=json.dumps({"max_tokens": 1, **body}),
                       headers={"content-type": "application/json"})


def _video_part(url):
    return {"type": "video_url", "video_url": {"url": url}}


def _data_url(path, kind="video/mp4"):
    return f"data:{kind};base64," + base64.b64encode(open(path, "rb").read()).decode()


def _error(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---------------------------------------------------------------- placeholders typed in text (1)


def test_typed_placeholders_are_read_as_text(client, engine, video):
    """A <video> or <image> in a question is text: the request is answered with the one video it
    sent (before, it was a 400, or a 503 for every request batched with it)."""
    text = "What does the HTML <video> tag do, and <image>? <vid"
    r = _chat(client, {"messages": [{"role": "system", "content": "Say <image>."},
                                    {"role": "user", "content": [_video_part(_data_url(video)),
                                                                 {"type": "text", "text": text},
                                                                 {"type": "text", "text": "eo>"}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["visual_tokens"] == engine.config.num_visual_tokens(FRAMES)
    r = client.post("/v1/answer", files={"video": ("a.mp4", video.read_bytes(), "video/mp4")},
                    data={"question": "Is there an <image> or a <video>?", "options": ["<video>", "<image>"],
                          "max_new_tokens": "1"})
    assert r.status_code == 200, r.text
    prepared = engine.prepare([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}], [2])
    ids = engine.processor(text=prepared.prompt, videos=[random_video(2)])["input_ids"][0].tolist()
    assert ids.count(engine.processor.video_token_id) == engine.config.num_visual_tokens(2)
    assert engine.processor.image_token_id not in ids


# ---------------------------------------------------------------- bounded text, off the event loop (2)


def test_text_is_bounded_per_request_and_per_message(client):
    from storm_vlm.serve.openai_api import MAX_PARTS, MAX_TEXT_CHARS, MAX_TOTAL_TEXT_CHARS

    parts = MAX_TOTAL_TEXT_CHARS // MAX_TEXT_CHARS + 1
    many = [{"type": "text", "text": "x" * MAX_TEXT_CHARS}] * parts
    error = _error(_chat(client, {"messages": [{"role": "user", "content": many}]}), 400)
    assert error["param"] == "messages" and str(MAX_TOTAL_TEXT_CHARS) in error["message"]
    long_turns = [{"role": "user", "content": "x" * MAX_TEXT_CHARS}] * parts
    assert _error(_chat(client, {"messages": long_turns}), 400)["param"] == "messages"
    error = _error(_chat(client, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]
                                                * (MAX_PARTS + 1)}]}), 400)
    assert error["param"] == "messages.0.content" and str(MAX_PARTS) in error["message"]


def test_json_rendering_and_tokenizing_run_off_the_event_loop(client, engine, video, monkeypatch):
    import storm_vlm.serve.api as api

    on_loop = []

    def spy(fn):
        def call(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(fn.__name__)
            except RuntimeError:
                on_loop.append(None)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(api, "parse_json", spy(api.parse_json))
    monkeypatch.setattr(engine, "prepare", spy(engine.prepare))
    monkeypatch.setattr(engine, "prepare_question", spy(engine.prepare_question))
    assert _chat(client, {"messages": TEXT}).status_code == 200
    r = client.post("/v1/answer", files={"video": ("a.mp4", video.read_bytes(), "video/mp4")},
                    data={"question": "What?", "max_new_tokens": "1"})
    assert r.status_code == 200, r.text
    assert len(on_loop) >= 4 and on_loop == [None] * len(on_loop), on_loop


# ---------------------------------------------------------------- input that is not text (4)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "\ud800"}],
    [{"role": "system", "content": "\udfff"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": [{"type": "text", "text": "a\ud800b"}]}],
])
def test_lone_surrogates_are_400_not_500(client, messages):
    assert "surrogate" in _error(_chat(client, {"messages": messages}), 400)["message"]


def test_nul_and_surrogates_in_paths_and_questions_are_4xx(local, video):
    answer = {"video_path": str(video), "question": "What?", "max_new_tokens": 1}
    for body in ({**answer, "question": "\ud800"}, {**answer, "video_path": "/tmp/a\x00b.mp4"},
                 {**answer, "video_path": "/tmp/\ud800.mp4"}):
        r = local.post("/v1/answer", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
    for url in ("file:///tmp/a\x00b.mp4", "file:///tmp/a%00b.mp4", "file:///tmp/\ud800.mp4"):
        error = _error(_chat(local, {"messages": [{"role": "user", "content": [_video_part(url)]}]}), 400)
        assert "NUL" in error["message"] or "surrogate" in error["message"]


# ---------------------------------------------------------------- OpenAI's fields (6)


def test_openai_default_and_null_fields_are_accepted(client):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []},
             {"role": "user", "content": "and?"}]
    no_ops = {"n": None, "stream": None, "logprobs": False, "top_logprobs": None, "presence_penalty": 0,
              "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}, "tools": [],
              "tool_choice": "none", "parallel_tool_calls": False, "store": False, "metadata": {"k": "v"},
              "service_tier": "auto", "reasoning_effort": "low", "user": "u", "safety_identifier": "s",
              "prompt_cache_key": "k", "seed": None, "stop": None,
              "max_completion_tokens": None, "max_tokens": 2, "temperature": 0}
    developer = _chat(client, {"messages": [{"role": "developer", "content": "Be brief."}, *turns], **no_ops})
    assert developer.status_code == 200, developer.text
    system = _chat(client, {"messages": [{"role": "system", "content": "Be brief."}, *turns], "max_tokens": 2,
                            "temperature": 0}).json()
    # a developer message is a system message: the same prompt (the second one's was cached by the first)
    assert developer.json()["usage"]["prompt_tokens"] == system["usage"]["prompt_tokens"]
    assert system["usage"]["prompt_tokens_details"]["cached_tokens"] == system["usage"]["prompt_tokens"] - 1
    assert developer.json()["choices"][0]["message"] == system["choices"][0]["message"]


@pytest.mark.parametrize("fields,param", [
    ({"n": 99}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"max_tokens": 10**6}, "max_tokens"), ({"max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"num_frames": 10**6}, "num_frames"), ({"stop": ["a"] * 5}, "stop"),
])
def test_unsupported_values_are_400_naming_the_field(client, fields, param):
    error = _error(_chat(client, {"messages": TEXT, **fields}), 400)
    assert error["param"] == param and error["message"].startswith(param), error


# ---------------------------------------------------------------- bodies and request heads (8)


def test_requests_beyond_the_body_slots_wait_then_get_503_with_retry_after(client, video, monkeypatch):
    slots = client.app.state.body_slots
    monkeypatch.setattr(slots, "wait_s", 0)
    slots.busy = slots.limit
    try:
        r = _chat(client, {"messages": TEXT})
        assert _error(r, 503)["code"] == "bodies_full" and int(r.headers["retry-after"]) >= 1
        r = client.post("/v1/answer", files={"video": ("a.mp4", video.read_bytes(), "video/mp4")},
                        data={"question": "What?"})
        assert r.status_code == 503 and "--max-concurrent-bodies" in r.json()["detail"] and r.headers["retry-after"]
        monkeypatch.setattr(slots, "wait_s", 30)  # a slot that comes free in time is taken
        threading.Timer(0.2, lambda: setattr(slots, "busy", 0)).start()
        assert _chat(client, {"messages": TEXT}).status_code == 200
    finally:
        slots.busy = 0
    assert slots.busy == 0


def test_a_request_head_that_stalls_or_is_too_large_is_refused():
    from storm_vlm.serve.network import uvicorn_config

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    with uvicorn_in_thread(uvicorn_config(app, "127.0.0.1", port, header_timeout_s=0.3, log_level="warning")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a head, then a byte now and then
            for _ in range(3):
                time.sleep(0.1)
                sock.sendall(b"X")
            assert sock.recv(100) == b"" and time.monotonic() - start < 3  # closed at 0.3 s
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b"ok"):
                reply += sock.recv(100)
            assert reply.startswith(b"HTTP/1.1 200")  # a whole head is answered
            start = time.monotonic()
            assert sock.recv(100) == b"" and time.monotonic() - start < 3  # no next head: closed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
            assert sock.recv(100).startswith(b"HTTP/1.1 400")  # 16 KiB of head and no end in sight


# ---------------------------------------------------------------- error shapes and small compatibility (10)


@pytest.mark.parametrize("content,param,needle", [
    ([{"type": "video_url", "video_url": 5}], "messages.0.content.0.video_url", "URL string or an object"),
    ([{"type": "video_url", "video_url": {"url": 5}}], "messages.0.content.0.video_url.url", "valid string"),
    ([{"type": "input_audio", "input_audio": {}}], "messages.0.content.0", "'text', 'video_url' or 'image_url'"),
    ([{"type": "text", "text": "hi", "x": 1}], "messages.0.content.0.x", "Extra inputs"),
    (5, "messages.0.content", "a string or a list of content parts"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}}],
     "messages.0.content.0", "not a readable image"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png,abc"}}], "messages.0.content.0", "base64"),
    ([_video_part("http://example.com/v.mp4")], "messages.0.content.0", "not fetched"),
])
def test_errors_name_the_field_and_the_cause(client, content, param, needle):
    error = _error(_chat(client, {"messages": [{"role": "user", "content": content}]}), 400)
    assert error["param"] == param and needle in error["message"] and " object at 0x" not in error["message"], error


def test_file_urls_follow_rfc_8089_and_schemes_ignore_case(local, video, tmp_path):
    path = str(video)
    assert " " in path
    quoted = path.replace(" ", "%20")
    for url in (f"file://localhost{quoted}", f"FILE://{quoted}", f"file:{quoted}"):
        r = _chat(local, {"messages": [{"role": "user", "content": [_video_part(url)]}]})
        assert r.status_code == 200, (url, r.text)
    error = _error(_chat(local, {"messages": [{"role": "user", "content": [_video_part("file://host/x.mp4")]}]}), 400)
    assert error["param"] == "messages.0.content.0" and "host" in error["message"]
    image = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(image, "PNG")
    url = "DATA:image/png;BASE64," + base64.b64encode(image.getvalue()).decode()
    r = _chat(local, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert r.status_code == 200, r.text


def test_models_retrieve_and_head(client):
    r = client.get("/v1/models/storm-tiny")
    assert r.status_code == 200 and r.json()["id"] == "storm-tiny" and r.json()["object"] == "model"
    assert _error(client.get("/v1/models/gpt-4o"), 404)["code"] == "model_not_found"
    for path in ("/health", "/v1/models", "/v1/models/storm-tiny"):
        assert client.head(path).status_code == 200


def test_streamed_chunks_carry_null_usage_with_include_usage(client):
    def events(**fields):
        r = client.post("/v1/chat/completions", json={"messages": TEXT, "max_tokens": 2, "stream": True, **fields})
        assert r.status_code == 200, r.text
        lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    chunks = events(stream_options={"include_usage": True})
    assert all(c["usage"] is None and c["choices"] for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all("usage" not in c for c in events())
