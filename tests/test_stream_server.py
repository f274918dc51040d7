"""Streaming over HTTP (`storm_vlm.serve.sessions`) and the frame sources of `storm-vlm watch`
(`storm_vlm.streaming.sources`): segments appended to a session answer as a one-shot pass over the
same frames; every bad input is a 4xx naming the cause; sources read files, folders of segments
and pipes with times continuing across segments."""

import io
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
from helpers import encode_video, random_video, write_mp4
from test_video import write_video
from test_video_realworld import damage_packets

from storm_vlm.errors import StormError
from storm_vlm.inference import build_messages
from storm_vlm.streaming.sources import FrameSampler, decode_segment, open_source

FPS = 4  # frames sampled per second of video in these tests (segments are written at 8 fps)


def write_segment(path, frames, fps=8, fmt="mpegts"):
    """(T, H, W, 3) uint8 frames as a self-contained segment file (MPEG-TS by default)."""
    return encode_video(path, frames, fps, "mpeg4", fmt=fmt)


@pytest.fixture(scope="module")
def segments(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segments")
    return [write_segment(folder / f"seg_{i:03d}.ts", random_video(12, 32, 32, seed=10 + i)) for i in range(3)]


# ---- sources --------------------------------------------------------------------------------------


def test_sampler_keeps_the_rate_across_segments():
    sampler = FrameSampler(2)
    kept = []
    for segment in range(2):
        sampler.begin_segment(1 / 8)
        kept += [t for t in (sampler.take(i / 8) for i in range(12)) if t is not None]  # 1.5 s each
    assert kept == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert sampler.end == 3.0


def test_file_folder_and_pipe_sources(segments, tmp_path):
    folder = os.path.dirname(segments[0])
    chunks = list(open_source(folder, fps=FPS, chunk_seconds=1, idle_timeout=0.2, poll_s=0.02).chunks())
    times = np.concatenate([c.timestamps for c in chunks])
    assert np.allclose(times, np.arange(18) / FPS)  # 3 segments x 1.5 s at 4 fps, times continuing
    assert all(len(c) == 4 for c in chunks[:-1]) and chunks[0].source.endswith("seg_000.ts")
    clip = write_mp4(tmp_path / "clip.mp4", random_video(8, 32, 32), fps=8)
    start = time.monotonic()
    paced = list(open_source(str(clip), fps=FPS, chunk_seconds=1, realtime=True).chunks())
    assert time.monotonic() - start >= 0.7  # the last frame (0.75 s) is released at its time
    assert sum(len(c) for c in paced) == 4
    fifo = tmp_path / "live.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: open(fifo, "wb").write(open(segments[1], "rb").read()))
    writer.start()
    piped = list(open_source(str(fifo), fps=FPS, fmt="mpegts").chunks())
    writer.join()
    assert sum(len(c) for c in piped) == 6


def test_a_folder_picks_up_segments_as_they_are_written(segments, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    source = open_source(str(live), fps=FPS, chunk_seconds=0.5, idle_timeout=0.6, poll_s=0.02)
    got = []
    reader = threading.Thread(target=lambda: got.extend(source.chunks()))
    reader.start()
    for i, seg in enumerate(segments):
        time.sleep(0.1)
        os.link(seg, live / f"seg_{i:03d}.ts")
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert np.allclose(np.concatenate([c.timestamps for c in got]), np.arange(18) / FPS)


def test_sources_refuse_what_they_cannot_read(tmp_path):
    with pytest.raises(StormError, match="cannot be read"):
        open_source(str(tmp_path / "missing.mp4"))
    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXTINF:1,\nseg_000.ts\n")
    with pytest.raises(StormError, match="not a readable video stream"):
        list(open_source(str(playlist)).chunks())


# ---- sessions over HTTP ----------------------------------------------------------------------------


def _post_segment(live_client, sid, path):
    return live_client.post(f"/v1/sessions/{sid}/chunks", content=open(path, "rb").read(),
                       headers={"content-type": "video/mp2t"})


def test_a_session_answers_as_a_one_shot_pass_over_the_frames_received(live_client, live_engine, segments):
    created = live_client.post("/v1/sessions", json={"fps": FPS})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    for i, seg in enumerate(segments[:2]):
        r = _post_segment(live_client, sid, seg)
        assert r.status_code == 200, r.text
        assert r.json()["frames_added"] == 6 and r.json()["frames"] == 6 * (i + 1)
    assert r.json()["video_seconds"] == 3.0 and r.json()["visual_tokens"] == 6 * 16
    question = "What colour is the square?"
    answer = live_client.post(f"/v1/sessions/{sid}/ask", json={"question": question, "max_new_tokens": 5})
    assert answer.status_code == 200, answer.text
    # the reference: the same frames (sampled the same way) encoded at once
    sampler = FrameSampler(FPS)
    frames = np.stack([f for seg in segments[:2] for _, f in decode_segment(str(seg), sampler, "seg")])
    p = live_engine.predictor
    inputs = p.encode(p.render(build_messages(question)), [frames])
    with torch.inference_mode():
        out = p.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = p.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer.json()["answer"] == expected and answer.json()["frames"] == 12
    with_options = live_client.post(f"/v1/sessions/{sid}/ask", json={"question": question, "options": ["red", "blue"],
                                                                "max_new_tokens": 2}).json()
    assert with_options["options"] == ["red", "blue"] and "choice" in with_options
    status = live_client.get(f"/v1/sessions/{sid}").json()
    assert status["frames"] == 12 and status["chunks"] == 2 and status["memory_bytes"] > 0
    assert live_client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert live_client.get(f"/v1/sessions/{sid}").status_code == 404


def test_session_errors_are_4xx_naming_the_cause(live_client, segments, tmp_path):
    assert live_client.post("/v1/sessions", json={"fps": 0}).status_code == 422
    assert live_client.post("/v1/sessions", json={"memory_policy": "forget"}).status_code == 422
    assert live_client.post("/v1/sessions", json={"bogus": 1}).status_code == 422
    assert live_client.post("/v1/sessions/nope/ask", json={"question": "x"}).status_code == 404
    sid = live_client.post("/v1/sessions").json()["id"]  # no body: the defaults
    early = live_client.post(f"/v1/sessions/{sid}/ask", json={"question": "What?"})
    assert early.status_code == 422 and "no frames" in early.json()["detail"]
    assert live_client.post(f"/v1/sessions/{sid}/ask", json={"question": ""}).status_code == 422
    assert live_client.post(f"/v1/sessions/{sid}/chunks", json={"x": 1}).status_code == 415
    bad = live_client.post(f"/v1/sessions/{sid}/chunks", content=b"not a video at all" * 10)
    assert bad.status_code == 422 and "the chunk" in bad.json()["detail"]
    assert live_client.post(f"/v1/sessions/{sid}/chunks", content=b"").status_code == 422
    assert live_client.get(f"/v1/sessions/{sid}").json()["chunks"] == 0  # nothing was read from either
    live_client.delete(f"/v1/sessions/{sid}")


def test_session_questions_read_placeholders_as_text(live_client, segments):
    sid = live_client.post("/v1/sessions", json={"fps": FPS}).json()["id"]
    assert _post_segment(live_client, sid, segments[0]).status_code == 200
    for question, options in [("What is <video>?", None), ("Is there an <image>?", ["<video>", "<image>"])]:
        r = live_client.post(f"/v1/sessions/{sid}/ask", json={"question": question, "options": options, "max_new_tokens": 1})
        assert r.status_code == 200, r.text
    live_client.delete(f"/v1/sessions/{sid}")


def test_a_chunk_past_the_decode_timeout_is_503(live_client, live_engine, segments, monkeypatch):
    sid = live_client.post("/v1/sessions", json={"fps": FPS}).json()["id"]
    monkeypatch.setattr(live_engine, "decode_timeout_s", 1e-9)  # the server's --decode-timeout
    r = _post_segment(live_client, sid, segments[0])
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    assert r.json()["detail"].startswith("the chunk: ") and "took longer" in r.json()["detail"]
    monkeypatch.undo()
    assert _post_segment(live_client, sid, segments[1]).json()["frames_added"] == 6
    live_client.delete(f"/v1/sessions/{sid}")


def test_limits_sessions_chunk_size_and_idle_timeout(live_engine, segments):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from storm_vlm.serve.sessions import add_session_routes

    app = FastAPI()
    store = add_session_routes(app, live_engine, max_sessions=2, max_chunk_bytes=1000, idle_timeout_s=0.3)
    client = TestClient(app)
    a, b = (client.post("/v1/sessions").json()["id"] for _ in range(2))
    full = client.post("/v1/sessions")
    assert full.status_code == 429 and "Retry-After" in full.headers
    big = _post_segment(client, a, segments[0])
    assert big.status_code == 413
    time.sleep(0.4)
    assert client.get(f"/v1/sessions/{a}").status_code == 404  # ended after 0.3 s idle
    assert len(store) == 0 and client.post("/v1/sessions").status_code == 201
    time.sleep(0.5)  # the reaper ends an idle session without any request
    assert len(store) == 0


def test_a_bidirectional_model_refuses_sessions(qwen2_mamba_dir):
    from fastapi.testclient import TestClient

    from storm_vlm.serve import StormEngine
    from storm_vlm.serve.api import create_app

    engine = StormEngine(qwen2_mamba_dir, device="cpu", precision="float32", max_batch_size=1)
    try:
        r = TestClient(create_app(engine)).post("/v1/sessions")
        assert r.status_code == 400 and "projector_bidirectional=False" in r.json()["detail"]
    finally:
        engine.close()


# ---- storm-vlm watch ---------------------------------------------------------------------------------


def test_watch_answers_questions_typed_while_it_runs(qwen2_causal_dir, segments, monkeypatch, capsys):
    from storm_vlm.cli import main

    folder = os.path.dirname(segments[0])
    monkeypatch.setattr(sys, "stdin", io.StringIO("@1 What colour is the square?\n/status\n/frobnicate\n"
                                                  "@99 And at the end?\n"))
    assert main(["watch", str(qwen2_causal_dir), folder, "--fps", str(FPS), "--chunk-seconds", "0.5", "--idle-timeout",
                 "0.3", "--max-new-tokens", "3", "--device", "cpu", "--precision", "float32", "-q", "Last question?",
                 "--status-every", "1"]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    asked = [line for line in lines if line.startswith("[")]
    assert asked[0].startswith("[0:00:00] ") and "frames" in asked[0]  # /status, before any frame
    # frames at 0, 0.25, 0.5, 0.75 and 1.0: the chunk holding 1.0 and 1.25 is split after 1.0
    assert any(line.startswith("[0:00:01, 5 frames] What colour is the square?") for line in asked)
    assert any("asked for 0:01:39, the video ended before] And at the end?" in line for line in asked)
    assert any(line.startswith("[0:00:04, 18 frames] Last question?") for line in asked)
    assert "unknown command /frobnicate" in out.out
    assert "end of the video at 0:00:04: 18 frames" in out.err


def test_watch_refuses_a_bidirectional_model(qwen2_mamba_dir, segments, capsys):
    from storm_vlm.cli import main

    assert main(["watch", str(qwen2_mamba_dir), str(segments[0])]) == 2
    assert "projector_bidirectional=False" in capsys.readouterr().err


def test_frames_are_scaled_down_while_decoded(tmp_path):
    segment = write_segment(tmp_path / "big.ts", random_video(4, 96, 128))
    frames = [f for _, f in decode_segment(str(segment), FrameSampler(8), "big", min_side=32)]
    assert len(frames) == 4 and frames[0].shape == (32, 43, 3)  # the shorter side to the model's input size


def _watch(qwen2_causal_dir, source, *extra):
    from storm_vlm.cli import main

    return main(["watch", str(qwen2_causal_dir), str(source), "--fps", str(FPS), "--idle-timeout", "0.3", "--max-new-tokens",
                 "2", "--device", "cpu", "--precision", "float32", "--status-every", "0", *extra])


def test_a_timed_question_sees_the_frames_up_to_its_time_and_no_later(qwen2_causal_dir, segments, monkeypatch, capsys):
    folder = os.path.dirname(segments[0])
    # chunks of 2 s (8 frames); the questions fall inside the first one; an untimed question that comes
    # before the first frame waits for them
    monkeypatch.setattr(sys, "stdin", io.StringIO("First?\n@0.5 At half a second?\n@1.6 Between frames?\n"))
    assert _watch(qwen2_causal_dir, folder, "--chunk-seconds", "2") == 0
    asked = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert any(line.startswith("[0:00:00, 3 frames] At half a second?") for line in asked)  # 0, 0.25, 0.5
    assert any(line.startswith("[0:00:01, 7 frames] Between frames?") for line in asked)  # 0 ... 1.5
    assert any(line.startswith("[0:00:02, 8 frames] First?") for line in asked)  # after the first chunk
    assert not any("no frames" in line for line in asked)


def test_watch_survives_undecodable_input_and_a_failing_question(qwen2_causal_dir, segments, monkeypatch, capsys):
    from storm_vlm.streaming.stream import StormStream

    ask = StormStream.ask

    def failing_once(self, question, *args, **kwargs):
        if "boom" in question:
            raise RuntimeError("CUDA out of memory")
        return ask(self, question, *args, **kwargs)

    monkeypatch.setattr(StormStream, "ask", failing_once)
    typed = b"@0.5 caf\xe9 or <video>?\n@1 boom?\n@1.25 Still there?\n"  # Latin-1, not UTF-8
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8", errors="strict"))
    assert _watch(qwen2_causal_dir, segments[0], "--chunk-seconds", "0.5", "--exit-at-end") == 0
    out = capsys.readouterr().out
    assert "caf\ufffd or <video>?" in out and "exactly one <video>" not in out
    assert "error: answering failed (RuntimeError: CUDA out of memory)" in out
    assert "[0:00:01, 6 frames] Still there?" in out


@pytest.mark.parametrize("argv, message", [
    (["--chunk-seconds", "inf"], "--chunk-seconds must be > 0 and hold at most 128 frames"),
    (["--fps", "30", "--chunk-seconds", "60"], "at most 4.26667 s"),
    (["--format", "hls"], "--format 'hls' is not a stream format"),
    (["--idle-timeout", "nan"], "--idle-timeout must be > 0"),
])
def test_watch_bad_arguments_are_one_line_errors(qwen2_causal_dir, segments, monkeypatch, capsys, argv, message):
    from storm_vlm.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["watch", str(qwen2_causal_dir), str(segments[0]), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_watch_refuses_a_source_before_loading_the_model(qwen2_causal_dir, tmp_path, monkeypatch, capsys):
    from storm_vlm.cli import main
    from storm_vlm.inference import Predictor

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Predictor, "from_pretrained", no_loading)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    notes = tmp_path / "notes.ts"
    notes.write_text("not a video\n" * 30)
    assert main(["watch", str(qwen2_causal_dir), str(notes)]) == 2
    assert "not a readable video stream" in capsys.readouterr().err
    assert main(["watch", str(qwen2_causal_dir), "rtsp://camera/stream"]) == 2
    assert "URLs are not opened" in capsys.readouterr().err


def test_watch_refuses_a_terminal_as_its_video_and_endless_times(qwen2_causal_dir, monkeypatch, capsys):
    from storm_vlm.cli import main
    from storm_vlm.commands.watch import parse_question

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(""))
    assert main(["watch", str(qwen2_causal_dir), "-", "-q", "What happened?"]) == 2
    assert "standard input, which is a terminal" in capsys.readouterr().err
    assert parse_question("@90 What happened?") == (90.0, "What happened?")
    for line in ("@inf What?", "@nan What?", "@-1 What?", "@5"):
        with pytest.raises(StormError, match="SECONDS"):
            parse_question(line)


def test_watch_without_any_frame_exits_1(qwen2_causal_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    folder = tmp_path / "segments"
    folder.mkdir()
    (folder / "seg_000.ts").write_bytes(b"\x00" * 4096)
    assert _watch(qwen2_causal_dir, folder, "-q", "What happened?") == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "no video frames could be read" in err


@pytest.mark.slow
def test_watch_stops_cleanly_on_sigterm(qwen2_causal_dir, tmp_path):
    import signal
    import subprocess

    fifo = tmp_path / "live.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "storm_vlm", "watch", str(qwen2_causal_dir), str(fifo), "--format",
                             "mpegts", "--device", "cpu"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    writer = open(fifo, "wb")  # returns once the model is loaded and the source opened; then nothing comes
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        writer.close()
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err and "(stopped at 0:00:00: 0 frames)" in err


def test_watch_stops_with_one_message_when_a_chunk_cannot_be_encoded(qwen2_causal_dir, segments, monkeypatch, capsys):
    """A chunk the model cannot encode (out of memory) ends the watch with one line, no traceback:
    the stream's state cannot skip its frames."""
    from storm_vlm.streaming.stream import StormStream

    feed = StormStream.feed
    calls = []

    def failing_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return feed(self, *args, **kwargs)

    monkeypatch.setattr(StormStream, "feed", failing_second)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert _watch(qwen2_causal_dir, segments[0], "--chunk-seconds", "0.5", "--exit-at-end") == 1
    err = capsys.readouterr().err
    assert "storm-vlm watch: error: encoding the video after" in err and "CUDA out of memory" in err
    assert "Traceback" not in err


def test_a_segment_with_a_damaged_stretch_keeps_its_frames_and_says_so(live_client, tmp_path):
    damaged = damage_packets(write_video(tmp_path / "cam.mkv", 60, "mpeg4", gop=10), (25, 26), tmp_path / "bad.mkv")
    sid = live_client.post("/v1/sessions", json={"fps": 8}).json()["id"]
    r = live_client.post(f"/v1/sessions/{sid}/chunks", content=damaged.read_bytes(),
                         headers={"content-type": "video/x-matroska"})
    assert r.status_code == 200
    assert r.json()["frames_added"] >= 40  # decoding went on past the damage
    assert "damaged packet(s) skipped" in r.json()["error"]
    live_client.delete(f"/v1/sessions/{sid}")
