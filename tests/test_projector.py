import math

import pytest
import torch

from storm_vlm.model.projector import MambaTemporalProjector, MLPProjector, pixel_shuffle, pixel_shuffled_tokens

C, D = 6, 16  # vision_dim, d_model of the tiny projectors


def make(kind, **kw):
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPProjector(C, D, **kw)
    return MambaTemporalProjector(C, D, d_state=4, bidirectional=(kind == "bi"), **kw)


KINDS = ["mlp", "bi", "uni"]


# ---------------------------------------------------------------- pixel_shuffle


def test_pixel_shuffle_hand_built_grid():
    # 4x4 grid, token value = 10*row + col, channels (v, -v)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    v = (10 * rows + cols).flatten().float()
    feats = torch.stack([v, -v], dim=-1)[None, None]  # (1, 1, 16, 2)
    out = pixel_shuffle(feats, 2)
    assert out.shape == (1, 1, 4, 8)
    # coarse token (0, 1) = window rows 0-1, cols 2-3: top-left, top-right, bottom-left, bottom-right
    assert out[0, 0, 1].tolist() == [2, -2, 3, -3, 12, -12, 13, -13]
    # coarse tokens are row-major: (1, 0) is index 2
    assert out[0, 0, 2].tolist() == [20, -20, 21, -21, 30, -30, 31, -31]
    assert out[0, 0, 3, ::2].tolist() == [22, 23, 32, 33]


def test_pixel_shuffle_ratio_and_batch_frames():
    x = torch.randn(2, 3, 36, 5)
    out = pixel_shuffle(x, 3)
    assert out.shape == (2, 3, 4, 45)
    grid = x.reshape(2, 3, 6, 6, 5)
    # coarse (1, 0), offset (dy=2, dx=1) -> channel block 2*3+1
    torch.testing.assert_close(out[1, 2, 2, 7 * 5 : 8 * 5], grid[1, 2, 3 + 2, 0 + 1])
    torch.testing.assert_close(pixel_shuffle(x, 1), x)
    assert pixel_shuffled_tokens(1024, 2) == 256 and pixel_shuffled_tokens(36, 3) == 4


def test_pixel_shuffle_pads_an_odd_grid_with_zeros():
    """A 384 px SigLIP's 27 x 27 grid: zero tokens below and right of it, as VILA's DownSampleBlock."""
    x = torch.randn(2, 3, 25, 4)  # 5 x 5
    out = pixel_shuffle(x, 2)
    assert out.shape == (2, 3, 9, 16) and pixel_shuffled_tokens(25, 2) == 9 and pixel_shuffled_tokens(729, 2) == 196
    padded = torch.zeros(2, 3, 6, 6, 4)
    padded[:, :, :5, :5] = x.reshape(2, 3, 5, 5, 4)
    torch.testing.assert_close(out, pixel_shuffle(padded.reshape(2, 3, 36, 4), 2))
    # the corner window holds the grid's last token, then three zero tokens
    torch.testing.assert_close(out[:, :, 8, :4], x[:, :, 24])
    assert not out[:, :, 8, 4:].any()
    # the last coarse column's windows: their right half is padding
    assert not out[:, :, 2, 4:8].any() and not out[:, :, 2, 12:].any()


def test_pixel_shuffle_bad_input():
    with pytest.raises(ValueError, match="N̂ = 15"):
        pixel_shuffle(torch.zeros(1, 1, 15, 2))
    with pytest.raises(ValueError, match=r"\(1, 16, 2\)"):
        pixel_shuffle(torch.zeros(1, 16, 2))
    with pytest.raises(ValueError, match="ratio.*0"):
        pixel_shuffle(torch.zeros(1, 1, 16, 2), 0)
    with pytest.raises(ValueError, match="square"):
        pixel_shuffled_tokens(10, 2)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_image_and_video(kind):
    proj = make(kind)
    image = proj(torch.randn(2, 1, 16, C))
    assert image.shape == (2, 1, 4, D)
    video = proj(torch.randn(1, 5, 64, C))
    assert video.shape == (1, 5, 16, D)
    assert torch.isfinite(video).all()


