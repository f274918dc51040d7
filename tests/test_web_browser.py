"""The web page in a real browser: headless Chromium (Debian's `chromium` package) driven by
Playwright against `storm-vlm web` on 127.0.0.1: upload a video, ask, read the answer from the
page, save a screenshot, start a new conversation. Skipped, with the reason, where no browser can be had."""

import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers import free_port, random_video, running_server, write_mp4

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
# Flags for a closed network: no background connections, no sandbox (tests may run as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_url(qwen2_mamba_dir, tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    argv = [sys.executable, "-m", "storm_vlm", "web", str(qwen2_mamba_dir), "--port", str(port),
            "--frames", "4", "--max-frames", "16", "--precision", "float32"]
    with running_server(argv, url, tmp_path_factory.mktemp("web") / "web.log"):
        yield url


def test_upload_ask_and_read_the_answer_in_chromium(page_url, tmp_path):
    video = write_mp4(tmp_path / "clip.mp4", random_video(8, seed=3))
    shot = Path(os.environ.get("STORM_VLM_SCREENSHOT_DIR", tmp_path)) / "web-page.png"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # Playwright's wait_for_function evaluates its text, which the page's CSP (no eval) refuses;
            # tests/test_web_page_behaviour.py drives the page under its CSP
            page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
            page.goto(page_url, wait_until="load", timeout=120_000)
            page.wait_for_selector("#ask", timeout=120_000)
            page.set_input_files("#video input[type=file]", str(video))
            page.wait_for_selector("#video video", timeout=60_000)  # the upload has reached the server
            page.fill("#question textarea", "What colour is the square?")
            page.click("#ask")
            # the question leaves the box (and Ask locks) before the answer is written, as in gradio's chat apps
            page.wait_for_function("document.querySelector('#question textarea').value === ''", timeout=30_000)
            page.wait_for_function("document.querySelector('#status')?.innerText.includes('visual tokens')",
                                   timeout=180_000)
            page.wait_for_function("!document.querySelector('#question textarea').disabled", timeout=30_000)
            messages = page.locator("#chat .message-row")
            assert messages.count() == 2
            assert "What colour is the square?" in messages.nth(0).inner_text()
            answer = messages.nth(1).inner_text().strip()
            assert answer and "⚠️" not in answer
            assert page.inner_text("#status").startswith("64 visual tokens (4 frames")
            # an error shows up in the conversation, not as a traceback
            page.fill("#options textarea", "only one option")
            page.fill("#question textarea", "And now?")
            page.click("#ask")
            page.wait_for_function("document.querySelectorAll('#chat .message-row').length >= 4", timeout=60_000)
            assert "between 2 and 26 options" in page.locator("#chat .message-row").nth(3).inner_text()
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            page.click("#clear")
            page.wait_for_function("document.querySelectorAll('#chat .message-row').length == 0", timeout=30_000)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
