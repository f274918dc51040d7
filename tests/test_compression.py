import math

import pytest
import torch

from storm_vlm.model.compression import (
    pooled_num_frames,
    sampled_num_frames,
    spatial_pool,
    spatial_pooled_tokens,
    temporal_pool,
    temporal_sample,
)


def frames(values, n=1, d=1):
    """(1, T, n, d) tensor whose frame t is filled with values[t]."""
    v = torch.tensor(values, dtype=torch.float32)
    return v[None, :, None, None].expand(1, len(values), n, d).clone()


# ---------------------------------------------------------------- temporal_pool


def test_temporal_pool_full_groups():
    x = frames([1.0, 3.0, 10.0, 20.0])
    out = temporal_pool(x, 2)[0]
    assert out.shape == (1, 2, 1, 1)
    assert out.flatten().tolist() == [2.0, 15.0]


def test_temporal_pool_partial_last_group_averages_frames_it_has():
    x = frames([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    out = temporal_pool(x, 3)[0]
    assert out.shape == (1, 3, 1, 1)
    assert out.flatten().tolist() == [2.0, 5.0, 7.0]
    out = temporal_pool(frames([1.0, 2.0, 3.0, 4.0, 6.0]), 4)[0]
    assert out.flatten().tolist() == [2.5, 6.0]


def test_temporal_pool_keeps_tokens_and_channels_apart():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(1, 2, 4, 3)
    out = temporal_pool(x, 2)[0]
    assert out.shape == (1, 1, 4, 3)
    torch.testing.assert_close(out[0, 0], (x[0, 0] + x[0, 1]) / 2)


def test_temporal_pool_k1_and_k_larger_than_t():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(temporal_pool(x, 1)[0], x)
    torch.testing.assert_close(temporal_pool(x, 8)[0], x.mean(dim=1, keepdim=True))


def test_temporal_pool_mask_ignores_padding_even_nan():
    # video 0: 5 real frames; video 1: 2 real frames then NaN padding
    x = torch.cat([frames([1.0, 3.0, 5.0, 7.0, 9.0]), frames([2.0, 4.0, math.nan, math.nan, math.nan])])
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out, m = temporal_pool(x, 2, frame_mask=mask)
    assert out.shape == (2, 3, 1, 1)
    assert out[0].flatten().tolist() == [2.0, 6.0, 9.0]
    assert out[1, 0].item() == 3.0
    assert m.tolist() == [[True, True, True], [True, False, False]]
    # groups of padding only are zeros, not NaN
    assert out[1, 1:].flatten().tolist() == [0.0, 0.0]


def test_temporal_pool_mask_partial_group_of_real_frames():
    x = torch.cat([frames([1.0, 2.0, 3.0, 4.0]), frames([10.0, 20.0, 30.0, 99.0])])
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    out, m = temporal_pool(x, 2, frame_mask=mask)
    # video 1's second group has one real frame (30) and one padded (99): average is 30
    assert out[1].flatten().tolist() == [15.0, 30.0]
    assert m.tolist() == [[True, True], [True, True]]
    # and matches the video pooled alone
    torch.testing.assert_close(out[1:2], temporal_pool(frames([10.0, 20.0, 30.0]), 2)[0])


def test_temporal_pool_nan_in_real_frame_stays_nan():
    out = temporal_pool(frames([1.0, math.nan, 3.0, 4.0]), 2)[0]
    assert math.isnan(out[0, 0].item()) and out[0, 1].item() == 3.5
    out, _ = temporal_pool(frames([1.0, 2.0, math.inf]), 2, frame_mask=torch.ones(1, 3, dtype=torch.bool))
    assert math.isinf(out[0, 1].item())


def test_temporal_pool_gradient():
    x = frames([1.0, 2.0, 3.0]).requires_grad_()
    temporal_pool(x, 2)[0].sum().backward()
    assert x.grad.flatten().tolist() == [0.5, 0.5, 1.0]


# ---------------------------------------------------------------- spatial_pool


def test_spatial_pool_hand_computed_grid():
    # one frame, 4x4 grid of scalars 0..15 (row-major)
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 16, 1)
    out = spatial_pool(x, 2)[0]
    assert out.shape == (1, 1, 4, 1)
    # windows: {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    out = spatial_pool(x, 4)[0]
    assert out.flatten().tolist() == [7.5]


def test_spatial_pool_channels_and_frames_independent():
    x = torch.randn(2, 3, 36, 5)
    out = spatial_pool(x, 3)[0]
    assert out.shape == (2, 3, 4, 5)
    grid = x.reshape(2, 3, 6, 6, 5)
    torch.testing.assert_close(out[1, 2, 1], grid[1, 2, 0:3, 3:6].mean(dim=(0, 1)))
    torch.testing.assert_close(out[0, 0, 2], grid[0, 0, 3:6, 0:3].mean(dim=(0, 1)))
    torch.testing.assert_close(spatial_pool(x, 1)[0], x)


def test_spatial_pool_mask_passes_through():
    x = torch.randn(2, 3, 16, 2)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out, m = spatial_pool(x, 2, frame_mask=mask)
    assert out.shape == (2, 3, 4, 2)
    assert m.tolist() == mask.tolist()
    torch.testing.assert_close(out[1:2, :1], spatial_pool(x[1:2, :1], 2)[0])


# ---------------------------------------------------------------- temporal_sample


def test_temporal_sample_keeps_every_sth_frame():
    x = frames([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert temporal_sample(x, 3)[0].flatten().tolist() == [0.0, 3.0, 6.0]
    assert temporal_sample(x, 2)[0].flatten().tolist() == [0.0, 2.0, 4.0, 6.0]
    assert temporal_sample(x, 1)[0].flatten().tolist() == list(range(7))
    assert temporal_sample(x, 10)[0].flatten().tolist() == [0.0]


def test_temporal_sample_mask():
    x = torch.cat([frames([0.0, 1.0, 2.0, 3.0, 4.0]), frames([5.0, 6.0, 7.0, 0.0, 0.0])])
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out, m = temporal_sample(x, 2, frame_mask=mask)
    assert out[0].flatten().tolist() == [0.0, 2.0, 4.0]
    assert out[1, :2].flatten().tolist() == [5.0, 7.0]
    assert m.tolist() == [[True, True, True], [True, True, False]]


# ---------------------------------------------------------------- counting helpers


def test_counting_helpers_match_functions():
    for t in (1, 4, 7, 8, 16):
        for k in (1, 2, 3, 4):
            x = torch.zeros(1, t, 16, 1)
            assert pooled_num_frames(t, k) == temporal_pool(x, k)[0].shape[1]
            assert sampled_num_frames(t, k) == temporal_sample(x, k)[0].shape[1]
    assert spatial_pooled_tokens(256, 2) == 64
    assert spatial_pooled_tokens(256, 4) == 16
    assert spatial_pooled_tokens(256, 1) == 256
    with pytest.raises(ValueError, match="not divisible"):
        spatial_pooled_tokens(256, 3)
    with pytest.raises(ValueError, match="square"):
        spatial_pooled_tokens(200, 2)
    with pytest.raises(ValueError, match="num_frames"):
        pooled_num_frames(-1, 2)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [temporal_pool, spatial_pool, temporal_sample])
@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_bad_factor(fn, bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        fn(torch.zeros(1, 2, 4, 1), bad)


@pytest.mark.parametrize("fn", [temporal_pool, spatial_pool, temporal_sample])
def test_bad_rank(fn):
    with pytest.raises(ValueError, match=r"\(2, 4, 1\)"):
        fn(torch.zeros(2, 4, 1), 2)
    with pytest.raises(ValueError, match="Tensor"):
        fn([[1.0]], 2)


@pytest.mark.parametrize("fn", [temporal_pool, spatial_pool, temporal_sample])
def test_bad_mask(fn):
    x = torch.zeros(2, 3, 4, 1)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        fn(x, 2, frame_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="torch.int64"):
        fn(x, 2, frame_mask=torch.ones(2, 3, dtype=torch.long))


def test_spatial_pool_bad_grid():
    with pytest.raises(ValueError, match="N = 12"):
        spatial_pool(torch.zeros(1, 1, 12, 3), 2)
    with pytest.raises(ValueError, match="side 5.*stride 2"):
        spatial_pool(torch.zeros(1, 1, 25, 3), 2)


def test_temporal_sample_per_video_strides_packs_each_video_to_the_front():
    x = torch.stack([frames(list(range(7)))[0], frames([10.0 * i for i in range(7)])[0]])
    out, m = temporal_sample(x, [2, 3])
    assert out.shape == (2, 4, 1, 1)
    assert out[0].flatten().tolist() == [0.0, 2.0, 4.0, 6.0]
    assert out[1, :3].flatten().tolist() == [0.0, 30.0, 60.0]
    assert m.tolist() == [[True] * 4, [True, True, True, False]]
    # with a padded batch: video 1 has 4 real frames
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out, m = temporal_sample(x, [3, 2], frame_mask=mask)
    assert m.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert out[1, :2].flatten().tolist() == [0.0, 20.0]
    with pytest.raises(ValueError, match="3 strides for a batch of 2"):
        temporal_sample(x, [1, 2, 3])


# ---------------------------------------------------------------- VisualTokenLayout


def test_layout_counts_what_apply_produces():
    from storm_vlm.model.compression import VisualTokenLayout

    for k, p, s in [(1, 1, 1), (4, 1, 1), (4, 2, 2), (3, 1, 2), (1, 4, 3)]:
        layout = VisualTokenLayout(grid_side=8, temporal_pool_size=k, spatial_pool_stride=p, temporal_sample_stride=s)
        for t in (1, 5, 8, 13):
            out, m = layout.apply(torch.randn(1, t, 64, 3))
            assert out.shape[1] * out.shape[2] == layout.num_tokens(t) == int(m.sum()) * layout.tokens_per_frame
            assert out.shape[1] == layout.num_frames(t)


def test_layout_apply_equals_the_three_operations_in_order():
    from storm_vlm.model.compression import VisualTokenLayout

    layout = VisualTokenLayout(4, temporal_pool_size=2, spatial_pool_stride=2, temporal_sample_stride=2)
    x = torch.randn(2, 9, 16, 3)
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    a, am = temporal_pool(x, 2, frame_mask=mask)
    b, bm = spatial_pool(a, 2, frame_mask=am)
    want, wm = temporal_sample(b, 2, frame_mask=bm)
    got, gm = layout.apply(x, mask)
    torch.testing.assert_close(got[gm], want[wm])
    assert gm.tolist() == wm.tolist()
    got, gm = layout.apply(x, mask, sample_strides=[1, 2])  # video 1: 3 real pooled frames
    assert gm.tolist() == [[True] * 5, [True, True, False, False, False]]
    torch.testing.assert_close(got[1, 1], b[1, 2])


def test_layout_rows_dicts_and_the_0_1_0_processor_fields():
    from storm_vlm.model.compression import VisualTokenLayout

    layout = VisualTokenLayout(16, 4, 2, 1)
    assert VisualTokenLayout.from_row(layout.as_row()) == layout
    assert VisualTokenLayout.from_dict(layout.to_dict()) == layout
    legacy = {"image_size": 448, "patch_size": 14, "downsample_ratio": 2, "temporal_pool_size": 4,
              "spatial_pool_stride": 2, "temporal_sample_stride": 1}
    assert VisualTokenLayout.from_dict(legacy) == layout
    assert layout.with_sample_stride(2).temporal_sample_stride == 2 and layout.with_sample_stride(None) is layout
    assert layout.same_model(layout.with_sample_stride(3)) and not layout.same_model(VisualTokenLayout(16, 1, 2, 1))
    with pytest.raises(ValueError, match="does not divide"):
        VisualTokenLayout(6, spatial_pool_stride=4)
    with pytest.raises(ValueError, match="temporal_pool_size"):
        VisualTokenLayout(6, temporal_pool_size=0)
    with pytest.raises(ValueError, match="expected the fields"):
        VisualTokenLayout.from_dict({"grid_side": 4, "pool": 2})
