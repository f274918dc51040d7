"""The selective scan, the depthwise causal conv and the bidirectional mixer against the reference
projects' own definitions, test grids and tolerances: mamba-ssm's ``selective_scan_ref``
(tests/ops/test_selective_scan.py), causal-conv1d's ``causal_conv1d_ref`` (tests/test_causal_conv1d.py)
and Vim's bimamba "v2" mixer. Every case runs on each C kernel build this CPU runs and on the
pure-PyTorch path, forward and gradients, in float32 and bfloat16. The default run takes a
representative slice of each grid; the full grids are marked slow."""

import contextlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from helpers import KERNEL_ISAS, isa_runs
from storm_vlm.model.ssm import BiMambaMixer, MambaMixer, cpu_kernel, selective_scan
from storm_vlm.model.ssm import mixer as mixer_mod
from test_mixer import _vim_v2_forward, _vim_v2_state_dict

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def paths():
    """(name, library) of every kernel build this CPU runs, then ("pytorch", None): the tensor path."""
    libs = [] if cpu_kernel._compiler() is None else [(i, cpu_kernel.build(i)) for i in KERNEL_ISAS if isa_runs(i)]
    return [*libs, ("pytorch", None)]


@contextlib.contextmanager
def on_path(monkeypatch, lib):
    """The scan, the conv and the mixers use ``lib`` (None: no kernel) inside the block."""
    with monkeypatch.context() as m:
        m.setattr(cpu_kernel, "load_library", lambda *a, **k: lib)
        yield


def _close(name, got, want, rtol, atol):
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, reference {want.dtype}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _leaves(t: dict) -> dict:
    """t's tensors as differentiable views with their strides (gaps included) into fresh buffers that
    require grad: what the code under test reads is laid out as given."""
    views = {}
    for k, v in t.items():
        if v is not None:
            size = 1 + v.storage_offset() + sum((n - 1) * s for n, s in zip(v.shape, v.stride()))
            buf = torch.zeros(size, dtype=v.dtype)
            buf.as_strided(v.shape, v.stride(), v.storage_offset()).copy_(v)
            views[k] = buf.requires_grad_().as_strided(v.shape, v.stride(), v.storage_offset())
    return views


def _grads(out, extra, leaves: dict, seed=7) -> dict:
    """Gradients of <out, g> (+ <extra, g'>) for random g, g' in out's (extra's) dtype."""
    gen = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=gen).to(out.dtype).float()).sum()
    if extra is not None:
        loss = loss + (extra.float() * torch.randn(extra.shape, generator=gen).to(extra.dtype).float()).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


