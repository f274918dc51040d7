"""The web demo (gradio Blocks): `build_demo(engine)` and `answer_video`, the function it calls.

Upload a video, ask a question (optionally with one multiple-choice option per line), pick
how many frames to sample and the test-time temporal sampling stride; the demo shows the
answer, how many visual tokens the LLM read and where the time went. A video that cannot be
decoded, or a bad setting, shows its one-line message in the UI (gr.Error), never a traceback.

Nothing here reaches the internet: gradio analytics and its version check are off and
there is no share link. Importing this module imports gradio (seconds); nothing else in
storm_vlm does.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402

from storm_vlm.errors import StormError  # noqa: E402

__all__ = ["answer_video", "build_demo", "launch_demo", "TEMPORAL_SAMPLE_CHOICES"]

MODEL_DEFAULT = "default"
TEMPORAL_SAMPLE_CHOICES = (MODEL_DEFAULT, "1", "2", "4", "8")


def _options(text: str | None) -> list[str] | None:
    lines = [line.strip() for line in (text or "").splitlines()]
    return [line for line in lines if line] or None


def answer_video(engine, video: str | None, question: str, options_text: str | None = "", frames: float = 32,
                 temporal_sample: str | None = MODEL_DEFAULT, max_new_tokens: float = 64) -> tuple[str, str, str]:
    """What the demo's button runs: (answer text, visual-token summary, latency summary).

    `video` is the uploaded file's path (gradio's cache); `options_text` holds one option per
    line (none: an open question); `temporal_sample` is "default" or a stride. Raises gr.Error
    with the one-line cause for a missing/undecodable video or a bad setting.
    """
    if not video:
        raise gr.Error("Upload a video first.", print_exception=False)
    options = _options(options_text)
    stride = None if temporal_sample in (None, "", MODEL_DEFAULT) else int(temporal_sample)
    try:
        result = engine.answer(video, question or "", options=options, num_frames=int(frames),
                               temporal_sample_stride=stride, max_new_tokens=int(max_new_tokens))
    except StormError as exc:
        # name the file as the user knows it, not by gradio's cache folder
        message = str(exc).replace(str(video), os.path.basename(str(video)))
        raise gr.Error(message, print_exception=False) from None

    text = result["answer"] or "(empty answer)"
    if options:
        if result["choice"] is None:
            text += "\n\n-> names none of the options"
        else:
            text += f"\n\n-> option {result['choice_letter']}: {result['options'][result['choice']]}"
    tokens = (f"{result['visual_tokens']} visual tokens: {result['frames']} frames -> {result['visual_frames']} "
              f"after pooling/sampling (stride {result['temporal_sample_stride']}) x "
              f"{result['visual_tokens'] // max(result['visual_frames'], 1)} tokens per frame")
    t = result["timings"]
    latency = (f"total {t['total_s']:.2f} s (decode video {t['decode_s']:.2f} s, prefill {t['prefill_s']:.2f} s, "
               f"generate {t['generate_s']:.2f} s, queued {t['wait_s']:.2f} s)")
    return text, tokens, latency


def build_demo(engine, title: str = "STORM video question answering") -> gr.Blocks:
    """The gradio Blocks for `engine` (a `StormEngine`); not launched."""
    info = engine.info()
    cfg = info["config"]
    default_stride = cfg["temporal_sample_stride"]
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        precision = info["dtype"] + (f", {info['autocast']} autocast" if info["autocast"] else "")
        gr.Markdown(
            f"## {title}\n"
            f"Model `{info['model_dir']}`: {cfg['projector_type']} projector, "
            f"temporal pool {cfg['temporal_pool_size']}, spatial pool {cfg['spatial_pool_stride']}, "
            f"{cfg['tokens_per_frame']} tokens per frame; {info['device']} ({precision})."
        )
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video", sources=["upload"], format=None)
                question = gr.Textbox(label="Question", placeholder="What happens in the video?", lines=2)
                options = gr.Textbox(label="Options (optional, one per line)", lines=4,
                                     placeholder="a red circle\na blue square")
                frames = gr.Slider(1, info["limits"]["max_frames"], value=info["defaults"]["frames"], step=1,
                                   label="Frames sampled")
                temporal_sample = gr.Dropdown(
                    choices=[(f"model default ({default_stride})", MODEL_DEFAULT)]
                    + [(s, s) for s in TEMPORAL_SAMPLE_CHOICES[1:]],
                    value=MODEL_DEFAULT, label="Temporal sampling stride (keep every s-th frame's tokens)")
                max_new_tokens = gr.Slider(1, min(512, info["limits"]["max_new_tokens"]), value=64, step=1,
                                           label="Max new tokens")
                ask = gr.Button("Ask", variant="primary")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=6, interactive=False)
                tokens = gr.Textbox(label="Visual tokens", interactive=False)
                latency = gr.Textbox(label="Latency", interactive=False)

        def handle(video, question, options, frames, temporal_sample, max_new_tokens):
            return answer_video(engine, video, question, options, frames, temporal_sample, max_new_tokens)

        inputs = [video, question, options, frames, temporal_sample, max_new_tokens]
        ask.click(handle, inputs=inputs, outputs=[answer, tokens, latency], api_name="answer")
        question.submit(handle, inputs=inputs, outputs=[answer, tokens, latency], api_name=False)
    return demo


def launch_demo(demo: gr.Blocks, host: str, port: int, max_upload_mb: float = 200) -> None:
    """Serve the demo on host:port until interrupted; one request at a time, never a share link."""
    shown = f"[{host}]" if ":" in host else host
    print(f"storm-vlm web: serving on http://{shown}:{port} (Ctrl+C to stop)", flush=True)
    # quiet: gradio's banner would suggest share=True, which this command never offers
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False, quiet=True,
        max_file_size=f"{max_upload_mb:g}mb")
