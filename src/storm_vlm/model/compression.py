"""Token compression for video features, and the visual-token layout that counts its result.

The functions work on visual tokens ``x`` of shape (B, T, N, D): B videos, T frames, N tokens
per frame (a row-major sqrt(N) x sqrt(N) grid), D channels. They are pure tensor functions and
know nothing of models:

- ``temporal_pool(x, k)`` averages consecutive, non-overlapping groups of k frames (trained);
- ``spatial_pool(x, p)`` average-pools each frame's grid with a p x p window (trained);
- ``temporal_sample(x, s)`` keeps frames 0, s, 2s, ... (test time; s may differ per video).

Each returns ``(x', mask')``. ``frame_mask`` (B, T) bool marks real frames (True) in a padded
batch, padding as a suffix; padded frames never contribute to a real output frame, so a video in a
padded batch gets exactly the frames it gets alone. The temporal operations refuse a mask with a
real frame after a padded one (ValueError): pooling windows and sampled frames are counted from a
video's first frame, so leading padding or holes would shift them. Output frames that hold no real
frame are False in ``mask'``; their values are zeros for ``temporal_pool`` and unspecified for the
others. Without a mask every frame is real.

`VisualTokenLayout` bundles the three settings with the projector's grid: the one value that
says how many tokens a T-frame video becomes (`num_tokens`), which `StormConfig` exposes, the
processor saves and writes into every batch (`as_row`), and the model applies (`apply`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from storm_vlm.utils import check_int

__all__ = [
    "VisualTokenLayout",
    "temporal_pool",
    "spatial_pool",
    "temporal_sample",
    "pooled_num_frames",
    "sampled_num_frames",
    "spatial_pooled_tokens",
    "shuffled_grid_side",
]


def shuffled_grid_side(side: int, ratio: int) -> int:
    """Side of a side x side patch grid after a ratio x ratio pixel shuffle: ceil(side / ratio).

    A side that ratio does not divide (a 384 px SigLIP in 14 px patches: 27) is zero-padded to the
    next multiple first, as VILA does (see `storm_vlm.model.projector.pixel_shuffle`).
    """
    return -(-side // ratio)


def _check_x(fn: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: x must be a torch.Tensor of shape (B, T, N, D), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must have shape (B, T, N, D), got shape {tuple(x.shape)}")


def check_frame_mask(fn: str, x: torch.Tensor, frame_mask, suffix: bool = True) -> torch.Tensor | None:
    """`frame_mask` validated against x's (B, T) and moved to x's device (None stays None).

    ``suffix``: also require each video's padding to follow all its real frames, as the processor
    and the collator pad (operations that look across frames count them from a video's start).
    """
    if frame_mask is None:
        return None
    if not isinstance(frame_mask, torch.Tensor):
        raise ValueError(f"{fn}: frame_mask must be a bool tensor of shape (B, T), got {type(frame_mask).__name__}")
    if frame_mask.dtype != torch.bool:
        raise ValueError(f"{fn}: frame_mask must have dtype torch.bool, got {frame_mask.dtype}")
    if tuple(frame_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{fn}: frame_mask shape {tuple(frame_mask.shape)} does not match the input's (B, T) = "
            f"{tuple(x.shape[:2])} (input shape {tuple(x.shape)})"
        )
    frame_mask = frame_mask.to(x.device)
    if suffix:
        late = frame_mask[:, 1:] & ~frame_mask[:, :-1]  # a real frame right after a padded one
        if bool(late.any()):
            video, before = late.nonzero()[0].tolist()
            raise ValueError(
                f"{fn}: frame_mask must be True for a video's real frames, then False for its padding "
                f"(padding as a suffix); video {video} has a real frame at index {before + 1} after padding"
            )
    return frame_mask


def _grid_side(fn: str, num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{fn}: N = {num_tokens} tokens per frame is not a square grid")
    return side


def pooled_num_frames(num_frames: int, k: int) -> int:
    """Frames left after ``temporal_pool(x, k)`` on ``num_frames`` frames: ceil(T / k)."""
    check_int("num_frames", num_frames, 0)
    check_int("k", k)
    return -(-num_frames // k)


def sampled_num_frames(num_frames: int, s: int) -> int:
    """Frames left after ``temporal_sample(x, s)`` on ``num_frames`` frames: ceil(T / s)."""
    check_int("num_frames", num_frames, 0)
    check_int("s", s)
    return -(-num_frames // s)


def spatial_pooled_tokens(num_tokens: int, stride: int) -> int:
    """Tokens per frame after ``spatial_pool(x, stride)``: N / stride**2 (N a square grid, side divisible by stride)."""
    check_int("num_tokens", num_tokens, 0)
    check_int("stride", stride)
    side = _grid_side("spatial_pool", num_tokens)
    if side % stride:
        raise ValueError(f"spatial_pool: grid side {side} (N = {num_tokens}) is not divisible by stride {stride}")
    return (side // stride) ** 2


# ---------------------------------------------------------------------------------------------------
# The operations. The public functions validate their arguments; `VisualTokenLayout.apply` validates
# once and runs the unchecked `_` versions.


def _temporal_pool(x: torch.Tensor, k: int, mask: torch.Tensor | None):
    """The unchecked operations take and return mask None for "every frame is real"."""
    b, t, n, d = x.shape
    t_out = pooled_num_frames(t, k)
    if mask is None and t % k == 0:
        return x.reshape(b, t_out, k, n, d).mean(dim=2), None
    weight = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=x.device)
    pad = t_out * k - t
    # where (not multiply) so that NaN/inf in padded frames cannot leak into real groups.
    xm = torch.where(weight[:, :, None, None], x, x.new_zeros(()))
    if pad:
        xm = torch.cat([xm, xm.new_zeros(b, pad, n, d)], dim=1)
        weight = torch.cat([weight, weight.new_zeros(b, pad)], dim=1)
    sums = xm.reshape(b, t_out, k, n, d).sum(dim=2)
    counts = weight.reshape(b, t_out, k).sum(dim=2)
    out = sums / counts.clamp(min=1).to(x.dtype)[:, :, None, None]
    return out, (counts > 0 if mask is not None else None)


def _spatial_pool(x: torch.Tensor, stride: int, mask: torch.Tensor | None):
    b, t, n, d = x.shape
    n_out = spatial_pooled_tokens(n, stride)
    if stride == 1:
        return x, mask
    g = math.isqrt(n) // stride
    return x.reshape(b, t, g, stride, g, stride, d).mean(dim=(3, 5)).reshape(b, t, n_out, d), mask


def _temporal_sample(x: torch.Tensor, s: int | Sequence[int], mask: torch.Tensor | None):
    if isinstance(s, int) or len(set(s)) == 1:
        step = s if isinstance(s, int) else s[0]
        return x[:, ::step], (None if mask is None else mask[:, ::step])
    # a different stride per video: each keeps frames 0, s_i, 2 s_i, ... packed to the front
    b, t = x.shape[:2]
    t_out = max(sampled_num_frames(t, si) for si in s)
    index = torch.zeros(b, t_out, dtype=torch.long, device=x.device)
    keep = torch.zeros(b, t_out, dtype=torch.bool, device=x.device)
    for i, si in enumerate(s):
        rows = torch.arange(0, t, si, device=x.device)
        index[i, : len(rows)] = rows
        keep[i, : len(rows)] = True
    out = x.gather(1, index[:, :, None, None].expand(-1, -1, *x.shape[2:]))
    return out, (keep if mask is None else mask.gather(1, index) & keep)


def _check_strides(fn: str, s, batch: int) -> int | list[int]:
    """One sampling stride (an int), or one per video (a list or tuple of ``batch`` ints)."""
    if not isinstance(s, (list, tuple)):
        return check_int(f"{fn}: s", s)
    if len(s) != batch:
        raise ValueError(f"{fn}: {len(s)} strides for a batch of {batch} videos")
    return [check_int(f"{fn}: s", v) for v in s]


def _with_mask(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return x, (mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))


def temporal_pool(x: torch.Tensor, k: int, frame_mask: torch.Tensor | None = None):
    """Average consecutive, non-overlapping groups of ``k`` frames.

    x: (B, T, N, D) -> ``(x', mask')`` with x' (B, ceil(T / k), N, D). A last partial group is
    averaged over the frames it has. With ``frame_mask`` (B, T) bool each group averages only its
    real frames; mask' (B, ceil(T / k)) is True where a group holds a real frame; groups that are
    all padding are zeros. NaN/inf in real frames propagate; padded frames are never read.
    """
    _check_x("temporal_pool", x)
    check_int("k", k)
    return _with_mask(*_temporal_pool(x, k, check_frame_mask("temporal_pool", x, frame_mask)))


def spatial_pool(x: torch.Tensor, stride: int, frame_mask: torch.Tensor | None = None):
    """Average-pool each frame's sqrt(N) x sqrt(N) token grid with kernel = stride = ``stride``.

    x: (B, T, N, D) with N a square grid whose side is divisible by ``stride`` -> ``(x', mask)``
    with x' (B, T, N / stride**2, D), tokens in row-major order; frames are pooled independently,
    so the mask (any pattern) passes through.
    """
    _check_x("spatial_pool", x)
    check_int("stride", stride)
    return _with_mask(*_spatial_pool(x, stride, check_frame_mask("spatial_pool", x, frame_mask, suffix=False)))


def temporal_sample(x: torch.Tensor, s: int | Sequence[int], frame_mask: torch.Tensor | None = None):
    """Keep frames 0, s, 2s, ... (test-time temporal sampling).

    x: (B, T, N, D) -> ``(x', mask')`` with x' (B, ceil(T / s), N, D) and mask' = frame_mask[:, ::s].
    ``s`` may also be one stride per video (a sequence of B ints): each video's kept frames are
    packed to the front, x' has the longest count, and mask' is False past a video's own.
    """
    _check_x("temporal_sample", x)
    s = _check_strides("temporal_sample", s, x.shape[0])
    return _with_mask(*_temporal_sample(x, s, check_frame_mask("temporal_sample", x, frame_mask)))


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualTokenLayout:
    """How a T-frame video becomes the visual tokens an LLM reads.

    grid_side: tokens per side of a frame's grid leaving the projector (N = grid_side²: the
        vision tower's patch grid divided by the pixel-shuffle ratio).
    temporal_pool_size (k) and spatial_pool_stride (p): trained with the model.
    temporal_sample_stride (s): test-time sampling after pooling (1 = none).

    T frames -> T' = ceil(ceil(T / k) / s) frames of N' = (grid_side / p)² tokens; an image is a
    one-frame video. Rows of `as_row()` travel with a processed batch (`video_token_layout`), so
    the model applies exactly what the processor counted.
    """

    grid_side: int
    temporal_pool_size: int = 1
    spatial_pool_stride: int = 1
    temporal_sample_stride: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_int(f"visual token layout: {f.name}", getattr(self, f.name))
        if self.grid_side % self.spatial_pool_stride:
            raise ValueError(
                f"visual token layout: spatial_pool_stride {self.spatial_pool_stride} does not divide the "
                f"{self.grid_side} x {self.grid_side} token grid"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "VisualTokenLayout":
        """From `to_dict()`, or from the `visual_token_config` a 0.1.0 processor saved
        (image_size, patch_size and downsample_ratio instead of grid_side)."""
        data = dict(data)
        if "grid_side" not in data and {"image_size", "patch_size", "downsample_ratio"} <= set(data):
            side = data.pop("image_size") // data.pop("patch_size")
            data["grid_side"] = shuffled_grid_side(side, data.pop("downsample_ratio"))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown or "grid_side" not in data:
            raise ValueError(f"visual token layout: expected the fields {sorted(names)}, got {sorted(data)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def as_row(self) -> list[int]:
        """[grid_side, k, p, s]: one row of a batch's `video_token_layout` (V, 4)."""
        return [self.grid_side, self.temporal_pool_size, self.spatial_pool_stride, self.temporal_sample_stride]

    @classmethod
    def from_row(cls, row) -> "VisualTokenLayout":
        return cls(*(int(v) for v in row))

    def with_sample_stride(self, s: int | None) -> "VisualTokenLayout":
        """This layout with test-time sampling stride `s` (None keeps the current one)."""
        return self if s is None else dataclasses.replace(self, temporal_sample_stride=s)

    def same_model(self, other: "VisualTokenLayout") -> bool:
        """Whether the trained parts (grid, k, p) agree; the sampling stride may differ."""
        return self.as_row()[:3] == other.as_row()[:3]

    @property
    def tokens_per_frame(self) -> int:
        """N': tokens per output frame."""
        return (self.grid_side // self.spatial_pool_stride) ** 2

    def num_frames(self, num_frames: int) -> int:
        """T': frames left of a T-frame video after pooling and sampling."""
        check_int("num_frames", num_frames)
        return sampled_num_frames(pooled_num_frames(num_frames, self.temporal_pool_size), self.temporal_sample_stride)

    def num_tokens(self, num_frames: int) -> int:
        """Visual tokens the LLM reads for a T-frame video: T' x N'."""
        return self.num_frames(num_frames) * self.tokens_per_frame

    def apply(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None,
              sample_strides: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool, spatially pool and sample projector outputs x (B, T, N, D) -> ``(x', mask')``.

        ``sample_strides`` (one per video) replaces this layout's stride where a batch mixes them.
        """
        _check_x("VisualTokenLayout.apply", x)
        strides = self.temporal_sample_stride
        if sample_strides is not None:
            given = sample_strides.tolist() if isinstance(sample_strides, torch.Tensor) else list(sample_strides)
            strides = _check_strides("VisualTokenLayout.apply", given, x.shape[0])
        if x.shape[2] != self.grid_side**2:
            raise ValueError(f"VisualTokenLayout.apply: x has {x.shape[2]} tokens per frame, the layout "
                             f"expects a {self.grid_side} x {self.grid_side} grid")
        mask = check_frame_mask("VisualTokenLayout.apply", x, frame_mask)
        x, mask = _temporal_pool(x, self.temporal_pool_size, mask)
        x, mask = _spatial_pool(x, self.spatial_pool_stride, mask)
        return _with_mask(*_temporal_sample(x, strides, mask))
