"""load_video's bounds: frames scaled while decoding, huge sources refused,
a process-wide limit on concurrent decodes, a time limit and cancellation.

Sizes and counts are asserted, never timings: the time limit runs on a fake clock and
cancellation on a callable that flips after N checks.
"""

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from helpers import write_solid
from PIL import Image

import storm_vlm.media.limits as limits
import storm_vlm.video as video
from storm_vlm import VideoDecodeError, load_video
from storm_vlm.video import DEFAULT_MAX_PIXELS, DecodeCancelled, DecodeTimeout
from test_video import read_index, write_video


# ------------------------------------------------------------------ pixel cap


def test_output_size_keeps_the_aspect_ratio_and_never_upscales():
    assert limits.output_size(64, 48, DEFAULT_MAX_PIXELS, None) == (64, 48)
    assert limits.output_size(3840, 2160, DEFAULT_MAX_PIXELS, None) == (1365, 768)
    assert limits.output_size(3840, 2160, DEFAULT_MAX_PIXELS, 448) == (796, 448)  # the model's input side
    assert limits.output_size(3840, 2160, None, None) == (3840, 2160)
    w, h = limits.output_size(16000, 16000, 200_000, None)
    assert w * h <= 200_000 and w == h
    w, h = limits.output_size(20000, 100, 1_000_000, 448)  # extreme aspect: max_pixels wins over min_side
    assert w * h <= 1_000_000 and abs(w / h - 200) < 2
    assert limits.output_size(100, 80, 10, 448) == (3, 3)  # tiny caps still give >= 1 pixel a side


def test_big_frames_come_back_scaled_to_the_cap(tmp_path):
    path = write_solid(tmp_path / "big.mp4", 2048, 1536, 3)  # 3.1 MP
    clip = load_video(path, num_frames=4)
    h, w = clip.frames.shape[1:3]
    assert h * w <= DEFAULT_MAX_PIXELS and abs(w / h - 4 / 3) < 0.01
    assert clip.extra["source_size"] == (2048, 1536) and clip.extra["frame_size"] == (w, h)
    assert np.abs(clip.frames.astype(int).mean() - load_video(path, num_frames=1, max_pixels=None).frames.mean()) < 2
    side = load_video(path, num_frames=2, min_side=448)
    assert side.frames.shape[1:3] == (448, 597)
    assert load_video(path, num_frames=1, max_pixels=None).frames.shape[1:3] == (1536, 2048)


def test_scaling_follows_the_display_rotation(tmp_path):
    path = write_video(tmp_path / "rot.mp4", 2, "mpeg4", rotation=90)  # 64 x 48, shown as 48 x 64
    clip = load_video(path, num_frames=2, max_pixels=768)  # 0.5 x linear
    assert clip.frames.shape[1:3] == (32, 24)


