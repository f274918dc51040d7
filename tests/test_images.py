"""`load_image`, the one reader of still images: a phone photo's EXIF orientation is applied on every
path that reads an image file (processor, OpenAI server, training records, evaluation frame folders)."""

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import AutoProcessor

from storm_vlm import load_video
from storm_vlm.media.images import ImageTooLarge, load_image


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 16 x 8 JPEG (left quarter white) whose EXIF says "rotate to view" (orientation 6): upright it is 8 x 16."""
    path = tmp_path_factory.mktemp("exif") / "photo.jpg"
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :4] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.fixture(scope="module")
def upright(photo):
    with Image.open(photo) as im:
        pixels = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert pixels.shape == (16, 8, 3)
    return pixels


def test_load_image_turns_the_picture_upright(photo, upright):
    for source in (photo, str(photo), photo.read_bytes(), open(photo, "rb")):
        out = load_image(source)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, upright)
    with pytest.raises(ImageTooLarge, match="16x8 is larger than 100 pixels"):
        load_image(photo, max_pixels=100)


def test_every_reader_of_image_files_sees_it_upright(photo, upright, tmp_path, monkeypatch):
    from storm_vlm.data.datasets import read_image
    from storm_vlm.eval.frames import load_frame_folder
    from storm_vlm.serve import openai_api

    np.testing.assert_array_equal(read_image(photo), upright)
    np.testing.assert_array_equal(openai_api._image_frames(photo.read_bytes(), "image")[0], upright)
    monkeypatch.setattr(openai_api, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(openai_api.OpenAIError, match="image: 16x8 is larger than 100 pixels"):
        openai_api._image_frames(photo, "image")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "00001.jpg").write_bytes(photo.read_bytes())
    np.testing.assert_array_equal(load_frame_folder(tmp_path / "frames", 1)[0], upright)
    frame = load_video(photo, num_frames=1).frames[0]  # FFmpeg's JPEG decoder: the same picture, up to rounding
    assert frame.shape == upright.shape and np.abs(frame.astype(int) - upright).mean() < 8


def test_the_processor_reads_image_paths_upright(photo, upright, qwen2_mamba_dir):
    processor = AutoProcessor.from_pretrained(qwen2_mamba_dir)
    ref = processor(text="<image>", images=[upright])["pixel_values"]
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(photo)}, {"type": "text", "text": "q"}]}]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert out["pixel_values"].equal(ref)
    assert processor(text="<image>", images=[photo])["pixel_values"].equal(ref)


def test_only_raster_formats_are_opened(tmp_path):
    """PIL would take an EPS file to Ghostscript (which runs its PostScript): it is not opened at all."""
    from PIL import UnidentifiedImageError

    from storm_vlm.serve import openai_api

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"
    with pytest.raises(UnidentifiedImageError):
        load_image(eps)
    with pytest.raises(openai_api.OpenAIError, match="not a readable image"):
        openai_api._image_frames(eps, "image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_min_side_scales_large_pictures_down_while_reading(tmp_path, fmt):
    """A picture larger than the model's input is scaled down to it (shorter side = min_side, area
    averaged; a JPEG decoded at a reduced scale): what a server holds per image stays small."""
    pixels = np.zeros((200, 400, 3), np.uint8)
    pixels[:, :100] = 255  # left quarter white
    path = tmp_path / f"big.{fmt.lower()}"
    Image.fromarray(pixels).save(path, format=fmt, quality=95)
    small = load_image(path, min_side=50)
    assert small.shape == (50, 100, 3)
    assert small[:, :23].min() > 200 and small[:, 27:].max() < 60  # the same picture, smaller
    assert load_image(path, min_side=500).shape == (200, 400, 3)  # never scaled up
