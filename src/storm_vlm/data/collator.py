"""Batching encoded samples: right-pad text, concatenate images, pad videos along time with a frame mask."""

from __future__ import annotations

from typing import Sequence

import torch

from storm_vlm.utils import IGNORE_INDEX


class StormCollator:
    """Collate `LlavaDataset` samples into model inputs.

    Each sample: input_ids (L,), labels (L,), optional pixel_values_videos (T, 3, H, W) or
    pixel_values (I, 3, H, W) (or (3, H, W): one image), num_skipped (int). Returns:
        input_ids (B, Lmax) right-padded with `pad_token_id`, attention_mask (B, Lmax),
        labels (B, Lmax) padded with -100,
        pixel_values_videos (V, Tmax, 3, H, W) + video_frame_mask (V, Tmax) bool (padding frames
        are zeros at the end, masked False) -- V = samples with a video, in batch order,
        pixel_values (I, 3, H, W) -- I = the samples' images, in batch order (a sample's in its order),
        num_skipped: records skipped to produce this batch, skipped: their descriptions (see LlavaDataset).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, samples: Sequence[dict]) -> dict:
        if not samples:
            raise ValueError("empty batch")
        lmax = max(int(s["input_ids"].shape[0]) for s in samples)
        b = len(samples)
        input_ids = torch.full((b, lmax), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, lmax), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, lmax), dtype=torch.long)
        for i, s in enumerate(samples):
            n = int(s["input_ids"].shape[0])
            input_ids[i, :n] = s["input_ids"]
            labels[i, :n] = s["labels"]
            attention_mask[i, :n] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "num_skipped": sum(int(s.get("num_skipped", 0)) for s in samples),
            "skipped": [r for s in samples for r in s.get("skipped", ())],
        }
        videos = [s["pixel_values_videos"] for s in samples if s.get("pixel_values_videos") is not None]
        if videos:
            tmax = max(v.shape[0] for v in videos)
            pv = videos[0].new_zeros((len(videos), tmax, *videos[0].shape[1:]))
            mask = torch.zeros((len(videos), tmax), dtype=torch.bool)
            for i, v in enumerate(videos):
                pv[i, : v.shape[0]] = v
                mask[i, : v.shape[0]] = True
            out["pixel_values_videos"] = pv
            out["video_frame_mask"] = mask
        images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
        if images:
            out["pixel_values"] = torch.cat([im.reshape(-1, *im.shape[-3:]) for im in images])
        return out
