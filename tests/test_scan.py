"""selective_scan (fast, chunked) against selective_scan_reference (the definition)."""

import math

import pytest
import torch
import torch.nn.functional as F

from storm_vlm.model.ssm import selective_scan, selective_scan_reference


def _naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """Scalar-loop transcription of the recurrence, independent of both implementations. B, C:
    (b, N, L), (b, G, N, L) or constant (d, N), read as mamba-ssm's selective_scan_ref reads them."""
    b, d, L = u.shape
    n = A.shape[1]

    def at(X, bi, di, t):  # the (N,) row channel di uses at step t
        if X.dim() == 2:
            return X[di].double()
        X4 = X[:, None] if X.dim() == 3 else X
        return X4[bi, di // (d // X4.shape[1]), :, t].double()

    out = torch.zeros(b, d, L, dtype=torch.float64)
    last = torch.zeros(b, d, n, dtype=torch.float64)
    for bi in range(b):
        for di in range(d):
            h = torch.zeros(n, dtype=torch.float64) if initial_state is None else initial_state[bi, di].double()
            for t in range(L):
                dl = float(delta[bi, di, t]) + (float(delta_bias[di]) if delta_bias is not None else 0.0)
                if delta_softplus:
                    dl = math.log1p(math.exp(dl))
                h = torch.exp(dl * A[di].double()) * h + dl * float(u[bi, di, t]) * at(B, bi, di, t)
                y = float((h * at(C, bi, di, t)).sum())
                if D is not None:
                    y += float(D[di]) * float(u[bi, di, t])
                if z is not None:
                    zz = float(z[bi, di, t])
                    y *= zz / (1 + math.exp(-zz))
                out[bi, di, t] = y
            last[bi, di] = h
    return out, last


def _inputs(dtype, b=2, d=6, L=11, n=4, groups=None, D=True, z=True, bias=True, seed=0, const="", h0=False):
    """Scan arguments; ``const``: "B", "C" or "BC" makes those constant over time, (d, n);
    ``h0``: add an initial_state."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    bc = (b, n, L) if groups is None else (b, groups, n, L)
    t = dict(
        u=r(b, d, L),
        delta=torch.rand(b, d, L, generator=g, dtype=dtype) * 0.6 - 0.1,
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 3 - 0.1,
        B=r(d, n) if "B" in const else r(*bc),
        C=r(d, n) if "C" in const else r(*bc),
        D=r(d) if D else None,
        z=r(b, d, L) if z else None,
        delta_bias=r(d) * 0.3 if bias else None,
    )
    if h0:
        t["initial_state"] = r(b, d, n)
    return {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}


def _run(fn, t, softplus, seed=1, **kw):
    out, last = fn(**t, delta_softplus=softplus, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    gl = torch.randn(last.shape, generator=g, dtype=last.dtype)
    names = [k for k, v in t.items() if v is not None]
    grads = torch.autograd.grad((out * go).sum() + (last * gl).sum(), [t[k] for k in names])
    return {"out": out, "last": last, **{"d_" + k: gr for k, gr in zip(names, grads)}}


def _assert_close(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def test_reference_matches_scalar_loop():
    t = _inputs(torch.float64, b=2, d=4, L=5, n=3, groups=2)
    out, last = selective_scan_reference(**t, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = _naive(**{k: (v.detach() if v is not None else None) for k, v in t.items()},
                               delta_softplus=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(last, ref_last)


CASES = [
    # (b, d, L, n, groups, D, z, bias, softplus, chunk)
    (2, 6, 11, 4, None, True, True, True, True, 4),  # L not a multiple of the chunk
    (2, 6, 11, 4, 3, True, True, True, True, 4),  # grouped B/C
    (1, 6, 1, 4, 2, True, True, True, True, 4),  # L = 1
    (2, 6, 8, 4, None, False, False, False, False, 4),  # nothing optional
    (3, 4, 9, 3, 1, True, False, True, False, 2),  # batch 3, groups=1 given as 4-D
    (1, 8, 20, 5, 4, False, True, False, True, 7),  # ragged last chunk, many groups
    (2, 6, 13, 4, None, True, True, True, True, 32),  # chunk longer than L
]


@pytest.mark.parametrize("b,d,L,n,groups,D,z,bias,softplus,chunk", CASES)
def test_fast_equals_reference_float64(b, d, L, n, groups, D, z, bias, softplus, chunk):
    t = _inputs(torch.float64, b, d, L, n, groups, D, z, bias)
    _assert_close(_run(selective_scan, t, softplus, chunk=chunk), _run(selective_scan_reference, t, softplus),
                  rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups", [None, 2])
def test_fast_equals_reference_float32(groups):
    t = _inputs(torch.float32, b=2, d=8, L=45, n=16, groups=groups)
    # several full chunks and a ragged one
    _assert_close(_run(selective_scan, t, True, chunk=16), _run(selective_scan_reference, t, True),
                  rtol=1e-4, atol=1e-4)


def test_default_chunk_follows_width_and_matches_reference():
    from storm_vlm.model.ssm.fast_scan import auto_chunk

    assert [auto_chunk(c) for c in (8, 448, 1024, 2048, 4096, 10**6)] == [64, 64, 32, 16, 16, 16]
    t = _inputs(torch.float32, b=1, d=8, L=150, n=4)  # default chunk 64: two full chunks and a ragged one
    _assert_close(_run(selective_scan, t, True), _run(selective_scan_reference, t, True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
def test_input_staging_boundaries(monkeypatch, reverse):
    """The forward stages inputs a few chunks at a time; stage edges inside and across chunks,
    with a ragged last chunk and stage, in both scan directions, change nothing."""
    from storm_vlm.model.ssm import fast_scan

    monkeypatch.setattr(fast_scan, "_STAGE_STEPS", 7)  # 2 chunks of 3 per stage
    t = _inputs(torch.float64, b=2, d=6, L=23, n=4, groups=2)
    _assert_close(_run(selective_scan, t, True, chunk=3, reverse=reverse),
                  _run(selective_scan_reference, t, True, reverse=reverse), rtol=1e-10, atol=1e-10)


def test_bfloat16_inputs_computed_in_float32():
    t = _inputs(torch.float32, b=1, d=4, L=19, n=8, groups=None)
    t16 = {k: (v.detach().to(torch.bfloat16) if k in ("u", "delta", "z") and v is not None else
               (v.detach() if v is not None else None)) for k, v in t.items()}
    out, last = selective_scan(**t16, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = selective_scan_reference(**t16, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(last, ref_last, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_chunk():
    t = {k: (v.detach() if v is not None else None) for k, v in _inputs(torch.float64, L=37).items()}
    outs = [selective_scan(**t, delta_softplus=True, chunk=c) for c in (1, 5, 16, 64)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-12, atol=1e-12)


def _alloc_stats(fn):
    """(total bytes allocated, largest single allocation) while fn() runs on CPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    return sum(sizes), max(sizes)


def test_reference_backward_is_linear_in_length():
    """Indexing t[:, :, i] inside the loop would make autograd quadratic (a full-size zero tensor per step)."""

    def total(L):
        t = _inputs(torch.float32, b=1, d=4, L=L, n=4, z=False, D=False, bias=False)
        return _alloc_stats(lambda: selective_scan_reference(**t).sum().backward())[0]

    assert total(128) <= 5 * total(32)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(u=torch.zeros(2, 6)), r"u must be \(batch, dim, L\)"),
        (dict(delta=torch.zeros(2, 6, 10)), r"delta shape \(2, 6, 10\).*u shape \(2, 6, 11\)"),
        (dict(A=torch.zeros(5, 4)), r"A must be \(dim, N\).*\(5, 4\)"),
        (dict(B=torch.zeros(2, 3, 11)), r"B must be .*\(2, 3, 11\)"),
        (dict(C=torch.zeros(2, 4, 4, 11)), r"C has 4 groups, which does not divide dim 6"),
        (dict(B=torch.zeros(2, 2, 4, 11), C=torch.zeros(2, 3, 4, 11)), r"different group counts"),
        (dict(D=torch.zeros(5)), r"D must be \(dim,\).*\(5,\)"),
        (dict(z=torch.zeros(2, 6, 12)), r"z shape \(2, 6, 12\)"),
        (dict(delta_bias=torch.zeros(6, 1)), r"delta_bias must be \(dim,\)"),
        (dict(delta=torch.zeros(2, 6, 11, dtype=torch.float64)), r"share a dtype"),
        (dict(u=torch.zeros(2, 6, 11, dtype=torch.long)), r"floating-point"),
        (dict(A=torch.zeros(6, 4, dtype=torch.complex64)), r"complex A"),
        (dict(delta_proj=torch.zeros(5, 3)), r"delta_proj must be \(dim, R\) = \(6, R\), got shape \(5, 3\)"),
        (dict(delta_proj=torch.zeros(6, 3)),
         r"with delta_proj \(6, 3\), delta must be \(batch, R, L\) = \(2, 3, 11\), got shape \(2, 6, 11\)"),
    ],
)
@pytest.mark.parametrize("fn", [selective_scan, selective_scan_reference])
def test_bad_inputs_raise_value_error(fn, override, match):
    t = {k: (v.detach() if v is not None else None) for k, v in _inputs(torch.float32).items()}
    t.update(override)
    with pytest.raises(ValueError, match=match):
        fn(**t)


