"""The OpenAI-compatible API of `storm-vlm serve`, driven by the official `openai` client against a
real server process on 127.0.0.1."""

import base64
import socket
import sys

import httpx
import pytest
from helpers import free_port, random_video, running_server, write_mp4

openai = pytest.importorskip("openai")

FRAMES = 4


@pytest.fixture(scope="module")
def server(qwen2_mamba_dir, tmp_path_factory):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "storm_vlm", "serve", str(qwen2_mamba_dir), "--port", str(port),
            "--frames", str(FRAMES), "--max-frames", "16", "--max-upload-mb", "0.2", "--precision", "float32",
            "--served-model-name", "storm-tiny", "--body-timeout", "2"]
    with running_server(argv, f"{base}/health", tmp_path_factory.mktemp("server") / "server.log"):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def video_url(tmp_path_factory):
    path = write_mp4(tmp_path_factory.mktemp("oai") / "clip.mp4", random_video(8, seed=3))
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _messages(url, text="Which colour flashed?"):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["storm-tiny"]


def test_streaming_and_not_streaming_give_the_same_answer(client, video_url, qwen2_mamba_dir):
    kw = dict(model="storm-tiny", messages=_messages(video_url), max_tokens=6, temperature=0)
    whole = client.chat.completions.create(**kw)
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    # usage counts the visual tokens: 4 frames x 16 tokens of the tiny model
    assert whole.usage.prompt_tokens_details.visual_tokens == 4 * 16
    assert whole.usage.prompt_tokens > 4 * 16 and 1 <= whole.usage.completion_tokens <= 6
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_text_completions_through_the_client(client):
    kw = dict(model="storm-tiny", prompt="Once upon a time", max_tokens=3, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_storm_knobs_travel_as_extra_body_fields(client, video_url):
    reply = client.chat.completions.create(model="storm-tiny", messages=_messages(video_url), max_tokens=2,
                                           temperature=0, extra_body={"num_frames": 8, "temporal_sample_stride": 2})
    assert reply.usage.prompt_tokens_details.visual_tokens == 4 * 16  # 8 frames, every 2nd kept


def test_multi_turn_and_seeded_sampling(client, video_url):
    messages = _messages(video_url) + [{"role": "assistant", "content": "red"},
                                       {"role": "user", "content": "Are you sure?"}]
    kw = dict(model="storm-tiny", messages=messages, max_tokens=4, temperature=1.0, seed=7)
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first


def test_a_bad_video_is_a_400_naming_the_cause(client):
    url = "data:video/mp4;base64," + base64.b64encode(b"\x00\x00\x00\x18ftypmp42" + bytes(64)).decode()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="storm-tiny", messages=_messages(url), max_tokens=2)
    assert "messages.0.content.0" in info.value.message and "video" in info.value.message
    assert info.value.body["type"] == "invalid_request_error"


def test_an_oversized_body_is_413(client, server):
    url = "data:video/mp4;base64," + "A" * 2_000_000  # more than 0.2 MB of media + 1 MB of text
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="storm-tiny", messages=_messages(url), max_tokens=2)
    assert info.value.status_code == 413
    assert httpx.get(f"{server}/health").status_code == 200  # the server is fine


@pytest.mark.parametrize("body,status,needle", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "bogus"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}]}]},
     400, "not fetched"),
    ({"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///etc/hosts"}}]}]},
     403, "file:// URLs are disabled"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served here"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "max_tokens must be at most 1024"),
])
def test_bad_requests_get_openai_error_objects(server, body, status, needle):
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_deeply_nested_json_is_400_not_500(server):
    body = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_a_stalled_body_is_408_and_the_server_goes_on(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        reply = b""
        while b"did not arrive" not in reply:  # sent after the 2 s body timeout
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in reply
    assert httpx.get(f"{server}/health").status_code == 200
