"""load_video on mp4/mkv files written here with PyAV, and on a corpus of broken files.

Each test frame carries its own index as 8 black/white blocks (one bit each), which
survive lossy compression, so the tests check *which* frames came back, not just shapes.
"""

import av
import numpy as np
import pytest
from helpers import encode_video, mux_silence
from PIL import Image

from storm_vlm import VideoDecodeError, load_video
from storm_vlm.errors import StormError
from storm_vlm.video import rotate_frame, uniform_indices

W, H = 64, 48  # non-square so that rotation is visible in the shape
BITS = 16


def encoder_available(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


CODECS = [pytest.param(c, marks=pytest.mark.skipif(not encoder_available(c), reason=f"no {c} encoder"))
          for c in ("libx264", "mpeg4")]


def index_frame(i: int) -> np.ndarray:
    """(H, W, 3) uint8 frame encoding i in 16 blocks of 8 px (bits 0-7 top half, 8-15 bottom half)."""
    frame = np.zeros((H, W, 3), np.uint8)
    frame[..., 0] = 60  # a dark red background
    for b in range(BITS):
        rows = slice(0, H // 2) if b < 8 else slice(H // 2, H)
        if (i >> b) & 1:
            frame[rows, (b % 8) * 8:(b % 8 + 1) * 8] = 255
    return frame


def read_index(frame: np.ndarray) -> int:
    """Inverse of index_frame for a decoded (H, W, 3) frame."""
    value = 0
    for b in range(BITS):
        rows = slice(4, H // 2 - 4) if b < 8 else slice(H // 2 + 4, H - 4)
        block = frame[rows, (b % 8) * 8 + 2:(b % 8) * 8 + 6].astype(np.float32)
        if block.mean() > 150:
            value |= 1 << b
    return value


def write_video(path, n, codec="libx264", fps=10, rotation=None, gop=None, fmt_options=None, fmt=None):
    """n index frames (frame i shows i, see index_frame); libx264 at crf 18 (ultrafast unless gop is set)."""
    options = {}
    if codec == "libx264":
        options = {"crf": "18", "preset": "ultrafast"} if gop is None else {"crf": "18"}
    return encode_video(path, (index_frame(i) for i in range(n)), fps, codec, fmt=fmt, container_options=fmt_options,
                        gop=gop, rotation=rotation, options=options)


def decoded_indices(clip) -> list[int]:
    return [read_index(f) for f in clip.frames]


# ------------------------------------------------------------------ sampling


def test_uniform_indices_helper():
    idx, rep = uniform_indices(100, 5)
    assert idx.tolist() == [0, 25, 50, 74, 99] and not rep  # round(linspace(0, 99, 5))
    idx, rep = uniform_indices(3, 8)
    assert rep and idx[0] == 0 and idx[-1] == 2 and np.all(np.diff(idx) >= 0)
    counts = np.bincount(idx)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("codec", CODECS)
def test_uniform_sampling_returns_the_right_frames(tmp_path, codec):
    path = write_video(tmp_path / f"v_{codec}.mp4", 60, codec)
    clip = load_video(path, num_frames=9)
    expected = np.round(np.linspace(0, 59, 9)).astype(int)
    assert clip.frames.shape == (9, H, W, 3) and clip.frames.dtype == np.uint8
    assert clip.indices.tolist() == expected.tolist()
    assert decoded_indices(clip) == expected.tolist()
    np.testing.assert_allclose(clip.timestamps, expected / 10.0, atol=1e-6)
    assert clip.num_source_frames == 60 and clip.native_fps == 10 and not clip.repeated
    assert clip.duration == pytest.approx(6.0)
    frames, timestamps = load_video(path, num_frames=9)  # unpacks as a pair
    np.testing.assert_array_equal(frames, clip.frames)


@pytest.mark.parametrize("gop", [5, 250])
def test_every_frame_and_random_subsets_with_bframes(tmp_path, gop):
    # h264 with B-frames: decode order differs from presentation order.
    path = write_video(tmp_path / "b.mp4", 80, "libx264", gop=gop)
    clip = load_video(path, num_frames=80)
    assert decoded_indices(clip) == list(range(80))
    assert clip.extra["decoded"] <= 80  # dense: decoded forward, nothing twice
    for t in (2, 7, 13, 31):
        assert decoded_indices(load_video(path, num_frames=t)) == np.round(np.linspace(0, 79, t)).astype(int).tolist()


def test_sparse_sampling_seeks_instead_of_decoding_everything(tmp_path):
    path = write_video(tmp_path / "long.mp4", 400, "mpeg4", gop=10)
    clip = load_video(path, num_frames=5)
    assert decoded_indices(clip) == [0, 100, 200, 299, 399]
    assert clip.extra["seeks"] >= 4
    assert clip.extra["decoded"] < 60  # about one GOP per wanted frame, not 400


def test_one_frame_video_and_fewer_frames_than_asked(tmp_path):
    one = load_video(write_video(tmp_path / "one.mp4", 1, "mpeg4"), num_frames=4)
    assert one.frames.shape == (4, H, W, 3) and one.repeated
    assert decoded_indices(one) == [0, 0, 0, 0]
    few = load_video(write_video(tmp_path / "few.mp4", 5, "libx264"), num_frames=12)
    got = decoded_indices(few)
    assert len(got) == 12 and few.repeated and got == sorted(got)
    assert set(got) == {0, 1, 2, 3, 4} and got[0] == 0 and got[-1] == 4
    assert max(np.bincount(got)) - min(np.bincount(got)) <= 1


def test_fps_mode(tmp_path):
    path = write_video(tmp_path / "fps.mp4", 50, "mpeg4", fps=10)
    clip = load_video(path, num_frames=32, fps=2)
    assert decoded_indices(clip) == list(range(0, 50, 5))
    np.testing.assert_allclose(clip.timestamps, np.arange(0, 5, 0.5), atol=1e-6)
    capped = load_video(path, num_frames=4, fps=2)  # 10 samples wanted, capped at 4, spread uniformly
    assert decoded_indices(capped) == [0, 16, 33, 49]
    fast = load_video(path, num_frames=100, fps=50)  # faster than native: every frame once
    assert decoded_indices(fast) == list(range(50))


def test_start_and_end(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 60, "libx264", fps=10)
    clip = load_video(path, num_frames=5, start=1.0, end=3.0)  # frames 10..29
    assert decoded_indices(clip) == [10, 15, 20, 24, 29]
    np.testing.assert_allclose(clip.timestamps, [1.0, 1.5, 2.0, 2.4, 2.9], atol=1e-6)
    tail = load_video(path, num_frames=3, start=5.0)  # to the end
    assert decoded_indices(tail) == [50, 54, 59]  # round(4.5) == 4
    with pytest.raises(VideoDecodeError, match="beyond the end"):
        load_video(path, start=7.0)


def test_matroska_without_frame_count(tmp_path):
    path = write_video(tmp_path / "v.mkv", 45, "mpeg4", gop=8)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # mkv stores no count: the loader must find it
    clip = load_video(path, num_frames=4)
    assert clip.num_source_frames == 45
    assert decoded_indices(clip) == [0, 15, 29, 44]


# ------------------------------------------------------------------ rotation and images


@pytest.mark.parametrize("degrees", [90, -90, 180])
def test_rotation_metadata_is_applied(tmp_path, degrees):
    plain = load_video(write_video(tmp_path / "plain.mp4", 3, "mpeg4"), num_frames=3)
    rotated = load_video(write_video(tmp_path / "rot.mp4", 3, "mpeg4", rotation=degrees), num_frames=3)
    assert rotated.rotation == degrees % 360
    expected_shape = (3, W, H, 3) if degrees % 180 else (3, H, W, 3)
    assert rotated.frames.shape == expected_shape
    np.testing.assert_array_equal(rotated.frames[1], np.rot90(plain.frames[1], k=degrees // 90))


def test_rotate_frame_helper():
    frame = np.arange(6).reshape(2, 3, 1)
    assert rotate_frame(frame, 0) is frame
    np.testing.assert_array_equal(rotate_frame(frame, 90)[..., 0], [[2, 5], [1, 4], [0, 3]])  # counter-clockwise
    np.testing.assert_array_equal(rotate_frame(frame, -90)[..., 0], [[3, 0], [4, 1], [5, 2]])
    np.testing.assert_array_equal(rotate_frame(frame, 180)[..., 0], [[5, 4, 3], [2, 1, 0]])


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_still_image_is_one_frame(tmp_path, suffix):
    array = index_frame(165)
    path = tmp_path / f"still.{suffix}"
    Image.fromarray(array).save(path)
    clip = load_video(path, num_frames=8)
    assert clip.is_image and clip.frames.shape == (1, H, W, 3)
    assert read_index(clip.frames[0]) == 165
    if suffix == "png":
        np.testing.assert_array_equal(clip.frames[0], array)


# ------------------------------------------------------------------ failures


def _broken_corpus(tmp_path):
    good = write_video(tmp_path / "good.mp4", 40, "libx264").read_bytes()
    faststart = write_video(tmp_path / "fs.mp4", 40, "libx264", fmt_options={"movflags": "faststart"}).read_bytes()
    files = {
        "missing.mp4": None,
        "empty.mp4": b"",
        "truncated.mp4": good[: len(good) // 2],  # index (moov) at the end: cut off
        "truncated_faststart.mp4": faststart[: len(faststart) * 2 // 3],  # index intact, data cut
        "random.mp4": np.random.default_rng(0).bytes(4096),
        "text.mp4": b"this is not a video\n" * 20,
        "broken.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / name
        if data is not None:
            paths[name].write_bytes(data)
    with av.open(str(tmp_path / "audio.m4a"), "w") as c:  # audio only
        mux_silence(c, c.add_stream("aac", rate=16000), 8)
    paths["audio.m4a"] = tmp_path / "audio.m4a"
    paths["a_directory"] = tmp_path
    return paths


def test_broken_files_raise_video_decode_error_naming_the_file(tmp_path):
    causes = {"missing.mp4": "no such file", "empty.mp4": "empty", "audio.m4a": "no video stream",
              "truncated_faststart.mp4": "truncated", "a_directory": "directory"}
    for name, path in _broken_corpus(tmp_path).items():
        with pytest.raises(VideoDecodeError) as info:
            load_video(path, num_frames=8)
        message = str(info.value)
        assert str(path) in message, message
        assert causes.get(name, "") in message, message
        assert isinstance(info.value, StormError) and isinstance(info.value, ValueError)


def test_bad_arguments(tmp_path):
    path = write_video(tmp_path / "ok.mp4", 10, "mpeg4")
    for kwargs, words in [({"num_frames": 0}, "num_frames"), ({"num_frames": 2.5}, "num_frames"),
                          ({"fps": 0}, "fps"), ({"fps": -1.0}, "fps"), ({"start": 2, "end": 1}, "before end"),
                          ({"start": -1}, "start"), ({"end": True}, "end"), ({"fps": "2"}, "fps")]:
        with pytest.raises(VideoDecodeError, match=words) as info:
            load_video(path, **kwargs)
        assert str(path) in str(info.value)


def test_video_modules_import_neither_torch_nor_av_at_import_time():
    # The package __init__ may pull in other modules; this checks the loader's own imports.
    import ast
    import pathlib

    import storm_vlm.media as media
    import storm_vlm.video as video

    files = [pathlib.Path(video.__file__), *sorted(pathlib.Path(media.__file__).parent.glob("*.py"))]
    for file in files:
        top_level = set()
        for node in ast.parse(file.read_text()).body:  # module-level statements only: function-level imports are lazy
            if isinstance(node, ast.Import):
                top_level |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                top_level.add(node.module.split(".")[0])
        assert "torch" not in top_level and "av" not in top_level, file
        assert top_level <= {"__future__", "io", "math", "numbers", "os", "re", "stat", "threading", "time", "typing", "warnings",
                             "concurrent", "dataclasses", "fractions", "numpy", "PIL", "storm_vlm"}, (file, top_level)
