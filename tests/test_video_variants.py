"""Valid files that are unusual but common in the wild: a last frame held for seconds, AVI without
presentation timestamps, Matroska's late keyframe index, a resolution change midway, several video
streams, mirrored display matrices, variable frame rates, numpy arguments, clips within one frame,
animated WebP. Frames carry their own index (test_video)."""

import struct
from fractions import Fraction

import av
import numpy as np
import pytest
from helpers import encode_video, mux_silence
from PIL import Image

from storm_vlm import VideoDecodeError, load_video
from storm_vlm.streaming.sources import FrameSampler, decode_segment
from test_video import CODECS, H, W, decoded_indices, index_frame, write_video


def write_timed(path, times_ms, hold_last_ms=None):
    """Index frame i shown at times_ms[i] (mpeg4, time base 1/1000: any frame rate, variable too);
    the last frame held for hold_last_ms when given (its packet's duration, as an mp4 muxer stores)."""
    base = Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = stream.time_base = base
        packets = []
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")
            frame.pts, frame.time_base = t, base
            packets += stream.encode(frame)
        packets += stream.encode()
        if hold_last_ms is not None:
            packets[-1].duration = hold_last_ms  # no B-frames: the last packet is the last frame shown
        for packet in packets:
            container.mux(packet)
    return path


def nearest_frames(clip, times_ms) -> list[int]:
    """For each sampled index, the frame whose time is nearest its target i / native_fps."""
    seconds = np.asarray(times_ms) / 1000
    return [int(np.argmin(np.abs(seconds - i / clip.native_fps))) for i in clip.indices]


# ------------------------------------------------------------------ variable frame rate


def test_a_held_last_frame_is_on_screen_until_the_stream_ends(tmp_path):
    # 20 frames at 30 fps, the last shown for 2 s (a screen recording, a slideshow): the stream
    # lasts 2.63 s, so the time grid runs far past the last frame's timestamp.
    times = [round(i * 1000 / 30) for i in range(20)]
    path = write_timed(tmp_path / "held.mp4", times, hold_last_ms=2000)
    for t in (8, 20):
        clip = load_video(path, num_frames=t)
        assert clip.num_source_frames == 20
        assert decoded_indices(clip) == nearest_frames(clip, times)
        assert decoded_indices(clip)[-t // 2:] == [19] * (t // 2)  # the second half shows the held frame
    assert clip.extra["decoded"] <= 40  # the held frame is reused, not decoded again per sample


def test_frames_missing_from_the_data_are_still_reported(tmp_path):
    # Sample 30's size in the index reaches past the file: the demuxer ends there, a second
    # early, with frames still due. That is a corrupt file, not a held last frame.
    path = write_video(tmp_path / "v.mp4", 40, "mpeg4", gop=10)
    data = bytearray(path.read_bytes())
    sizes = data.find(b"stsz") + 16  # after version/flags, the common size and the count
    struct.pack_into(">I", data, sizes + 4 * 30, 0x7FFFFFF0)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(VideoDecodeError, match=r"corrupt: no frame decodable at 3\.\d+ s"):
        load_video(bad, num_frames=8)


def test_variable_frame_rate_gives_the_nearest_frame(tmp_path):
    # 25 frames at 30 fps, a 4 s gap, 25 more: the average rate (~8 fps) spans several real frames.
    times = [round(i * 1000 / 30) for i in range(25)] + [4800 + round(i * 1000 / 30) for i in range(25)]
    path = write_timed(tmp_path / "gap.mp4", times)
    clip = load_video(path, num_frames=33)
    assert decoded_indices(clip) == nearest_frames(clip, times)


# ------------------------------------------------------------------ containers


@pytest.mark.parametrize("codec", CODECS)
def test_avi_with_b_frames_comes_back_in_display_order(tmp_path, codec):
    # AVI stores no presentation timestamps; FFmpeg's guesses for codecs that reorder frames are a
    # frame late and, with B-frames, out of order (MPEG-4 ASP is what Xvid/DivX files hold: UCF101, HMDB51).
    path = encode_video(tmp_path / "v.avi", (index_frame(i) for i in range(40)), 10, codec, gop=12,
                        options={"bf": "2"})
    for t in (8, 40):
        clip = load_video(path, num_frames=t)
        expected = np.round(np.linspace(0, 39, t)).astype(int).tolist()
        assert decoded_indices(clip) == expected
        np.testing.assert_allclose(clip.timestamps, np.array(expected) / 10, atol=1e-6)
    assert clip.extra["reader"] == "SequentialReader"


def test_matroska_seeks_once_its_index_is_read(tmp_path):
    # FFmpeg reads Matroska's keyframe index (Cues) at the first seek only: before it, one entry.
    path = write_video(tmp_path / "long.mkv", 300, "mpeg4", gop=10)
    clip = load_video(path, num_frames=4)
    assert decoded_indices(clip) == [0, 100, 199, 299]
    assert clip.extra["seeks"] >= 4 and clip.extra["decoded"] < 100  # not the whole file


def test_a_resolution_change_midway_is_scaled_to_the_first_size(tmp_path):
    # Two MPEG-TS recordings joined (an HLS download switching variants): 64x48, then 128x96.
    small = write_video(tmp_path / "a.ts", 20, "mpeg4", fmt="mpegts")
    big = tmp_path / "b.ts"
    encode_video(big, (np.kron(index_frame(20 + i), np.ones((2, 2, 1), np.uint8)) for i in range(20)), 10, "mpeg4",
                 fmt="mpegts", container_options={"output_ts_offset": "2"})
    joined = tmp_path / "joined.ts"
    joined.write_bytes(small.read_bytes() + big.read_bytes())
    clip = load_video(joined, num_frames=8)
    assert clip.frames.shape == (8, H, W, 3) and clip.num_source_frames == 40
    assert decoded_indices(clip) == np.round(np.linspace(0, 39, 8)).astype(int).tolist()
    assert clip.extra["source_size"] == (W, H)


def test_cover_art_is_not_a_video(tmp_path):
    path = tmp_path / "song.m4a"
    with av.open(str(path), "w", format="mp4") as container:  # the "ipod" muxer .m4a picks takes no picture
        audio = container.add_stream("aac", rate=16000)
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 128, np.uint8), format="rgb24")
        picture = picture.reformat(format="yuvj420p")
        picture.pts = 0
        for packet in [*cover.encode(picture), *cover.encode()]:
            container.mux(packet)
        mux_silence(container, audio, 4)
    with pytest.raises(VideoDecodeError, match=r"no video stream \(only a cover picture\)"):
        load_video(path, num_frames=4)


