"""The web page (gradio Blocks): `build_demo(engine)`, and `chat_turn`, the function it calls.

Upload a video (or pick one of the example videos the project generates), then talk about it:
the conversation keeps its history, answers stream in as they are generated, and a question may
carry multiple-choice options (one per line; the reply is read as one of them). A video that
cannot be decoded, or a bad setting, shows its one-line message in the conversation, never a
traceback. The limits are the HTTP API's (`StormEngine.info()["limits"]`).

As in chat apps, Enter sends the question and Shift+Enter starts a new line; the question box
empties and locks while an answer streams; "Stop", "New conversation" and a new video stop the
answer being written (`TurnStop`: the engine stops generating it, Stop leaves the words written so
far, the others an empty conversation). Each turn sends the whole conversation
and the video to the model again, but a video is decoded once per upload and frame count
(`ClipCache`).

What gradio serves from disk is its upload / cache folders only (no `allowed_paths`); uploads are
limited to `max_upload_mb` and the queue to `max_queue` waiting requests. gradio deletes an upload
an hour after the last question about it (checked hourly) and all of them when the page stops.

Questions and answers are shown as the text they are (HTML-escaped, no markdown or LaTeX): the
chatbot would otherwise render HTML, hiding text such as "a<b" or "<video>"; its copy buttons copy
that text, not the escapes (`COPY_AS_TEXT`). A turn that fails shows one line in the conversation,
after what was answered before it; a turn gradio itself refuses (the queue is full) leaves the
question in the box, and gradio says why.

Nothing here reaches the internet: gradio analytics and its version check are off and there is
no share link. Every response carries `SECURITY_HEADERS` (the page loads and sends nothing to
other hosts, and no other site may frame it), and a page listening on a loopback address answers
only requests addressed to a loopback name (`PageGuard`: no DNS rebinding). Importing this module
imports gradio (seconds); nothing else in storm_vlm does.
"""

from __future__ import annotations

import html
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlsplit

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from storm_vlm.choices import LETTERS, extract_choice, format_question  # noqa: E402
from storm_vlm.demo.synth import pick_codec, write_mp4  # noqa: E402
from storm_vlm.demo.synth_tasks import render_static, render_transient  # noqa: E402
from storm_vlm.errors import StormError  # noqa: E402
from storm_vlm.inference import build_messages  # noqa: E402
from storm_vlm.serve.engine import MAX_OPTION_CHARS, MAX_OPTIONS, ContextTooLong  # noqa: E402
from storm_vlm.serve.network import is_loopback  # noqa: E402

__all__ = ["build_demo", "chat_turn", "ClipCache", "example_videos", "launch_demo", "PageGuard",
           "SECURITY_HEADERS", "TEMPORAL_SAMPLE_CHOICES", "TurnStop"]