# ----------------------------------------------------------------------------- selective scan (mamba-ssm)
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """mamba-ssm's definition: everything in float32 whatever the input dtype; B, C per step
    (batch, N, L), grouped (batch, G, N, L) (channel d reads group d // (dim / G)) or constant (dim, N);
    out in u's dtype, the last state float32."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, _ = u.shape

    def per_channel(X):  # (batch, dim, N, L), or constant (dim, N)
        X = X.float()
        X = X.unsqueeze(1) if X.dim() == 3 else X
        return X if X.dim() == 2 else X.repeat_interleave(dim // X.shape[1], dim=1)

    B, C = per_channel(B), per_channel(C)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.float()))
    deltaB_u = torch.einsum("bdl,dn,bdl->bdln" if B.dim() == 2 else "bdl,bdnl,bdl->bdln", delta, B, u)
    C_steps = C[None, :, :, None].expand(batch, dim, -1, u.shape[2]) if C.dim() == 2 else C
    x = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for dA, dBu, Ct in zip(deltaA.unbind(2), deltaB_u.unbind(2), C_steps.unbind(3)):
        x = dA * x + dBu
        ys.append((x * Ct).sum(-1))
    out = torch.stack(ys, dim=2) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def scan_inputs(itype, batch, dim, dstate, L, var_B, var_C, groups, has_D, has_z, has_bias, sliced, seed=0):
    """Inputs drawn as mamba-ssm's test draws them: A = -0.5 U(0, 1), delta = 0.5 U(0, 1), the rest
    normal; u, delta, z and per-step B, C in ``itype``, A, D, delta_bias and constant B, C float32.
    ``sliced``: u, delta, z, B and C are views into wider tensors (channel and time strides
    other than their shapes', as in-place slices of a projection's output are)."""
    g = torch.Generator().manual_seed(seed)

    def act(*shape, scale=None):
        if not sliced:
            x = torch.randn(*shape, generator=g) if scale is None else scale * torch.rand(*shape, generator=g)
            return x.to(itype)
        b, d, n = shape  # a (b, n + 9, d) time-major buffer, read at columns [3, 3 + d) and rows [5, 5 + n)
        x = torch.randn(b, n + 9, d + 7, generator=g) if scale is None else scale * torch.rand(b, n + 9, d + 7,
                                                                                               generator=g)
        return x.to(itype)[:, 5:5 + n, 3:3 + d].transpose(1, 2)

    def bc(var):
        if not var:
            return torch.randn(dim, dstate, generator=g)
        if groups == 1:
            return act(batch, dstate, L)
        return torch.stack([act(batch, dstate, L) for _ in range(groups)], dim=1)

    return dict(u=act(batch, dim, L), delta=act(batch, dim, L, scale=0.5),
                A=-0.5 * torch.rand(dim, dstate, generator=g), B=bc(var_B), C=bc(var_C),
                D=torch.randn(dim, generator=g) if has_D else None, z=act(batch, dim, L) if has_z else None,
                delta_bias=0.5 * torch.rand(dim, generator=g) if has_bias else None)


def check_scan(monkeypatch, paths, itype, batch, dim, dstate, L, var_B, var_C, groups, has_D, has_z, has_bias,
               softplus, last, sliced):
    """One point of the grid on every path, at mamba-ssm's tolerances (its gradient ones included)."""
    t = scan_inputs(itype, batch, dim, dstate, L, var_B, var_C, groups, has_D, has_z, has_bias, sliced)
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-2, 5e-2)
    rtolw, atolw = (max(1e-3, rtol), max(1e-3, atol)) if has_z else (1e-3, 1e-3)
    tols = dict(u=(2 * rtol, 2 * atol), delta=(5 * rtol, 10 * atol), A=(rtolw, 5 * atolw),
                B=(rtol, atol) if var_B else (rtolw, atolw), C=(rtol, atol) if var_C else (rtolw, atolw),
                D=(rtolw, atolw), z=(rtolw, atolw), delta_bias=(rtolw, atolw))

    def run(fn):
        leaves = _leaves(t)
        res = fn(**{**dict.fromkeys(t), **leaves}, delta_softplus=softplus, return_last_state=last)
        out, state = res if last else (res, None)
        return out, state, _grads(out, state, leaves)

    want, want_state, want_grads = run(selective_scan_ref)
    for name, lib in paths:
        with on_path(monkeypatch, lib):
            with torch.no_grad():
                res = selective_scan(**t, delta_softplus=softplus, return_last_state=last)
            got, state, grads = run(selective_scan)
        for out in (res[0] if last else res, got):
            _close(f"{name} out", out, want, rtol, atol)
        if last:
            _close(f"{name} last state", res[1], want_state, rtol, atol)
            _close(f"{name} last state", state, want_state, rtol, atol)
        for k, (rt, at) in tols.items():
            if k in grads:
                _close(f"{name} d{k}", grads[k], want_grads[k], rt, at)


SCAN_SLICE = [
    # batch, dim, dstate, L, var_B, var_C, groups, D, z, delta_bias, softplus, last state, sliced
    (2, 4, 8, 128, True, True, 1, True, True, True, True, True, False),  # mamba-ssm's own point
    (2, 4, 8, 33, True, True, 2, True, True, True, True, True, True),  # grouped, odd L, strided views
    (2, 4, 8, 1, True, True, 1, True, True, True, True, True, False),  # L = 1
    (1, 4, 3, 2, False, True, 1, False, False, False, False, False, False),  # batch 1, N = 3, constant B, bare
    (2, 37, 5, 70, True, False, 1, True, False, True, True, True, True),  # ragged vectors, constant C, strided
    (2, 8, 17, 9, False, False, 1, True, True, False, True, False, False),  # constant B and C, N = 17
    (1, 6, 8, 40, True, True, 3, False, True, True, False, True, True),  # 3 groups, no softplus
]


@pytest.mark.parametrize("itype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SCAN_SLICE, ids=[f"L{c[3]}-N{c[2]}-d{c[1]}" for c in SCAN_SLICE])
def test_scan_matches_mamba_ssm_reference(monkeypatch, paths, case, itype):
    check_scan(monkeypatch, paths, itype, *case)


def _scan_grid():
    """mamba-ssm's full grid (every flag both ways; grouped B/C only when both are per step) at short
    lengths, and its long lengths with every flag on, as its current test runs them."""
    for itype, L, var_B, var_C, groups, *flags in itertools.product(
            [torch.float32, BF16], [1, 2, 8, 33, 128], [False, True], [False, True], [1, 2], *[[False, True]] * 5):
        if groups == 1 or (var_B and var_C):
            yield itype, 2, 4, 8, L, var_B, var_C, groups, *flags, L == 33
    for itype, L, groups in itertools.product([torch.float32, BF16], [256, 372, 1134, 4096], [1, 2]):
        yield itype, 2, 4, 8, L, True, True, groups, True, True, True, True, True, False


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_scan_grid()))
def test_scan_full_mamba_ssm_grid(monkeypatch, paths, case):
    check_scan(monkeypatch, paths, *case)


# ----------------------------------------------------------------------------- causal conv (causal-conv1d)
def causal_conv1d_ref(x, weight, bias=None, initial_states=None, activation=None):
    """causal-conv1d's definition: x (batch, dim, L), weight (dim, width), initial_states
    (batch, dim, width - 1) in front of x (zeros without), computed in the weight's dtype and rounded
    to x's once, after the activation (None or "silu")."""
    dtype_in, L = x.dtype, x.shape[-1]
    dim, width = weight.shape
    x = x.to(weight.dtype)
    front = x.new_zeros(x.shape[0], dim, width - 1) if initial_states is None else initial_states.to(weight.dtype)
    out = F.conv1d(torch.cat([front, x], dim=-1), weight.unsqueeze(1), bias, groups=dim)[..., :L]
    return (out if activation is None else F.silu(out)).to(dtype_in)


def check_conv(monkeypatch, paths, itype, dim, L, width, has_bias, silu, channel_last, initial, reverse):
    """Our conv on time-major x (batch, L, dim) (``mixer._conv_silu``, or ``mixer._depthwise_conv``
    without the activation) against the reference, on every path without autograd and with autograd
    (the tensor path), at causal-conv1d's tolerances. ``channel_last``: x a column slice of a
    (batch, L, wider) tensor, else a (batch, dim, L) tensor's transpose; ``reverse``: the
    anti-causal conv, the reference's on x flipped along L, flipped back."""
    g = torch.Generator().manual_seed(0)
    if channel_last:
        x = torch.randn(2, L, dim + 96, generator=g).to(itype)[:, :, 64:64 + dim]
    else:
        x = torch.randn(2, dim + 96, L, generator=g).to(itype)[:, 64:64 + dim].transpose(1, 2)
    t = dict(x=x, weight=torch.randn(dim, width, generator=g),
             bias=torch.randn(dim, generator=g) if has_bias else None,
             prefix=torch.randn(2, width - 1, dim, generator=g).to(itype) if initial else None)
    rtol, atol = (3e-4, 1e-3) if itype == torch.float32 else (1e-2, 5e-2)
    tols = dict(x=(rtol, atol), prefix=(rtol, atol), weight=(1e-3, 1e-3), bias=(1e-3, 1e-3))

    def ours(x, weight, bias=None, prefix=None):
        if silu:
            return mixer_mod._conv_silu(x, weight[:, None], bias, reverse, prefix)
        return mixer_mod._depthwise_conv(x, weight[:, None], bias, reverse, prefix).to(x.dtype)

    def ref(x, weight, bias=None, prefix=None):
        x = x.transpose(1, 2)
        out = causal_conv1d_ref(x.flip(-1) if reverse else x, weight, bias,
                                None if prefix is None else prefix.transpose(1, 2), "silu" if silu else None)
        return (out.flip(-1) if reverse else out).transpose(1, 2)

    def run(fn):
        leaves = _leaves(t)
        out = fn(**leaves)
        return out, _grads(out, None, leaves)

    want, want_grads = run(ref)
    for name, lib in paths:
        with on_path(monkeypatch, lib), torch.no_grad():
            _close(f"{name} out", ours(**t), want, rtol, atol)
    with on_path(monkeypatch, None):
        got, grads = run(ours)
    _close("autograd out", got, want, rtol, atol)
    for k, (rt, at) in tols.items():
        if k in grads:
            _close(f"d{k}", grads[k], want_grads[k], rt, at)


