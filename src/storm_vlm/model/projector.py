"""Vision-to-LLM projectors: STORM's Mamba temporal projector and the VILA MLP baseline.

Both take vision features (B, T, N̂, C) — B videos, T frames (T = 1 for an image), N̂ tokens per
frame on a row-major sqrt(N̂) x sqrt(N̂) grid, C = vision_dim channels — and return
(B, T, N, d_model) with N = ceil(sqrt(N̂) / downsample_ratio)**2 (an odd grid, such as a 384 px
SigLIP's 27 x 27, is padded with zeros first, as VILA does).

Padded batches pass ``frame_mask`` (B, T) bool, True for a real frame, padding as a suffix (a
real frame after a padded one is a ValueError). Each video then gets the output it gets alone
(exactly in float32; in bfloat16 within a rounding step, the padded path forming the scan's step
sizes apart), and padded frames come out as zeros.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from storm_vlm.model.compression import check_frame_mask, shuffled_grid_side
from storm_vlm.model.ssm import BiMambaMixer, MambaMixer
from storm_vlm.utils import check_int

__all__ = ["pixel_shuffle", "pixel_shuffled_tokens", "MLPProjector", "MambaTemporalProjector"]


def _grid_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"pixel_shuffle: N̂ = {num_tokens} tokens per frame is not a square grid")
    return side


def pixel_shuffled_tokens(num_tokens: int, ratio: int = 2) -> int:
    """Tokens per frame after ``pixel_shuffle`` of a square grid of ``num_tokens``: ceil(√N̂ / ratio)²."""
    check_int("num_tokens", num_tokens, 0)
    check_int("ratio", ratio)
    return shuffled_grid_side(_grid_side(num_tokens), ratio) ** 2


def pixel_shuffle(features: torch.Tensor, ratio: int = 2) -> torch.Tensor:
    """Space-to-channel: fold each ratio x ratio window of the token grid into one token.

    features: (B, T, N̂, C), N̂ a square grid (row-major)
    -> (B, T, g², C * ratio**2) with g = ceil(√N̂ / ratio), output tokens row-major over the coarse grid.

    A side that ``ratio`` does not divide (a 384 px SigLIP in 14 px patches: 27 x 27) is padded with
    zero tokens at the bottom and the right first, as VILA's ``DownSampleBlock`` does, so the last
    row and column of windows are part zeros.

    Channel order: output channel ``(dy * ratio + dx) * C + c`` holds channel c of the input token
    at offset (row dy, column dx) inside the window, i.e. the window's tokens are concatenated
    in row-major order (for ratio 2: top-left, top-right, bottom-left, bottom-right), the same
    layout as VILA's ``mlp_downsample``.
    """
    check_int("ratio", ratio)
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"pixel_shuffle: features must have shape (B, T, N̂, C), got {shape}")
    b, t, n, c = features.shape
    side = _grid_side(n)
    if ratio == 1:
        return features
    g = shuffled_grid_side(side, ratio)
    x = features.reshape(b, t, side, side, c)
    if g * ratio != side:
        pad = g * ratio - side
        x = torch.nn.functional.pad(x, (0, 0, 0, pad, 0, pad))
    x = x.reshape(b, t, g, ratio, g, ratio, c)
    x = x.permute(0, 1, 2, 4, 3, 5, 6)  # (B, T, gy, gx, dy, dx, C)
    return x.reshape(b, t, g * g, ratio * ratio * c)


def _prepare(features, frame_mask, vision_dim: int, ratio: int, dtype: torch.dtype):
    """Validate (padding must be a suffix: the scan reads a video's tokens from its first frame on),
    zero padded frames (so NaN/garbage there cannot leak), pixel-shuffle.

    Returns (x (B, T, N, C·ratio²), frame_mask or None when every frame is real).
    """
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must have shape (B, T, N̂, vision_dim={vision_dim}), got {shape}")
    if features.shape[-1] != vision_dim:
        raise ValueError(
            f"features have {features.shape[-1]} channels but the projector expects vision_dim={vision_dim} "
            f"(features shape {tuple(features.shape)})"
        )
    frame_mask = check_frame_mask("projector", features, frame_mask)
    if frame_mask is not None:
        if bool(frame_mask.all()):
            frame_mask = None
        else:
            features = torch.where(frame_mask[:, :, None, None], features, features.new_zeros(()))
    return pixel_shuffle(features.to(dtype), ratio), frame_mask


def _zero_padding(out: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    if frame_mask is None:
        return out
    return torch.where(frame_mask[:, :, None, None], out, out.new_zeros(()))


class MLPProjector(nn.Module):
    """VILA baseline: pixel shuffle -> LayerNorm(C·r²) -> Linear -> GELU -> Linear.

    forward(features (B, T, N̂, vision_dim), frame_mask (B, T) bool or None) -> (B, T, N̂/r², d_model).
    Tokens are projected independently; no information moves across tokens or frames.
    """

    def __init__(self, vision_dim: int, d_model: int, downsample_ratio: int = 2):
        super().__init__()
        self.vision_dim = check_int("vision_dim", vision_dim)
        self.d_model = check_int("d_model", d_model)
        self.downsample_ratio = check_int("downsample_ratio", downsample_ratio)
        in_dim = vision_dim * downsample_ratio**2
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, d_model)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_model, d_model)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, frame_mask = _prepare(features, frame_mask, self.vision_dim, self.downsample_ratio, self.fc1.weight.dtype)
        out = self.fc2(self.act(self.fc1(self.norm(x))))
        return _zero_padding(out, frame_mask)


class MambaBlock(nn.Module):
    """Pre-norm residual block ``x + Mixer(LayerNorm(x))`` on (B, L, d_model), token mask (B, L) bool."""

    def __init__(self, d_model: int, mixer: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = mixer

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None, state=None,
                return_state: bool = False):
        """With ``return_state`` (causal mixers only): ``(out, MambaState)``, continuing from ``state``."""
        if not return_state:
            return hidden_states + self.mixer(self.norm(hidden_states), mask=mask)
        out, new_state = self.mixer(self.norm(hidden_states), mask=mask, state=state, return_state=True)
        return hidden_states + out, new_state


class MambaTemporalProjector(nn.Module):
    """STORM's temporal projector: pixel shuffle -> Linear -> L x [x + Mixer(LayerNorm(x))] -> LayerNorm.

    The mixers run over each video's tokens flattened in sweep order (row-major inside a frame,
    then frame after frame; length T·N), so every output token can carry information from other
    frames: from all of them when ``bidirectional`` (BiMambaMixer), from earlier ones only when
    not (MambaMixer, the streaming variant).

    forward(features (B, T, N̂, vision_dim), frame_mask (B, T) bool or None) -> (B, T, N̂/r², d_model).
    Set ``gradient_checkpointing = True`` to recompute each block in backward while training (the
    model's `gradient_checkpointing_enable` does, and its `_gradient_checkpointing_func` with the
    options it was given, e.g. offloading, is what recomputes; non-reentrant `checkpoint` otherwise).
    ``divide_out`` (bidirectional only): halve the sum of the two scan directions, as Vim's released
    bidirectional models do (see ``BiMambaMixer``).
    """

    def __init__(
        self,
        vision_dim: int,
        d_model: int,
        num_layers: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        bidirectional: bool = True,
        downsample_ratio: int = 2,
        divide_out: bool = False,
    ):
        super().__init__()
        self.vision_dim = check_int("vision_dim", vision_dim)
        self.d_model = check_int("d_model", d_model)
        self.downsample_ratio = check_int("downsample_ratio", downsample_ratio)
        check_int("num_layers", num_layers, 0)
        self.bidirectional = bool(bidirectional)
        if divide_out and not self.bidirectional:
            raise ValueError("divide_out=True halves the sum of two scan directions: it needs bidirectional=True")
        self.divide_out = bool(divide_out)
        self.gradient_checkpointing = False
        self.in_proj = nn.Linear(vision_dim * downsample_ratio**2, d_model)
        self.layers = nn.ModuleList(
            MambaBlock(d_model, BiMambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand,
                                             divide_out=self.divide_out) if self.bidirectional
                       else MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand))
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(d_model)

    def forward(self, features: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, frame_mask = _prepare(
            features, frame_mask, self.vision_dim, self.downsample_ratio, self.in_proj.weight.dtype
        )
        b, t, n, _ = x.shape
        hidden = self.in_proj(x).reshape(b, t * n, self.d_model)
        token_mask = None
        if frame_mask is not None:
            token_mask = frame_mask[:, :, None].expand(b, t, n).reshape(b, t * n)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpoint:
                recompute = getattr(self, "_gradient_checkpointing_func", None) or \
                    functools.partial(checkpoint, use_reentrant=False)
                hidden = recompute(layer, hidden, token_mask)
            else:
                hidden = layer(hidden, token_mask)
        out = self.norm_out(hidden).reshape(b, t, n, self.d_model)
        return _zero_padding(out, frame_mask)

    def forward_chunk(self, features: torch.Tensor, states: list | None = None):
        """The next frames of videos already begun: streaming with the causal projector.

        features (B, T_c, N̂, vision_dim): the next T_c frames; ``states``: what the previous call
        returned (one ``MambaState`` per layer), None at a video's first frame. Returns
        ``(out (B, T_c, N, d_model), states)``. A chunk is a contiguous piece of the sweep order
        (its frames' tokens follow the earlier frames' ones), and everything but the mixers works
        token by token, so feeding a video chunk by chunk gives ``forward``'s outputs on the whole
        video. Only the causal projector (``bidirectional=False``) can: the bidirectional one reads
        the future (ValueError).
        """
        if self.bidirectional:
            raise ValueError("a bidirectional projector cannot encode a video chunk by chunk: its backward scan "
                             "reads frames that have not arrived yet (use projector_bidirectional=False)")
        if states is not None and len(states) != len(self.layers):
            raise ValueError(f"forward_chunk: {len(states)} states for {len(self.layers)} layers")
        x, _ = _prepare(features, None, self.vision_dim, self.downsample_ratio, self.in_proj.weight.dtype)
        b, t, n, _ = x.shape
        hidden = self.in_proj(x).reshape(b, t * n, self.d_model)
        new_states = []
        for i, layer in enumerate(self.layers):
            hidden, state = layer(hidden, None, None if states is None else states[i], return_state=True)
            new_states.append(state)
        return self.norm_out(hidden).reshape(b, t, n, self.d_model), new_states
