"""Plain helpers the tests share (videos, messages, a tiny config, a server process); the shared
fixtures (tiny parts and model folders, built once per session) are in conftest.py. The benchmarks
that write videos use encode_video and write_solid from here too."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import storm_vlm  # noqa: F401  (registers the STORM classes with the Auto classes)
from transformers import AutoModelForImageTextToText, AutoProcessor

from storm_vlm.demo.synth import write_mp4 as encode
from storm_vlm.model.ssm import cpu_kernel

SERVE_FRAMES = 4  # frames per video of the tiny server the `engine` / `client` fixtures (conftest.py) run

def load(model_dir):
    """(model in eval mode, processor) from a folder, through the Auto classes."""
    return AutoModelForImageTextToText.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def random_video(num_frames: int, height: int = 40, width: int = 48, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 noise frames."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_frames, height, width, 3), dtype=np.uint8)


def video_question(video, text: str = "What colour is the circle?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": text}]}]


def write_mp4(path, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4"):
    """Write (T, H, W, 3) uint8 frames as an mp4 with PyAV (the synthetic benchmark's encoder)."""
    encode(str(path), frames, fps, codec)
    return path


def encode_video(path, frames, fps=10, codec="mpeg4", fmt=None, container_options=None, gop=None, rotation=None,
                 options=None, hflip=False, vflip=False, sample_aspect_ratio=None):
    """Encode frames with PyAV, frame t at pts t (time base 1/fps), as yuv420p; returns path.

    frames: any iterable (a generator too) of (H, W, 3) uint8 RGB arrays, or of yuv420p av.VideoFrames
    (encoded as they are; one frame may come several times). fmt: the container format (None: from
    the file name); container_options: the muxer's (e.g. {"movflags": "faststart"}); options: the
    encoder's (e.g. {"crf": "18"}), gop sets its "g"; rotation: display-rotation metadata in degrees,
    with hflip / vflip: a display matrix that also mirrors; sample_aspect_ratio: the shape of the
    pixels (width / height, a Fraction) the bitstream declares.
    """
    import av

    frames = iter(frames)
    first = next(frames)
    height, width = (first.height, first.width) if isinstance(first, av.VideoFrame) else first.shape[:2]
    options = {**(options or {}), **({"g": str(gop)} if gop else {})}
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if rotation is not None or hflip or vflip:
            stream.set_display_rotation(rotation or 0, hflip=hflip, vflip=vflip)
        if sample_aspect_ratio is not None:
            stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
        for t, image in enumerate(itertools.chain([first], frames)):
            if isinstance(image, av.VideoFrame):
                frame = image
            else:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def mux_silence(container, stream, frames: int) -> None:
    """Encode and mux `frames` frames of mono silence (1024 samples each) on an audio `stream` of
    `container` at its rate, then flush the encoder."""
    import av

    for i in range(frames):
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate, samples.pts = stream.rate, i * 1024
        for packet in stream.encode(samples):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_solid(path, width, height, n, codec="mpeg4", fmt=None, luma=100):
    """n flat grey frames (yuv420p, Y = luma) of width x height at 10 fps, cheap to encode at any size."""
    import av

    frame = av.VideoFrame(width, height, "yuv420p")
    for plane, value in zip(frame.planes, (luma, 128, 128)):
        plane.update(np.full(plane.buffer_size, value, np.uint8).tobytes())
    options = {"preset": "ultrafast", "crf": "40"} if codec == "libx264" else {}
    return encode_video(path, itertools.repeat(frame, n), 10, codec, fmt=fmt, options=options)


# ---- a server process ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_in_thread(config):
    """A uvicorn server for `config` (uvicorn.Config) running in a thread of this process while
    inside; stopped at the end."""
    import threading

    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def running_server(argv, url, log_path, timeout_s=240):
    """Start argv (its output to log_path), wait until GET url answers 200 (the test fails, with the
    log's tail, if the process exits or timeout_s pass first), yield, then stop the process."""
    import httpx

    with open(log_path, "w") as out:
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                command = " ".join(str(a) for a in argv[1:])
                pytest.fail(f"`{command}` did not start:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def heavy_imports(argv, modules) -> list[str]:
    """Which of modules `storm_vlm.cli.main(argv)` imports, in a fresh interpreter (--help's exit caught)."""
    code = ("import json, sys; from storm_vlm import cli\n"
            f"try:\n    cli.main({list(argv)!r})\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', json.dumps(sorted(m for m in {tuple(modules)!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.rsplit("HEAVY ", 1)[1])


# a tiny StormConfig(**TINY_CONFIG) for random-weight models (profiler, CPU fast paths)
TINY_CONFIG = dict(
    vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False),
    text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
    projector_num_layers=1,
    video_token_id=63,
    image_token_id=62,
)


KERNEL_ISAS = list(cpu_kernel.ISAS)  # every build of the C kernels, narrowest first


def isa_runs(isa: str) -> bool:
    """This CPU runs the kernels' `isa` path."""
    return KERNEL_ISAS.index(isa) <= KERNEL_ISAS.index(cpu_kernel.detect_isa())


def use_kernel_library(monkeypatch, isa: str):
    """The C kernel library built for `isa`, made the one `cpu_kernel.load_library` returns; skips
    the test without a C compiler or where this CPU does not run `isa`."""
    if cpu_kernel._compiler() is None or not isa_runs(isa):
        pytest.skip(f"no C compiler, or this CPU does not run {isa}")
    lib = cpu_kernel.build(isa)
    monkeypatch.setattr(cpu_kernel, "load_library", lambda *a, **k: lib)
    return lib