def test_downsample_ratio_one_and_module_names():
    proj = MambaTemporalProjector(C, D, num_layers=2, d_state=4, downsample_ratio=1)
    assert proj(torch.randn(1, 2, 9, C)).shape == (1, 2, 9, D)
    names = set(dict(proj.named_parameters()))
    assert {"in_proj.weight", "layers.0.norm.weight", "layers.1.mixer.A_b_log", "norm_out.weight"} <= names
    mlp_names = set(dict(MLPProjector(C, D).named_parameters()))
    assert mlp_names == {"norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


# ---------------------------------------------------------------- temporal mixing


def test_bidirectional_sees_future_unidirectional_does_not():
    torch.manual_seed(1)
    feats = torch.randn(1, 3, 16, C)
    changed = feats.clone()
    changed[:, -1] += torch.randn(1, 16, C)
    bi, uni, mlp = make("bi"), make("uni"), make("mlp")
    with torch.no_grad():
        assert not torch.allclose(bi(feats)[:, 0], bi(changed)[:, 0], atol=1e-5)
        torch.testing.assert_close(uni(feats)[:, :2], uni(changed)[:, :2], rtol=0, atol=1e-6)
        # ... but the unidirectional one does mix earlier frames into later ones
        early = feats.clone()
        early[:, 0] += 1.0
        assert not torch.allclose(uni(feats)[:, -1], uni(early)[:, -1], atol=1e-5)
        torch.testing.assert_close(mlp(feats)[:, -1], mlp(early)[:, -1], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_each_video_alone(kind):
    proj = make(kind)
    torch.manual_seed(2)
    long, short = torch.randn(1, 4, 16, C), torch.randn(1, 2, 16, C)
    batch = torch.cat([long, torch.cat([short, torch.full((1, 2, 16, C), math.nan)], dim=1)])
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    with torch.no_grad():
        out = proj(batch, frame_mask=mask)
        torch.testing.assert_close(out[0:1], proj(long), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[1:2, :2], proj(short), rtol=1e-5, atol=1e-6)
    assert (out[1, 2:] == 0).all()
    # an all-True mask is the same as no mask
    torch.testing.assert_close(proj(long, frame_mask=torch.ones(1, 4, dtype=torch.bool)), proj(long))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    proj = make(kind)
    feats = torch.randn(2, 2, 16, C, requires_grad=True)
    mask = torch.tensor([[True, True], [True, False]])
    out = proj(feats, frame_mask=mask)
    # a random projection, not .sum(): the final LayerNorm makes d(sum)/dx vanish
    (out * torch.randn_like(out)).sum().backward()
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert feats.grad[1, 1].abs().sum() == 0  # padding gets no gradient
    assert feats.grad[1, 0].abs().sum() > 0


def test_gradient_checkpointing_same_grads_and_recomputes_blocks():
    proj = make("bi")
    assert proj.gradient_checkpointing is False
    proj.train()
    calls = []
    for layer in proj.layers:
        layer.mixer.register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recompute stops early
    feats = torch.randn(1, 2, 16, C)
    weight = torch.randn(1, 2, 4, D)
    (proj(feats) * weight).sum().backward()
    ref = {n: p.grad.clone() for n, p in proj.named_parameters()}
    assert len(calls) == 2
    proj.zero_grad()
    proj.gradient_checkpointing = True
    (proj(feats) * weight).sum().backward()
    assert len(calls) == 2 + 4  # each block ran again in backward
    for n, p in proj.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)
    calls.clear()
    proj.eval()
    with torch.no_grad():
        proj(feats)
    assert len(calls) == 2


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input(kind):
    proj = make(kind)
    with pytest.raises(ValueError, match=r"7 channels.*vision_dim=6"):
        proj(torch.zeros(1, 1, 16, 7))
    with pytest.raises(ValueError, match=r"\(1, 16, 6\)"):
        proj(torch.zeros(1, 16, C))
    with pytest.raises(ValueError, match="N̂ = 12"):
        proj(torch.zeros(1, 1, 12, C))
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 2\)"):
        proj(torch.zeros(1, 2, 16, C), frame_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.int64"):
        proj(torch.zeros(1, 2, 16, C), frame_mask=torch.ones(1, 2, dtype=torch.long))


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="downsample_ratio.*0"):
        MLPProjector(C, D, downsample_ratio=0)
    with pytest.raises(ValueError, match="vision_dim.*2.5"):
        MambaTemporalProjector(2.5, D)


def test_nan_in_real_frame_is_not_hidden():
    proj = make("bi")
    feats = torch.randn(1, 2, 16, C)
    feats[0, 0, 3, 0] = math.nan
    with torch.no_grad():
        assert torch.isnan(proj(feats)).any()


def test_divide_out_is_a_saved_config_switch(tmp_path):
    from storm_vlm import StormConfig, StormForConditionalGeneration
    from helpers import TINY_CONFIG

    model = StormForConditionalGeneration(StormConfig(**TINY_CONFIG, projector_divide_out=True))
    assert all(layer.mixer.divide_out for layer in model.projector.layers)
    model.save_pretrained(tmp_path)
    assert StormConfig.from_pretrained(tmp_path).projector_divide_out is True
    assert StormForConditionalGeneration.from_pretrained(tmp_path).projector.layers[0].mixer.divide_out
