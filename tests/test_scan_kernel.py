"""The fused C forward and backward (ssm/_scan_kernel.c) against the reference and the pure-PyTorch path."""

import shutil

import pytest
import torch

from storm_vlm.model.ssm import cpu_kernel, fast_scan, selective_scan, selective_scan_reference
from test_scan import _assert_close, _inputs, _run

pytestmark = pytest.mark.skipif(cpu_kernel.load() is None, reason="no C compiler: the kernel is optional")


@pytest.fixture
def pytorch_path(monkeypatch):
    """Runs a callable with the kernel switched off (the pure-PyTorch chunked scan)."""

    def run(fn, *args, **kw):
        with monkeypatch.context() as m:
            m.setenv(cpu_kernel.ENV_SWITCH, "0")
            assert cpu_kernel.load() is None
            return fn(*args, **kw)

    return run


def _calls(monkeypatch, name="scan_forward"):
    """The (c0, c1) channel range of every call to cpu_kernel.<name>."""
    calls = []
    real = getattr(cpu_kernel, name)
    monkeypatch.setattr(cpu_kernel, name, lambda *a, **k: calls.append(a[-2:]) or real(*a, **k))
    return calls


@pytest.mark.parametrize(
    "b,d,L,n,groups,D,z,bias,softplus,reverse,time_major",
    [
        (2, 6, 11, 4, None, True, True, True, True, False, False),  # fewer channels than a vector
        (1, 13, 150, 16, None, True, True, True, True, False, True),  # partial vector, L > one tile
        (2, 24, 130, 5, 3, False, False, False, False, False, False),  # odd N, groups of 8, nothing optional
        (1, 20, 129, 16, 2, True, True, True, True, True, True),  # reverse, groups not a multiple of 8
        (3, 8, 1, 3, None, True, False, True, True, True, False),  # L = 1
    ],
)
def test_kernel_equals_reference_and_pytorch_path(monkeypatch, pytorch_path, b, d, L, n, groups, D, z, bias,
                                                  softplus, reverse, time_major):
    calls, bwd_calls = _calls(monkeypatch), _calls(monkeypatch, "scan_backward")
    t = _inputs(torch.float32, b=b, d=d, L=L, n=n, groups=groups, D=D, z=z, bias=bias)
    if time_major:
        t = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                 if k in ("u", "delta", "z") and v is not None else v) for k, v in t.items()}
    kernel = _run(selective_scan, t, softplus, reverse=reverse, chunk=4)
    assert calls and bwd_calls, "the float32 CPU scan did not use the kernel"
    ref = _run(selective_scan_reference, t, softplus, reverse=reverse)
    _assert_close(kernel, ref, rtol=2e-5, atol=2e-5)
    _assert_close(kernel, pytorch_path(_run, selective_scan, t, softplus, reverse=reverse, chunk=4),
                  rtol=2e-5, atol=2e-5)


def test_float64_does_not_use_the_kernel(monkeypatch):
    calls = _calls(monkeypatch)
    t = {k: (v.detach() if v is not None else None) for k, v in _inputs(torch.float64).items()}
    selective_scan(**t)
    assert calls == []


def test_channel_ranges_in_threads(monkeypatch):
    """With several torch threads the channels are split over worker threads, in whole vectors."""
    monkeypatch.setattr(fast_scan, "_PARALLEL_MIN_WORK", 0)
    assert fast_scan._kernel_ranges(40, 10**9) == [(0, 40)]  # 1 thread (conftest)
    calls = _calls(monkeypatch)
    bwd_calls = _calls(monkeypatch, "scan_backward")
    t = _inputs(torch.float32, b=2, d=40, L=70)
    one = _run(selective_scan, t, True)
    prev = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert fast_scan._kernel_ranges(40, 10**9) == [(0, 16), (16, 24), (24, 40)]
        calls.clear(), bwd_calls.clear()
        three = _run(selective_scan, t, True)
    finally:
        torch.set_num_threads(prev)
    assert sorted(calls) == sorted(bwd_calls) == [(0, 16), (16, 24), (24, 40)]
    # channel-wise results are bit-identical; B and C gradients are sums of the threads' shares
    _assert_close(three, one, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(three[k], one[k]) for k in ("out", "last", "d_u", "d_delta", "d_A"))


def test_extreme_values_match_reference():
    """exp2 underflow (large delta * A), overflow (positive A) and softplus's threshold."""
    t = {k: (v.detach().clone() if v is not None else None) for k, v in _inputs(torch.float32, d=9, L=30).items()}
    t["delta"][0, 0] = 50.0  # softplus passes it through; exp(50 * A) underflows to 0
    t["delta"][0, 1] = -30.0  # softplus ~ 1e-13
    t["A"][2] = 10.0  # growing state: overflows to inf
    out = selective_scan(**t, delta_softplus=True)
    ref = selective_scan_reference(**t, delta_softplus=True)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert not torch.isfinite(out[:, 2]).all()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-4, atol=1e-4)


def test_nan_stays_nan_in_the_kernel(monkeypatch):
    calls = _calls(monkeypatch)
    t = {k: (v.detach().clone() if v is not None else None) for k, v in _inputs(torch.float32, d=16, L=20).items()}
    t["delta"][1, 3, 4] = float("nan")
    t["z"][0, 9, 7] = float("nan")
    out = selective_scan(**t, delta_softplus=True)
    assert calls
    assert torch.isnan(out[1, 3, 4:]).all() and not torch.isnan(out[1, 3, :4]).any()
    assert torch.isnan(out[0, 9, 7]) and torch.isnan(out).sum() == 16 + 1


def test_without_a_compiler_the_pytorch_scan_is_used(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        assert cpu_kernel.load() is None
    assert "no C compiler" in caplog.text
    t = _inputs(torch.float32)
    _assert_close(_run(selective_scan, t, True), _run(selective_scan_reference, t, True), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc")
def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("STORM_VLM_CACHE", str(tmp_path))
    first = cpu_kernel._build(shutil.which("cc"))
    assert first.parent == tmp_path / "kernels" and first.suffix == ".so"
    mtime = first.stat().st_mtime_ns
    assert cpu_kernel._build(shutil.which("cc")) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]  # no temporary left behind


def test_compile_error_names_the_source(monkeypatch, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", bad)
    monkeypatch.setenv("STORM_VLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="bad.c"):
        cpu_kernel._build(shutil.which("cc") or "gcc")
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []
