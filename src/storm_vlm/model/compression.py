"""Token compression for video features: temporal pooling, spatial pooling, temporal sampling.

All functions work on visual tokens ``x`` of shape (B, T, N, D): B videos, T frames, N tokens
per frame (a row-major sqrt(N) x sqrt(N) grid), D channels. They are pure tensor functions and
know nothing of models.

Padded batches: pass ``frame_mask`` (B, T) bool, True for a real frame. The functions then
return ``(x', mask')`` and padded frames never contribute to a real output frame, so a video in a
padded batch gets exactly the frames it gets alone (padding is expected as a suffix; other masks
work too, frame by frame). Output frames that hold no real frame are False in ``mask'``; their
values are zeros for ``temporal_pool`` and unspecified for the others.

The ``*_num_*`` helpers count output sizes from plain ints, for token bookkeeping without tensors.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "temporal_pool",
    "spatial_pool",
    "temporal_sample",
    "pooled_num_frames",
    "sampled_num_frames",
    "spatial_pooled_tokens",
]


def _check_factor(name: str, value) -> int:
    # bool is an int subclass; True as a pooling size is almost certainly a bug.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _check_x(fn: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: x must be a torch.Tensor of shape (B, T, N, D), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must have shape (B, T, N, D), got shape {tuple(x.shape)}")


def _check_mask(fn: str, x: torch.Tensor, frame_mask) -> None:
    if not isinstance(frame_mask, torch.Tensor):
        raise ValueError(f"{fn}: frame_mask must be a bool tensor of shape (B, T), got {type(frame_mask).__name__}")
    if frame_mask.dtype != torch.bool:
        raise ValueError(f"{fn}: frame_mask must have dtype torch.bool, got {frame_mask.dtype}")
    if tuple(frame_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{fn}: frame_mask shape {tuple(frame_mask.shape)} does not match x's (B, T) = "
            f"{tuple(x.shape[:2])} (x shape {tuple(x.shape)})"
        )


def _grid_side(fn: str, num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{fn}: N = {num_tokens} tokens per frame is not a square grid")
    return side


def pooled_num_frames(num_frames: int, k: int) -> int:
    """Frames left after ``temporal_pool(x, k)`` on ``num_frames`` frames: ceil(T / k)."""
    _check_size("num_frames", num_frames)
    _check_factor("k", k)
    return -(-num_frames // k)


def sampled_num_frames(num_frames: int, s: int) -> int:
    """Frames left after ``temporal_sample(x, s)`` on ``num_frames`` frames: ceil(T / s)."""
    _check_size("num_frames", num_frames)
    _check_factor("s", s)
    return -(-num_frames // s)


def spatial_pooled_tokens(num_tokens: int, stride: int) -> int:
    """Tokens per frame after ``spatial_pool(x, stride)``: N / stride**2 (N a square grid, side divisible by stride)."""
    _check_size("num_tokens", num_tokens)
    _check_factor("stride", stride)
    side = _grid_side("spatial_pool", num_tokens)
    if side % stride:
        raise ValueError(f"spatial_pool: grid side {side} (N = {num_tokens}) is not divisible by stride {stride}")
    return (side // stride) ** 2


def temporal_pool(x: torch.Tensor, k: int, frame_mask: torch.Tensor | None = None):
    """Average consecutive, non-overlapping groups of ``k`` frames.

    x: (B, T, N, D) -> (B, ceil(T / k), N, D). A last partial group is averaged over the frames it
    has. With ``frame_mask`` (B, T) bool, each group averages only its real frames and the result
    is ``(x', mask')`` with mask' (B, ceil(T / k)) True where a group holds a real frame; groups
    that are all padding are zeros. NaN/inf in real frames propagate; padded frames are never read.
    """
    _check_x("temporal_pool", x)
    _check_factor("k", k)
    if frame_mask is not None:
        _check_mask("temporal_pool", x, frame_mask)
    b, t, n, d = x.shape
    t_out = pooled_num_frames(t, k)
    if frame_mask is None:
        if t % k == 0:
            return x.reshape(b, t_out, k, n, d).mean(dim=2)
        weight = torch.ones(b, t, dtype=torch.bool, device=x.device)
    else:
        weight = frame_mask
    pad = t_out * k - t
    # where (not multiply) so that NaN/inf in padded frames cannot leak into real groups.
    xm = torch.where(weight[:, :, None, None], x, x.new_zeros(()))
    if pad:
        xm = torch.cat([xm, xm.new_zeros(b, pad, n, d)], dim=1)
        weight = torch.cat([weight, weight.new_zeros(b, pad)], dim=1)
    sums = xm.reshape(b, t_out, k, n, d).sum(dim=2)
    counts = weight.reshape(b, t_out, k).sum(dim=2)
    out = sums / counts.clamp(min=1).to(x.dtype)[:, :, None, None]
    if frame_mask is None:
        return out
    return out, counts > 0


def spatial_pool(x: torch.Tensor, stride: int, frame_mask: torch.Tensor | None = None):
    """Average-pool each frame's sqrt(N) x sqrt(N) token grid with kernel = stride = ``stride``.

    x: (B, T, N, D) with N a square grid whose side is divisible by ``stride`` ->
    (B, T, N / stride**2, D), tokens in row-major order. Frames are pooled independently, so with
    ``frame_mask`` (B, T) bool the result is ``(x', frame_mask)``.
    """
    _check_x("spatial_pool", x)
    _check_factor("stride", stride)
    if frame_mask is not None:
        _check_mask("spatial_pool", x, frame_mask)
    b, t, n, d = x.shape
    n_out = spatial_pooled_tokens(n, stride)
    if stride == 1:
        out = x
    else:
        side, s = math.isqrt(n), stride
        g = side // s
        out = x.reshape(b, t, g, s, g, s, d).mean(dim=(3, 5)).reshape(b, t, n_out, d)
    if frame_mask is None:
        return out
    return out, frame_mask


def temporal_sample(x: torch.Tensor, s: int, frame_mask: torch.Tensor | None = None):
    """Keep frames 0, s, 2s, ... (test-time temporal sampling).

    x: (B, T, N, D) -> (B, ceil(T / s), N, D). With ``frame_mask`` (B, T) bool the result is
    ``(x', frame_mask[:, ::s])``.
    """
    _check_x("temporal_sample", x)
    _check_factor("s", s)
    if frame_mask is not None:
        _check_mask("temporal_sample", x, frame_mask)
    out = x[:, ::s]
    if frame_mask is None:
        return out
    return out, frame_mask[:, ::s]
