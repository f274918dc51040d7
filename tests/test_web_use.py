"""The web page of `storm-vlm web` as people use it and break it: text that looks like HTML in
questions and answers, a model that fails mid-answer or a bug in a turn, a stopped answer, a
Stop and "New conversation" from gradio's other threads, a
conversation that outgrows the context, an upload gradio has deleted, a turn gradio itself
refuses, and the command's temporary files (on a tiny STORM; one test in headless Chromium)."""

import html
import os
import stat
import sys
import threading
import time

import pytest
from helpers import free_port, random_video, running_server, write_mp4

from storm_vlm.cli import build_parser
from storm_vlm.errors import StormError
from storm_vlm.serve.engine import Completion, RequestHandle

pytest.importorskip("gradio", reason="gradio is not installed (pip install 'storm-vlm[web]')")

from storm_vlm.serve.web import ERROR_PREFIX, STOPPED, TurnStop, build_demo, chat_turn  # noqa: E402

TRICKY = 'a<b and c>d, <video> tokens, <img src=x onerror="window.hacked=1"> **not bold** & 日本語'


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(write_mp4(tmp_path_factory.mktemp("web-use") / "clip.mp4", random_video(8, seed=3)))


@pytest.fixture
def scripted(engine, monkeypatch):
    """`scripted(events)`: the engine answers every request with these (kind, payload) events."""
    def script(events):
        def submit(prepared, videos=(), loop=None):
            handle = RequestHandle(prepared)
            for event in events:
                handle.emit(*event)
            return handle
        monkeypatch.setattr(engine, "submit", submit)
    return script


def done(text: str) -> tuple:
    return "done", Completion(text, "stop", 1, 1, 64, {"wait_s": 0, "prefill_s": 0, "generate_s": 0})


def last(steps):
    return list(steps)[-1]


def test_html_in_a_question_or_an_answer_is_shown_as_the_text_it_is(engine, video, scripted):
    scripted([("delta", TRICKY), done(TRICKY)])
    chat, turns, _ = last(chat_turn(engine, video, TRICKY, [], [], "", 4, "default", 8))
    assert [m["content"] for m in chat] == [html.escape(TRICKY, quote=False)] * 2
    assert turns == [(TRICKY, TRICKY)]  # the model sees the text itself
    (chatbot,) = [c for c in build_demo(engine).get_config_file()["components"] if c["props"].get("elem_id") == "chat"]
    assert chatbot["props"]["sanitize_html"] and not chatbot["props"]["render_markdown"]


def test_a_model_error_mid_answer_keeps_what_was_written(engine, video, scripted):
    scripted([("delta", "The square is"), ("error", StormError("generation failed (RuntimeError: CUDA OOM)"))])
    chat, turns, status = last(chat_turn(engine, video, "What colour?", [], [], "", 4, "default", 8))
    assert chat[-1]["content"] == f"The square is\n\n{ERROR_PREFIX}generation failed (RuntimeError: CUDA OOM)"
    assert turns == [] and status == ""