MODEL_DEFAULT = "default"
TEMPORAL_SAMPLE_CHOICES = (MODEL_DEFAULT, "1", "2", "4", "8")
ERROR_PREFIX = "⚠️ "
GENERATING, STOPPED = "generating ...", "Stopped."
# What every response of the page says to the browser: load scripts, styles, media and fonts from
# this server only and send nothing elsewhere (gradio's page needs its inline scripts and styles),
# never be framed by another site (clickjacking), no MIME sniffing, no Referer to other sites.
SECURITY_HEADERS = {
    "content-security-policy": "; ".join([
        "default-src 'self'", "script-src 'self' 'unsafe-inline'", "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:", "media-src 'self' data: blob:", "font-src 'self' data:",
        "worker-src 'self' blob:", "connect-src 'self'", "object-src 'none'", "base-uri 'self'",
        "form-action 'self'", "frame-ancestors 'none'"]),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
# The chat's messages are HTML-escaped (`_shown`), and gradio's copy buttons copy a message as it
# is stored: this script of the page gives the clipboard the text itself ("a<b", not "a&lt;b"),
# through the clipboard API or, where the page is no secure context, the `copy` event.
COPY_AS_TEXT = """<script>
(() => {
  let fromChat = false;
  const text = (s) => s.replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&");
  document.addEventListener("click", (e) => { fromChat = !!e.target.closest?.("#chat"); }, true);
  const clipboard = navigator.clipboard;
  if (clipboard) {
    const write = clipboard.writeText.bind(clipboard);
    clipboard.writeText = (s) => write(fromChat ? text(s) : s);
  }
  document.addEventListener("copy", (e) => {
    const box = e.target;
    if (fromChat && box instanceof HTMLTextAreaElement && !box.closest("gradio-app")) {
      e.clipboardData.setData("text/plain", text(box.value));
      e.preventDefault();
    }
  }, true);
})();
</script>"""
log = logging.getLogger("storm_vlm.web")


def example_videos(folder: Path) -> list[tuple[str, str]]:
    """A few short videos from the project's synthetic benchmark, written to `folder`:
    [(path, a question to ask about it)]."""
    rng = np.random.default_rng(0)
    codec = pick_codec(None)
    out = []
    for name, render, question in (
        ("flash.mp4", render_transient, "A coloured square flashes for a single frame. What colour was it?"),
        ("square.mp4", render_static, "What colour is the square?"),
    ):
        path = folder / name
        if not path.is_file():
            write_mp4(str(path), render(rng, 64, 128, "A").frames, 8, codec)
        out.append((str(path), question))
    return out


class ClipCache:
    """The decoded clips of the last `size` (video file, frame count) pairs, shared by all sessions.

    Every turn of a conversation sends the video to the model again; this keeps the page from
    decoding the file again each time. An entry is keyed by the file's path, size and mtime as
    well (gradio names an upload by a hash of its bytes, so sessions never see each other's
    videos under one key); a file that cannot be stat'ed is not cached (reading it reports why).
    """

    def __init__(self, size: int = 4):
        self.size = size
        self._clips: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, engine, path: str, num_frames: int, cancel=None):
        """(clip, cached): `engine.read_video(path, num_frames, cancel=cancel)`, or the clip read
        earlier (a decode stopped by `cancel` raises, and is not kept)."""
        try:
            st = os.stat(path)
            key = (str(path), st.st_size, st.st_mtime_ns, num_frames)
        except OSError:
            key = None
        with self._lock:
            if key in self._clips:
                self._clips.move_to_end(key)
                return self._clips[key], True
        clip = engine.read_video(path, num_frames, cancel=cancel)
        if key is not None:
            with self._lock:
                self._clips[key] = clip
                while len(self._clips) > self.size:
                    self._clips.popitem(last=False)
        return clip, False


class TurnStop(threading.Event):
    """What stops one turn of the page: "Stop", "New conversation" and a new video call `stop`
    (from gradio's request threads) on the turn's own stop, which Ask made and the session keeps
    (a `gr.State`). It cancels the engine's request at once (the one the turn `watch`es), so the
    turn's wait for the next words ends; the turn then ends with a last step that says how it
    ended. As a threading.Event it also stops the video's decoding.

    The page does not use gradio's `cancels=` for this: that cancels the asyncio task while the
    turn's generator runs in a worker thread, so a turn could go on streaming, a step already
    written could reach the page after the conversation was cleared, and the page could show
    gradio's error overlay. A turn that ends itself has none of these races: its last step is the
    last word, and agrees with what the button's own handler showed."""

    def __init__(self):
        super().__init__()
        self.cleared = False  # "New conversation" / a new video: the turn leaves an empty conversation
        self._handle = None
        self._lock = threading.Lock()
        self._video = None  # the video the turn is about, once it starts
        self._changed_to = None  # a video the page changed to before the turn started

    def begin(self, video) -> None:
        """The turn starts, about `video`; a page that changed to another video meanwhile stops it."""
        with self._lock:
            self._video = video
            changed = self._changed_to is not None and self._changed_to != video
        if changed:
            self.stop(clear=True)

    def video_changed(self, video) -> bool:
        """The page's video changed to `video`: stops the turn (True) unless it is the video the turn
        is about -- the change event of the upload Ask followed can reach the server after Ask on a
        busy machine. Before the turn starts, `begin` decides (False)."""
        with self._lock:
            if self._video is None:
                self._changed_to = video
                return False
            if self._video == video:
                return False
        self.stop(clear=True)
        return True

    def stop(self, clear: bool = False) -> None:
        with self._lock:
            self.cleared = self.cleared or clear
            self.set()
            handle = self._handle
        if handle is not None:
            handle.cancel()  # a no-op once the request is done

    def watch(self, handle) -> None:
        """The engine's request of this turn: cancelled by `stop`, at once if it came already."""
        with self._lock:
            self._handle = handle
            stopped = self.is_set()
        if stopped:
            handle.cancel()