def factored_delta(t: dict, rank: int, seed: int = 2) -> dict:
    """``t`` with delta given as its factor: delta (b, R, L), a column slice of a time-major (b, L, R + 5)
    tensor as the mixer's dt is of x_proj's output, and delta_proj (d, R); they require grad if u does."""
    b, d, L = t["u"].shape
    g = torch.Generator().manual_seed(seed)
    grad = t["u"].requires_grad
    wide = (torch.randn(b, L, rank + 5, generator=g, dtype=t["u"].dtype) * 0.5).requires_grad_(grad)
    proj = (torch.randn(d, rank, generator=g, dtype=t["u"].dtype) * max(rank, 1)**-0.5).requires_grad_(grad)
    return dict(t, delta=wide[..., :rank].transpose(1, 2), delta_proj=proj)


@pytest.mark.parametrize("reverse", [False, True])
def test_factored_delta_equals_the_full_delta_with_gradients(reverse):
    """delta given as (b, R, L) with delta_proj (d, R) is the scan of delta_proj @ delta, gradients
    (to the factor and to delta_proj) included, on the fast path and the reference."""
    t = factored_delta(_inputs(torch.float64, b=2, d=6, L=23, n=4, h0=True), rank=3)
    full = dict(t, delta=t["delta_proj"] @ t["delta"], delta_proj=None)
    for fn in (selective_scan, selective_scan_reference):
        out, last = fn(**t, delta_softplus=True, return_last_state=True, reverse=reverse)
        ref_out, ref_last = selective_scan_reference(**full, delta_softplus=True, return_last_state=True,
                                                     reverse=reverse)
        torch.testing.assert_close((out, last), (ref_out, ref_last))
        leaves = [t["delta_proj"], t["u"], t["A"]]
        got = torch.autograd.grad(out.square().sum() + last.sum(), leaves + [t["delta"]], retain_graph=True)
        want = torch.autograd.grad(ref_out.square().sum() + ref_last.sum(), leaves + [t["delta"]], retain_graph=True)
        torch.testing.assert_close(got, want)


