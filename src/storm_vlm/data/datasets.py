"""`LlavaDataset`: LLaVA-style records -> model-ready samples with labels on assistant tokens only.

Text: `StormProcessor.build_training_example` renders the conversation with the processor's
chat template (the one used at inference), expands the `<image>`/`<video>` placeholder to the
exact number of visual tokens, turns the frames into pixel values and labels the assistant
turns (text + end-of-turn token); everything else (system, user turns, role headers, visual
tokens, padding) is -100.

Media: `video` is a video file or a folder of its frames (image files, sampled uniformly in name
order as LLaVA-NeXT reads such folders; see `storm_vlm.eval.frames.load_frame_folder`).

Skips: a record that cannot make a sample is skipped -- its image/video cannot be read (missing,
not a regular file (a FIFO would block), undecodable, a decompression bomb, a clip outside the
video, `start`/`end` on a frame folder, any exception the decoder raises), its text is too long
for `max_length` (the cut would split its visual tokens or leave no assistant token), or every
assistant reply is empty or blank (its only label would be the end-of-turn token: it would teach
the model to answer nothing). Such a
record only shows when its sample is built, possibly deep into a long run, so it must not end
the run: `__getitem__(i)` moves on to the next usable record (i+1, i+2, ... wrapping around),
deterministically (a resumed run and every DDP rank make the same choice and the same number of
steps), and reports how many it skipped in `num_skipped` (the trainer sums them into
`skipped_media`); a warning names the record's `file:line`, id and the cause. No frame is ever
invented. A `max_length` too short for *any* sample of a modality in the file is a ConfigError
when the dataset is built. A malformed record is not a skip: it stops the run when the file is
loaded (`storm_vlm.data.records`).
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
from storm_vlm.errors import ConfigError, StormError
from storm_vlm.eval.frames import load_frame_folder
from storm_vlm.media.images import load_image
from storm_vlm.utils import IGNORE_INDEX
from storm_vlm.video import VideoDecodeError, load_video

if TYPE_CHECKING:
    from storm_vlm.train.config import TrainConfig

logger = logging.getLogger("storm_vlm.data")


class MediaUnreadable(Exception):
    """Internal: the record's media could not be read, or (from `LlavaDataset._skip`) the record cannot
    make a sample for another reason: the sample is skipped."""


class RecordTooLong(StormError):
    """The record's tokens do not fit `max_length` (`LlavaDataset` skips the sample); `reason` is the
    message without the record's location."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def encode_conversation(processor, messages: list[dict], frames: np.ndarray | None = None,
                        kind: str | None = None, max_length: int | None = None, where: str = "") -> dict:
    """Token ids + labels (+ pixel values) for one conversation, via `StormProcessor.build_training_example`.

    messages: [{"role", "content": str}] with one `<video>` placeholder, or one `<image>` per image.
    frames: (T, H, W, 3) uint8 for kind="video"; for kind="image", (I, H, W, 3) or a list of I
    (H, W, 3) images (of any sizes), in the order of their placeholders.
    Returns input_ids (L,), labels (L,) (-100 off the assistant turns) and
    pixel_values_videos (T, 3, S, S) or pixel_values (I, 3, S, S).
    """
    videos = [frames] if kind == "video" else None
    images = list(frames) if kind == "image" else None
    enc = processor.build_training_example(messages, videos=videos, images=images)
    out: dict = {}
    if kind == "video":
        t_real = int(enc["video_frame_mask"][0].sum())
        out["pixel_values_videos"] = enc["pixel_values_videos"][0, :t_real]
    elif kind == "image":
        out["pixel_values"] = enc["pixel_values"]
    input_ids = enc["input_ids"][0].long()
    label_ids = enc["labels"][0].long()
    if max_length is not None and input_ids.shape[0] > max_length:
        visual_ids = [i for i in (getattr(processor, "video_token_id", None), getattr(processor, "image_token_id", None))
                      if i is not None]
        cut = input_ids[max_length:]
        if any(bool((cut == v).any()) for v in visual_ids):
            raise RecordTooLong(where, f"{input_ids.shape[0]} tokens exceed max_length {max_length} and the cut "
                                       "would split the visual tokens; raise max_length or lower num_frames")
        input_ids, label_ids = input_ids[:max_length], label_ids[:max_length]
    if not bool((label_ids[1:] != IGNORE_INDEX).any()):
        raise RecordTooLong(where, f"no assistant token left to learn from (max_length {max_length})")
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
    """(H, W, 3) uint8 RGB, upright (see `load_image`); MediaUnreadable when the file cannot be decoded."""
    _check_regular_file(path)
    try:
        return load_image(path)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MediaUnreadable(f"{path}: {exc}") from None
    except Exception as exc:  # e.g. PIL's DecompressionBombError: whatever the decoder raises is this file's
        raise MediaUnreadable(f"{path}: {type(exc).__name__}: {exc}") from None