def _whole(name: str, value) -> int:
    """`value` (a slider's float, a dropdown's string) as an int; StormError naming it if it is none."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise StormError(f"{name} must be a whole number, got {value!r}") from None


def _options(text: str | None) -> list[str] | None:
    lines = [line.strip() for line in (text or "").splitlines()]
    return [line for line in lines if line] or None


def _keep(path: str) -> None:
    """Mark the uploaded video at `path` as in use: gradio deletes an upload an hour after its
    ctime (`delete_cache`), even in a conversation still going on. Setting its times to what they
    are renews the ctime, not the mtime `ClipCache` keys on. StormError when it is gone already."""
    try:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    except FileNotFoundError:
        raise StormError(f"{os.path.basename(path)} is no longer on the server (an upload is kept for an hour "
                         "after the last question about it): upload it again") from None
    except OSError:
        pass  # reading it says what is wrong


def _shown(role: str, text: str) -> dict:
    """A chat message as the page shows it: the text exactly as typed or generated. The chatbot
    renders HTML (sanitized, so no script runs), which would hide text such as "a<b" or "<video>";
    escaped, it shows as the characters themselves."""
    return {"role": role, "content": html.escape(text, quote=False)}


def _error_message(exc: Exception, video, turns: list) -> str:
    """The one line the page shows for `exc`: a StormError's message with the video named as the
    user knows it (not by gradio's cache folder); anything else (a bug) by its type, with its
    traceback in the server's log."""
    if not isinstance(exc, StormError):
        log.error("the web page's turn failed", exc_info=exc)
        return f"internal error ({type(exc).__name__}: {exc}); the server's log has the details"
    message = str(exc).replace(str(video), os.path.basename(str(video))) if video else str(exc)
    if isinstance(exc, ContextTooLong) and turns:  # every earlier turn is part of the prompt
        message += " (or start a new conversation)"
    return message


def chat_turn(engine, video: str | None, question: str, history: list[dict], turns: list, options_text: str = "",
              frames: float = 32, temporal_sample: str | None = MODEL_DEFAULT, max_new_tokens: float = 64,
              clips: ClipCache | None = None, stop: TurnStop | None = None):
    """One turn of the page's conversation: yields (chat messages, model turns, status) as the
    answer streams in. `history` holds the chat as shown ({"role", "content"} dicts, `_shown`);
    `turns` the (prompt, answer) pairs the model saw, the answer so far while it streams (so a
    stopped answer stays part of the conversation, as the page shows it); `clips` keeps decoded
    videos between turns. Any error ends up in the conversation as one line, after what was
    answered before it; an empty question changes nothing.

    `stop` (see `TurnStop`) ends the turn early: its last step holds the words written so far and
    the status `STOPPED` (the question stays out of the chat when no word was written yet), or,
    when the conversation was cleared, an empty one. Closing the generator cancels the request in
    the engine too."""
    if not (question or "").strip():
        yield history, turns, "Type a question first."
        return
    stop = stop if stop is not None else TurnStop()
    shown = [*history, _shown("user", question)]
    steps = _answer(engine, video, question, turns, options_text, frames, temporal_sample, max_new_tokens, clips,
                    stop)
    answer = ""
    try:
        for answer, now, status in steps:
            if stop.cleared:
                break
            yield ([*shown, _shown("assistant", answer)], now, status) if answer or status != STOPPED else (
                history, turns, STOPPED)  # stopped before the first word: the question stays in the box
    except Exception as exc:  # noqa: BLE001 - the page shows every failure as one line
        if not stop.is_set():
            told = (f"{answer}\n\n" if answer else "") + ERROR_PREFIX + _error_message(exc, video, turns)
            yield [*shown, _shown("assistant", told)], turns, ""
        elif not stop.cleared:  # what failed was stopped (the video's decoding)
            yield history, turns, STOPPED
    finally:
        steps.close()  # cancels the request when this generator is closed early
    if stop.cleared:
        yield [], [], ""  # after any step already on its way to the page


def _answer(engine, video, question, turns, options_text, frames, temporal_sample, max_new_tokens, clips,
            stop: TurnStop):
    """`chat_turn`'s work: yields (answer so far, model turns, status), the last one with status
    `STOPPED` when `stop` ended it; raises on any error."""
    if not video:
        raise StormError("Upload a video first (or pick an example).")
    _keep(video)
    options = _options(options_text)
    if options and not 2 <= len(options) <= MAX_OPTIONS:
        raise StormError(f"give between 2 and {MAX_OPTIONS} options, one per line")
    if options and max(map(len, options)) > MAX_OPTION_CHARS:
        raise StormError(f"each option must be at most {MAX_OPTION_CHARS} characters")
    stride = (None if temporal_sample in (None, "", MODEL_DEFAULT)
              else _whole("temporal_sample_stride", temporal_sample))
    question, options, num_frames, stride, max_new = engine.check_request(
        question, options, _whole("frames", frames), stride, _whole("max_new_tokens", max_new_tokens))
    prompt = format_question(question, options) if options else question
    prepared = engine.prepare(build_messages(prompt, turns), [num_frames], engine.check_sampling(max_new), stride)
    clip, cached = (clips or ClipCache(0)).read(engine, video, num_frames, cancel=stop)
    answer, completion = "", None
    if not stop.is_set():
        handle = engine.submit(prepared, [clip.frames])
        stop.watch(handle)
        try:
            for kind, payload in handle.events():
                if stop.is_set():
                    break
                if kind == "delta":
                    answer += payload
                    yield answer, [*turns, (prompt, answer)], GENERATING
                elif kind == "error":
                    raise payload
                else:
                    completion = payload
        finally:
            handle.cancel()  # a no-op once it is done; stops generating when the turn ends early
    if completion is None:  # stopped
        yield answer, [*turns, (prompt, answer)], STOPPED
        return
    text = completion.text or "(empty answer)"
    if options:
        choice = extract_choice(completion.text, options)
        text += ("\n\n→ names none of the options" if choice is None
                 else f"\n\n→ option {LETTERS[choice]}: {options[choice]}")
    t = completion.timings
    n = len(clip)
    decoded = "video decoded earlier" if cached else f"decode video {clip.extra['decode_s']:.2f} s"
    status = (f"{completion.visual_tokens} visual tokens ({n} frame{'s' * (n != 1)}, stride "
              f"{engine.config.visual_token_layout.with_sample_stride(stride).temporal_sample_stride}); "
              f"{decoded}, queued {t['wait_s']:.2f} s, "
              f"prefill {t['prefill_s']:.2f} s, generate {t['generate_s']:.2f} s")
    yield text, [*turns, (prompt, completion.text)], status


def build_demo(engine, title: str = "STORM video question answering", examples_dir: str | Path | None = None):
    """The gradio Blocks for `engine` (a `StormEngine`); not launched. Example videos are written
    to `examples_dir` (default: a temporary folder, removed with the Blocks or at exit)."""
    info = engine.info()
    cfg, limits = info["config"], info["limits"]
    folder = Path(examples_dir or tempfile.mkdtemp(prefix="storm-web-examples-"))
    folder.mkdir(parents=True, exist_ok=True)
    examples = example_videos(folder)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        if examples_dir is None:
            weakref.finalize(demo, shutil.rmtree, folder, ignore_errors=True)
        precision = info["dtype"] + (f", {info['autocast']} autocast" if info["autocast"] else "")
        gr.Markdown(
            f"## {title}\n"
            f"Model `{Path(info['model_dir']).name}`: {cfg['projector_type']} projector, "
            f"temporal pool {cfg['temporal_pool_size']}, spatial pool {cfg['spatial_pool_stride']}, "
            f"{cfg['tokens_per_frame']} tokens per frame; {info['device']} ({precision}). "
            "A video the browser cannot play (its player says so: HEVC, MPEG-4 Part 2, ...) is still answered."
        )
        turns = gr.State([])
        stopper = gr.State(None)  # the `TurnStop` of the session's last turn
        with gr.Row():
            with gr.Column(scale=2):
                video = gr.Video(label="Video", sources=["upload"], format=None, elem_id="video")
                gr.Examples([[path] for path, _ in examples], inputs=[video], label="Example videos")
                options = gr.Textbox(label=f"Options (optional, one per line, at most {MAX_OPTIONS})", lines=3,
                                     placeholder="red\ngreen\nblue", elem_id="options")
                frames = gr.Slider(1, limits["max_frames"], value=info["defaults"]["frames"], step=1,
                                   label="Frames sampled")
                temporal_sample = gr.Dropdown(
                    choices=[(f"model default ({cfg['temporal_sample_stride']})", MODEL_DEFAULT)]
                    + [(s, s) for s in TEMPORAL_SAMPLE_CHOICES[1:]],
                    value=MODEL_DEFAULT, label="Temporal sampling stride (keep every s-th frame's tokens)")
                max_new_tokens = gr.Slider(1, limits["max_new_tokens"], value=min(64, limits["max_new_tokens"]),
                                           step=1, label="Max new tokens")
            with gr.Column(scale=3):
                # the messages are HTML-escaped text (`_shown`), shown as they are: no markdown or LaTeX
                chat = gr.Chatbot(label="Conversation about the video", height=420, elem_id="chat",
                                  render_markdown=False, latex_delimiters=[])
                # one line that grows: gradio's Enter sends it, Shift+Enter starts a new line (in a
                # box of several lines, gradio has Enter start a line and Shift+Enter send)
                question = gr.Textbox(label="Question (Enter sends, Shift+Enter starts a new line)",
                                      placeholder=examples[0][1], lines=1, max_lines=8, elem_id="question")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("New conversation", elem_id="clear")
                status = gr.Markdown(elem_id="status")
        clips = ClipCache()

        def turn(video, question, history, turns, options, frames, temporal_sample, max_new_tokens, stopper):
            """`chat_turn`, emptying the question box once the question is in the chat."""
            history = history or []
            if stopper is not None:
                stopper.begin(video)
            steps = chat_turn(engine, video, question, history, turns or [], options, frames,
                              temporal_sample, max_new_tokens, clips, stopper)
            taken = False
            try:
                for shown, *step in steps:
                    takes = not taken and len(shown) > len(history)
                    taken = taken or takes
                    yield shown, *step, ("" if takes else gr.update())
            finally:
                steps.close()  # gradio closes a turn whose page went away: so is the request

        def stop_turn(stopper, shown):
            """Stop: the turn stops (its last step keeps the words written so far, and says so)."""
            if stopper is not None:
                stopper.stop()
            return unlocked, unlocked, STOPPED if shown == GENERATING else gr.update()

        def new_conversation(stopper):
            """"New conversation" or a new video: the turn stops, and leaves the conversation empty."""
            if stopper is not None:
                stopper.stop(clear=True)
            return [], [], "", unlocked, unlocked

        def new_video(stopper, video):
            """A new video starts a new conversation (`TurnStop.video_changed`: not the late change
            event of the upload the turn is about)."""
            if stopper is None or stopper.video_changed(video):
                return [], [], "", unlocked, unlocked
            return (gr.update(),) * 5

        # gradio's chat pattern: lock the question box (and Ask) until the answer is written, so a
        # second Ask / Enter cannot start a second turn meanwhile. The question moves from the box to
        # the chat at the turn's first step: a turn gradio refuses (the queue is full; gradio says
        # so) leaves it in the box. Each turn gets a new `TurnStop`, for the buttons that stop it.
        locked, unlocked = gr.update(interactive=False), gr.update(interactive=True)
        take = gr.on([ask.click, question.submit], lambda: (locked, locked, TurnStop()),
                     outputs=[question, ask, stopper], queue=False, api_name=False)
        answering = take.then(turn, inputs=[video, question, chat, turns, options, frames, temporal_sample,
                                            max_new_tokens, stopper], outputs=[chat, turns, status, question],
                              api_name=False)
        for after in (answering.then, answering.failure):  # the page runs no `.then` after a failure
            after(lambda: (unlocked, unlocked), outputs=[question, ask], queue=False, api_name=False)
        # not gradio's `cancels=` (see `TurnStop`): the turn ends itself, soon after; these unlock
        # the box at once (and Stop says so where the status still reads as generating)
        stop.click(stop_turn, inputs=[stopper, status], outputs=[question, ask, status], queue=False,
                   api_name=False)
        clear.click(new_conversation, inputs=[stopper], outputs=[chat, turns, status, question, ask], queue=False,
                    api_name=False)
        video.change(new_video, inputs=[stopper, video], outputs=[chat, turns, status, question, ask], queue=False,
                     api_name=False)
    return demo


class PageGuard:
    """ASGI middleware around gradio's app: `SECURITY_HEADERS` on every response (headers gradio
    set itself are kept), and, with `loopback_only`, a 400 for a request whose Host header names
    anything but a loopback address or localhost. A page on 127.0.0.1 is otherwise open to any
    web site the browser visits that points a name of its own at 127.0.0.1 (DNS rebinding): the
    browser treats the page as that site's, so it could upload files and ask questions."""

    def __init__(self, app, loopback_only: bool):
        self.app, self.loopback_only = app, loopback_only
        self._headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
        if self.loopback_only and host is not None and not _is_loopback_host(host):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            body = (f"storm-vlm web listens on a loopback address: open it as http://127.0.0.1 or "
                    f"http://localhost, not as {host!r}").encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()), *self._headers]})
            return await send({"type": "http.response.body", "body": body})

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                given = {k.lower() for k, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()), *(h for h in self._headers if h[0] not in given)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _is_loopback_host(host: str) -> bool:
    """Whether a Host header ("127.0.0.1:7860", "[::1]:7860", "localhost") names this host only."""
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:
        return False
    return bool(name) and is_loopback(name)


def launch_demo(demo: gr.Blocks, host: str, port: int, max_upload_mb: float = 200, concurrency: int = 8,
                max_queue: int | None = None, block: bool = True) -> None:
    """Serve the page on host:port (until interrupted, or in the background with block=False);
    never a share link. `concurrency`: answers written at once (the engine batches them);
    `max_queue`: answers waiting at most (beyond, the page says the queue is full); uploads over
    `max_upload_mb` (MiB, as `storm-vlm serve` counts them) are refused. Every response goes
    through `PageGuard` (for a loopback `host`, only requests addressed to a loopback name)."""
    shown = f"[{host}]" if ":" in host else host
    print(f"storm-vlm web: serving on http://{shown}:{port} (Ctrl+C to stop)", flush=True)
    # quiet: gradio's banner would suggest share=True, which this command never offers. The upload
    # limit goes as bytes: gradio reads a size string's number as an int ("0.5mb" fails).
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, quiet=True,
        max_file_size=int(max_upload_mb * 2**20), prevent_thread_lock=not block, head=COPY_AS_TEXT,
        app_kwargs={"middleware": [Middleware(PageGuard, loopback_only=is_loopback(host))]})