def test_nan_and_inf_propagate():
    t = {k: (v.detach().clone() if v is not None else None) for k, v in _inputs(torch.float32, L=20).items()}
    t["u"][0, 1, 5] = float("nan")
    t["delta"][1, 2, 3] = float("inf")
    out, last = selective_scan(**t, delta_softplus=True, return_last_state=True)
    ref = selective_scan_reference(**t, delta_softplus=True)
    # the NaN reaches channel 1 of batch 0 from step 5 on and its last state
    assert torch.isnan(out[0, 1, 5:]).all() and not torch.isnan(out[0, 1, :5]).any()
    assert torch.isnan(last[0, 1]).all()
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert not torch.isfinite(out[1, 2, 3:]).all()
    assert torch.isfinite(out[0, 0]).all()


def test_empty_sequence():
    t = {k: (v.detach() if v is not None else None) for k, v in _inputs(torch.float32, L=0).items()}
    out, last = selective_scan(**t, return_last_state=True)
    assert out.shape == (2, 6, 0) and torch.equal(last, torch.zeros(2, 6, 4))


def test_memory_does_not_grow_with_length_times_state():
    """The fast path never holds a (batch, dim, L, N) tensor, forward or backward (L long enough
    that the default chunk, up to 64 steps at small widths, is well below L / 8)."""
    d, L, n = 16, 1024, 16
    t = _inputs(torch.float32, b=1, d=d, L=L, n=n, z=False, D=False, bias=False)
    full = d * L * n * 4
    _, biggest = _alloc_stats(lambda: selective_scan(**t).sum().backward())
    assert biggest <= full / 8
    L_ref = 128  # the reference loop is slow; a short one shows the check can see such a tensor
    t = _inputs(torch.float32, b=1, d=d, L=L_ref, n=n, z=False, D=False, bias=False)
    _, biggest_ref = _alloc_stats(lambda: selective_scan_reference(**t).sum().backward())
    assert biggest_ref >= d * L_ref * n * 4


