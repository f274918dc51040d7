"""`storm-vlm serve` against what a client of vLLM's OpenAI-compatible server sends (FastAPI
TestClient on a tiny STORM model): values of the wrong JSON type are 400s, vLLM's sampling fields
are accepted at their no-op values, /v1/completions answers in OpenAI's text-completion format,
a body of many small JSON values is refused before it is parsed, and files on the server are read
only inside the allowed folder."""

import base64
import io
import json

import pytest
from helpers import SERVE_FRAMES as FRAMES
from helpers import random_video, write_mp4
from PIL import Image

from storm_vlm.serve.caches import VideoTokenCache

TEXT = [{"role": "user", "content": "hi"}]


def _post(client, path: str, body, headers=None):
    return client.post(path, content=json.dumps(body),
                       headers={"content-type": "application/json"} if headers is None else headers)


def _error(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _events(r) -> list:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    assert r.text.endswith("data: [DONE]\n\n")
    lines = [line for line in r.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": "3"}, "max_tokens"), ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"stream": "yes"}, "stream"), ({"temperature": "0.5"}, "temperature"), ({"seed": "7"}, "seed"),
    ({"model": 5}, "model"), ({"stop": 5}, "stop"), ({"user": 5}, "user"),
])
def test_values_of_the_wrong_type_are_400_not_coerced(client, fields, param):
    """As OpenAI's API does: "3" is not an integer and "yes" is not true (pydantic's lax mode read
    them so and answered what the client did not ask for)."""
    error = _error(_post(client, "/v1/chat/completions", {"messages": TEXT, "max_tokens": 1, **fields}), 400)
    assert error["param"] == param, error


def test_a_body_that_is_not_an_object_or_has_no_content_type(client):
    for body in ([1], "x", None):
        assert "JSON object" in _error(_post(client, "/v1/chat/completions", body), 400)["message"]
    r = _post(client, "/v1/chat/completions", {"messages": TEXT, "max_tokens": 1}, headers={})
    assert r.status_code == 200, r.text  # read as JSON, as FastAPI's routes (and vLLM's) read it
    assert _error(_post(client, "/v1/chat/completions", {"messages": TEXT}, {"content-type": "text/plain"}), 415)


def test_vllm_sampling_fields_at_their_no_op_values_are_accepted(client):
    no_ops = {"top_k": -1, "min_p": 0, "repetition_penalty": 1, "min_tokens": 0, "best_of": 1, "ignore_eos": False,
              "use_beam_search": False, "include_stop_str_in_output": False, "skip_special_tokens": True}
    plain = _post(client, "/v1/chat/completions", {"messages": TEXT, "max_tokens": 2, "temperature": 0}).json()
    r = _post(client, "/v1/chat/completions", {"messages": TEXT, "max_tokens": 2, "temperature": 0, **no_ops})
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == plain["choices"]


@pytest.mark.parametrize("fields,param", [
    ({"top_k": 5}, "top_k"), ({"min_p": 0.1}, "min_p"), ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"min_tokens": 3}, "min_tokens"), ({"best_of": 2}, "best_of"), ({"ignore_eos": True}, "ignore_eos"),
    ({"use_beam_search": True}, "use_beam_search"), ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"skip_special_tokens": False}, "skip_special_tokens"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
])
def test_vllm_sampling_fields_this_server_cannot_honour_are_400(client, fields, param):
    for path, body in (("/v1/chat/completions", {"messages": TEXT}), ("/v1/completions", {"prompt": "hi"})):
        error = _error(_post(client, path, {**body, **fields}), 400)
        assert error["param"] == param and error["message"].startswith(param), error


def test_text_completions_answer_in_openai_format(client):
    kw = {"model": "storm-tiny", "prompt": "Once upon a <video>", "max_tokens": 3, "temperature": 0}
    whole = _post(client, "/v1/completions", kw).json()
    assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-") and whole["model"] == "storm-tiny"
    (choice,) = whole["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
    usage = whole["usage"]
    assert 1 <= usage["completion_tokens"] <= 3 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    echoed = _post(client, "/v1/completions", {**kw, "prompt": [kw["prompt"]], "echo": True}).json()
    assert echoed["choices"][0]["text"] == kw["prompt"] + choice["text"]

    chunks = _events(_post(client, "/v1/completions", {**kw, "stream": True, "stream_options": {"include_usage": True}}))
    assert {(c["id"], c["created"], c["object"]) for c in chunks} == {(chunks[0]["id"], chunks[0]["created"],
                                                                        "text_completion")}
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == choice["finish_reason"]
    streamed = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and streamed["prompt_tokens_details"].pop("cached_tokens") > 0  # asked before
    usage["prompt_tokens_details"].pop("cached_tokens")
    assert streamed == usage and all(c["usage"] is None for c in chunks[:-1])

    default = _post(client, "/v1/completions", {"prompt": "Once", "temperature": 0}).json()
    assert default["usage"]["completion_tokens"] <= 16  # OpenAI's and vLLM's default max_tokens


@pytest.mark.parametrize("fields,param", [
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"suffix": "x"}, "suffix"), ({"logprobs": 1}, "logprobs"), ({"n": 9}, "n"), ({"max_tokens": 10**6}, "max_tokens"),
])
def test_text_completions_refuse_what_they_cannot_honour(client, fields, param):
    error = _error(_post(client, "/v1/completions", {"prompt": "hi", **fields}), 400)
    assert error["param"] == param, error
    assert _error(_post(client, "/v1/completions", {"prompt": "hi", "model": "gpt-4o"}), 404)["param"] == "model"


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", {"messages": TEXT}), ("/v1/completions", {"prompt": "hi"})])
def test_n_choices_are_seed_plus_i_and_stream_interleaved(client, path, body):
    """Choice i of a seeded request is what one request with seed + i answers (so the choices differ
    and repeat); a stream carries every choice's chunks under its index; usage counts the prompt once."""
    kw = {**body, "max_tokens": 4, "temperature": 1.0, "seed": 11}
    text = (lambda c: c["message"]["content"]) if "messages" in body else (lambda c: c["text"])
    alone = [_post(client, path, {**kw, "seed": 11 + i}).json() for i in range(3)]
    together = _post(client, path, {**kw, "n": 3}).json()
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    assert [text(c) for c in together["choices"]] == [text(a["choices"][0]) for a in alone]
    usage = together["usage"]
    assert usage["prompt_tokens"] == alone[0]["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)

    chunks = _events(_post(client, path, {**kw, "n": 3, "stream": True, "stream_options": {"include_usage": True}}))
    delta = (lambda c: c["delta"].get("content", "")) if "messages" in body else (lambda c: c["text"])
    streamed = ["".join(delta(c["choices"][0]) for c in chunks if c["choices"] and c["choices"][0]["index"] == i)
                for i in range(3)]
    assert streamed == [text(c) for c in together["choices"]]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2] and chunks[-1]["usage"] == usage
    assert _error(_post(client, path, {**kw, "n": 9}), 400)["param"] == "n"  # past the server's --max-batch-size


