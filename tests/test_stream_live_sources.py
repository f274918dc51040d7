"""Live sources of `storm-vlm watch` as cameras and recorders give them: a damaged stretch midway
(reported, and the stream goes on), a file still being written (`--follow`, and a note when it
grew without it), a device (refused, saying how to pipe it in), the video given as another name of standard input, status lines going to
standard error as it is when printed, and a stream's pooling window holding only its own frames
between chunks."""

import io
import os
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import encode_video, random_video
from test_video import write_video
from test_video_realworld import damage_packets

from storm_vlm.commands.watch import _Watcher
from storm_vlm.inference import Predictor
from storm_vlm.streaming.sources import open_source
from storm_vlm.streaming.stream import StormStream

FPS = 4  # frames sampled per second; recordings are written at 8 fps


def _watch(model_dir, source, *extra):
    from storm_vlm.cli import main

    return main(["watch", str(model_dir), str(source), "--fps", str(FPS), "--max-new-tokens", "2", "--device", "cpu",
                 "--precision", "float32", "--status-every", "0", *extra])


def test_a_damaged_stretch_midway_is_reported_and_the_stream_goes_on(tmp_path):
    # Matroska (a camera's or OBS's recording) whose packets 25 and 26 the decoder rejects as invalid data
    damaged = damage_packets(write_video(tmp_path / "cam.mkv", 60, "mpeg4", gop=10), (25, 26), tmp_path / "bad.mkv")
    errors = []
    chunks = list(open_source(str(damaged), fps=10, chunk_seconds=1, on_error=errors.append).chunks())
    assert sum(len(c) for c in chunks) >= 55  # only the frames near the damage are lost, not the rest of the video
    assert errors and all("damaged packet(s) skipped" in str(e) and "bad.mkv" in str(e) for e in errors)


def _recording(tmp_path, suffix, fmt, **kwargs):
    """A recording's bytes: 10 s at 8 fps."""
    path = encode_video(tmp_path / f"full.{suffix}", random_video(80, 32, 32, seed=3), 8, "mpeg4", fmt=fmt, gop=8,
                        **kwargs)
    return path.read_bytes()


@pytest.mark.parametrize("suffix, fmt, options", [("ts", "mpegts", None), ("mkv", "matroska", None),
                                                  ("mp4", "mp4", {"movflags": "frag_keyframe+empty_moov"})])
def test_follow_reads_a_file_as_a_recorder_writes_it(tmp_path, suffix, fmt, options):
    data = _recording(tmp_path, suffix, fmt, container_options=options)
    growing = tmp_path / f"recording.{suffix}"
    growing.write_bytes(b"")  # the recorder has just started
    cuts = [0] + [len(data) * k // 4 + 7 for k in range(1, 4)] + [len(data)]  # written in bursts, cut mid-packet

    def recorder():
        for start, end in zip(cuts, cuts[1:]):
            time.sleep(0.15)
            with open(growing, "ab") as f:
                f.write(data[start:end])

    writer = threading.Thread(target=recorder)
    writer.start()
    source = open_source(str(growing), fps=FPS, chunk_seconds=1, follow=True, idle_timeout=0.6, poll_s=0.02)
    times = np.concatenate([c.timestamps for c in source.chunks()])
    writer.join()
    assert np.allclose(times, np.arange(40) / FPS)  # every second of the recording, not what existed at the start


def test_watch_says_when_a_file_grew_and_refuses_what_it_cannot_follow(qwen2_causal_dir, tmp_path, monkeypatch, capsys):
    data = _recording(tmp_path, "ts", "mpegts")
    growing = tmp_path / "recording.ts"
    growing.write_bytes(data[: len(data) // 2])
    load = Predictor.from_pretrained

    def recorder_writes_meanwhile(*args, **kwargs):  # the source is open; the recorder goes on
        with open(growing, "ab") as f:
            f.write(data[len(data) // 2:])
        return load(*args, **kwargs)

    monkeypatch.setattr(Predictor, "from_pretrained", recorder_writes_meanwhile)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert _watch(qwen2_causal_dir, growing, "--exit-at-end") == 0
    assert "has grown since it was opened: it is still being written" in capsys.readouterr().err
    assert _watch(qwen2_causal_dir, tmp_path, "--follow") == 2
    assert "--follow reads a file still being written" in capsys.readouterr().err
    assert _watch(qwen2_causal_dir, os.devnull) == 2  # a device: one line saying how to pipe it in
    err = capsys.readouterr().err
    assert "devices (a camera, a capture card) are not opened" in err and len(err.strip().splitlines()) == 1


def test_the_video_on_standard_input_by_another_name_is_not_read_as_questions(qwen2_causal_dir, tmp_path,
                                                                               monkeypatch, capsys):
    # storm-vlm watch MODEL /dev/stdin -q ... < segment.ts: /dev/stdin is standard input's own file
    segment = encode_video(tmp_path / "seg.ts", random_video(16, 32, 32, seed=4), 8, "mpeg4", fmt="mpegts")
    with open(segment, "rb") as stdin:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(stdin))
        assert _watch(qwen2_causal_dir, segment, "-q", "What happened?") == 0
    asked = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(asked) == 1 and asked[0].endswith("frames] What happened?")  # the video's bytes were not questions


def test_the_pooling_window_holds_only_its_own_frames(qwen2_causal_dir):
    stream = StormStream(Predictor.from_pretrained(qwen2_causal_dir, "cpu", "float32"), max_visual_tokens=64)
    stream.feed(random_video(9, seed=5))  # temporal pool 2: the 9th frame waits for the next chunk
    assert len(stream._window) == 1
    held = sum(f.untyped_storage().nbytes() for f in stream._window)
    assert held == stream.memory_bytes()["window"]  # not the projector outputs of the whole chunk


def test_status_goes_to_standard_error_as_it_is_when_printed(monkeypatch):
    # watch's module was imported (at the top of this file) before standard error is replaced here,
    # as an application embedding it or a test's capture replaces it
    stats = {"frames": 8, "visual_tokens": 16, "max_visual_tokens": 64, "kept_frames": 4, "rebuilds": 0}
    stream = SimpleNamespace(stats=lambda: stats, memory_bytes=lambda: {"total": 2**20})
    args = SimpleNamespace(fps=FPS, status_every=0, source="cam.ts", realtime=False)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    _Watcher(args, stream, source=None).status()
    assert "8 frames, 16 visual tokens kept of 64" in err.getvalue()