def test_matches_mamba_style_softplus():
    # delta_softplus uses softplus(delta + delta_bias), exactly as mamba-ssm
    t = {k: (v.detach() if v is not None else None) for k, v in _inputs(torch.float64, L=6).items()}
    manual = selective_scan(**{**t, "delta": F.softplus(t["delta"] + t["delta_bias"][:, None]), "delta_bias": None})
    torch.testing.assert_close(selective_scan(**t, delta_softplus=True), manual)


@pytest.mark.parametrize("groups", [None, 3])
def test_reverse_equals_flipped_scan(groups):
    t = _inputs(torch.float64, b=2, d=6, L=13, n=4, groups=groups)
    fast = _run(selective_scan, t, True, reverse=True, chunk=4)
    ref = _run(selective_scan_reference, t, True, reverse=True)
    _assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    flip = {k: (v.detach().flip(-1) if k in ("u", "delta", "z", "B", "C") else (v.detach() if v is not None else None))
            for k, v in t.items()}
    out, last = selective_scan_reference(**flip, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(fast["out"], out.flip(-1))
    torch.testing.assert_close(fast["last"], last)


def test_time_major_inputs_and_outputs():
    """Inputs stored (b, L, d) and seen through transpose (as the mixer passes them) give the same results."""
    t = _inputs(torch.float64, b=3, d=6, L=10, n=4)
    tm = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
              if k in ("u", "delta", "z") else v) for k, v in t.items()}
    _assert_close(_run(selective_scan, tm, True, chunk=4), _run(selective_scan_reference, t, True),
                  rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("groups,reverse", [(None, False), (2, True)])
def test_channel_blocks_in_threads_equal_reference(monkeypatch, groups, reverse):
    """With >1 torch thread the fast path splits channels over worker threads (on the CPU only: a
    GPU's kernels are launched from one thread)."""
    from storm_vlm.model.ssm import fast_scan

    monkeypatch.setattr(fast_scan, "_PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(fast_scan, "_MIN_BLOCK", 1)
    cpu = torch.device("cpu")
    assert fast_scan._blocks(3, 10**9, cpu) == [(0, 3)]  # 1 thread (conftest): one block
    t = _inputs(torch.float64, b=2, d=6, L=11, n=4, groups=groups)
    prev = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert len(fast_scan._blocks(3, 10**9, cpu)) == 3
        assert fast_scan._blocks(3, 10**9, torch.device("meta")) == [(0, 3)]
        fast = _run(selective_scan, t, True, chunk=4, reverse=reverse)
    finally:
        torch.set_num_threads(prev)
    _assert_close(fast, _run(selective_scan_reference, t, True, reverse=reverse), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- constant B / C, initial state
def _detached(t):
    return {k: (v.detach() if v is not None else None) for k, v in t.items()}


@pytest.mark.parametrize("const,groups", [("B", None), ("C", 3), ("BC", None)])
def test_constant_B_C_and_initial_state_match_scalar_loop(const, groups):
    t = _detached(_inputs(torch.float64, b=2, d=6, L=7, n=3, groups=groups, const=const, h0=True))
    want_out, want_last = _naive(**t, delta_softplus=True)
    for fn in (selective_scan_reference, selective_scan):
        out, last = fn(**t, delta_softplus=True, return_last_state=True)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(last, want_last)


def test_constant_B_C_mean_every_step_of_each_channel():
    """mamba-ssm's reading of a (dim, N) B / C: channel d uses row d at every step, i.e. the same as
    a per-step B / C with one group per channel holding that row at each step."""
    t = _detached(_inputs(torch.float64, b=2, d=4, L=9, n=3, const="BC"))
    per_step = {**t, "B": t["B"][None, :, :, None].expand(2, 4, 3, 9), "C": t["C"][None, :, :, None].expand(2, 4, 3, 9)}
    for fn in (selective_scan_reference, selective_scan):
        torch.testing.assert_close(fn(**t, delta_softplus=True), fn(**per_step, delta_softplus=True))


@pytest.mark.parametrize("const,groups,reverse", [("", None, False), ("B", 2, True), ("C", None, False),
                                                  ("BC", None, True), ("", 3, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: the C kernel when it builds
def test_fast_equals_reference_with_constant_B_C_and_initial_state(const, groups, reverse, dtype):
    t = _inputs(dtype, b=2, d=12, L=23, n=5, groups=groups, const=const, h0=True)
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    got = _run(selective_scan, t, True, chunk=4, reverse=reverse)
    assert "d_initial_state" in got and got["d_initial_state"].abs().sum() > 0
    _assert_close(got, _run(selective_scan_reference, t, True, reverse=reverse), rtol=tol, atol=tol)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scanning_in_pieces_from_the_last_state_equals_one_scan(reverse, dtype):
    """last_state of one piece as initial_state of the next: outputs and final state as in one go
    (float32: identical, the recurrence is the same sequence of operations)."""
    t = _detached(_inputs(dtype, b=2, d=20, L=50, n=8))
    whole, whole_last = selective_scan(**t, delta_softplus=True, return_last_state=True, chunk=8, reverse=reverse)
    edges = [0, 13, 14, 40, 50]
    pieces = list(zip(edges[:-1], edges[1:]))
    state, outs = None, {}
    for s, e in (reversed(pieces) if reverse else pieces):
        part = {k: (v[..., s:e] if k in ("u", "delta", "z", "B", "C") else v) for k, v in t.items()}
        outs[s], state = selective_scan(**part, delta_softplus=True, return_last_state=True, chunk=8,
                                        reverse=reverse, initial_state=state)
    out = torch.cat([outs[s] for s, _ in pieces], dim=-1)
    if dtype == torch.float32:
        assert torch.equal(out, whole) and torch.equal(state, whole_last)
    else:
        torch.testing.assert_close(out, whole, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, whole_last, rtol=1e-12, atol=1e-12)


def test_initial_state_of_an_empty_sequence_is_the_last_state():
    t = _detached(_inputs(torch.float32, L=0, h0=True))
    out, last = selective_scan(**t, return_last_state=True)
    assert out.shape == (2, 6, 0) and torch.equal(last, t["initial_state"])


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(initial_state=torch.zeros(2, 6, 5)), r"initial_state must be \(batch, dim, N\) = \(2, 6, 4\)"),
        (dict(B=torch.zeros(6, 5)), r"B must be .*constant \(dim, N\) = \(6, 4\), got shape \(6, 5\)"),
        (dict(C=torch.zeros(4, 6)), r"C must be .*\(4, 6\)"),
        (dict(initial_state=torch.zeros(2, 6, 4, dtype=torch.long)), r"initial_state must be a floating-point"),
    ],
)
@pytest.mark.parametrize("fn", [selective_scan, selective_scan_reference])
def test_bad_constant_B_C_or_initial_state_raise_value_error(fn, override, match):
    t = _detached(_inputs(torch.float32))
    t.update(override)
    with pytest.raises(ValueError, match=match):
        fn(**t)