def test_the_default_video_track_is_read_not_the_first(tmp_path):
    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as container:
        preview = container.add_stream("mpeg4", rate=10)
        preview.width, preview.height, preview.pix_fmt = 16, 16, "yuv420p"
        main = container.add_stream("mpeg4", rate=10)
        main.width, main.height, main.pix_fmt = W, H, "yuv420p"
        main.disposition = av.stream.Disposition.default
        for i in range(10):
            for stream, image in ((preview, np.zeros((16, 16, 3), np.uint8)), (main, index_frame(i))):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
        for stream in (preview, main):
            for packet in stream.encode():
                container.mux(packet)
    clip = load_video(path, num_frames=4)
    assert clip.frames.shape == (4, H, W, 3) and decoded_indices(clip) == [0, 3, 6, 9]


# ------------------------------------------------------------------ display matrix


def write_oriented(path, rotation=0, hflip=False, vflip=False):
    """Two frames showing index 259 (blocks top-left and bottom-left: no flip or turn leaves it
    alone) with a display matrix."""
    return encode_video(path, [index_frame(259)] * 2, 10, "mpeg4", rotation=rotation, hflip=hflip, vflip=vflip)


@pytest.mark.parametrize("rotation,hflip,vflip,shown", [
    (0, True, False, lambda a: a[:, ::-1]),  # ffmpeg: hflip (the angle alone says 180 degrees)
    (0, False, True, lambda a: a[::-1]),  # ffmpeg: vflip (the angle alone says 0 degrees)
    (90, True, False, lambda a: np.rot90(a, -1)[::-1]),  # ffmpeg: transpose=clock_flip
    (-90, True, False, lambda a: a.transpose(1, 0, 2)),  # ffmpeg: transpose=cclock_flip
])
def test_mirrored_display_matrices_are_shown_as_ffmpeg_shows_them(tmp_path, rotation, hflip, vflip, shown):
    plain = load_video(write_oriented(tmp_path / "plain.mp4"), num_frames=1)
    clip = load_video(write_oriented(tmp_path / "mirrored.mp4", rotation, hflip, vflip), num_frames=1)
    assert decoded_indices(plain) == [259]
    np.testing.assert_array_equal(clip.frames[0], shown(plain.frames[0]))
    assert clip.extra["mirrored"] and "mirrored" not in plain.extra
    # the live-video reader (storm-vlm watch, sessions) shows it the same way
    (_, live), = list(decode_segment(str(tmp_path / "mirrored.mp4"), FrameSampler(1.0), "mirrored.mp4"))
    np.testing.assert_array_equal(live, clip.frames[0])


# ------------------------------------------------------------------ arguments


def test_numpy_scalars_are_numbers(tmp_path):
    path = write_video(tmp_path / "v.mp4", 60, "mpeg4")
    clip = load_video(path, num_frames=np.int64(5), start=np.int64(1), end=np.float32(3.0))  # a pandas row
    assert decoded_indices(clip) == [10, 15, 20, 24, 29]
    assert decoded_indices(load_video(path, num_frames=32, fps=np.float32(2))) == list(range(0, 60, 5))
    for kwargs in ({"start": np.bool_(True)}, {"fps": np.float64("nan")}, {"end": np.int64(-1)}):
        with pytest.raises(VideoDecodeError):
            load_video(path, **kwargs)


def test_a_clip_within_one_frame_has_that_frame(tmp_path):
    path = write_video(tmp_path / "v.mp4", 60, "mpeg4")  # 10 fps: frame 5 is shown from 0.5 to 0.6 s
    assert decoded_indices(load_video(path, num_frames=2, start=0.51, end=0.55)) == [5, 5]
    assert decoded_indices(load_video(path, num_frames=2, start=5.95)) == [59, 59]  # 59 is on screen at 5.95
    assert decoded_indices(load_video(path, num_frames=3, start=1.02, end=1.25)) == [10, 11, 12]
    with pytest.raises(VideoDecodeError, match="beyond the end"):
        load_video(path, start=6.0)


# ------------------------------------------------------------------ images


def test_animated_webp_is_refused_as_such(tmp_path):
    if not av.codecs_available & {"webp", "libwebp"}:
        pytest.skip("no WebP decoder in this FFmpeg")
    still, animated = tmp_path / "still.webp", tmp_path / "animated.webp"
    frames = [Image.fromarray(index_frame(i)) for i in range(4)]
    frames[0].save(still, lossless=True)
    frames[0].save(animated, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with pytest.raises(VideoDecodeError, match="animated WebP is not supported") as info:
        load_video(animated, num_frames=4)
    assert "corrupt" not in str(info.value)
    assert decoded_indices(load_video(still)) == [0]  # a still WebP is read as before
