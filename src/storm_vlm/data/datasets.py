"""`LlavaDataset`: LLaVA-style records -> model-ready samples with labels on assistant tokens only.

Text: `StormProcessor.build_training_example` renders the conversation with the processor's
chat template (the one used at inference), expands the `<image>`/`<video>` placeholder to the
exact number of visual tokens, turns the frames into pixel values and labels the assistant
turns (text + end-of-turn token); everything else (system, user turns, role headers, visual
tokens, padding) is -100.

Media: a record whose image/video cannot be read -- missing, not a regular file (a folder, a
FIFO that would block), undecodable, a decompression bomb, a clip outside the video, any
exception the decoder raises -- is skipped: `__getitem__(i)` moves on to the next readable
record (i+1, i+2, ... wrapping around), deterministically, and reports how many it skipped in
`num_skipped` (the trainer sums them into `skipped_media`); a warning names the record's
`file:line`, id and the cause. No frame is ever invented. A malformed record is not a skip: it
stops the run when the file is loaded (`storm_vlm.data.records`).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import UnidentifiedImageError

from storm_vlm.data.records import Conversation, load_records
from storm_vlm.errors import StormError
from storm_vlm.media.images import load_image
from storm_vlm.utils import IGNORE_INDEX
from storm_vlm.video import VideoDecodeError, load_video

if TYPE_CHECKING:
    from storm_vlm.train.config import TrainConfig

logger = logging.getLogger("storm_vlm.data")


class MediaUnreadable(Exception):
    """Internal: the record's media could not be read (the sample is skipped)."""


def encode_conversation(processor, messages: list[dict], frames: np.ndarray | None = None,
                        kind: str | None = None, max_length: int | None = None, where: str = "") -> dict:
    """Token ids + labels (+ pixel values) for one conversation, via `StormProcessor.build_training_example`.

    messages: [{"role", "content": str}] with at most one `<video>`/`<image>` placeholder.
    frames: (T, H, W, 3) uint8 for kind="video", (1, H, W, 3) for kind="image".
    Returns input_ids (L,), labels (L,) (-100 off the assistant turns) and
    pixel_values_videos (T, 3, S, S) or pixel_values (3, S, S).
    """
    videos = [frames] if kind == "video" else None
    images = [frames[0] if frames.ndim == 4 else frames] if kind == "image" else None
    enc = processor.build_training_example(messages, videos=videos, images=images)
    out: dict = {}
    if kind == "video":
        t_real = int(enc["video_frame_mask"][0].sum())
        out["pixel_values_videos"] = enc["pixel_values_videos"][0, :t_real]
    elif kind == "image":
        out["pixel_values"] = enc["pixel_values"][0]
    input_ids = enc["input_ids"][0].long()
    label_ids = enc["labels"][0].long()
    if max_length is not None and input_ids.shape[0] > max_length:
        visual_ids = [i for i in (getattr(processor, "video_token_id", None), getattr(processor, "image_token_id", None))
                      if i is not None]
        cut = input_ids[max_length:]
        if any(bool((cut == v).any()) for v in visual_ids):
            raise StormError(
                f"{where}: {input_ids.shape[0]} tokens exceed max_length {max_length} and the cut would "
                "split the visual tokens; raise max_length or lower num_frames"
            )
        input_ids, label_ids = input_ids[:max_length], label_ids[:max_length]
    if not bool((label_ids[1:] != IGNORE_INDEX).any()):
        raise StormError(f"{where}: no assistant token left to learn from (max_length {max_length})")
    out["input_ids"] = input_ids
    out["labels"] = label_ids
    return out


def _check_regular_file(path: Path) -> None:
    """MediaUnreadable unless `path` is a regular file (a folder fails to decode; a FIFO or a
    device would block the data loader or never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise MediaUnreadable(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise MediaUnreadable(f"{path}: not a regular file")


def read_image(path: Path) -> np.ndarray:
    """(1, H, W, 3) uint8 RGB, upright (see `load_image`); MediaUnreadable when the file cannot be decoded."""
    _check_regular_file(path)
    try:
        return load_image(path)[None]
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MediaUnreadable(f"{path}: {exc}") from None
    except Exception as exc:  # e.g. PIL's DecompressionBombError: whatever the decoder raises is this file's
        raise MediaUnreadable(f"{path}: {type(exc).__name__}: {exc}") from None


def read_video(path: Path, num_frames: int, start: float | None, end: float | None,
               min_side: int | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 frames sampled uniformly (scaled while decoding, see `load_video`);
    MediaUnreadable on any decode failure."""
    _check_regular_file(path)
    try:
        return load_video(str(path), num_frames=num_frames, start=start, end=end, min_side=min_side).frames
    except (VideoDecodeError, OSError) as exc:
        raise MediaUnreadable(str(exc)) from None
    except Exception as exc:  # a decoder failure load_video does not wrap is still this file's, not the run's
        raise MediaUnreadable(f"{path}: {type(exc).__name__}: {exc}") from None


class LlavaDataset(torch.utils.data.Dataset):
    """Map-style dataset over validated `Conversation`s (see `storm_vlm.data.records`).

    Each item: input_ids (L,), labels (L,), pixel_values_videos (T, 3, H, W) for video records,
    pixel_values (3, H, W) for image records, num_skipped (int), record_index (int).
    """

    def __init__(self, records: list[Conversation], processor, num_frames: int, max_length: int | None = None):
        self.records = records
        self.processor = processor
        self.num_frames = num_frames
        self.max_length = max_length
        self._bad: dict[int, str] = {}  # record index -> why its media is unreadable

    @classmethod
    def from_files(cls, train_file, media_root, processor, num_frames: int, max_length: int | None = None):
        return cls(load_records(train_file, media_root), processor, num_frames, max_length)

    @classmethod
    def from_config(cls, cfg: "TrainConfig", processor) -> "LlavaDataset":
        return cls.from_files(cfg.train_file, cfg.media_root, processor, cfg.num_frames, cfg.max_length)

    def __len__(self) -> int:
        return len(self.records)

    def encode(self, index: int) -> dict:
        rec = self.records[index]
        if index in self._bad:
            raise MediaUnreadable(self._bad[index])
        frames = None
        try:
            if rec.video is not None:
                frames = read_video(rec.video, self.num_frames, rec.start, rec.end, self.processor.image_size)
            elif rec.image is not None:
                frames = read_image(rec.image)
        except MediaUnreadable as exc:
            self._bad[index] = str(exc)
            logger.warning("skipping record %s (id %s): unreadable media: %s", rec.where, rec.id, exc)
            raise
        item = encode_conversation(self.processor, rec.messages, frames, rec.modality if frames is not None else None,
                                   self.max_length, where=f"{rec.where} (id {rec.id})")
        item["record_index"] = index
        return item

    def __getitem__(self, index: int) -> dict:
        n = len(self.records)
        first_cause = None
        for k in range(n):
            j = (index + k) % n
            try:
                item = self.encode(j)
            except MediaUnreadable as exc:
                first_cause = first_cause or f"{self.records[j].where}: {exc}"
                continue
            item["num_skipped"] = k
            return item
        raise StormError(f"none of the {n} training records has readable media (first: {first_cause})")
