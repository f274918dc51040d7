"""MambaMixer carrying its state across calls (prefill, streaming): pieces equal the whole sequence,
step() continues a prefill, padding leaves the state alone; BiMambaMixer refuses."""

import pytest
import torch

from storm_vlm.model.ssm import BiMambaMixer, MambaMixer, MambaState

D_MODEL = 16


def _mixer(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return MambaMixer(D_MODEL, **kw).to(dtype)


def _x(b=2, L=23, dtype=torch.float64, seed=1):
    return torch.randn(b, L, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=dtype)


EDGES = [0, 1, 3, 11, 23]  # pieces shorter and longer than d_conv


def _in_pieces(m, x, edges=EDGES, state=None):
    outs = []
    for s, e in zip(edges[:-1], edges[1:]):
        out, state = m(x[:, s:e], state=state, return_state=True)
        outs.append(out)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])  # float32: the C kernel
def test_pieces_equal_the_whole_sequence(dtype, tol):
    m, x = _mixer(dtype), _x(dtype=dtype)
    whole, whole_state = m(x, return_state=True)
    assert isinstance(whole_state, MambaState)
    assert whole_state.conv_state.shape == (2, 32, 4) and whole_state.ssm_state.shape == (2, 32, 16)
    assert whole_state.conv_state.dtype == dtype and whole_state.ssm_state.dtype == dtype
    torch.testing.assert_close(whole, m(x), rtol=0, atol=0)  # asking for the state changes nothing
    pieces, state = _in_pieces(m, x)
    torch.testing.assert_close(pieces, whole, rtol=tol, atol=tol)
    torch.testing.assert_close(state.conv_state, whole_state.conv_state, rtol=tol, atol=tol)
    torch.testing.assert_close(state.ssm_state, whole_state.ssm_state, rtol=tol, atol=tol)


def test_gradients_through_carried_states_equal_the_whole():
    m, x = _mixer(), _x()
    w = torch.randn(x.shape, dtype=x.dtype)

    def grads(run):
        m.zero_grad()
        xr = x.clone().requires_grad_()
        out, state = run(xr)
        ((out * w).sum() + state.ssm_state.sum() + state.conv_state.sum()).backward()
        return {"x": xr.grad, **{k: p.grad.clone() for k, p in m.named_parameters()}}

    whole = grads(lambda xr: m(xr, return_state=True))
    pieces = grads(lambda xr: _in_pieces(m, xr))
    for k in whole:
        # A, D and the dt bias enter the scan as float32 (as in mamba-ssm): their gradients are rounded so
        tol = 1e-6 if k in ("A_log", "D", "dt_proj.bias") else 1e-10
        torch.testing.assert_close(pieces[k], whole[k], rtol=tol, atol=tol, msg=lambda s: f"{k}: {s}")


def test_prefill_then_step_continues_exactly():
    """A prefill's state is mamba-ssm's: the same as stepping the prompt token by token, and step()
    continues from it as the whole forward does."""
    m, x = _mixer(), _x(L=14)
    full = m(x)
    _, state = m(x[:, :9], return_state=True)
    stepped = MambaState(*m.allocate_inference_cache(2, dtype=torch.float64))
    for t in range(9):
        _, *stepped = m.step(x[:, t], *stepped)
    torch.testing.assert_close(state.conv_state, stepped[0])
    torch.testing.assert_close(state.ssm_state, stepped[1])
    conv_state, ssm_state = state
    for t in range(9, 14):
        out, conv_state, ssm_state = m.step(x[:, t], conv_state, ssm_state)
        torch.testing.assert_close(out, full[:, t])
    # a state made by step() continues a forward too (allocate_inference_cache's pair is accepted)
    rest = m(x[:, 9:], state=tuple(stepped))
    torch.testing.assert_close(rest, full[:, 9:])


def test_given_state_is_not_modified():
    m, x = _mixer(), _x(L=6)
    state = MambaState(torch.randn(2, 32, 4, dtype=torch.float64), torch.randn(2, 32, 16, dtype=torch.float64))
    before = [t.clone() for t in state]
    out, new = m(x, state=state, return_state=True)
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    assert not torch.equal(new.ssm_state, state.ssm_state)
    assert not torch.equal(out, m(x))  # the state matters


def test_padding_leaves_the_state_unchanged():
    """Rows of a batch end at different places in a piece: each row's state is the one after its last
    valid position, a row with nothing valid keeps its state, and the next piece continues each row
    as if it were alone."""
    m, x = _mixer(), _x(b=3, L=12)
    _, start = m(x[:, :5], return_state=True)
    lengths = [7, 3, 0]
    piece = x[:, 5:12].clone()
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    piece[~mask] = float("nan")  # whatever sits in the padding must not leak
    out, state = m(piece, mask=mask, state=start, return_state=True)
    for i, n in enumerate(lengths):
        row_start = MambaState(start.conv_state[i:i + 1], start.ssm_state[i:i + 1])
        alone, alone_state = m(piece[i:i + 1, :n], state=row_start, return_state=True)
        torch.testing.assert_close(out[i:i + 1, :n], alone, rtol=1e-12, atol=1e-12)
        assert torch.equal(out[i, n:], torch.zeros_like(out[i, n:]))
        torch.testing.assert_close(state.conv_state[i:i + 1], alone_state.conv_state, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.ssm_state[i:i + 1], alone_state.ssm_state, rtol=1e-12, atol=1e-12)
    assert torch.equal(state.conv_state[2], start.conv_state[2]) and torch.equal(state.ssm_state[2], start.ssm_state[2])


def test_state_dtypes_follow_the_given_state_else_activations_and_scan():
    m, x = _mixer(torch.float32), _x(L=8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = m(x, return_state=True)
        assert state.conv_state.dtype == torch.bfloat16 and state.ssm_state.dtype == torch.float32
        given = m.allocate_inference_cache(2, dtype=torch.float32)
        _, state = m(x, state=given, return_state=True)
    assert state.conv_state.dtype == torch.float32 and state.ssm_state.dtype == torch.float32


def test_bad_state_and_bidirectional_refusal():
    m = _mixer()
    with pytest.raises(ValueError, match=r"conv_state \(2, 32, 3\)"):
        m(_x(L=4), state=(torch.zeros(2, 32, 3, dtype=torch.float64), torch.zeros(2, 32, 16, dtype=torch.float64)))
    bi = BiMambaMixer(D_MODEL)
    x = torch.randn(1, 5, D_MODEL)
    for kw in (dict(return_state=True), dict(state=MambaState(torch.zeros(1, 32, 4), torch.zeros(1, 32, 16)))):
        with pytest.raises(NotImplementedError, match="backward direction reads the sequence's future"):
            bi(x, **kw)
