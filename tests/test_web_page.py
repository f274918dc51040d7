"""The web page of `storm-vlm web` without a browser: its Python handler (`chat_turn`), how its
events are wired, and the launched gradio app over HTTP on 127.0.0.1 (uploads and their size
limit, what its file route serves from disk, turns of two sessions through gradio's queue), on a
tiny STORM model."""

import json
import uuid

import httpx
import pytest
from helpers import free_port, random_video, write_mp4
from PIL import Image

from storm_vlm.cli import build_parser

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'storm-vlm[web]')")

from storm_vlm.serve.web import ERROR_PREFIX, ClipCache, TurnStop, build_demo, chat_turn, launch_demo  # noqa: E402


@pytest.fixture(scope="module")
def engine(qwen2_mamba_dir):
    from storm_vlm.serve import StormEngine

    engine = StormEngine(qwen2_mamba_dir, default_frames=4, max_frames=16, precision="float32")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(write_mp4(tmp_path_factory.mktemp("web-video") / "clip.mp4", random_video(8, seed=3)))


@pytest.fixture
def reads(engine, monkeypatch):
    """The paths `engine.read_video` is asked to decode, in order."""
    paths = []
    read = engine.read_video
    monkeypatch.setattr(engine, "read_video", lambda path, *a, **k: paths.append(path) or read(path, *a, **k))
    return paths


def last(steps):
    return list(steps)[-1]


# ---------------------------------------------------------------- the handler


def test_a_video_is_decoded_once_per_upload_and_frame_count(engine, video, reads):
    clips = ClipCache()
    chat, turns, status = last(chat_turn(engine, video, "What colour?", [], [], "", 4, clips=clips))
    assert status.startswith("64 visual tokens (4 frames") and "decode video" in status
    chat, turns, status = last(chat_turn(engine, video, "Sure?", chat, turns, "", 4, clips=clips))
    assert len(chat) == 4 and len(turns) == 2 and "video decoded earlier" in status
    assert reads == [video]
    last(chat_turn(engine, video, "And with 2 frames?", chat, turns, "", 2, clips=clips))
    assert reads == [video, video]  # another frame count: decoded again


def test_closing_the_turn_cancels_the_request_in_the_engine(engine, video, monkeypatch):
    handles = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda *a, **k: handles.append(submit(*a, **k)) or handles[-1])
    turn = chat_turn(engine, video, "Describe it.", [], [], "", 4, "default", 64)
    next(turn)  # the first words are on the page; then the page cancels the turn
    turn.close()
    assert handles[0].cancelled
    assert handles[0].result().finish_reason in ("cancelled", "stop", "length")  # the engine answered it


@pytest.mark.parametrize("frames,stride,max_new,message", [
    (4, "abc", 3, "temporal_sample_stride must be a whole number, got 'abc'"),
    (float("nan"), "default", 3, "frames must be a whole number"),
    (None, "default", 3, "frames must be a whole number"),
    (4, "default", float("inf"), "max_new_tokens must be a whole number"),
])
def test_bad_settings_are_one_line_in_the_conversation(engine, video, frames, stride, max_new, message):
    chat, turns, _ = last(chat_turn(engine, video, "What?", [], [], "", frames, stride, max_new))
    assert chat[-1]["content"].startswith(ERROR_PREFIX) and message in chat[-1]["content"] and turns == []


def test_an_empty_question_changes_nothing(engine, video):
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert last(chat_turn(engine, video, "  \n", history, [("q", "a")])) == (history, [("q", "a")],
                                                                            "Type a question first.")


def test_a_still_image_is_one_frame(engine, tmp_path):
    image = tmp_path / "still.png"
    Image.fromarray(random_video(1, seed=1)[0]).save(image)
    _, turns, status = last(chat_turn(engine, str(image), "What is it?", [], [], "", 4, "default", 2))
    assert status.startswith("16 visual tokens (1 frame, stride 1)") and len(turns) == 1


# ---------------------------------------------------------------- the page's events


def test_stop_clear_and_a_new_video_stop_the_answer_being_written(engine, tmp_path):
    demo = build_demo(engine, examples_dir=tmp_path)
    config = demo.get_config_file()
    elem = {c["props"].get("elem_id"): c["id"] for c in config["components"] if c["props"].get("elem_id")}
    deps = config["dependencies"]
    (take,) = [d for d in deps if (elem["ask"], "click") in map(tuple, d["targets"])]
    assert (elem["question"], "submit") in map(tuple, take["targets"])  # one event: one turn at a time
    assert elem["question"] in take["outputs"] and elem["ask"] in take["outputs"]  # emptied and locked
    (answer,) = [d for d in deps if d["trigger_after"] == take["id"]]
    assert elem["chat"] in answer["outputs"] and answer["queue"]
    stopper = answer["inputs"][-1]  # each Ask makes the turn's own TurnStop
    assert take["outputs"][-1] == stopper and isinstance(demo.fns[take["id"]].fn()[-1], TurnStop)
    for trigger, cleared in [((elem["stop"], "click"), False), ((elem["clear"], "click"), True),
                             ((elem["video"], "change"), True)]:
        (handler,) = [d for d in deps if trigger in map(tuple, d["targets"])]
        assert handler["inputs"][0] == stopper and elem["question"] in handler["outputs"], trigger  # unlocks
        assert not handler["queue"], trigger  # runs at once, however busy the queue is
        turn_stop = TurnStop()
        turn_stop.begin("clip.mp4")
        demo.fns[handler["id"]].fn(turn_stop, *["other.mp4"][:len(handler["inputs"]) - 1])
        assert turn_stop.is_set() and turn_stop.cleared == cleared, trigger
    # the change event of the very upload a turn is about (late, on a busy machine: before or after the
    # turn starts) leaves the turn be; another video's, before the turn starts, stops it as it starts
    (changed,) = [d for d in deps if (elem["video"], "change") in map(tuple, d["targets"])]
    for late_before_start in (True, False):
        turn_stop = TurnStop()
        if not late_before_start:
            turn_stop.begin("clip.mp4")
        assert demo.fns[changed["id"]].fn(turn_stop, "clip.mp4") == (gr.update(),) * 5
        turn_stop.begin("clip.mp4")
        assert not turn_stop.is_set()
    turn_stop = TurnStop()
    demo.fns[changed["id"]].fn(turn_stop, "other.mp4")
    turn_stop.begin("clip.mp4")
    assert turn_stop.is_set() and turn_stop.cleared


