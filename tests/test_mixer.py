"""MambaMixer / BiMambaMixer: mamba-ssm parameter layout, causality, step, padding."""

import copy
import math

import pytest
import torch

from storm_vlm.model.projector import MambaTemporalProjector
from storm_vlm.model.ssm import BiMambaMixer, MambaMixer, selective_scan_reference
from storm_vlm.model.ssm import cpu_kernel
from storm_vlm.model.ssm import mixer as mixer_mod
from helpers import KERNEL_ISAS, use_kernel_library

D_MODEL = 16


def _mixer(cls, seed=0, **kw):
    torch.manual_seed(seed)
    m = cls(D_MODEL, **kw).double()
    # make every parameter matter (out_proj/D/biases are not zero) but keep the scan stable
    return m


def _x(b=2, L=9, seed=1):
    return torch.randn(b, L, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MAMBA_SHAPES = {  # mamba-ssm Mamba(d_model=16, d_state=16, d_conv=4, expand=2): d_inner 32, dt_rank 1
    "A_log": (32, 16),
    "D": (32,),
    "in_proj.weight": (64, 16),
    "conv1d.weight": (32, 1, 4),
    "conv1d.bias": (32,),
    "x_proj.weight": (33, 32),
    "dt_proj.weight": (32, 1),
    "dt_proj.bias": (32,),
    "out_proj.weight": (16, 32),
}


def test_parameter_names_and_shapes_match_mamba_ssm():
    shapes = {k: tuple(v.shape) for k, v in MambaMixer(D_MODEL).state_dict().items()}
    assert shapes == MAMBA_SHAPES
    bi = {k: tuple(v.shape) for k, v in BiMambaMixer(D_MODEL).state_dict().items()}
    extra = {k.replace("A_log", "A_b_log") if k == "A_log" else k.split(".")[0] + "_b" + k[len(k.split(".")[0]):]: s
             for k, s in MAMBA_SHAPES.items() if not k.startswith(("in_proj", "out_proj"))}
    assert bi == {**MAMBA_SHAPES, **extra}
    assert {"conv1d_b.weight", "x_proj_b.weight", "dt_proj_b.bias", "A_b_log", "D_b"} <= set(bi)


def test_options_change_shapes():
    m = MambaMixer(24, d_state=8, d_conv=3, expand=3, dt_rank=5, bias=True, conv_bias=False)
    sd = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert sd["in_proj.weight"] == (144, 24) and sd["in_proj.bias"] == (144,)
    assert sd["conv1d.weight"] == (72, 1, 3) and "conv1d.bias" not in sd
    assert sd["x_proj.weight"] == (5 + 16, 72) and sd["dt_proj.weight"] == (72, 5)
    assert sd["A_log"] == (72, 8) and sd["out_proj.bias"] == (24,)
    assert MambaMixer(40).dt_rank == math.ceil(40 / 16)


@pytest.mark.parametrize("cls", [MambaMixer, BiMambaMixer])
def test_initialisation_follows_mamba_ssm(cls):
    dt_min, dt_max = 0.002, 0.05
    m = cls(64, dt_min=dt_min, dt_max=dt_max)
    for sfx in ("", "_b") if cls is BiMambaMixer else ("",):
        A_log = getattr(m, "A_log" if not sfx else "A_b_log")
        torch.testing.assert_close(A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
        torch.testing.assert_close(getattr(m, "D" + sfx), torch.ones(128))
        dt = torch.nn.functional.softplus(getattr(m, "dt_proj" + sfx).bias)
        assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
        assert dt.std() > 0  # drawn, not constant
        w = getattr(m, "dt_proj" + sfx).weight
        assert w.abs().max() <= m.dt_rank ** -0.5
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def test_forward_matches_explicit_mamba_computation():
    """The slow-path formula of mamba-ssm's Mamba.forward, written out with the reference scan."""
    m = _mixer(MambaMixer)
    x = _x()
    L = x.shape[1]
    xz = (x @ m.in_proj.weight.T).transpose(1, 2)
    xi, z = xz.chunk(2, dim=1)
    xi = torch.nn.functional.silu(m.conv1d(xi)[..., :L])
    dt, B, C = torch.split(xi.transpose(1, 2) @ m.x_proj.weight.T, [m.dt_rank, 16, 16], dim=-1)
    dt = (dt @ m.dt_proj.weight.T).transpose(1, 2)
    y = selective_scan_reference(xi, dt, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2), m.D, z=z,
                                 delta_bias=m.dt_proj.bias, delta_softplus=True)
    expected = y.transpose(1, 2) @ m.out_proj.weight.T
    torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_c_conv_silu_equals_the_tensor_conv(isa, monkeypatch):
    """The one-pass C conv + SiLU of float32 inference, on each vector width the CPU runs: both
    directions, a carried prefix, ragged widths, sequences shorter than the kernel; the mixer with it."""
    lib = use_kernel_library(monkeypatch, isa)
    g = torch.Generator().manual_seed(0)
    calls = []
    real = lib.storm_dwconv_silu_f32
    monkeypatch.setattr(lib, "storm_dwconv_silu_f32", lambda *a: calls.append(a) or real(*a))
    for bsz, L, d, K, bias, reverse, prefix in [(2, 70, 37, 4, True, False, False), (2, 70, 37, 4, True, True, False),
                                                (1, 3, 40, 4, False, False, True), (2, 300, 48, 3, True, False, True),
                                                (1, 1, 16, 4, True, True, False)]:
        x = torch.randn(bsz, L, d, generator=g)
        w, b = torch.randn(d, 1, K, generator=g), torch.randn(d, generator=g) if bias else None
        pre = torch.randn(bsz, d, K - 1, generator=g).transpose(1, 2) if prefix else None  # a conv state's view
        with torch.no_grad():
            got = mixer_mod._conv_silu(x, w, b, reverse, pre)
        torch.testing.assert_close(got, torch.nn.functional.silu(mixer_mod._depthwise_conv(x, w, b, reverse, pre)),
                                   rtol=1e-5, atol=1e-6)
    assert len(calls) >= 5
    xz = torch.randn(2, 70, 74, generator=g)  # x as the mixer passes it: a column slice of in_proj's output
    x, w, b = xz[..., 37:], torch.randn(37, 1, 4, generator=g), torch.randn(37, generator=g)
    for reverse in (False, True):
        calls.clear()
        with torch.no_grad():
            got = mixer_mod._conv_silu(x, w, b, reverse)
        assert calls[-1][:2] == (x[1].data_ptr(), 74)  # read in place, rows 74 floats apart: no copy
        want = torch.nn.functional.silu(mixer_mod._depthwise_conv(x.contiguous(), w, b, reverse))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError):  # shapes that do not fit: the tensor conv's own error, no read out of bounds
        mixer_mod._conv_silu(torch.randn(1, 8, 40), torch.randn(16, 1, 4), None, False)
    x, w, b = torch.randn(1, 900, 40, generator=g), torch.randn(40, 1, 4, generator=g), torch.randn(40, generator=g)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = mixer_mod._conv_silu(x, w, b, False)
            torch.set_num_threads(3)  # three pieces of the time axis: the same bits
            assert torch.equal(mixer_mod._conv_silu(x, w, b, False), one)
    finally:
        torch.set_num_threads(threads)
    m = _mixer(BiMambaMixer).float()
    with torch.no_grad():
        calls.clear()
        fast = m(_x().float())
        assert len(calls) == 4  # both directions of both rows
        monkeypatch.setattr(cpu_kernel, "load_library", lambda *a, **k: None)
        torch.testing.assert_close(fast, m(_x().float()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_c_conv_silu_reads_bf16_inputs(isa, monkeypatch):
    """Under autocast in_proj's output is bf16: the C conv reads it as it is (a column slice, rows
    apart) and gives exactly the float32 kernel's result on its widened values rounded to bf16, both
    directions and with a carried prefix; the mixer under autocast takes it and stays as close to the
    float32 mixer as the tensor path under autocast."""
    lib = use_kernel_library(monkeypatch, isa)
    g = torch.Generator().manual_seed(3)
    calls = []
    real = lib.storm_dwconv_silu_bf16
    monkeypatch.setattr(lib, "storm_dwconv_silu_bf16", lambda *a: calls.append(a) or real(*a))
    xz = torch.randn(2, 70, 74, generator=g).bfloat16()
    x, w, b = xz[..., 37:], torch.randn(37, 1, 4, generator=g), torch.randn(37, generator=g)
    pre = torch.randn(2, 3, 37, generator=g)
    with torch.no_grad():
        for reverse, prefix in ((False, None), (True, None), (False, pre)):
            got = mixer_mod._conv_silu(x, w, b, reverse, prefix)
            assert got.dtype == torch.bfloat16 and calls[-1][:2] == (x[1].data_ptr(), 74)
            assert torch.equal(got, mixer_mod._conv_silu(x.float(), w, b, reverse, prefix).bfloat16())
    m = _mixer(BiMambaMixer).float()
    with torch.no_grad():
        exact = m(_x().float())
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = m(_x().float())
        assert len(calls) == 4
        monkeypatch.setattr(cpu_kernel, "load_library", lambda *a, **k: None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tensors = m(_x().float())
    assert (fast.float() - exact).abs().max() <= 1.5 * (tensors.float() - exact).abs().max()


def test_step_equals_forward():
    m = _mixer(MambaMixer)
    x = _x(b=2, L=10)
    full = m(x)
    conv_state, ssm_state = m.allocate_inference_cache(2, dtype=torch.float64)
    assert conv_state.shape == (2, 32, 4) and ssm_state.shape == (2, 32, 16)
    outs = []
    for t in range(x.shape[1]):
        out, conv_state, ssm_state = m.step(x[:, t], conv_state, ssm_state)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), full)
    # (B, 1, d_model) input as in mamba-ssm
    cs, ss = m.allocate_inference_cache(2, dtype=torch.float64)
    out, _, _ = m.step(x[:, :1], cs, ss)
    assert out.shape == (2, 1, D_MODEL)
    torch.testing.assert_close(out[:, 0], full[:, 0])


def test_last_position_reaches_first_output_only_when_bidirectional():
    x = _x(b=1, L=12)
    x2 = x.clone()
    x2[:, -1] += 1.0
    uni, bi = _mixer(MambaMixer), _mixer(BiMambaMixer)
    torch.testing.assert_close(uni(x2)[:, :-1], uni(x)[:, :-1], rtol=0, atol=0)
    assert (bi(x2)[:, 0] - bi(x)[:, 0]).abs().max() > 1e-6
    # and a change at the first position reaches the last output in both
    x3 = x.clone()
    x3[:, 0] += 1.0
    for m in (uni, bi):
        assert (m(x3)[:, -1] - m(x)[:, -1]).abs().max() > 1e-8


@pytest.mark.parametrize("cls", [MambaMixer, BiMambaMixer])
def test_padding_invariance(cls):
    m = _mixer(cls)
    lengths = [9, 4, 1]
    x = _x(b=3, L=9)
    x[1, 4:] = 123.0  # garbage in padding must not leak
    x[2, 1:] = float("nan")
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    x.requires_grad_()
    out = m(x, mask)
    w = torch.randn(out.shape, dtype=out.dtype)
    (out * w).sum().backward()
    for i, n in enumerate(lengths):
        xi = x.detach()[i : i + 1, :n].clone().requires_grad_()
        alone = m(xi)
        (alone * w[i : i + 1, :n]).sum().backward()
        torch.testing.assert_close(out[i, :n], alone[0], rtol=1e-10, atol=1e-10)
        assert torch.equal(out[i, n:], torch.zeros_like(out[i, n:]))
        torch.testing.assert_close(x.grad[i, :n], xi.grad[0], rtol=1e-10, atol=1e-10)
        assert torch.equal(x.grad[i, n:], torch.zeros_like(x.grad[i, n:]))


@pytest.mark.parametrize("cls", [MambaMixer, BiMambaMixer])
def test_gradients_flow_to_every_parameter(cls):
    m = cls(D_MODEL)
    m(torch.randn(2, 7, D_MODEL)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fast_and_reference_scan_give_the_same_mixer(monkeypatch):
    m = _mixer(BiMambaMixer)
    x = _x(b=2, L=21)
    fast = m(x)
    monkeypatch.setattr(mixer_mod._scan, "selective_scan", selective_scan_reference)
    torch.testing.assert_close(fast, m(x), rtol=1e-10, atol=1e-10)


def test_bad_inputs():
    m = MambaMixer(D_MODEL)
    with pytest.raises(ValueError, match=r"\(B, L, 16\).*\(2, 5, 8\)"):
        m(torch.zeros(2, 5, 8))
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\)"):
        m(torch.zeros(2, 5, D_MODEL), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        m(torch.zeros(2, 5, D_MODEL), torch.ones(2, 5))
    cs, ss = m.allocate_inference_cache(1)
    with pytest.raises(ValueError, match="conv_state"):
        m.step(torch.zeros(2, D_MODEL), cs, ss)
    with pytest.raises(NotImplementedError):
        BiMambaMixer(D_MODEL).step(torch.zeros(1, D_MODEL), cs, ss)


def test_bfloat16_autocast_runs():
    m = MambaMixer(D_MODEL)
    x = torch.randn(1, 6, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), m(x), rtol=5e-2, atol=5e-2)


def test_parallel_directions_match_serial(monkeypatch):
    m = _mixer(BiMambaMixer)
    x = _x(b=2, L=15)
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, 9:] = False
    serial = m(x, mask)
    monkeypatch.setattr(mixer_mod, "_PARALLEL_MIN_ELEMENTS", 0)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert m._parallel_ok(x)
        xr = x.clone().requires_grad_()
        par = m(xr, mask)
        par.sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(par, serial, rtol=1e-12, atol=1e-12)
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_inference_follows_parameter_updates():
    """A = -exp(A_log) and the conv taps, kept between calls where no gradient is recorded, follow
    in-place updates (an optimizer step) and loaded state dicts at the next call."""
    m = _mixer(BiMambaMixer).float()
    x = _x().float()
    with torch.no_grad():
        before = m(x)
        m.A_log.mul_(0.5)
        m.conv1d_b.weight.add_(0.1)
        got = m(x)
        assert not torch.equal(got, before) and torch.equal(got, copy.deepcopy(m)(x))
    other = _mixer(BiMambaMixer, seed=5).float()
    with torch.inference_mode():
        m(x)
        m.load_state_dict(other.state_dict())
        assert torch.equal(m(x), other(x))


