"""Files as users have them rather than as encoders write them: a damaged packet midway, recordings
joined with their clocks restarting, anamorphic pixels, transparent and 16-bit pictures, pictures
larger than the image cap. Frames carry their own index (test_video)."""

import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from helpers import encode_video
from PIL import Image

from storm_vlm import VideoDecodeError, load_video
from storm_vlm.media.images import ImageTooLarge, load_image
from storm_vlm.media.limits import MAX_IMAGE_PIXELS
from test_video import CODECS, H, W, decoded_indices, index_frame, write_video

# ------------------------------------------------------------------ damaged data


def damage_packets(path, packets, out):
    """Overwrite all but the first quarter of the given video packets with noise (a bad stretch
    of a download or a recording: the container is intact, the codec data is not)."""
    with av.open(str(path)) as container:
        spans = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(1)
    for k in packets:
        pos, size = spans[k]
        data[pos + size // 4:pos + size] = rng.integers(0, 256, size - size // 4, dtype=np.uint8).tobytes()
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize("codec,suffix", [*(pytest.param(*p.values, "mp4", marks=p.marks) for p in CODECS[:1]),
                                          ("mpeg4", "mkv")])
def test_a_damaged_packet_costs_its_frames_not_the_video(tmp_path, codec, suffix):
    # The decoder rejects the two packets as invalid data; ffmpeg and players skip them and go on.
    good = write_video(tmp_path / f"v.{suffix}", 60, codec, gop=10)
    path = damage_packets(good, (25, 26), tmp_path / f"damaged.{suffix}")
    clip = load_video(path, num_frames=6)
    assert decoded_indices(clip) == [0, 12, 24, 35, 47, 59]
    every = load_video(path, num_frames=60)
    assert every.extra["skipped_packets"] >= 1
    assert sum(a != b for a, b in zip(decoded_indices(every), range(60))) <= 4  # only frames near the damage


def test_a_picture_cut_short_says_so(tmp_path):
    Image.fromarray(index_frame(5)).save(tmp_path / "full.png")
    cut = tmp_path / "cut.png"
    data = (tmp_path / "full.png").read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VideoDecodeError, match=r"cut\.png: .*(corrupt|cut short)"):
        load_video(cut)


# ------------------------------------------------------------------ timestamps


def test_timestamps_run_on_across_a_clock_restart(tmp_path):
    # Two MPEG-TS recordings joined, each starting at 0 (a camera's split files, a captured broadcast).
    first = write_video(tmp_path / "a.ts", 20, "mpeg4", fmt="mpegts")
    second = encode_video(tmp_path / "b.ts", (index_frame(20 + i) for i in range(20)), 10, "mpeg4", fmt="mpegts")
    joined = tmp_path / "joined.ts"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    clip = load_video(joined, num_frames=8)
    expected = np.round(np.linspace(0, 39, 8)).astype(int)
    assert decoded_indices(clip) == expected.tolist()
    np.testing.assert_allclose(clip.timestamps, expected / 10, atol=1e-6)  # never back to 0 midway


# ------------------------------------------------------------------ pixel shapes


def write_anamorphic(path, sar, frames=3):
    """A W x H mpeg4 video whose pixels have the shape `sar` (width / height), its left half white."""
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2] = 255
    return encode_video(path, [image] * frames, 10, "mpeg4", sample_aspect_ratio=sar)


@pytest.mark.parametrize("sar,shown", [(Fraction(2), (24, 64)), (Fraction(1, 2), (48, 32))])
def test_anamorphic_pixels_are_shown_at_the_display_aspect_ratio(tmp_path, sar, shown):
    # A DVD's 720 x 480 picture is shown at 16:9: its pixels are wider than tall.
    path = write_anamorphic(tmp_path / "anamorphic.mp4", sar)
    clip = load_video(path, num_frames=2)
    assert clip.frames.shape == (2, *shown, 3)
    assert clip.extra["source_size"] == (W, H) and clip.extra["sample_aspect_ratio"] == float(sar)
    half = shown[1] // 2
    assert clip.frames[:, :, : half - 2].min() > 200 and clip.frames[:, :, half + 2:].max() < 60  # not cropped


# ------------------------------------------------------------------ still images


def test_transparent_pictures_are_shown_over_white(tmp_path):
    # A logo: black strokes on transparent pixels that hold black (as most editors export them).
    rgba = np.zeros((8, 16, 4), np.uint8)
    rgba[:, 4:8, 3] = 255
    half = rgba.copy()
    half[:, 12:, 3] = 128
    Image.fromarray(half, "RGBA").save(tmp_path / "logo.png")
    palette = Image.new("P", (16, 8), 0)
    palette.putpalette([0, 0, 0] * 2)
    palette.paste(1, (4, 0, 8, 8))
    palette.save(tmp_path / "palette.png", transparency=0)
    palette.save(tmp_path / "palette.gif", transparency=0)
    for name in ("logo.png", "palette.png", "palette.gif"):
        for pixels in (load_image(tmp_path / name), load_video(tmp_path / name).frames[0]):
            assert pixels.shape == (8, 16, 3), name
            assert pixels[:, :4].min() == 255 and pixels[:, 4:8].max() == 0, name
            if name == "logo.png":
                assert np.all(np.abs(pixels[:, 12:].astype(int) - 127) <= 1)  # half-transparent black: grey


def test_16_bit_grey_pictures_keep_their_levels(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))  # a depth map, a scan
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    expected = np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(load_image(tmp_path / "grey16.png"), expected)  # not clipped to white
    assert np.abs(load_video(tmp_path / "grey16.png").frames[0].astype(int) - expected).max() <= 1


def png_header(width, height):
    """A PNG's header and the start of its pixel data: its size is known, its pixels are not there."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pictures_above_the_image_cap_are_refused_before_decoding(tmp_path):
    # Above the cap (where PIL only warns): refused from the header, even if a program turned
    # PIL's own limit off.
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    with pytest.raises(ImageTooLarge, match=f"{side}x{side} is larger than"):
        load_image(png_header(side, side))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with pytest.raises(ImageTooLarge):
            load_image(png_header(side, side))
