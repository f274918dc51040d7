"""Frames for one record: a video file through `storm_vlm.video.load_video`, or a folder of
frame images (MVBench's TVQA frames, extracted at `record.frames_fps`).

The readers confine `record.video` to the data root; here a frame image that is a symlink out
of its folder, and anything that is not a regular file (a FIFO or device would block the run),
is a decode failure -- recorded for that question, and the run goes on."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from storm_vlm.errors import StormError
from storm_vlm.eval.records import Record
from storm_vlm.media.images import load_image
from storm_vlm.utils import numbered_name_key
from storm_vlm.video import VideoDecodeError, load_video

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _decode_error(path: str, cause: str) -> StormError:
    return VideoDecodeError(f"{path}: {cause}")


def _check_regular(path: str, inside: Path | None = None) -> None:
    """VideoDecodeError unless `path` is a regular file (inside `inside`, after resolving symlinks)."""
    if inside is not None and not Path(path).resolve().is_relative_to(inside):
        raise _decode_error(path, "a symlink out of its frame folder")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the decoder names it in its own words
    if not stat.S_ISREG(mode):
        raise _decode_error(path, "not a regular file")


def load_frame_folder(path: str | Path, num_frames: int, folder_fps: float | None = None,
                      start: float | None = None, end: float | None = None, min_side: int | None = None) -> np.ndarray:
    """`num_frames` images spread uniformly over a folder of frames (in name order, numbers by
    value), restricted to [start, end) seconds when the folder's frame rate is known, each scaled
    down to `min_side` on its shorter side as it is read (`load_image`). Returns (T, H, W, 3) uint8."""
    path = str(path)
    folder = Path(path).resolve()
    entries = os.listdir(path)
    names = sorted((n for n in entries if Path(n).suffix.lower() in _IMAGE_SUFFIXES), key=numbered_name_key)
    if not names:
        files = sorted(n for n in entries if (folder / n).is_file())
        hint = (f" ({', '.join(sorted(_IMAGE_SUFFIXES))}); it holds {', '.join(files[:3])}"
                f"{', ...' if len(files) > 3 else ''}: for a video, pass the file itself") if files else ""
        raise _decode_error(path, f"frame folder holds no images{hint}")
    lo, hi = 0, len(names) - 1
    if folder_fps and start is not None:
        lo = min(max(0, int(round(start * folder_fps))), hi)
    if folder_fps and end is not None:
        hi = max(lo, min(hi, int(round(end * folder_fps))))
    idx = np.round(np.linspace(lo, hi, num_frames)).astype(int)
    frames = []
    size = None
    for i in idx:
        _check_regular(os.path.join(path, names[i]), folder)
        try:
            frame = load_image(os.path.join(path, names[i]), min_side=min_side)
        except (OSError, ValueError) as exc:
            raise _decode_error(os.path.join(path, names[i]), f"unreadable frame image ({exc})") from None
        if size is None:
            size = frame.shape
        elif frame.shape != size:
            frame = np.asarray(Image.fromarray(frame).resize((size[1], size[0])))
        frames.append(frame)
    return np.stack(frames)


def load_record_frames(record: Record, num_frames: int, fps: float | None = None,
                       min_side: int | None = None) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 for `record`, videos scaled while decoding to no less than
    `min_side` on their shorter side (the model's input size; see `load_video`). Raises a
    StormError (VideoDecodeError) on failure."""
    start, end = record.start, record.end
    if start is not None and end is not None and end <= start:
        start = end = None  # a few public annotations have empty bounds; read the whole clip
    if os.path.isdir(record.video):
        return load_frame_folder(record.video, num_frames, record.frames_fps, start, end, min_side)
    _check_regular(record.video)
    clip = load_video(record.video, num_frames=num_frames, fps=fps, start=start, end=end, min_side=min_side)
    return clip.frames