def _vim_v2_state_dict(d_model=16, d_state=16, d_conv=4, expand=2, seed=3):
    """A state dict in the layout of Vim's bidirectional (bimamba_type "v2") Mamba, random values."""
    g = torch.Generator().manual_seed(seed)
    di, rank = expand * d_model, math.ceil(d_model / 16)
    sd = {"in_proj.weight": torch.randn(2 * di, d_model, generator=g) * 0.3,
          "out_proj.weight": torch.randn(d_model, di, generator=g) * 0.3}
    for sfx, a_key in (("", "A_log"), ("_b", "A_b_log")):
        sd.update({
            a_key: torch.log(torch.rand(di, d_state, generator=g) * 3 + 0.5),
            f"D{sfx}": torch.randn(di, generator=g),
            f"conv1d{sfx}.weight": torch.randn(di, 1, d_conv, generator=g) * 0.5,
            f"conv1d{sfx}.bias": torch.randn(di, generator=g) * 0.1,
            f"x_proj{sfx}.weight": torch.randn(rank + 2 * d_state, di, generator=g) * 0.2,
            f"dt_proj{sfx}.weight": torch.randn(di, rank, generator=g) * 0.5,
            f"dt_proj{sfx}.bias": torch.rand(di, generator=g) * 2 - 4,
        })
    return {k: v.double() for k, v in sd.items()}