def test_peak_memory_stays_far_below_the_full_size_clip(tmp_path):
    # 16 frames of 7680 x 4320 would be 16 x 95 MiB of RGB; capped, the loader holds the decoder's
    # pictures and 16 small frames. Peak RSS of a fresh process, a size bound, not a timing.
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) for the peak resident set")
    path = write_solid(tmp_path / "8k.mp4", 7680, 4320, 2, codec="libx264")
    script = textwrap.dedent(f"""
        from storm_vlm.video import load_video

        def peak():  # this process image's high-water mark (ru_maxrss would include pytest's at fork)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

        base = peak()
        clip = load_video({str(path)!r}, num_frames=16)
        print(clip.frames.shape, peak() - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    full_frame = 7680 * 4320 * 3
    assert int(out[-1]) < 4 * full_frame, out  # 16 full frames is what an uncapped loader holds


def test_sources_above_the_decoder_cap_are_refused_before_decoding(tmp_path, monkeypatch):
    path = write_video(tmp_path / "v.mp4", 3, "mpeg4")  # 64 x 48 = 3072 pixels
    monkeypatch.setattr(video, "MAX_SOURCE_PIXELS", 3000)
    with pytest.raises(VideoDecodeError, match=r"64x48 .*more than .*MAX_SOURCE_PIXELS") as info:
        load_video(path, num_frames=2)
    assert str(path) in str(info.value)


def test_images_above_the_image_cap_are_refused(tmp_path, monkeypatch):
    import storm_vlm.media.container as container

    path = tmp_path / "still.png"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(path)  # 3072 pixels
    monkeypatch.setattr(video, "MAX_IMAGE_PIXELS", 3000)
    with pytest.raises(VideoDecodeError, match=r"64x48 .*MAX_IMAGE_PIXELS"):
        load_video(path)
    monkeypatch.setattr(container, "MAX_IMAGE_PIXELS", 3000)  # FFmpeg's probe refuses it too: size unknown to it
    with pytest.raises(VideoDecodeError, match=r"64x48 .*MAX_IMAGE_PIXELS"):  # the size from the file's header
        load_video(path)
    if "QOI" not in Image.SAVE:  # Pillow < 11.3
        return
    Image.open(path).save(tmp_path / "still.qoi")  # a format whose header this loader does not read with PIL
    with pytest.raises(VideoDecodeError, match="decoder refused a picture: it is larger than"):
        load_video(tmp_path / "still.qoi")


# ------------------------------------------------------------------ time, cancellation, slots


class CancelAfter:
    """A cancel callable that says stop on its n-th call and counts the calls."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self):
        self.calls += 1
        return self.calls >= self.n


def test_cancel_stops_decoding_between_frames(tmp_path):
    path = write_video(tmp_path / "v.mp4", 40, "mpeg4")
    cancel = CancelAfter(5)
    with pytest.raises(DecodeCancelled, match="cancelled") as info:
        load_video(path, num_frames=40, cancel=cancel)
    assert cancel.calls == 5  # nothing decoded after the check that said stop
    assert isinstance(info.value, VideoDecodeError) and str(path) in str(info.value)
    never = CancelAfter(10**9)
    clip = load_video(path, num_frames=40, cancel=never)
    assert [read_index(f) for f in clip.frames] == list(range(40)) and never.calls >= 40


def test_cancel_accepts_a_threading_event(tmp_path):
    path = write_video(tmp_path / "v.mp4", 5, "mpeg4")
    event = threading.Event()
    assert len(load_video(path, num_frames=5, cancel=event)) == 5
    event.set()
    with pytest.raises(DecodeCancelled):
        load_video(path, num_frames=5, cancel=event)
    with pytest.raises(VideoDecodeError, match="cancel must be"):
        load_video(path, cancel="stop")


def test_time_limit_on_a_fake_clock(tmp_path, monkeypatch):
    path = write_video(tmp_path / "v.mp4", 40, "mpeg4")
    ticks = iter(range(10**6))
    monkeypatch.setattr(limits, "_clock", lambda: float(next(ticks)))  # one second per reading
    with pytest.raises(DecodeTimeout, match=r"(decoding took longer than|gave up after) 10 s") as info:
        load_video(path, num_frames=40, timeout_s=10)
    assert str(path) in str(info.value)
    for bad in (0, -1, float("nan"), "5"):
        with pytest.raises(VideoDecodeError, match="timeout_s"):
            load_video(path, timeout_s=bad)


def test_concurrent_decodes_wait_for_a_slot(tmp_path):
    path = write_video(tmp_path / "v.mp4", 10, "mpeg4")
    previous = video.max_concurrent_decodes()
    inside, release = threading.Event(), threading.Event()

    def hold_slot():  # a decode that stays inside its slot until released
        inside.set()
        release.wait(30)
        return False

    video.set_max_concurrent_decodes(1)
    try:
        holder = threading.Thread(target=load_video, args=(path,), kwargs={"num_frames": 2, "cancel": hold_slot})
        holder.start()
        assert inside.wait(30)
        with pytest.raises(DecodeTimeout, match="waiting for a decode slot"):
            load_video(path, num_frames=2, timeout_s=0.2)
        with pytest.raises(DecodeCancelled, match="waiting for a decode slot"):
            load_video(path, num_frames=2, cancel=lambda: True)
        release.set()
        holder.join(30)
        assert len(load_video(path, num_frames=2, timeout_s=30)) == 2  # the slot is free again
    finally:
        release.set()
        video.set_max_concurrent_decodes(previous)
    with pytest.raises(ValueError):
        video.set_max_concurrent_decodes(0)


def test_the_deadline_holds_while_the_decoding_thread_is_stuck(tmp_path):
    # A decoding thread inside one long library call cannot check its budget; the caller still
    # returns at the deadline, and the decode stops at its next check.
    path = write_video(tmp_path / "v.mp4", 10, "mpeg4")
    stuck, release = threading.Event(), threading.Event()

    def stuck_inside():  # runs on the decoding thread, like a long FFmpeg call
        stuck.set()
        release.wait(30)
        return False

    with pytest.raises(DecodeTimeout, match="took longer than 0.3 s"):
        load_video(path, num_frames=2, timeout_s=0.3, cancel=stuck_inside)
    assert stuck.is_set()
    release.set()
    assert len(load_video(path, num_frames=2, timeout_s=30)) == 2  # the decoding thread is free again


def test_repeated_calls_do_not_accumulate_memory(tmp_path):
    # The decode in progress must be closed before its file: freed in the other order, each call
    # on large frames left tens of MB resident (glibc's heap could not reuse them).
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) for the resident set")
    path = write_solid(tmp_path / "4k.mp4", 3840, 2160, 2, codec="libx264")
    script = textwrap.dedent(f"""
        from storm_vlm.video import load_video

        def rss():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

        sizes = []
        for _ in range(5):
            clip = load_video({str(path)!r}, num_frames=1)
            del clip
            sizes.append(rss())
        print(sizes[-1] - sizes[1])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[-1]) < 3840 * 2160 * 3 // 2, out  # less than one decoded picture over three calls


def _frame_count_in_child(path):
    return len(load_video(path, num_frames=3))


def test_a_forked_process_decodes_after_the_parent_did(tmp_path):
    # DataLoader workers fork a process whose decoding threads have worked: nothing the child
    # inherits from them (FFmpeg's converter and its worker threads) may block it.
    path = write_video(tmp_path / "v.mp4", 10, "mpeg4")
    assert len(load_video(path, num_frames=3)) == 3
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_frame_count_in_child, (str(path),)).get(timeout=60) == 3


def test_new_arguments_are_checked(tmp_path):
    path = write_video(tmp_path / "v.mp4", 3, "mpeg4")
    for kwargs, words in [({"max_pixels": 0}, "max_pixels"), ({"max_pixels": 1.5}, "max_pixels"),
                          ({"min_side": 0}, "min_side"), ({"allow_truncated": "yes"}, "allow_truncated")]:
        with pytest.raises(VideoDecodeError, match=words):
            load_video(path, **kwargs)
