"""The HTTP API (`storm-vlm serve`), the web demo's handler (`storm-vlm web`) and their commands,
on a tiny STORM model and a real mp4 (no server is started, no browser opened)."""

import socket
import sys
import tempfile

import pytest
from helpers import random_video, write_mp4

from storm_vlm.cli import build_parser, main
from storm_vlm.eval import extract_choice
from storm_vlm.precision import cpu_has_fast_bf16

FRAMES = 4  # the engine's default frame count in these tests


@pytest.fixture(scope="module")
def engine(qwen2_mamba_dir):
    from storm_vlm.serve import StormEngine

    return StormEngine(qwen2_mamba_dir, default_frames=FRAMES, max_frames=64)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_mp4(tmp_path_factory.mktemp("serve-video") / "clip.mp4", random_video(8, seed=3))


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    return TestClient(create_app(engine))


def _upload(client, video_bytes, name="clip.mp4", **fields):
    return client.post("/v1/answer", files={"video": (name, video_bytes, "video/mp4")}, data=fields)


def test_api_and_commands_do_not_import_gradio():
    if "gradio" in sys.modules:
        pytest.skip("gradio was imported by an earlier test")
    import storm_vlm.commands.serve  # noqa: F401
    import storm_vlm.commands.web  # noqa: F401
    import storm_vlm.serve.api  # noqa: F401

    assert "gradio" not in sys.modules


def test_health_reports_model_and_compression(client, engine, qwen2_mamba_dir):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model_dir"] == str(qwen2_mamba_dir)
    cfg = engine.config
    assert body["config"]["projector_type"] == "mamba"
    assert body["config"]["tokens_per_frame"] == cfg.tokens_per_frame == 16
    assert body["config"]["temporal_pool_size"] == 1 and body["config"]["spatial_pool_stride"] == 1
    assert body["defaults"] == {"frames": FRAMES, "visual_tokens": cfg.num_visual_tokens(FRAMES)}
    # CPU: float32 weights, bfloat16 autocast only where the CPU has native bf16, never float16
    expected_autocast = "bfloat16" if cpu_has_fast_bf16() else None
    assert body["device"] == "cpu" and body["dtype"] == "float32" and body["autocast"] == expected_autocast
    assert body["server"]["allow_local_paths"] is False


def test_answer_an_uploaded_mp4(client, engine, video, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the upload is written
    options = ["red circle", "B. blue square", "green star"]
    r = _upload(client, video.read_bytes(), question="What colour is the circle?", options=options,
                frames="4", temporal_sample_stride="2", max_new_tokens="3")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["visual_tokens"] == engine.config.num_visual_tokens(4, 2) == 2 * 16
    assert out["frames"] == 4 and out["visual_frames"] == 2 and out["temporal_sample_stride"] == 2
    assert out["options"] == ["red circle", "blue square", "green star"]  # letter prefixes dropped
    assert out["choice"] == extract_choice(out["answer"], out["options"])
    t = out["timings"]
    assert 0 <= t["decode_s"] <= t["total_s"] and 0 < t["prefill_s"] <= t["generate_s"] <= t["total_s"]
    assert list(tmp_path.iterdir()) == []  # the upload's temporary folder is gone
    # the same question about the same file on disk gives the same greedy answer
    direct = engine.answer(video, "What colour is the circle?", options=options, num_frames=4,
                           temporal_sample_stride=2, max_new_tokens=3)
    assert direct["answer"] == out["answer"]


def test_open_question_uses_the_default_frames(client, engine, video):
    r = _upload(client, video.read_bytes(), question="What happens?", max_new_tokens="2")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["frames"] == FRAMES and out["visual_tokens"] == engine.config.num_visual_tokens(FRAMES)
    assert out["choice"] is None and out["options"] is None and isinstance(out["answer"], str)


def test_broken_upload_is_422_naming_the_cause(client, video):
    r = _upload(client, video.read_bytes()[:300], name="holiday.mp4", question="What happens?")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("holiday.mp4: ") and "not a readable video" in detail
    assert "storm-serve-" not in detail and "Traceback" not in r.text


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"question": "q", "frames": "0"}, "frames"),
        ({"question": "q", "frames": "65"}, "frames must be an integer between 1 and 64"),
        ({"question": "q", "temporal_sample_stride": "x"}, "temporal_sample_stride"),
        ({"question": "q", "options": ["only one"]}, "between 2 and 26 options"),
        ({"question": "q", "max_new_tokens": "100000"}, "max_new_tokens"),
        ({"question": "q", "frame": "4"}, "extra_forbidden"),
        ({"question": "   "}, "question must be a non-empty string"),
        ({}, "question"),
    ],
)
def test_bad_parameters_are_422(client, video, fields, needle):
    r = _upload(client, video.read_bytes(), **fields)
    assert r.status_code == 422 and needle in r.text, r.text