def _vim_v2_forward(sd, hs, divide_out, d_state=16):
    """Vim's v2 forward re-stated in mamba-ssm's (batch, dim, L) layout with the reference scan: each
    direction is Mamba's conv -> x_proj -> dt_proj -> gated selective scan, the backward one on xz
    flipped along L (z included) and flipped back; out_proj((out + out_b) / 2 if divide_out else the sum)."""
    L = hs.shape[1]
    xz = sd["in_proj.weight"] @ hs.transpose(1, 2)  # (b, 2 d_inner, L)

    def direction(xz, sfx, a_key):
        x, z = xz.chunk(2, dim=1)
        w = sd[f"conv1d{sfx}.weight"]
        x = torch.nn.functional.conv1d(x, w, sd[f"conv1d{sfx}.bias"], padding=w.shape[-1] - 1, groups=w.shape[0])
        x = torch.nn.functional.silu(x[..., :L])
        x_dbl = x.transpose(1, 2) @ sd[f"x_proj{sfx}.weight"].T
        dt, B, C = torch.split(x_dbl, [x_dbl.shape[-1] - 2 * d_state, d_state, d_state], dim=-1)
        dt = sd[f"dt_proj{sfx}.weight"] @ dt.transpose(1, 2)
        # A, D and the dt bias in float32, as Vim (and mamba-ssm) pass them
        return selective_scan_reference(x, dt, -torch.exp(sd[a_key].float()), B.transpose(1, 2), C.transpose(1, 2),
                                        sd[f"D{sfx}"].float(), z=z, delta_bias=sd[f"dt_proj{sfx}.bias"].float(),
                                        delta_softplus=True)

    y = direction(xz, "", "A_log") + direction(xz.flip(-1), "_b", "A_b_log").flip(-1)
    if divide_out:
        y = y / 2
    return y.transpose(1, 2) @ sd["out_proj.weight"].T


