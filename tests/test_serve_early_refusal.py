"""`storm-vlm serve` turns a chat completion away before decoding its videos when the numbers known
up front already say no (the prompt, the frames each video gives at least, the queue), answers
every HTTP error an OpenAI client can meet in OpenAI's error shape (unknown routes and methods too),
and is driven here by the official `openai` client over the app itself (FastAPI TestClient)."""

import base64
import io
import os
import threading
import types
from collections import deque

import numpy as np
import pytest
from helpers import random_video, write_mp4
from PIL import Image

from storm_vlm.serve.engine import SamplingParams

openai = pytest.importorskip("openai")

FRAMES = 128  # past the planner's largest temporal stride (64): a video keeps 2 frames' tokens, an image 1


@pytest.fixture(scope="module")
def oai(client):
    """The official client, its requests served by the app in-process."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """(video part, image-as-video part): an mp4 and a PNG, both sent as video_url data URLs."""
    video = write_mp4(tmp_path_factory.mktemp("early") / "clip.mp4", random_video(4, seed=2))
    image = io.BytesIO()
    Image.new("RGB", (40, 32), (10, 200, 10)).save(image, "PNG")
    return [{"type": "video_url", "video_url": {"url": f"data:{kind};base64," + base64.b64encode(data).decode()}}
            for kind, data in (("video/mp4", video.read_bytes()), ("image/png", image.getvalue()))]


@pytest.fixture
def decoded(engine, monkeypatch):
    """The frame counts the engine decoded videos at, one per video read; FRAMES frames may be asked for."""
    calls = []
    read = engine.read_video
    monkeypatch.setattr(engine, "read_video", lambda path, n, **kw: calls.append(n) or read(path, n, **kw))
    monkeypatch.setattr(engine, "max_frames", FRAMES)
    return calls


def _text_tokens(engine, text: str) -> int:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    return engine.prepare(messages, [1], SamplingParams(max_new_tokens=1)).text_tokens


def _text_leaving(engine, positions: int) -> str:
    """A question whose prompt (one video's placeholder included) leaves `positions` of the context, or
    up to two words' tokens more."""
    context = engine.config.get_text_config().max_position_embeddings
    at_100, at_200 = _text_tokens(engine, "hello " * 100), _text_tokens(engine, "hello " * 200)
    per_word = (at_200 - at_100) / 100
    words = 100 + int((context - positions - at_100) / per_word)
    while context - _text_tokens(engine, "hello " * words) < positions:
        words -= 1
    assert context - _text_tokens(engine, "hello " * words) < positions + 2 * per_word
    return "hello " * words


def test_a_request_that_cannot_fit_is_refused_before_its_videos_are_decoded(oai, engine, media, decoded):
    """With the default answer budget a request fits when one answer token does; here the text
    leaves room for one frame's visual tokens (an image's) and not for a video's two."""
    video, image = media
    per_frame = engine.config.num_visual_tokens(1, 64)
    assert engine.config.num_visual_tokens(FRAMES, 64) == 2 * per_frame
    text = _text_leaving(engine, 1 + per_frame)

    def ask(part):
        return oai.chat.completions.create(model="storm-tiny", messages=[{"role": "user", "content": [
            part, {"type": "text", "text": text}]}], extra_body={"num_frames": FRAMES})

    with pytest.raises(openai.BadRequestError) as refused:
        ask(video)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"
    assert decoded == []  # nothing was decoded to find out
    # a still image sent as a video gives one frame: its bound is one frame, so it is not turned away
    answer = ask(image)
    assert decoded == [FRAMES] and answer.usage.prompt_tokens_details.visual_tokens == per_frame


def test_the_decoded_frames_have_the_final_word(client, engine, decoded, tmp_path):
    """fps sampling may give fewer frames than asked, so it is checked early at one frame: 80 frames
    read at their native rate keep two frames' tokens, which the text leaves no room for."""
    long = write_mp4(tmp_path / "long.mp4", random_video(80, height=16, width=16, seed=1))
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"
                                                       + base64.b64encode(long.read_bytes()).decode()}}
    text = _text_leaving(engine, 1 + engine.config.num_visual_tokens(1, 64))
    body = {"messages": [{"role": "user", "content": [video, {"type": "text", "text": text}]}],
            "num_frames": FRAMES, "fps": 240}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert decoded == [FRAMES]


def test_a_request_the_queue_cannot_take_is_503_before_decoding(client, engine, media, decoded, monkeypatch):
    waiting = types.SimpleNamespace(prepared=types.SimpleNamespace(
        videos=[np.zeros((engine.max_queue_frames, 1, 1, 3), np.uint8)]))
    monkeypatch.setattr(engine, "_waiting", deque([waiting]))  # the queue holds all the frames it takes
    video, _ = media
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [video]}]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
    assert int(r.headers["retry-after"]) >= 1 and decoded == []


def test_unknown_routes_and_methods_answer_openai_errors(oai, client):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.with_options(base_url="http://testserver/v2").models.list()
    assert missing.value.type == "Not Found" and "GET /v2/models: no such route" in missing.value.message
    for method, path, status, allow in (("GET", "/v1/chat/completions", 405, "POST"),
                                        ("POST", "/v1/models", 405, "GET"), ("POST", "/v1/chat", 404, None)):
        r = client.request(method, path)
        assert r.status_code == status and r.headers.get("allow") == allow, r.text
        error = r.json()["error"]
        assert error == {"message": error["message"], "type": error["type"], "param": None, "code": status}
        assert f"{method} {path}" in error["message"] and error["type"] in ("Not Found", "Method Not Allowed")


def test_a_file_url_naming_a_pipe_is_refused_not_waited_on(engine, tmp_path):
    """Looking at a video's first bytes must not open what is not a regular file (a pipe blocks)."""
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    pipe = tmp_path / "pipe.mp4"
    os.mkfifo(pipe)
    local = TestClient(create_app(engine, allow_local_paths=True))
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{pipe}"}}]}]}
    answers = []
    asking = threading.Thread(target=lambda: answers.append(local.post("/v1/chat/completions", json=body)),
                              daemon=True)
    asking.start()
    asking.join(30)
    assert answers, "the request waited on the pipe"
    assert answers[0].status_code == 400 and "not a regular file" in answers[0].json()["error"]["message"]
