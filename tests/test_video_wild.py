"""Files as users get them from other tools: clips cut without re-encoding (an MP4 edit list hiding
the frames before the cut), phone photos with any EXIF orientation, pictures too large to decode,
the pixel formats cameras and editors write. Frames carry their own index (test_video)."""

import struct
import zlib

import av
import numpy as np
import pytest
from helpers import encode_video
from PIL import Image

from storm_vlm import VideoDecodeError, load_video
from storm_vlm.media.images import load_image
from test_video import H, W, decoded_indices, encoder_available, index_frame

# ------------------------------------------------------------------ clips cut without re-encoding


def cut(src, dst, first):
    """What `ffmpeg -ss <first / fps> -i src -c copy dst` writes: the packets from the keyframe
    before frame `first` on, shifted so that frame `first` is shown at 0 (the mp4 muxer writes an
    edit list hiding the earlier ones, which are still needed to decode it)."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        stream = source.streams.video[0]
        copy = out.add_stream_from_template(stream)
        offset = first * int(1 / (stream.average_rate * stream.time_base))
        packets = [p for p in source.demux(stream) if p.size]
        key = max(i for i, p in enumerate(packets) if p.is_keyframe and p.pts <= offset)
        for packet in packets[key:]:
            packet.pts -= offset
            packet.dts -= offset
            packet.stream = copy
            out.mux(packet)
    return dst


@pytest.mark.parametrize("first", [12, 22])
def test_a_clip_cut_without_reencoding_shows_the_frames_after_the_cut(tmp_path, first):
    # With B-frames; each cut is decoded from the keyframe before it, frames the edit list hides.
    source = encode_video(tmp_path / "v.mp4", (index_frame(i) for i in range(40)), 10, "mpeg4", gop=12,
                          options={"bf": "2"})
    path = cut(source, tmp_path / "cut.mp4", first)
    shown = list(range(first, 40))
    clip = load_video(path, num_frames=len(shown))
    assert clip.num_source_frames == len(shown)
    assert decoded_indices(clip) == shown
    spread = np.round(np.linspace(0, len(shown) - 1, 5)).astype(int)
    assert decoded_indices(load_video(path, num_frames=5)) == [shown[i] for i in spread]


# ------------------------------------------------------------------ still images


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp"])
def test_every_exif_orientation_is_shown_as_load_image_shows_it(tmp_path, suffix):
    # 2, 4, 5 and 7 mirror the picture (a front camera's photo); FFmpeg's matrix alone turned them instead.
    if suffix == "webp" and not av.codecs_available & {"webp", "libwebp"}:
        pytest.skip("no WebP decoder in this FFmpeg")
    picture = Image.fromarray(index_frame(259))  # no turn or flip leaves it alone
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.{suffix}"
        picture.save(path, exif=exif, quality=95)
        upright = load_image(path).astype(int)
        frame = load_video(path).frames[0].astype(int)
        assert frame.shape == upright.shape, orientation
        assert np.abs(frame - upright).mean() < 4, orientation


def png_of(width, height):
    """A valid black 1-bit PNG (a few kB, whatever its size)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compress = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    pixels = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side,words", [(10_000, r"10000x10000 \(100\.0 MP\), more than the 89\.5 MP"),
                                        (16_384, r"larger than the 89\.5 MP .*MAX_IMAGE_PIXELS")])
def test_an_image_too_large_to_decode_says_so(tmp_path, side, words):
    # FFmpeg's probe refuses to decode it, so its size is unknown to FFmpeg: the file is fine, not corrupt.
    path = tmp_path / "scan.png"
    path.write_bytes(png_of(side, side))
    with pytest.raises(VideoDecodeError, match=words) as info:
        load_video(path)
    assert "corrupt" not in str(info.value)


# ------------------------------------------------------------------ pixel formats


def encode_as(path, codec, pix_fmt, n=12):
    """n index frames (10 fps) encoded from `pix_fmt` pictures."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24").reformat(format=pix_fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("suffix,codec,pix_fmt", [
    ("mp4", "libx264", "yuv444p"), ("mp4", "libx264", "yuv420p10le"),  # camera "444" / 10-bit recordings
    ("mov", "mjpeg", "yuvj420p"),  # full-range YUV: a webcam's or old camera's motion JPEG
    ("mkv", "ffv1", "gray"), ("mov", "png", "rgb24"), ("mov", "prores", "yuv422p10le"),  # archives and editors
])
def test_pixel_formats_cameras_and_editors_write(tmp_path, suffix, codec, pix_fmt):
    if not encoder_available(codec):
        pytest.skip(f"no {codec} encoder")
    path = encode_as(tmp_path / f"v.{suffix}", codec, pix_fmt)
    clip = load_video(path, num_frames=4)
    assert clip.frames.shape == (4, H, W, 3) and decoded_indices(clip) == [0, 4, 7, 11]
    # the dark red (60, 0, 0) behind the index blocks, at the right levels (grey: its luma, BT.601)
    expected = [18, 18, 18] if pix_fmt == "gray" else [60, 0, 0]
    background = clip.frames[:, H // 2 - 2, W - 4]
    assert np.abs(background.astype(int) - expected).max() <= 4, background


def test_a_file_url_is_told_to_be_given_as_its_path(tmp_path):
    """file:///x.mp4 is a local file named the URL way: the message says to drop the scheme (not to
    download it, as for http://)."""
    with pytest.raises(VideoDecodeError, match=r"a file: URL; give the file's path itself \(without file://\)"):
        load_video(f"file://{tmp_path}/clip.mp4")
