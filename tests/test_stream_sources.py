"""Frame sources of `storm-vlm watch` (`storm_vlm.streaming.sources`) on real-world streams: a camera
that reconnects (timestamps back to zero, another picture size), a recorder's folder past
seg_999 with its playlist beside the segments and old segments deleted, an error after some
frames, and sources that are refused with a message saying why."""

import os
from fractions import Fraction

import numpy as np
import pytest
from helpers import encode_video, random_video, write_mp4

from storm_vlm.errors import StormError
from storm_vlm.streaming import sources
from storm_vlm.streaming.sources import FrameSampler, FrameSource, open_source
from storm_vlm.video import VideoDecodeError, load_video
from test_video_realworld import write_anamorphic

FPS = 4  # frames sampled per second; segments are written at 8 fps


def write_segment(path, frames, fps=8):
    return encode_video(path, frames, fps, "mpeg4", fmt="mpegts")


def test_timestamps_that_restart_continue_the_stream(tmp_path):
    # a camera that reconnects: its second run starts at time 0 again, with another picture size
    first = write_segment(tmp_path / "a.ts", random_video(24, 32, 32, seed=1))
    second = write_segment(tmp_path / "b.ts", random_video(24, 48, 64, seed=2))
    joined = tmp_path / "reconnect.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    chunks = list(open_source(str(joined), fps=FPS, chunk_seconds=1).chunks())
    times = np.concatenate([c.timestamps for c in chunks])
    assert np.allclose(times, np.arange(24) / FPS)  # 3 s + 3 s, the second run after the first
    assert {c.frames.shape[1:3] for c in chunks} == {(32, 32), (48, 64)}


def test_anamorphic_pixels_are_shown_as_load_video_shows_them(tmp_path):
    path = write_anamorphic(tmp_path / "anamorphic.mp4", Fraction(2), frames=8)
    frames = np.concatenate([c.frames for c in open_source(str(path), fps=FPS, chunk_seconds=1).chunks()])
    assert frames.shape[1:] == load_video(path, num_frames=1).frames.shape[1:] == (24, 64, 3)


def test_sampler_restarts_on_a_jump_back_and_ignores_jitter():
    sampler = FrameSampler(1)
    sampler.begin_segment(0.5)
    kept = [sampler.take(t) for t in (100.0, 100.5, 101.0, 100.8, 101.5, 102.0, 0.0, 0.5, 1.0)]
    # 100.8 (jitter, 0.2 s back) is dropped; 0.0 (a restart) continues at 102.5, so 0.5 is kept at 3.0
    assert [k for k in kept if k is not None] == [0.0, 1.0, 2.0, 3.0]


def test_a_folder_reads_numbered_segments_in_number_order(tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for i in (9, 10, 11):  # seg_%d: "seg_10" < "seg_9" as text
        write_segment(live / f"seg_{i}.ts", random_video(8, 32, 32, seed=i))
    (live / "seg.m3u8").write_text("#EXTM3U\n#EXTINF:1,\nseg_9.ts\n")  # the recorder's playlist sorts last
    (live / "seg_12.ts.tmp").write_bytes(b"\x47" * 188)  # a segment still being written
    errors = []
    chunks = list(open_source(str(live), fps=FPS, chunk_seconds=1, idle_timeout=0.2, poll_s=0.02,
                              on_error=errors.append).chunks())
    assert [os.path.basename(c.source) for c in chunks] == ["seg_9.ts", "seg_10.ts", "seg_11.ts"]
    assert np.allclose(np.concatenate([c.timestamps for c in chunks]), np.arange(12) / FPS)
    assert errors == []


def test_a_folder_survives_segments_deleted_while_listed(tmp_path, monkeypatch):
    live = tmp_path / "live"
    live.mkdir()
    for i in range(3):
        write_segment(live / f"seg_{i:03d}.ts", random_video(8, 32, 32, seed=i))
    scandir = os.scandir

    class Deleting:  # the recorder removes the oldest segment between the listing and its stat
        def __init__(self, path):
            self.entries = list(scandir(path))
            (live / "seg_000.ts").unlink(missing_ok=True)

        def __enter__(self):
            return iter(self.entries)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(sources.os, "scandir", Deleting)
    chunks = list(open_source(str(live), fps=FPS, chunk_seconds=1, idle_timeout=0.2, poll_s=0.02).chunks())
    assert [os.path.basename(c.source) for c in chunks] == ["seg_001.ts", "seg_002.ts"]


def test_frames_decoded_before_an_error_are_not_lost():
    class Failing(FrameSource):
        def _frames(self):
            for i in range(3):
                yield i / FPS, np.zeros((8, 8, 3), np.uint8), "cam"
            raise VideoDecodeError("cam: decoding stopped (I/O error)")

    chunks = Failing("cam", "pipe", fps=FPS, chunk_seconds=2).chunks()
    assert len(next(chunks)) == 3
    with pytest.raises(VideoDecodeError, match="decoding stopped"):
        next(chunks)


def test_sources_that_are_refused_say_why(tmp_path):
    with pytest.raises(StormError, match="URLs are not opened"):
        open_source("http://camera.local/live.ts")
    clip = write_mp4(tmp_path / "clip.mp4", random_video(4, 32, 32))
    with pytest.raises(StormError, match="at most 128 frames"):
        open_source(str(clip), fps=30, chunk_seconds=3600)
    with pytest.raises(StormError, match="at most 128 frames"):
        open_source(str(clip), chunk_seconds=float("inf"))
    with pytest.raises(StormError, match="'hls' is not a stream format"):
        open_source(str(clip), fmt="hls")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    with pytest.raises(VideoDecodeError, match="not a readable video stream"):
        open_source(str(text)).check()
    open_source(str(clip)).check()
    # an MP4 still being recorded has no index yet: said so, with what to record instead
    cut = tmp_path / "recording.mp4"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match="truncated.*folder of segments or a pipe"):
        open_source(str(cut)).check()
