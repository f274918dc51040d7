"""The web page of `storm-vlm web` in headless Chromium under the page's own Content-Security-Policy
(no `bypass_csp`), driven as a chat user drives it: Enter and Shift+Enter, a reply that looks like
HTML, markdown or LaTeX shown and copied as the text it is, Stop and "New conversation" while a
reply streams (the reply stops, its request in the engine is cancelled, nothing comes late); and,
over HTTP, the headers of every response and the Host check of a page on 127.0.0.1. The tiny STORM
decodes the video; its replies are scripted, streamed a word at a time until stopped."""

import threading
import time

import httpx
import pytest
from helpers import free_port, random_video, write_mp4
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from storm_vlm.demo.synth import pick_codec
from storm_vlm.serve.engine import Completion, RequestHandle

pytest.importorskip("gradio", reason="gradio is not installed (pip install 'storm-vlm[web]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from test_web_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402

from storm_vlm.serve.web import GENERATING, SECURITY_HEADERS, STOPPED, PageGuard, build_demo, launch_demo  # noqa: E402

REPLY = 'It is <img src=x onerror="window.hacked=1"> a<b & c, **not bold**, $$x^2$$'
QUESTION = "a<b & <i>c</i> $$y$$?"
SUBMITTED: list[RequestHandle] = []  # the scripted engine's requests, in order
# gradio's "Error" over a component (its status tracker) or in a toast
ERROR_SHOWN = "document.querySelector(\"[data-testid='status-tracker'] .error, .toast-body.error\") !== null"


def scripted_submit(prepared, videos=(), loop=None):
    """The engine's submit, answering REPLY and then a word every 50 ms (for 10 s) until cancelled."""
    handle = RequestHandle(prepared)
    SUBMITTED.append(handle)

    def write():
        text = REPLY
        handle.emit("delta", REPLY)
        for i in range(200):
            if handle.cancelled:
                break
            time.sleep(0.05)
            text += f" w{i}"
            handle.emit("delta", f" w{i}")
        handle.emit("done", Completion(text, "cancelled" if handle.cancelled else "stop", 1, 1, 64,
                                       {"wait_s": 0, "prefill_s": 0, "generate_s": 0}))

    threading.Thread(target=write, daemon=True).start()
    return handle


@pytest.fixture(scope="module")
def url(engine, tmp_path_factory):
    """The page, launched on 127.0.0.1 as `storm-vlm web` launches it, on the scripted engine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "submit", scripted_submit)
        demo = build_demo(engine, examples_dir=tmp_path_factory.mktemp("examples"))
        port = free_port()
        launch_demo(demo, "127.0.0.1", port, max_upload_mb=1, concurrency=2, block=False)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


@pytest.fixture(scope="module")
def browser(url):
    """A Chromium context that may use the clipboard."""
    if CHROMIUM is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_context(viewport={"width": 1280, "height": 900},
                                      permissions=["clipboard-read", "clipboard-write"])
        finally:
            browser.close()


@pytest.fixture
def page(browser, url, video):
    """A new tab of the page with `video` uploaded; `page.requested`: the URLs it asked for,
    `page.document`: the response that brought the page."""
    page = browser.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.add_init_script("window.violations = []; document.addEventListener('securitypolicyviolation',"
                         " (e) => window.violations.push(`${e.violatedDirective} ${e.blockedURI}`))")
    page.document = page.goto(url, wait_until="load", timeout=120_000)
    page.wait_for_selector("#ask", timeout=120_000)
    page.set_input_files("#video input[type=file]", str(video))
    page.wait_for_selector("#video video", timeout=60_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A clip Chromium plays (H.264 where PyAV has it)."""
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4", random_video(8, seed=3), codec=pick_codec(None))


def wait_for(page, expression: str, timeout_s: float = 30):
    """Poll `expression` in the page until it is truthy (Playwright's wait_for_function evaluates
    text, which the page's CSP refuses)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}: {rows(page)}"
        page.wait_for_timeout(50)


def rows(page) -> list[str]:
    return page.locator("#chat .message-row").all_inner_texts()


def test_enter_sends_and_shift_enter_starts_a_new_line(page):
    page.click("#question textarea")
    page.keyboard.type("first")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second")
    assert page.input_value("#question textarea") == "first\nsecond" and rows(page) == []
    page.keyboard.press("Enter")
    wait_for(page, "document.querySelectorAll('#chat .message-row').length === 2")
    assert rows(page)[0] == "first\nsecond" and page.input_value("#question textarea") == ""


def test_a_reply_is_shown_and_copied_as_the_text_it_is(page):
    page.fill("#question textarea", QUESTION)
    page.click("#ask")
    wait_for(page, "document.querySelectorAll('#chat .message-row').length === 2")
    assert rows(page)[0] == QUESTION and rows(page)[1].startswith(REPLY)
    chat = page.locator("#chat")
    assert chat.locator(".katex, img, b, strong, i").count() == 0 and page.evaluate("window.hacked") is None
    page.locator("#chat .message-row").nth(0).hover()
    chat.locator("button[title='Copy message']").first.click()
    assert page.evaluate("navigator.clipboard.readText()") == QUESTION
    chat.locator("button[title='Copy conversation']").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith(f"user: {QUESTION}\n\nassistant: {REPLY}")


def test_stop_unlocks_the_box_and_says_the_reply_stopped(engine, tmp_path):
    """Stop unlocks the box and says the reply stopped at once, before the turn's own last step
    (which says so too) reaches the page; where nothing streams, it leaves the status alone."""
    demo = build_demo(engine, examples_dir=tmp_path)
    config = demo.get_config_file()
    elem = {c["props"].get("elem_id"): c["id"] for c in config["components"] if c["props"].get("elem_id")}
    (stop,) = [d for d in config["dependencies"] if [elem["stop"], "click"] in map(list, d["targets"])]
    assert stop["inputs"][1:] == [elem["status"]] and stop["outputs"] == [elem["question"], elem["ask"], elem["status"]]
    unlocked = {"__type__": "update", "interactive": True}
    assert demo.fns[stop["id"]].fn(None, GENERATING) == (unlocked, unlocked, STOPPED)
    assert demo.fns[stop["id"]].fn(None, "64 visual tokens (4 frames)")[2] == {"__type__": "update"}  # nothing streams


@pytest.mark.parametrize("rounds", [4, pytest.param(10, marks=pytest.mark.slow)])
def test_stop_and_new_conversation_end_a_streaming_reply_every_time(page, rounds):
    """Ask, and once words stream in, Stop (even rounds) or "New conversation" (odd ones): the
    reply stops at once and for good, its request in the engine is cancelled, the box unlocks,
    and no error shows. Stop leaves the words so far and says so; a new conversation is empty."""
    for i in range(rounds):
        stopping = i % 2 == 0
        asked = len(SUBMITTED)
        page.fill("#question textarea", f"question {i}")
        page.click("#ask")
        wait_for(page, f"(([q, a]) => q?.innerText === 'question {i}' && a?.innerText.includes(' w2'))"
                       "([...document.querySelectorAll('#chat .message-row')].slice(-2))")
        page.click("#stop" if stopping else "#clear")
        handle = SUBMITTED[-1]
        assert len(SUBMITTED) == asked + 1
        wait_for(page, f"document.querySelectorAll('#chat .message-row').length === {2 if stopping else 0}"
                       " && !document.querySelector('#question textarea').disabled", timeout_s=3)
        deadline = time.monotonic() + 2
        while not handle.cancelled:
            assert time.monotonic() < deadline, f"round {i}: the engine's request was not cancelled"
            time.sleep(0.05)
        shown = rows(page)
        page.wait_for_timeout(400)  # eight more words, were the reply still streaming
        assert rows(page) == shown, f"round {i}: the reply went on"
        assert page.inner_text("#status") == (STOPPED if stopping else ""), f"round {i}"
        assert not page.evaluate(ERROR_SHOWN), f"round {i}: gradio shows an error"
        if stopping:
            assert shown[0] == f"question {i}" and shown[1].startswith(f"{REPLY} w0 w1 w2"), shown


def test_the_page_runs_under_its_csp_and_fetches_only_from_this_server(page, url):
    page.fill("#question textarea", "What colour?")
    page.click("#ask")
    wait_for(page, "document.querySelectorAll('#chat .message-row').length === 2")
    assert page.document.headers["content-security-policy"] == SECURITY_HEADERS["content-security-policy"]
    assert page.evaluate("window.violations") == []
    assert all(r.startswith((url, "blob:", "data:")) for r in page.requested), page.requested


# ---------------------------------------------------------------- over HTTP


def test_every_response_carries_the_security_headers(url):
    for path, status in [("", 200), ("config", 200), ("gradio_api/file=/etc/passwd", 403), ("nowhere", 404)]:
        response = httpx.get(url + path)
        assert response.status_code == status, path
        assert {k: response.headers.get(k) for k in SECURITY_HEADERS} == SECURITY_HEADERS, path


def test_a_page_on_127_0_0_1_refuses_requests_for_other_host_names(url):
    """What DNS rebinding sends: a request from a page of evil.example, whose name now points at
    127.0.0.1. Refused before gradio sees it (no upload); loopback names are served."""
    port = url.rsplit(":", 1)[1].strip("/")
    for host in ["evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"]:
        response = httpx.get(url + "config", headers={"Host": host})
        assert response.status_code == 400 and repr(host) in response.text, host
        upload = httpx.post(url + "gradio_api/upload", headers={"Host": host},
                            files={"files": ("x.mp4", b"\0" * 10, "application/octet-stream")})
        assert upload.status_code == 400, host
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.0.0.2"]:
        assert httpx.get(url + "config", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("loopback_only,status", [(True, 400), (False, 200)])
def test_a_page_on_all_interfaces_serves_any_host_name(loopback_only, status):
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    response = TestClient(PageGuard(app, loopback_only=loopback_only)).get("/")  # Host: testserver
    assert response.status_code == status
    assert response.headers["x-frame-options"] == "DENY"
