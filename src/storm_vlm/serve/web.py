"""The web page (gradio Blocks): `build_demo(engine)`, and `chat_turn`, the function it calls.

Upload a video (or pick one of the example videos the project generates), then talk about it:
the conversation keeps its history, answers stream in as they are generated, and a question may
carry multiple-choice options (one per line; the reply is read as one of them). A video that
cannot be decoded, or a bad setting, shows its one-line message in the conversation, never a
traceback. The limits are the HTTP API's (`StormEngine.info()["limits"]`).

Nothing here reaches the internet: gradio analytics and its version check are off and there is
no share link. Importing this module imports gradio (seconds); nothing else in storm_vlm does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from storm_vlm.choices import LETTERS, extract_choice, format_question  # noqa: E402
from storm_vlm.demo.synth import pick_codec, write_mp4  # noqa: E402
from storm_vlm.demo.synth_tasks import render_static, render_transient  # noqa: E402
from storm_vlm.errors import StormError  # noqa: E402
from storm_vlm.inference import build_messages  # noqa: E402
from storm_vlm.serve.engine import MAX_OPTION_CHARS, MAX_OPTIONS  # noqa: E402

__all__ = ["build_demo", "chat_turn", "example_videos", "launch_demo", "TEMPORAL_SAMPLE_CHOICES"]

MODEL_DEFAULT = "default"
TEMPORAL_SAMPLE_CHOICES = (MODEL_DEFAULT, "1", "2", "4", "8")
ERROR_PREFIX = "⚠️ "


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


def _options(text: str | None) -> list[str] | None:
    lines = [line.strip() for line in (text or "").splitlines()]
    return [line for line in lines if line] or None


def chat_turn(engine, video: str | None, question: str, history: list[dict], turns: list, options_text: str = "",
              frames: float = 32, temporal_sample: str | None = MODEL_DEFAULT, max_new_tokens: float = 64):
    """One turn of the page's conversation: yields (chat messages, model turns, status) as the
    answer streams in. `history` holds the chat as shown ({"role", "content"} dicts); `turns` the
    (prompt, answer) pairs the model saw. Errors end up in the conversation as one line."""
    shown = [*history, {"role": "user", "content": question or ""}]
    try:
        if not video:
            raise StormError("Upload a video first (or pick an example).")
        options = _options(options_text)
        if options and not 2 <= len(options) <= MAX_OPTIONS:
            raise StormError(f"give between 2 and {MAX_OPTIONS} options, one per line")
        if options and max(map(len, options)) > MAX_OPTION_CHARS:
            raise StormError(f"each option must be at most {MAX_OPTION_CHARS} characters")
        stride = None if temporal_sample in (None, "", MODEL_DEFAULT) else int(temporal_sample)
        question, options, num_frames, stride, max_new = engine.check_request(
            question, options, int(frames), stride, int(max_new_tokens))
        prompt = format_question(question, options) if options else question
        prepared = engine.prepare(build_messages(prompt, turns), [num_frames], engine.check_sampling(max_new), stride)
        clip = engine.read_video(video, num_frames)
        handle = engine.submit(prepared, [clip.frames])
    except StormError as exc:
        # name the file as the user knows it, not by gradio's cache folder
        message = str(exc).replace(str(video), os.path.basename(str(video))) if video else str(exc)
        yield [*shown, {"role": "assistant", "content": ERROR_PREFIX + message}], turns, ""
        return
    answer = ""
    for kind, payload in handle.events():
        if kind == "delta":
            answer += payload
            yield [*shown, {"role": "assistant", "content": answer}], turns, "generating ..."
        elif kind == "error":
            yield [*shown, {"role": "assistant", "content": ERROR_PREFIX + str(payload)}], turns, ""
            return
        else:
            completion = payload
    text = completion.text or "(empty answer)"
    if options:
        choice = extract_choice(completion.text, options)
        text += ("\n\n→ names none of the options" if choice is None
                 else f"\n\n→ option {LETTERS[choice]}: {options[choice]}")
    t = completion.timings
    status = (f"{completion.visual_tokens} visual tokens ({len(clip)} frames, stride "
              f"{engine.config.visual_token_layout.with_sample_stride(stride).temporal_sample_stride}); "
              f"decode video {clip.extra['decode_s']:.2f} s, queued {t['wait_s']:.2f} s, "
              f"prefill {t['prefill_s']:.2f} s, generate {t['generate_s']:.2f} s")
    yield [*shown, {"role": "assistant", "content": text}], [*turns, (prompt, completion.text)], status


def build_demo(engine, title: str = "STORM video question answering", examples_dir: str | Path | None = None):
    """The gradio Blocks for `engine` (a `StormEngine`); not launched. Example videos are written
    to `examples_dir` (default: a temporary folder)."""
    info = engine.info()
    cfg, limits = info["config"], info["limits"]
    folder = Path(examples_dir or tempfile.mkdtemp(prefix="storm-web-examples-"))
    folder.mkdir(parents=True, exist_ok=True)
    examples = example_videos(folder)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        precision = info["dtype"] + (f", {info['autocast']} autocast" if info["autocast"] else "")
        gr.Markdown(
            f"## {title}\n"
            f"Model `{Path(info['model_dir']).name}`: {cfg['projector_type']} projector, "
            f"temporal pool {cfg['temporal_pool_size']}, spatial pool {cfg['spatial_pool_stride']}, "
            f"{cfg['tokens_per_frame']} tokens per frame; {info['device']} ({precision})."
        )
        turns = gr.State([])
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
                chat = gr.Chatbot(label="Conversation about the video", height=420, elem_id="chat")
                question = gr.Textbox(label="Question", placeholder=examples[0][1], lines=2, elem_id="question")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    clear = gr.Button("New conversation")
                status = gr.Markdown(elem_id="status")

        def turn(video, question, history, turns, options, frames, temporal_sample, max_new_tokens):
            yield from chat_turn(engine, video, question, history or [], turns or [], options, frames,
                                 temporal_sample, max_new_tokens)

        inputs = [video, question, chat, turns, options, frames, temporal_sample, max_new_tokens]
        for event in (ask.click, question.submit):
            event(turn, inputs=inputs, outputs=[chat, turns, status], api_name=False).then(
                lambda: "", outputs=[question], api_name=False)
        for event in (clear.click, video.change):
            event(lambda: ([], [], ""), outputs=[chat, turns, status], api_name=False)
    return demo


def launch_demo(demo: gr.Blocks, host: str, port: int, max_upload_mb: float = 200, concurrency: int = 8) -> None:
    """Serve the page on host:port until interrupted; never a share link. `concurrency`: requests
    handled at once (the engine batches them)."""
    shown = f"[{host}]" if ":" in host else host
    print(f"storm-vlm web: serving on http://{shown}:{port} (Ctrl+C to stop)", flush=True)
    # quiet: gradio's banner would suggest share=True, which this command never offers
    demo.queue(default_concurrency_limit=concurrency).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, quiet=True,
        max_file_size=f"{max_upload_mb:g}mb")
