"""STORM's token reduction as the paper defines it, seen from a caller: the Mamba projector's sweep
order, and what pooling and sampling accept. Pooling windows and sampled frames are counted from a
video's first frame, so a frame mask must pad at the end; a mask padding elsewhere is refused
instead of shifting windows or changing the token count the processor counted."""

import pytest
import torch
from helpers import TINY_CONFIG

from storm_vlm import StormConfig, StormForConditionalGeneration
from storm_vlm.model.compression import VisualTokenLayout, spatial_pool, temporal_pool, temporal_sample
from storm_vlm.model.projector import MambaTemporalProjector

C, D = 6, 16
LEFT_PADDED = torch.tensor([[True] * 5, [False, False, True, True, True]])  # video 1: 3 real frames, padding first


def influence(proj, frames: int, tokens: int, t: int, n: int) -> torch.Tensor:
    """(frames, tokens) bool: which input tokens reach output token (t, n) of `proj` (downsample 1)."""
    x = torch.randn(1, frames, tokens, C, requires_grad=True)
    out = proj(x)[0, t, n]
    # a random projection, not .sum(): the final LayerNorm makes d(sum)/dx vanish
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x)
    return grad[0].abs().sum(-1) > 0


def test_causal_projector_scans_row_major_within_a_frame_then_frame_after_frame():
    torch.manual_seed(0)
    proj = MambaTemporalProjector(C, D, num_layers=1, d_state=4, bidirectional=False, downsample_ratio=1)
    seen = influence(proj, frames=3, tokens=9, t=1, n=4)
    order = torch.arange(27).reshape(3, 9)  # sweep position of token (t, n)
    assert seen.tolist() == (order <= order[1, 4]).tolist()


def test_backward_scan_is_the_forward_scan_over_the_reversed_sweep():
    """With the backward direction's weights set to the forward ones, the bidirectional mixer is
    the forward scan plus the forward scan of the reversed sequence (frames and tokens), reversed."""
    torch.manual_seed(0)
    proj = MambaTemporalProjector(C, D, num_layers=1, d_state=4, bidirectional=True, downsample_ratio=1)
    mixer = proj.layers[0].mixer
    with torch.no_grad():
        for name in ("conv1d", "x_proj", "dt_proj"):
            getattr(mixer, name + "_b").load_state_dict(getattr(mixer, name).state_dict())
        mixer.A_b_log.copy_(mixer.A_log)
        mixer.D_b.copy_(mixer.D)
        hidden = torch.randn(2, 3 * 9, D)
        x, z, _ = mixer._in(hidden, None)
        forward, _ = mixer._direction(x, z, None, "", False)
        flipped, _ = mixer._direction(x.flip(1), z.flip(1), None, "", False)
        torch.testing.assert_close(mixer(hidden), mixer.out_proj(forward + flipped.flip(1)))
    # and every output token sees the whole video
    assert influence(proj, frames=3, tokens=9, t=1, n=4).all()


@pytest.mark.parametrize("op", [lambda x, m: temporal_pool(x, 2, m), lambda x, m: temporal_sample(x, 2, m),
                                lambda x, m: VisualTokenLayout(2, temporal_pool_size=2).apply(x, m)],
                         ids=["temporal_pool", "temporal_sample", "layout"])
def test_temporal_operations_refuse_padding_before_a_real_frame(op):
    x = torch.randn(2, 5, 4, 3)
    with pytest.raises(ValueError, match="padding as a suffix.*video 1 has a real frame at index 2"):
        op(x, LEFT_PADDED)
    op(x, torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))  # the same video padded at the end
    # spatial pooling works frame by frame: any mask passes through
    assert spatial_pool(x, 2, LEFT_PADDED)[1].tolist() == LEFT_PADDED.tolist()


def test_projector_and_model_refuse_padding_before_a_real_frame():
    proj = MambaTemporalProjector(C, D, num_layers=1, d_state=4)
    with pytest.raises(ValueError, match="projector: .*padding as a suffix"):
        proj(torch.randn(2, 5, 16, C), frame_mask=LEFT_PADDED)
    model = StormForConditionalGeneration(StormConfig(**TINY_CONFIG, temporal_pool_size=2)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="video_frame_mask: .*padding as a suffix"):
        model.get_video_features(torch.randn(2, 5, 3, 32, 32), LEFT_PADDED)  # refused before the vision tower


def test_layout_checks_per_video_sample_strides():
    layout = VisualTokenLayout(2)
    x = torch.arange(12.0).reshape(2, 6, 1, 1).expand(2, 6, 4, 1)
    with pytest.raises(ValueError, match="1 strides for a batch of 2"):  # not one stride for every video
        layout.apply(x, sample_strides=[3])
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=f"s must be an integer >= 1, got {bad}"):
            layout.apply(x, sample_strides=[1, bad])
    out, mask = layout.apply(x, sample_strides=torch.tensor([3, 2]))
    assert out[0, :2, 0, 0].tolist() == [0.0, 3.0] and out[1, :, 0, 0].tolist() == [6.0, 8.0, 10.0]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