CONV_SLICE = [
    # dim, L, width, bias, silu, channel_last, initial states, reverse
    (64, 151, 4, True, True, True, True, False),
    (64, 129, 3, False, True, False, False, True),
    (37, 2, 4, True, True, True, True, False),  # L < width - 1: the initial states reach the last output
    (37, 1, 2, True, False, False, False, False),
    (64, 8, 2, False, False, True, True, False),
    (4128, 16, 4, True, True, True, False, True),  # causal-conv1d's wide dim
]


@pytest.mark.parametrize("itype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CONV_SLICE, ids=[f"d{c[0]}-L{c[1]}-w{c[2]}" for c in CONV_SLICE])
def test_conv_matches_causal_conv1d_reference(monkeypatch, paths, case, itype):
    check_conv(monkeypatch, paths, itype, *case)


def test_bf16_conv_is_rounded_once_with_and_without_autograd(monkeypatch, paths):
    """bf16 activations with float32 weights (in_proj's output under autocast): the conv, its bias and
    the SiLU are computed in float32 and rounded to bf16 once, so training (autograd, the tensor path)
    and inference (the C kernel) see the same activations, those of causal-conv1d."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 64, generator=g).to(BF16)
    w, b, pre = torch.randn(64, 1, 4, generator=g), torch.randn(64, generator=g), torch.randn(2, 3, 64, generator=g)
    for reverse, prefix in ((False, None), (True, None), (False, pre.to(BF16))):
        want = F.silu(mixer_mod._depthwise_conv(x.float(), w, b, reverse, prefix)).to(BF16)
        for name, lib in paths:
            with on_path(monkeypatch, lib):
                with torch.no_grad():
                    torch.testing.assert_close(mixer_mod._conv_silu(x, w, b, reverse, prefix), want)
                trained = mixer_mod._conv_silu(x.clone().requires_grad_(), w, b, reverse, prefix)
                torch.testing.assert_close(trained, want, msg=lambda m: f"{name}, with autograd: {m}")


def _conv_grid():
    for itype, dim, L, width, *flags in itertools.product(
            [torch.float32, BF16], [64, 4096 + 32], [1, 2, 8, 32, 129, 151, 372, 1024], [2, 3, 4],
            *[[False, True]] * 5):  # causal-conv1d's lengths, every other one
        channel_last, initial, reverse = flags[2:]
        if (initial and (reverse or not channel_last)) or (dim > 64 and L not in (1, 2, 129, 1024)):
            continue  # initial states are the causal direction's (channel-last, as causal-conv1d's)
        yield itype, dim, L, width, *flags


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_conv_grid()))
def test_conv_full_causal_conv1d_grid(monkeypatch, paths, case):
    check_conv(monkeypatch, paths, *case)


# ----------------------------------------------------------------------------- mixers (Vim v2, mamba-ssm state)
def check_vim_mixer(monkeypatch, paths, d_model, d_state, d_conv, L, batch, divide_out):
    """A float32 BiMambaMixer holding a Vim v2 state dict against Vim's formula in float64, output and
    the gradients of the input and of every parameter (matched to the state dict by name), on every
    path. Tolerance: mamba-ssm's float32 one, relative to each tensor's largest value (the mixer's
    in_proj/out_proj sum over many channels)."""
    sd = {k: v.requires_grad_() for k, v in _vim_v2_state_dict(d_model, d_state, d_conv).items()}
    x = torch.randn(batch, L, d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_()
    want = _vim_v2_forward(sd, xr, divide_out, d_state)
    gy = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want_grads = dict(zip(["x", *sd], torch.autograd.grad((want * gy).sum(), [xr, *sd.values()])))
    m = BiMambaMixer(d_model, d_state=d_state, d_conv=d_conv, divide_out=divide_out)
    m.load_state_dict(sd, strict=True)

    def close(name, got, ref):
        scale = ref.abs().max().item()
        torch.testing.assert_close(got.double(), ref, rtol=6e-4, atol=2e-3 * max(1.0, scale),
                                   msg=lambda msg: f"{name}: {msg}")

    for name, lib in paths:
        with on_path(monkeypatch, lib):
            with torch.no_grad():
                close(f"{name} out", m(x.float()), want)
            m.zero_grad()
            xf = x.float().requires_grad_()
            out = m(xf)
            close(f"{name} out with autograd", out, want)
            out.backward(gy.float())
        close(f"{name} dx", xf.grad, want_grads["x"])
        for k, p in m.named_parameters():
            close(f"{name} d{k}", p.grad, want_grads[k])


@pytest.mark.parametrize("d_model,d_state,d_conv,L,batch,divide_out", [
    (16, 16, 4, 17, 2, True),  # Vim's own settings
    (16, 5, 3, 1, 1, False),  # L = 1, N = 5, width 3, batch 1
    (40, 16, 2, 2, 2, False),  # L = 2, width 2, d_inner 80 (ragged vectors)
])
def test_bimamba_v2_matches_vim(monkeypatch, paths, d_model, d_state, d_conv, L, batch, divide_out):
    check_vim_mixer(monkeypatch, paths, d_model, d_state, d_conv, L, batch, divide_out)


@pytest.mark.slow
@pytest.mark.parametrize("d_model,d_state,d_conv,L,batch,divide_out", list(itertools.product(
    [16, 40], [16, 5, 1], [2, 3, 4], [1, 2, 3, 17, 70], [1, 2], [False, True])))
def test_bimamba_v2_full_grid(monkeypatch, paths, d_model, d_state, d_conv, L, batch, divide_out):
    check_vim_mixer(monkeypatch, paths, d_model, d_state, d_conv, L, batch, divide_out)


@pytest.mark.parametrize("d_conv", [2, 3, 4])
def test_short_pieces_carry_mamba_ssm_states(monkeypatch, paths, d_conv):
    """A float32 causal mixer fed pieces shorter than its conv (1, 2, ... steps) with the carried
    state: the outputs of the whole sequence, and after each piece the conv state mamba-ssm keeps,
    the last d_conv inputs x (after in_proj), zeros in front of the first."""
    torch.manual_seed(0)
    m = MambaMixer(16, d_state=5, d_conv=d_conv)
    hs = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = m.in_proj(hs).chunk(2, dim=-1)[0].transpose(1, 2)  # (B, d_inner, L)
        for name, lib in paths:
            with on_path(monkeypatch, lib):
                whole = m(hs)
                state, outs, seen = None, [], 0
                for n in (1, 2, 1, 5, 3):
                    out, state = m(hs[:, seen:seen + n], state=state, return_state=True)
                    outs.append(out)
                    seen += n
                    want_conv = F.pad(x[..., :seen], (d_conv, 0))[..., -d_conv:]
                    torch.testing.assert_close(state.conv_state, want_conv, msg=lambda msg: f"{name}: {msg}")
            torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=6e-4, atol=2e-5,
                                       msg=lambda msg: f"{name}: {msg}")
