"""Reading a still image file: `load_image`, the one place the project opens one with PIL.

The processor's image paths, the OpenAI server's `image_url`, training records and evaluation
frame folders all read their images here, so every path sees the same picture: turned upright by
its EXIF orientation (as a viewer shows a phone photo, and as `storm_vlm.video.load_video` does
for a still image) and converted to RGB uint8. Only the raster formats in IMAGE_FORMATS are opened:
PIL would otherwise try every plugin it has, EPS among them, which runs Ghostscript on the file
(Pillow's security notes: block EPS at the application layer). Imports PIL and numpy only.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = ["load_image", "ImageTooLarge", "IMAGE_FORMATS"]

# PIL format names opened (JPEG's opener also reads MPO, a phone's JPEG with a second picture)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageTooLarge(ValueError):
    """The picture has more pixels than the caller's `max_pixels` (seen in its header, before decoding)."""


def load_image(source: str | os.PathLike | bytes | BinaryIO, max_pixels: int | None = None,
               min_side: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright, from an image file: a path, its bytes or a binary file object.

    max_pixels: raise ImageTooLarge for a larger picture without decoding it (None: PIL's own
    decompression-bomb limit only). min_side: scale a larger picture down, area-averaged, until
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
        image = ImageOps.exif_transpose(im).convert("RGB")
    if min_side is not None and min(image.size) > min_side:
        scale = min_side / min(image.size)
        size = (max(min_side, round(image.width * scale)), max(min_side, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)
