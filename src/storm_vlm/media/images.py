"""Reading a still image file: `load_image`, the one place the project opens one with PIL.

The processor's image paths, the OpenAI server's `image_url`, training records and evaluation
frame folders all read their images here, so every path sees the same picture: turned upright by
its EXIF orientation (as a viewer shows a phone photo, and as `storm_vlm.video.load_video` does
for a still image) and converted to RGB uint8: a transparent picture shown over white (a logo or
screenshot whose transparent pixels hold black would otherwise be black on black), a 16-bit grey
one scaled to 8 bits (not clipped to white). Only the raster formats in IMAGE_FORMATS are opened:
PIL would otherwise try every plugin it has, EPS among them, which runs Ghostscript on the file
(Pillow's security notes: block EPS at the application layer). Imports PIL, numpy and the pixel caps.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

from storm_vlm.media.limits import MAX_IMAGE_PIXELS

__all__ = ["load_image", "ImageTooLarge", "IMAGE_FORMATS", "over_white", "pil_rgb", "ImageHeader", "image_header"]

# PIL format names opened (JPEG's opener also reads MPO, a phone's JPEG with a second picture)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageTooLarge(ValueError):
    """The picture has more pixels than the caller's `max_pixels` (seen in its header, before decoding)."""


class ImageHeader(NamedTuple):
    """What an image file's header says: its size (width, height) and its EXIF orientation as
    (rotation in degrees counter-clockwise, mirrored left-right before it), FFmpeg's display-matrix
    convention (`storm_vlm.media.readers.frame_orientation`); orientation None: not in the header."""

    size: tuple[int, int]
    orientation: tuple[int, bool] | None


# EXIF orientation -> (rotation, mirrored): the picture PIL's exif_transpose shows
_EXIF_ORIENTATION = {1: (0, False), 2: (0, True), 3: (180, False), 4: (180, True), 5: (90, True), 6: (270, False),
                     7: (270, True), 8: (90, False)}


def image_header(path: str) -> ImageHeader | None:
    """The size and EXIF orientation of an image file, read from its header (no pixel decoded);
    None when PIL cannot read the header or the format is not in IMAGE_FORMATS.

    `load_video` turns still images upright with it: FFmpeg reads the orientation too, but PyAV
    cannot read its display matrix next to the EXIF block FFmpeg also attaches, so the mirrored
    orientations (2, 4, 5, 7) would come back turned instead of mirrored. Raises ImageTooLarge
    above PIL's decompression-bomb error threshold, where PIL gives no size.
    """
    try:
        with warnings.catch_warnings():  # a size above PIL's warning threshold is the caller's to judge
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=IMAGE_FORMATS)
        with im:
            orientation = None
            if im.format != "PNG" or "exif" in im.info:  # PNG: PIL would decode it to look past the pixels
                orientation = _EXIF_ORIENTATION.get(im.getexif().get(ExifTags.Base.Orientation, 1), (0, False))
            return ImageHeader(im.size, orientation)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, ValueError, SyntaxError):
        return None


# PIL modes of 16-bit (and 32-bit integer) grey pictures: PIL's convert("RGB") clips them at 255
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def over_white(rgba: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB of (..., 4) uint8 RGBA pixels shown over a white background (what a
    browser or viewer shows, and what qwen-vl-utils hands its model)."""
    alpha = rgba[..., 3:].astype(np.uint16)
    return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def pil_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a PIL image of any mode (see the module's docstring)."""
    if image.mode in _WIDE_GREY:
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return over_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_image(source: str | os.PathLike | bytes | BinaryIO, max_pixels: int | None = MAX_IMAGE_PIXELS,
               min_side: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright, from an image file: a path, its bytes or a binary file object.

    max_pixels: raise ImageTooLarge for a larger picture without decoding it (default the cap
    `load_video` applies to images, which holds even where a program turned PIL's own limit off;
    None: PIL's decompression-bomb limit only). min_side: scale a larger picture down, area-averaged, until
    its shorter side is min_side (a model's input size: nothing it could see is lost, and a
    server holds a few hundred kilobytes per image, not the full picture; a JPEG is decoded at a
    reduced scale directly). PIL's errors pass through: OSError (UnidentifiedImageError) for what
    it cannot read or a format not in IMAGE_FORMATS, Image.DecompressionBombError above its limit.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS) as im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise ImageTooLarge(f"{im.width}x{im.height} is larger than {max_pixels} pixels")
        if min_side is not None and min(im.size) > min_side:
            im.draft("RGB", (min_side, min_side))  # JPEG: decode at the smallest scale still >= min_side
        image = Image.fromarray(pil_rgb(ImageOps.exif_transpose(im)))
    if min_side is not None and min(image.size) > min_side:
        scale = min_side / min(image.size)
        size = (max(min_side, round(image.width * scale)), max(min_side, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)