def test_the_command_listens_on_127_0_0_1_with_the_queue_limit(qwen2_mamba_dir, monkeypatch):
    from storm_vlm.commands import web as command
    from storm_vlm.serve import web

    launched = {}
    monkeypatch.setattr(command, "load_engine", lambda args: "engine")
    monkeypatch.setattr(web, "build_demo", lambda engine: "demo")
    monkeypatch.setattr(web, "launch_demo", lambda demo, host, port, **kw: launched.update(host=host, **kw))
    args = build_parser("web").parse_args(["web", str(qwen2_mamba_dir), "--port", str(free_port()),
                                           "--max-queue", "3", "--max-upload-mb", "0.5"])
    assert command.run(args) == 0
    assert launched == {"host": "127.0.0.1", "max_upload_mb": 0.5, "concurrency": 8, "max_queue": 3}


# ---------------------------------------------------------------- the launched app over HTTP


@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    """(engine, http client, examples folder) of the page launched on 127.0.0.1 with a 0.5 MiB upload limit."""
    examples = tmp_path_factory.mktemp("web-examples")
    demo = build_demo(engine, examples_dir=examples)
    port = free_port()
    launch_demo(demo, "127.0.0.1", port, max_upload_mb=0.5, concurrency=2, max_queue=4, block=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield demo, client, examples
    finally:
        demo.close()


def upload(client, name, data: bytes) -> httpx.Response:
    return client.post("/gradio_api/upload", files={"files": (name, data, "application/octet-stream")})


def test_uploads_are_limited_and_only_uploads_are_served(served, engine, video):
    demo, client, examples = served
    assert demo.server_name == "127.0.0.1"
    assert upload(client, "big.mp4", b"\0" * (2**19 + 1)).status_code == 413
    response = upload(client, "../../<b>x</b>;.mp4", open(video, "rb").read())
    assert response.status_code == 200
    (path,) = response.json()
    assert ".." not in path and "<" not in path
    assert client.get(f"/gradio_api/file={path}").content == open(video, "rb").read()
    for outside in ["/etc/passwd", engine.model_dir / "config.json", examples / "flash.mp4", video]:
        assert client.get(f"/gradio_api/file={outside}").status_code == 403, outside


def ask(client, config, session: str, video_path: str, question: str, chat: list) -> dict:
    """What the page does on Ask: lock the question box (gradio's /run/predict), then the turn
    through the queue; gradio's last message about it (its "output" holds the chat)."""
    deps = config["dependencies"]
    elem = {c["props"].get("elem_id"): c["id"] for c in config["components"] if c["props"].get("elem_id")}
    take = next(d for d in deps if [elem["ask"], "click"] in map(list, d["targets"]))
    answer = next(d for d in deps if d["trigger_after"] == take["id"])
    file = {"path": video_path, "orig_name": "clip.mp4", "meta": {"_type": "gradio.FileData"}}
    took = client.post("/gradio_api/run/predict", json={"fn_index": take["id"], "data": [],
                                                        "session_hash": session})
    assert took.status_code == 200, took.text
    data = [file, question, chat, None, "", 4, "default", 3, None]  # turns and TurnStop: the session's
    joined = client.post("/gradio_api/queue/join", json={"fn_index": answer["id"], "data": data,
                                                         "session_hash": session})
    assert joined.status_code == 200, joined.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as events:
        for line in events.iter_lines():
            message = json.loads(line[5:]) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                return message
    pytest.fail("the turn did not complete")


def answered(message: dict) -> list:
    assert message["success"], message
    return message["output"]["data"][0]


def said(chat: list, role: str = "assistant") -> list[str]:
    """The texts of `role`'s messages in a chat as gradio sends it to the page."""
    return ["".join(part["text"] for part in m["content"]) for m in chat if m["role"] == role]


def test_two_sessions_talk_independently_and_each_video_is_decoded_once(served, video, tmp_path, reads):
    demo, client, _ = served
    config = client.get("/config").json()
    other = write_mp4(tmp_path / "other.mp4", random_video(8, seed=4))
    first = upload(client, "clip.mp4", open(video, "rb").read()).json()[0]
    second = upload(client, "other.mp4", other.read_bytes()).json()[0]
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    chat_a = answered(ask(client, config, a, first, "What colour?", []))
    chat_b = answered(ask(client, config, b, second, "What moves?", []))
    chat_a = answered(ask(client, config, a, first, "Sure?", chat_a))
    assert said(chat_a, "user") == ["What colour?", "Sure?"] and said(chat_b, "user") == ["What moves?"]
    answers = said(chat_a + chat_b, "assistant")
    assert len(answers) == 3 and not any(t.startswith(ERROR_PREFIX) for t in answers)
    assert sorted(reads) == sorted([first, second])


def test_a_video_path_the_page_did_not_upload_is_refused(served, video, reads):
    _, client, _ = served
    config = client.get("/config").json()
    for path in [video, "/etc/passwd"]:  # a file on the server, named by a crafted request
        assert not ask(client, config, uuid.uuid4().hex, path, "What?", [])["success"]
    assert reads == []