def read_video(path: Path, num_frames: int, start: float | None, end: float | None,
               min_side: int | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 frames sampled uniformly from a video file (scaled while decoding, see
    `load_video`) or a folder of frame images; MediaUnreadable on any failure."""
    try:
        if path.is_dir():
            if start is not None or end is not None:
                raise MediaUnreadable(f"{path}: a folder of frames has no timestamps to cut 'start'/'end' from")
            return load_frame_folder(path, num_frames, min_side=min_side)
        _check_regular_file(path)
        return load_video(str(path), num_frames=num_frames, start=start, end=end, min_side=min_side).frames
    except MediaUnreadable:
        raise
    except (VideoDecodeError, OSError) as exc:
        raise MediaUnreadable(str(exc)) from None
    except Exception as exc:  # a decoder failure load_video does not wrap is still this file's, not the run's
        raise MediaUnreadable(f"{path}: {type(exc).__name__}: {exc}") from None


class LlavaDataset(torch.utils.data.Dataset):
    """Map-style dataset over validated `Conversation`s (see `storm_vlm.data.records`).

    Each item: input_ids (L,), labels (L,), pixel_values_videos (T, 3, H, W) for video records,
    pixel_values (I, 3, H, W) for records of I images, num_skipped (int), record_index (int), skipped
    ([{"record": "file:line", "id", "cause"}] for each record skipped to reach this one).
    """

    def __init__(self, records: list[Conversation], processor, num_frames: int, max_length: int | None = None):
        self.records = records
        self.processor = processor
        self.num_frames = num_frames
        self.max_length = max_length
        self._bad: dict[int, str] = {}  # record index -> why it cannot make a sample
        if max_length is not None:
            self._check_max_length()

    @classmethod
    def from_files(cls, train_file, media_root, processor, num_frames: int, max_length: int | None = None):
        return cls(load_records(train_file, media_root), processor, num_frames, max_length)

    @classmethod
    def from_config(cls, cfg: "TrainConfig", processor) -> "LlavaDataset":
        return cls.from_files(cfg.train_file, cfg.media_root, processor, cfg.num_frames, cfg.max_length)

    def __len__(self) -> int:
        return len(self.records)

    def _check_max_length(self) -> None:
        """ConfigError when `max_length` cannot hold even the shortest sample of a modality the file
        has (its visual tokens, the chat template and one answer token): every such record would be
        skipped, one decode at a time, before the run could say why."""
        kinds = {rec.modality for rec in self.records} - {"text"}
        template = encode_conversation(self.processor, [{"role": "user", "content": ""},
                                                        {"role": "assistant", "content": "a"}])
        for kind in sorted(kinds):
            frames, stride = (self.num_frames, None) if kind == "video" else (1, 1)  # as the processor counts
            need = template["input_ids"].shape[0] + self.processor.num_visual_tokens(frames, stride)
            if need > self.max_length:
                what = f"a {frames}-frame video" if kind == "video" else "an image"
                raise ConfigError(f"key 'max_length': {self.max_length} tokens cannot hold the shortest sample "
                                  f"with {what} ({need} tokens); raise max_length or lower num_frames")

    def encode(self, index: int) -> dict:
        rec = self.records[index]
        if index in self._bad:
            raise MediaUnreadable(self._bad[index])
        if not any(m["content"].strip() for m in rec.messages if m["role"] == "assistant"):
            self._skip(index, "no answer: every gpt reply is empty (it would only teach ending the turn at once)")
        frames = None
        try:
            if rec.video is not None:
                frames = read_video(rec.video, self.num_frames, rec.start, rec.end, self.processor.image_size)
            elif rec.images:
                frames = [read_image(path) for path in rec.images]
        except MediaUnreadable as exc:
            self._skip(index, f"unreadable media: {exc}")
        try:
            item = encode_conversation(self.processor, rec.messages, frames,
                                       rec.modality if frames is not None else None, self.max_length,
                                       where=f"{rec.where} (id {rec.id})")
        except RecordTooLong as exc:
            self._skip(index, f"too long: {exc.reason}")
        item["record_index"] = index
        return item

    def _skip(self, index: int, cause: str):
        """Remember and log why record `index` cannot make a sample; raises MediaUnreadable (a skip)."""
        rec = self.records[index]
        self._bad[index] = cause
        logger.warning("skipping record %s (id %s): %s", rec.where, rec.id, cause)
        raise MediaUnreadable(cause)

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
            item["skipped"] = [{"record": self.records[i].where, "id": self.records[i].id, "cause": self._bad[i]}
                               for i in ((index + s) % n for s in range(k))]
            return item
        raise StormError(f"none of the {n} training records can make a sample (first: {first_cause})")