def test_an_unexpected_failure_is_one_line_with_the_traceback_in_the_log(engine, video, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("decoder crashed")
    monkeypatch.setattr(engine, "read_video", broken)
    chat, turns, _ = last(chat_turn(engine, video, "What?", [], [], "", 4, "default", 8))
    assert chat[-1]["content"] == (f"{ERROR_PREFIX}internal error (RuntimeError: decoder crashed); "
                                   "the server's log has the details")
    assert turns == [] and "decoder crashed" in caplog.text and "Traceback" in caplog.text


def test_text_a_tokenizer_cannot_take_is_one_line(engine, video):
    chat, _, _ = last(chat_turn(engine, video, "what is \ud800?", [], [], "", 4, "default", 8))
    assert chat[-1]["content"] == f"{ERROR_PREFIX}question: the text holds an unpaired surrogate (\\ud800)"
    chat, _, _ = last(chat_turn(engine, video, "which?", [], [], "red\ngr\udfffeen", 4, "default", 8))
    assert chat[-1]["content"].startswith(f"{ERROR_PREFIX}options: an option holds an unpaired surrogate")


def test_a_stopped_answer_stays_part_of_the_conversation(engine, video, scripted):
    scripted([("delta", "It is "), ("delta", "red and"), done("It is red and blue")])
    turn = chat_turn(engine, video, "What colour?", [], [], "", 4, "default", 8)
    next(turn)
    chat, turns, _ = next(turn)
    turn.close()  # the page's Stop
    assert chat[-1]["content"] == "It is red and" and turns == [("What colour?", "It is red and")]


@pytest.mark.parametrize("clear", [False, True])
def test_stop_ends_a_turn_waiting_for_words_and_cancels_its_request(engine, video, monkeypatch, clear):
    """Stop / "New conversation" run in another thread while the turn waits for the engine's next
    words: the request is cancelled at once (the engine then ends it), and the turn's last step
    keeps the words so far and says it stopped, or leaves the conversation empty."""
    handles = []

    def submit(prepared, videos=(), loop=None):
        end = lambda handle: handle.emit("done", done("It is")[1])  # noqa: E731
        handle = RequestHandle(prepared, on_cancel=end)
        handles.append(handle)
        handle.emit("delta", "It is")
        threading.Timer(5, end, [handle]).start()  # the last word, were the request never cancelled
        return handle

    monkeypatch.setattr(engine, "submit", submit)
    history, turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], [("q", "a")]
    stop = TurnStop()
    turn = chat_turn(engine, video, "What colour?", history, turns, "", 4, "default", 8, stop=stop)
    next(turn)
    threading.Timer(0.1, stop.stop, kwargs={"clear": clear}).start()
    started = time.monotonic()
    steps = list(turn)
    assert time.monotonic() - started < 2 and handles[0].cancelled
    assert steps[-1] == (([], [], "") if clear else (
        [*history, {"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "It is"}],
        [*turns, ("What colour?", "It is")], STOPPED))


@pytest.mark.parametrize("clear", [False, True])
def test_a_turn_stopped_before_its_first_word_asks_nothing(engine, video, monkeypatch, clear):
    """Stopped while it waited in gradio's queue (or decoded the video): no request reaches the
    engine, and the question stays out of the conversation (it is still in the box)."""
    monkeypatch.setattr(engine, "submit", lambda *a, **k: pytest.fail("a stopped turn asked the engine"))
    stop = TurnStop()
    stop.stop(clear=clear)
    steps = list(chat_turn(engine, video, "What colour?", [], [("q", "a")], "", 4, "default", 8, stop=stop))
    assert steps == [([], [], "")] if clear else [([], [("q", "a")], STOPPED)]


def test_a_conversation_too_long_for_the_model_says_to_start_a_new_one(engine, video):
    long_ago = [(" ".join(map(str, range(3000))), "ok")]  # far beyond the 4096 positions
    chat, turns, _ = last(chat_turn(engine, video, "And now?", [], long_ago, "", 4, "default", 8))
    assert "maximum context length" in chat[-1]["content"]
    assert chat[-1]["content"].endswith("(or start a new conversation)") and turns == long_ago


def test_an_upload_in_use_is_kept_and_a_deleted_one_is_named(engine, video, tmp_path):
    from gradio.route_utils import delete_files_created_by_app

    demo = build_demo(engine, examples_dir=tmp_path / "examples")
    used, idle = (str(write_mp4(tmp_path / name, random_video(4, seed=1))) for name in ("used.mp4", "idle.mp4"))
    demo.upload_file_set.update([used, idle])
    time.sleep(1.1)
    last(chat_turn(engine, used, "What?", [], [], "", 2, "default", 1))
    delete_files_created_by_app(demo, age=1)  # what gradio does every hour, with a 1 s age
    assert os.path.exists(used) and not os.path.exists(idle)
    chat, _, _ = last(chat_turn(engine, idle, "What?", [], [], "", 2, "default", 1))
    assert chat[-1]["content"] == (f"{ERROR_PREFIX}idle.mp4 is no longer on the server (an upload is kept for an "
                                   "hour after the last question about it): upload it again")


def test_a_turn_gradio_refuses_leaves_the_question_in_the_box_unlocked(engine, tmp_path):
    """gradio's page runs no `.then` after a failed event (the queue is full): the box must not stay
    locked, and the question, taken out of the box only by the turn itself, must still be in it."""
    demo = build_demo(engine, examples_dir=tmp_path)
    config = demo.get_config_file()
    elem = {c["props"].get("elem_id"): c["id"] for c in config["components"] if c["props"].get("elem_id")}
    deps = config["dependencies"]
    (take,) = [d for d in deps if [elem["ask"], "click"] in map(list, d["targets"])]
    assert not any("value" in update for update in demo.fns[take["id"]].fn()[:2])  # it locks, keeps the text
    (answer,) = [d for d in deps if d["trigger_after"] == take["id"]]
    assert elem["question"] in answer["inputs"] and elem["question"] in answer["outputs"]
    (failed,) = [d for d in deps if d["trigger_after"] == answer["id"] and d["trigger_only_on_failure"]]
    assert set(failed["outputs"]) == {elem["question"], elem["ask"]}
    assert all(update == {"__type__": "update", "interactive": True} for update in demo.fns[failed["id"]].fn())


def test_the_command_keeps_gradio_files_in_a_private_folder_removed_at_the_end(monkeypatch, qwen2_mamba_dir):
    from storm_vlm.commands import web as command
    from storm_vlm.serve import web

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    seen = {}

    def launch(demo, host, port, **kw):
        folder = seen["folder"] = os.environ["GRADIO_TEMP_DIR"]
        seen["mode"] = stat.S_IMODE(os.stat(folder).st_mode)
        open(os.path.join(folder, "upload.mp4"), "wb").close()

    monkeypatch.setattr(command, "load_engine", lambda args: "engine")
    monkeypatch.setattr(web, "build_demo", lambda engine: "demo")
    monkeypatch.setattr(web, "launch_demo", launch)
    assert command.run(build_parser("web").parse_args(["web", str(qwen2_mamba_dir), "--port", str(free_port())])) == 0
    assert seen["mode"] == 0o700 and not os.path.exists(seen["folder"]) and "GRADIO_TEMP_DIR" not in os.environ


# ---------------------------------------------------------------- the command and Chromium


@pytest.mark.slow
def test_html_text_in_chromium_and_sigterm_leaves_no_files(qwen2_mamba_dir, tmp_path, monkeypatch):
    """`storm-vlm web` in a private TMPDIR: a question that looks like HTML shows as typed and runs
    nothing; after SIGTERM (what running_server sends) nothing of the page is left in TMPDIR."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from test_web_browser import CHROMIUM, CHROMIUM_ARGS

    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    port = free_port()
    argv = [sys.executable, "-m", "storm_vlm", "web", str(qwen2_mamba_dir), "--port", str(port),
            "--frames", "2", "--max-frames", "4", "--precision", "float32"]
    clip = write_mp4(tmp_path / "clip.mp4", random_video(4, seed=3))
    with running_server(argv, f"http://127.0.0.1:{port}/", tmp_path / "web.log"):
        assert os.listdir(tmp)  # gradio's folder and the example videos
        monkeypatch.undo()  # TMPDIR was for the command, not for Chromium
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(bypass_csp=True)  # for wait_for_function (see test_web_browser)
                page.goto(f"http://127.0.0.1:{port}/", timeout=120_000)
                page.set_input_files("#video input[type=file]", str(clip))
                page.wait_for_selector("#video video", timeout=60_000)
                page.fill("#question textarea", TRICKY)
                page.click("#ask")
                page.wait_for_function("document.querySelector('#status')?.innerText.includes('visual tokens')",
                                       timeout=120_000)
                assert page.locator("#chat .message-row").nth(0).inner_text().strip() == TRICKY
                assert page.evaluate("window.hacked") is None
            finally:
                browser.close()
        time.sleep(0.5)
    assert os.listdir(tmp) == []
    assert "Keyboard interruption" in (tmp_path / "web.log").read_text()  # SIGTERM stopped it as Ctrl+C does