def test_n_choices_about_a_video_encode_it_once(client, engine, tmp_path, monkeypatch):
    video = write_mp4(tmp_path / "clip.mp4", random_video(FRAMES, seed=3))
    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                      {"type": "text", "text": "What?"}]}],
            "max_tokens": 3, "temperature": 0}
    one = _post(client, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    seen = []
    encode = engine.model._vision_features
    monkeypatch.setattr(engine.model, "_vision_features", lambda frames: seen.append(len(frames)) or encode(frames))
    monkeypatch.setattr(engine, "video_cache", VideoTokenCache(0))  # else the first request's tokens are reused
    r = _post(client, "/v1/chat/completions", {**body, "n": 3})
    assert r.status_code == 200, r.text
    assert [c["message"]["content"] for c in r.json()["choices"]] == [one] * 3  # greedy: three times the same
    assert sum(seen) == FRAMES  # one video's frames through the tower, not three copies


def test_chat_stream_chunks_share_id_and_created(client):
    chunks = _events(_post(client, "/v1/chat/completions", {"messages": TEXT, "max_tokens": 3, "stream": True}))
    assert len({(c["id"], c["created"]) for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_body_of_many_small_values_is_refused_before_it_is_parsed(client, monkeypatch):
    """A few MB of "{}," would parse into ~25 times as much memory (the body limit counts bytes)."""
    import storm_vlm.serve.bodies as bodies

    parsed = []
    monkeypatch.setattr(bodies.json, "loads", lambda raw: parsed.append(raw))
    body = b'{"messages": [], "tools": [' + b"{}," * 300_000 + b"{}]}"
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    monkeypatch.undo()
    assert parsed == []
    assert _error(r, 413)["code"] == "request_too_large" and "JSON values" in r.json()["error"]["message"]


def test_mime_base64_with_line_breaks_is_read(client):
    image = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 10, 10)).save(image, "PNG")
    url = "data:image/png;base64," + base64.encodebytes(image.getvalue() * 2).decode()  # a line break per 76 chars
    assert "\n" in url
    part = {"type": "image_url", "image_url": {"url": url}}
    r = _post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1})
    assert r.status_code == 200, r.text
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,ab!c"}}
    assert "base64" in _error(_post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": [bad]}]}),
                              400)["message"]


def test_local_files_are_read_only_inside_the_allowed_folder(engine, tmp_path):
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    inside = write_mp4(allowed / "clip.mp4", random_video(FRAMES, seed=1))
    secret = write_mp4(outside / "secret.mp4", random_video(FRAMES, seed=2))
    (allowed / "link.mp4").symlink_to(secret)
    client = TestClient(create_app(engine, allowed_local_media_path=allowed))
    assert client.get("/health").json()["server"]["allowed_local_media_path"] == str(allowed.resolve())

    def chat(path):
        part = {"type": "video_url", "video_url": {"url": f"file://{path}"}}
        return _post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}],
                                                      "max_tokens": 1})

    assert chat(inside).status_code == 200, chat(inside).text
    for path in (secret, allowed / "link.mp4", f"{allowed}/../outside/secret.mp4", "/etc/hosts"):
        error = _error(chat(path), 403)
        assert error["code"] == "local_path_not_allowed" and error["param"] == "messages.0.content.0", error
    answer = {"question": "What?", "max_new_tokens": 1}
    assert client.post("/v1/answer", json={**answer, "video_path": str(inside)}).status_code == 200
    r = client.post("/v1/answer", json={**answer, "video_path": str(allowed / "link.mp4")})
    assert r.status_code == 403 and "allowed media folder" in r.json()["detail"]


def test_cache_salt_keeps_cached_work_apart(client):
    """vLLM's cache_salt: a prompt computed under one salt is reused only under the same salt, so a
    client cannot learn from `cached_tokens` (or timing) what others asked."""
    body = {"messages": [{"role": "user", "content": "Tell me about salt and pepper."}], "max_tokens": 2,
            "temperature": 0}

    def cached(**extra):
        r = _post(client, "/v1/chat/completions", {**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    alice, bob = "alice-" + "a" * 40, "bob-" + "b" * 40
    assert cached(cache_salt=alice) == 0  # nothing computed under this salt yet
    assert cached(cache_salt=bob) == 0  # alice's prompt is not bob's
    assert cached(cache_salt=alice) > 0
    assert _error(_post(client, "/v1/chat/completions", {**body, "cache_salt": ""}), 400)["param"] == "cache_salt"