def test_missing_video_and_wrong_content_type(client):
    r = client.post("/v1/answer", data={"question": "q"}, files={"other": ("x.txt", b"x")})
    assert r.status_code == 422 and "video" in r.text
    r = client.post("/v1/answer", content=b"question=q", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_oversize_upload_is_413(engine, video):
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    client = TestClient(create_app(engine, max_upload_mb=0.05))  # 51 KiB (+ slack for the form fields)
    data = video.read_bytes()
    big = data * (200_000 // len(data) + 1)
    r = _upload(client, big, question="q")
    assert r.status_code == 413 and "0.05 MB" in r.json()["detail"]

    boundary = "b0undary"

    def chunked():  # no Content-Length: the body is cut off while it streams in
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="question"\r\n\r\nq\r\n--{boundary}\r\n'
               f'Content-Disposition: form-data; name="video"; filename="a.mp4"\r\n'
               "Content-Type: video/mp4\r\n\r\n").encode()
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/answer", content=chunked(),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert _upload(client, data, question="q", max_new_tokens="1").status_code == 200  # under the limit


def test_local_paths_are_refused_unless_allowed(client, engine, video, tmp_path):
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    body = {"question": "What happens?", "video_path": str(video), "max_new_tokens": 2}
    r = client.post("/v1/answer", json=body)
    assert r.status_code == 403 and "--allow-local-paths" in r.json()["detail"]

    allowing = TestClient(create_app(engine, allow_local_paths=True))
    r = allowing.post("/v1/answer", json=body)
    assert r.status_code == 200 and r.json()["visual_tokens"] == engine.config.num_visual_tokens(FRAMES)
    r = allowing.post("/v1/answer", json={**body, "video_path": str(tmp_path / "missing.mp4")})
    assert r.status_code == 422 and r.json()["detail"] == f"{tmp_path / 'missing.mp4'}: no such file"


def test_openapi_schema_documents_both_request_bodies(client):
    spec = client.get("/openapi.json").json()
    assert "/health" in spec["paths"]
    content = spec["paths"]["/v1/answer"]["post"]["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["required"] == ["video", "question"]
    assert "video_path" in content["application/json"]["schema"]["properties"]


# ---------------------------------------------------------------- commands


def test_serve_binds_localhost_by_default(qwen2_mamba_dir, monkeypatch):
    import storm_vlm.commands.serve as serve_command

    args = build_parser("serve").parse_args(["serve", str(qwen2_mamba_dir)])
    assert (args.host, args.port, args.allow_local_paths, args.max_upload_mb) == ("127.0.0.1", 8000, False, 200)
    started = {}
    monkeypatch.setattr(serve_command, "start_server",
                        lambda app, host, port, **limits: started.update(app=app, host=host, port=port, **limits))
    assert main(["serve", str(qwen2_mamba_dir), "--frames", "4", "--port", "0"]) == 0
    assert started["host"] == "127.0.0.1" and started["port"] == 0
    assert started["header_timeout_s"] == 30 and started["limit_concurrency"] == 256
    assert "/v1/answer" in {route.path for route in started["app"].routes}


def test_serve_confines_local_media_to_the_allowed_folder(qwen2_mamba_dir, tmp_path, monkeypatch, capsys):
    from fastapi.testclient import TestClient

    import storm_vlm.commands.serve as serve_command

    started = {}
    monkeypatch.setattr(serve_command, "start_server", lambda app, host, port, **limits: started.update(app=app))
    assert main(["serve", str(qwen2_mamba_dir), "--frames", "4", "--port", "0",
                 "--allowed-local-media-path", str(tmp_path)]) == 0
    server = TestClient(started["app"]).get("/health").json()["server"]
    assert server["allowed_local_media_path"] == str(tmp_path.resolve()) and server["allow_local_paths"] is False
    monkeypatch.setattr(serve_command, "load_engine", lambda args: pytest.fail("the model was loaded"))
    assert main(["serve", str(qwen2_mamba_dir), "--allowed-local-media-path", str(tmp_path / "absent")]) == 2
    assert "absent: not a folder" in capsys.readouterr().err


def test_web_defaults_and_no_share_flag(qwen2_mamba_dir, capsys):
    args = build_parser("web").parse_args(["web", str(qwen2_mamba_dir)])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    with pytest.raises(SystemExit):
        build_parser("web").parse_args(["web", str(qwen2_mamba_dir), "--share"])


@pytest.mark.parametrize("command", ["serve", "web"])
@pytest.mark.parametrize("case,message", [("missing", "does not exist"), ("empty", "has no config.json"),
                                          ("not-storm", "model_type is 'qwen2'")])
def test_bad_model_dir_is_one_clear_message(command, case, message, tmp_path, capsys):
    folder = tmp_path / "model"
    if case != "missing":
        folder.mkdir()
    if case == "not-storm":
        (folder / "config.json").write_text('{"model_type": "qwen2"}')
    assert main([command, str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(folder) in err and "Traceback" not in err


def test_public_address_warns_and_bad_device_is_a_storm_error(qwen2_mamba_dir, capsys):
    from storm_vlm.errors import StormError
    from storm_vlm.serve import StormEngine
    from storm_vlm.serve.network import is_loopback, warn_if_public

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    warn_if_public("127.0.0.1", "x")
    assert capsys.readouterr().err == ""
    warn_if_public("0.0.0.0", "storm-vlm serve")
    assert "no authentication" in capsys.readouterr().err
    with pytest.raises(StormError, match="invalid device 'tpu9'"):
        StormEngine(qwen2_mamba_dir, device="tpu9")


def test_taken_port_is_one_clear_message(qwen2_mamba_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(qwen2_mamba_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


# ---------------------------------------------------------------- web demo (imports gradio: last)


def test_web_page_builds_and_a_turn_streams_into_the_conversation(engine, video, tmp_path):
    import gradio as gr

    from storm_vlm.serve.web import ERROR_PREFIX, build_demo, chat_turn

    demo = build_demo(engine, examples_dir=tmp_path / "examples")
    assert isinstance(demo, gr.Blocks)
    kinds = [c.get("type") for c in demo.get_config_file()["components"]]
    for kind in ("video", "chatbot", "textbox", "slider", "dropdown", "button", "dataset"):
        assert kind in kinds
    assert sorted(p.name for p in (tmp_path / "examples").iterdir()) == ["flash.mp4", "square.mp4"]

    steps = list(chat_turn(engine, str(video), "What colour?", [], [], "red\nblue", 4, "2", 3))
    chat, turns, status = steps[-1]
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[0]["content"] == "What colour?"
    assert "names none of the options" in chat[1]["content"] or "→ option " in chat[1]["content"]
    assert status.startswith(f"{engine.config.num_visual_tokens(4, 2)} visual tokens")
    assert len(steps) >= 2 and len(turns) == 1  # the answer streamed in; the model saw one turn
    # a second turn about the same video carries the history
    chat2, turns2, _ = list(chat_turn(engine, str(video), "Sure?", chat, turns, "", 4, "default", 2))[-1]
    assert len(chat2) == 4 and len(turns2) == 2 and turns2[0] == turns[0]

    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video" * 50)
    chat, turns, _ = list(chat_turn(engine, str(bad), "What happens?", [], []))[-1]
    assert chat[-1]["content"].startswith(ERROR_PREFIX + "broken.mp4: ") and turns == []
    assert "not a readable video" in chat[-1]["content"]
    chat, _, _ = list(chat_turn(engine, None, "What happens?", [], []))[-1]
    assert "Upload a video" in chat[-1]["content"]
    chat, _, _ = list(chat_turn(engine, str(video), "q", [], [], "\n".join(str(i) for i in range(30))))[-1]
    assert "between 2 and 26 options" in chat[-1]["content"]


def test_an_api_key_guards_v1_and_leaves_health_open(engine):
    """--api-key, as vLLM's: every /v1 request needs 'Authorization: Bearer KEY' (401 before its body
    is read, an OpenAI error the official client raises as AuthenticationError); /health is open."""
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    client = TestClient(create_app(engine, api_key="s3cret"))
    assert client.get("/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Bearer "}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/v1/chat/completions", content=b"{" * 1000).status_code == 401  # refused unread
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    openai = pytest.importorskip("openai")
    kw = dict(model=engine.model_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    good = openai.OpenAI(base_url="http://testserver/v1", api_key="s3cret", http_client=client, max_retries=0)
    assert good.chat.completions.create(**kw).choices[0].finish_reason in ("stop", "length")
    bad = openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**kw)


def test_serve_refuses_an_empty_api_key(qwen2_mamba_dir, capsys, monkeypatch):
    monkeypatch.setenv("STORM_VLM_API_KEY", " ")
    assert main(["serve", str(qwen2_mamba_dir)]) == 2
    assert "--api-key" in capsys.readouterr().err
