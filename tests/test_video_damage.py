"""Damaged files say what happened: a truncated file fails as truncated with
how much of it decodes (or, on request, gives the part that decodes, marked); implausible
frame durations do not collapse a clip onto one frame; running out of memory is reported as
such, never as a corrupt file."""

import struct

import av
import numpy as np
import pytest

import storm_vlm.media.readers as readers
from storm_vlm import VideoDecodeError, load_video
from test_video import H, W, decoded_indices, write_video


def write(path, n, codec, fmt=None, gop=10, options=None):
    return write_video(path, n, codec, gop=gop, fmt=fmt, fmt_options=options)


def cut(path, fraction):
    data = path.read_bytes()
    out = path.with_name("cut_" + path.name)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


WEBM = pytest.param("libvpx", "webm", marks=pytest.mark.skipif("libvpx" not in av.codecs_available,
                                                                 reason="no libvpx encoder"))


@pytest.mark.parametrize("codec,suffix", [WEBM, ("mpeg4", "mkv")])
def test_truncated_matroska_fails_saying_how_much_decodes(tmp_path, codec, suffix):
    path = cut(write(tmp_path / f"v.{suffix}", 60, codec), 0.5)
    with pytest.raises(VideoDecodeError) as info:
        load_video(path, num_frames=8)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "segment is cut off" in message
    assert "of its 60 frames" in message and "allow_truncated=True" in message, message
    clip = load_video(path, num_frames=8, allow_truncated=True)
    assert clip.truncated and clip.extra["truncated"]["declared_frames"] == 60
    n = clip.num_source_frames
    assert 10 < n < 50 and clip.extra["truncated"]["decoded_frames"] == n
    assert decoded_indices(clip) == np.round(np.linspace(0, n - 1, 8)).astype(int).tolist()
    assert f"about {n} of its 60 frames" in message  # the message counted what the clip then read


def test_truncated_mp4_with_its_index_first(tmp_path):
    path = cut(write(tmp_path / "fs.mp4", 60, "mpeg4", options={"movflags": "faststart"}), 0.8)
    with pytest.raises(VideoDecodeError, match=r"truncated: its 'mdat' box is cut off .*about \d+ of its 60 frames"):
        load_video(path, num_frames=8)
    clip = load_video(path, num_frames=4, allow_truncated=True)
    assert clip.truncated and 10 < clip.num_source_frames < 60
    assert decoded_indices(clip)[0] == 0 and decoded_indices(clip)[-1] == clip.num_source_frames - 1


def test_truncated_mp4_without_its_index(tmp_path):
    path = cut(write(tmp_path / "v.mp4", 40, "mpeg4"), 0.5)  # the index ('moov') was at the end
    for allow in (False, True):
        with pytest.raises(VideoDecodeError, match=r"truncated: .*index \('moov' box\).* is missing.*nothing can be "
                                                   r"decoded"):
            load_video(path, num_frames=4, allow_truncated=allow)


def test_complete_files_are_not_called_truncated(tmp_path):
    for name, codec in (("a.mkv", "mpeg4"), ("b.mp4", "mpeg4"), ("c.avi", "mpeg4")):
        clip = load_video(write(tmp_path / name, 20, codec), num_frames=4)
        assert not clip.truncated and "truncated" not in clip.extra and clip.num_source_frames == 20


def patch_sample_durations(path, ticks):
    """Set every entry of the mp4's time-to-sample table (stts) to `ticks` per frame."""
    data = bytearray(path.read_bytes())
    at = data.find(b"stts")
    for k in range(struct.unpack(">I", data[at + 8:at + 12])[0]):
        struct.pack_into(">I", data, at + 16 + 8 * k, ticks)
    out = path.with_name("stts_" + path.name)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("ticks", [2**31, 2**31 - 1])
def test_absurd_frame_durations_do_not_collapse_onto_one_frame(tmp_path, ticks):
    path = patch_sample_durations(write(tmp_path / "v.mp4", 60, "mpeg4"), ticks)
    clip = load_video(path, num_frames=8)
    assert decoded_indices(clip) == np.round(np.linspace(0, 59, 8)).astype(int).tolist()
    assert clip.num_source_frames == 60 and clip.duration == pytest.approx(6.0)
    np.testing.assert_allclose(clip.timestamps, clip.indices / 10.0, atol=1e-6)  # spread over the declared 6 s
    assert "implausible" in clip.extra["timing"]


def test_out_of_memory_is_reported_as_such(tmp_path, monkeypatch):
    path = write_video(tmp_path / "v.mp4", 10, "mpeg4")

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(readers, "scaled_rgb", no_memory)
    with pytest.raises(VideoDecodeError) as info:
        load_video(path, num_frames=4)
    message = str(info.value)
    assert f"out of memory while decoding {W}x{H} frames" in message and str(path) in message
    assert "corrupt" not in message and "truncated" not in message

    def ffmpeg_no_memory(*args, **kwargs):
        raise av.error.MemoryError(12, "Cannot allocate memory")

    monkeypatch.setattr(readers, "scaled_rgb", ffmpeg_no_memory)
    with pytest.raises(VideoDecodeError, match="out of memory while decoding"):
        load_video(path, num_frames=4)


def test_corrupt_data_is_not_called_truncated(tmp_path):
    data = bytearray(write(tmp_path / "v.mkv", 30, "mpeg4").read_bytes())
    rng = np.random.default_rng(0)
    start = len(data) // 4
    data[start:] = rng.integers(0, 256, len(data) - start, dtype=np.uint8).tobytes()  # same length, garbage
    path = tmp_path / "garbage.mkv"
    path.write_bytes(bytes(data))
    with pytest.raises(VideoDecodeError) as info:
        load_video(path, num_frames=30)
    assert "truncated" not in str(info.value)