@pytest.mark.parametrize("divide_out", [False, True])
def test_vim_v2_state_dict_reproduces_vim_formula(divide_out):
    sd = _vim_v2_state_dict()
    m = BiMambaMixer(D_MODEL, divide_out=divide_out).double()
    m.load_state_dict(sd, strict=True)
    x = _x(b=2, L=11)
    torch.testing.assert_close(m(x), _vim_v2_forward(sd, x, divide_out), rtol=1e-10, atol=1e-10)
    assert m.divide_out is divide_out and f"divide_out={divide_out}" in repr(m)


def test_divide_out_halves_the_output_and_reaches_the_projector():
    sd = _vim_v2_state_dict()
    halves, sums = BiMambaMixer(D_MODEL, divide_out=True).double(), BiMambaMixer(D_MODEL).double()
    halves.load_state_dict(sd)
    sums.load_state_dict(sd)
    assert sums.divide_out is False
    x = _x(b=1, L=7)
    torch.testing.assert_close(halves(x) * 2, sums(x), rtol=1e-12, atol=1e-12)
    proj = MambaTemporalProjector(8, D_MODEL, num_layers=2, divide_out=True)
    assert proj.divide_out and all(layer.mixer.divide_out for layer in proj.layers)
    assert not any(layer.mixer.divide_out for layer in MambaTemporalProjector(8, D_MODEL).layers)
    with pytest.raises(ValueError, match="bidirectional"):
        MambaTemporalProjector(8, D_MODEL, bidirectional=False, divide_out=True)
