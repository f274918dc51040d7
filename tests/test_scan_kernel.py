"""The fused C forward and backward (ssm/_scan_kernel.c) against the reference and the pure-PyTorch path."""

import hashlib
import shutil
import stat
from pathlib import Path

import pytest
import torch

from storm_vlm.model.ssm import cpu_kernel, fast_scan, selective_scan, selective_scan_reference
from helpers import KERNEL_ISAS, isa_runs, use_kernel_library
from test_scan import _assert_close, _inputs, _run, factored_delta

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


def _calls(monkeypatch, name="scan_forward", record=lambda args: args[-2:]):
    """record(args) of every call to cpu_kernel.<name>: by default its (c0, c1) channel range."""
    calls = []
    real = getattr(cpu_kernel, name)
    monkeypatch.setattr(cpu_kernel, name, lambda *a, **k: calls.append(record(a)) or real(*a, **k))
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


@pytest.mark.parametrize("const,groups,reverse,threads",
                         [("B", None, False, 1), ("C", 2, True, 1), ("BC", None, False, 3), ("", 4, True, 3)])
def test_kernel_constant_B_C_and_initial_state(monkeypatch, pytorch_path, const, groups, reverse, threads):
    """Constant (d, N) B / C and an initial state in the kernel, forward and backward (its gradient
    included), also split over threads, against the reference and the PyTorch path."""
    monkeypatch.setattr(fast_scan, "_PARALLEL_MIN_WORK", 0)
    calls, bwd_calls = _calls(monkeypatch), _calls(monkeypatch, "scan_backward")
    t = _inputs(torch.float32, b=2, d=40, L=37, n=6, groups=groups, const=const, h0=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel = _run(selective_scan, t, True, reverse=reverse, chunk=8)
    finally:
        torch.set_num_threads(prev)
    assert len(calls) == len(bwd_calls) == (1 if threads == 1 else 3)
    _assert_close(kernel, _run(selective_scan_reference, t, True, reverse=reverse), rtol=3e-5, atol=3e-5)
    _assert_close(kernel, pytorch_path(_run, selective_scan, t, True, reverse=reverse, chunk=8), rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("groups,time_major", [(None, True), (2, False)])
def test_inference_over_several_spans_of_channels(monkeypatch, isa, groups, time_major):
    """Inference (no autograd: the forward alone, called directly) with more channels than the
    kernel takes through a time tile at once (SPAN = 512): spans cut inside a group and a last
    partial vector, from an initial state, both directions, the last state included, on every
    build, time-major and channel-major inputs."""
    use_kernel_library(monkeypatch, isa)
    calls = _calls(monkeypatch)
    t = {k: v.detach() for k, v in _inputs(torch.float32, b=2, d=1100, L=70, n=3, groups=groups, h0=True).items()}
    if time_major:
        t.update({k: t[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("u", "delta", "z")})
    for reverse in (False, True):
        out, last = selective_scan(**t, delta_softplus=True, return_last_state=True, reverse=reverse)
        ref_out, ref_last = selective_scan_reference(**t, delta_softplus=True, return_last_state=True,
                                                     reverse=reverse)
        torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(last, ref_last, rtol=2e-5, atol=2e-5)
    assert len(calls) == 2


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("groups", [None, 2])
def test_inference_reads_B_and_C_where_x_proj_wrote_them(monkeypatch, isa, groups):
    """The forward reads per-step B and C in place inside a wider (b, L, width) buffer (the mixer's
    x_proj output: step and batch strides of the buffer), without copies, equal to the reference."""
    use_kernel_library(monkeypatch, isa)
    b, d, L, n, g = 2, 40, 70, 5, groups or 1
    seen = _calls(monkeypatch, record=lambda args: (args[5].data_ptr(), args[6].data_ptr()))  # BT, CT
    t = {k: v.detach() for k, v in _inputs(torch.float32, b=b, d=d, L=L, n=n).items()}
    buf = torch.randn(b, L, 3 + 2 * g * n + 4)  # 3 columns before B, C after it, 4 more
    B = buf[..., 3:3 + g * n].reshape(b, L, g, n).permute(0, 2, 3, 1)  # (b, g, n, L)
    C = buf[..., 3 + g * n:3 + 2 * g * n].reshape(b, L, g, n).permute(0, 2, 3, 1)
    if groups is None:  # C in a buffer of another width: strides of its own
        C = torch.randn(b, L, 2 * g * n + 1)[..., 1:1 + g * n].reshape(b, L, g, n).permute(0, 2, 3, 1)
    t["B"], t["C"] = (B[:, 0], C[:, 0]) if groups is None else (B, C)
    for reverse in (False, True):
        out = selective_scan(**t, delta_softplus=True, reverse=reverse)
        torch.testing.assert_close(out, selective_scan_reference(**t, delta_softplus=True, reverse=reverse),
                                   rtol=2e-5, atol=2e-5)
    assert seen == [(B.data_ptr(), C.data_ptr())] * 2


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
        assert fast_scan._kernel_ranges(40, 10**9) == [(0, 16), (16, 24), (24, 40)]  # 8-lane vectors
        want = fast_scan._kernel_ranges(40, 10**9, cpu_kernel.load().storm_lanes)
        calls.clear(), bwd_calls.clear()
        three = _run(selective_scan, t, True)
    finally:
        torch.set_num_threads(prev)
    assert len(want) > 1 and sorted(calls) == sorted(bwd_calls) == want
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


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_kernel_softplus_is_torch_softplus(monkeypatch, isa):
    """With A = 0, B = C = u = 1 and no D the scan's output is the step size itself: the kernel's
    softplus against torch's (float64) over -80..40 (both tails, the threshold at 20, NaN, -inf: +inf
    makes the scan's decay exp(inf · 0) NaN)."""
    if not isa_runs(isa):
        pytest.skip(f"this CPU does not run {isa}")
    lib = cpu_kernel.build(isa)
    monkeypatch.setattr(cpu_kernel, "load", lambda *a, **k: lib)
    calls = _calls(monkeypatch)
    x = torch.cat([torch.linspace(-80, 40, 20001), torch.tensor([20.0, 20.000002, 19.999998, 0.0, -0.0,
                                                                 float("-inf"), float("nan")])])
    d = x.numel()
    ones = torch.ones(1, 1, 1)
    out = selective_scan(torch.ones(1, d, 1), x.view(1, d, 1), torch.zeros(d, 1), ones, ones, delta_softplus=True)
    assert calls
    ref = torch.nn.functional.softplus(x.double())
    # exp's float32 argument x · log2(e) is rounded: a relative error growing as ~6e-8 |x|
    torch.testing.assert_close(out.view(-1).double(), ref, rtol=5e-6, atol=0, equal_nan=True)
    body = x.abs() < 5
    torch.testing.assert_close(out.view(-1)[body].double(), ref[body], rtol=5e-7, atol=0)


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
    monkeypatch.setattr(cpu_kernel, "_libs", {})
    monkeypatch.setattr(cpu_kernel, "_warned", set())
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        assert cpu_kernel.load() is None
    assert "no C compiler" in caplog.text
    t = _inputs(torch.float32)
    _assert_close(_run(selective_scan, t, True), _run(selective_scan_reference, t, True), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc")
def test_build_is_cached_private_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("STORM_VLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "cc")
    first = Path(cpu_kernel.build("generic").storm_origin)
    kernels = tmp_path / "kernels"
    assert first.parent.parent == kernels and first.name == "lib.so" and first.parent.name.startswith("scan-generic-4-")
    assert [p.name for p in kernels.iterdir()] == [first.parent.name]  # no temporary left behind
    assert sorted(p.name for p in first.parent.iterdir()) == ["lib.so", "lib.so.sha256"]
    assert stat.S_IMODE(kernels.stat().st_mode) == 0o700 and stat.S_IMODE(first.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    assert (first.parent / "lib.so.sha256").read_text().strip() == hashlib.sha256(first.read_bytes()).hexdigest()
    mtime = first.stat().st_mtime_ns
    assert cpu_kernel.build("generic").storm_origin == str(first) and first.stat().st_mtime_ns == mtime


def test_compile_error_names_the_source(monkeypatch, tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernel, "SOURCES", (*cpu_kernel.SOURCES[:-1], bad))
    monkeypatch.setenv("STORM_VLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="bad.c"):
        cpu_kernel.build("generic")
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


# ----------------------------------------------------------------------------- instruction-set paths
# (path, lanes): every path at its own width, and the wider logic built with narrower flags (the
# compiler splits each vector), so the 16-lane code runs and is checked on an AVX2 machine too
VARIANTS = [("generic", None), ("generic", 8), ("generic", 16), ("avx2", None), ("avx2", 16), ("avx512", None),
            ("avx512bf16", None)]


@pytest.mark.parametrize("isa,lanes", VARIANTS, ids=[f"{i}-{n or 'own'}" for i, n in VARIANTS])
def test_each_isa_path_equals_reference(monkeypatch, pytorch_path, isa, lanes):
    if not isa_runs(isa):
        pytest.skip(f"this CPU does not run {isa} (test_every_isa_path_compiles builds it)")
    lib = cpu_kernel.build(isa, lanes)
    assert lib.storm_isa == isa and lib.storm_lanes == (lanes or cpu_kernel.ISAS[isa].lanes)
    monkeypatch.setattr(cpu_kernel, "load", lambda *a, **k: lib)
    calls, bwd_calls = _calls(monkeypatch), _calls(monkeypatch, "scan_backward")
    for b, d, L, n, groups, reverse, time_major, const in [
            (2, 37, 70, 16, None, False, True, ""),  # ragged vector
            (1, 40, 33, 5, 2, True, False, "C"),  # groups of 20, odd N, constant C
            (2, 24, 30, 4, None, False, True, "BC"),  # constant B and C
            (3, 16, 1, 4, None, False, False, "")]:  # L = 1
        t = _inputs(torch.float32, b=b, d=d, L=L, n=n, groups=groups, const=const, h0=b == 2)
        if time_major:
            t = {k: (v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                     if k in ("u", "delta", "z") else v) for k, v in t.items()}
        calls.clear(), bwd_calls.clear()
        got = _run(selective_scan, t, True, reverse=reverse, chunk=8)
        assert calls and bwd_calls
        _assert_close(got, _run(selective_scan_reference, t, True, reverse=reverse), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("isa,lanes", VARIANTS, ids=[f"{i}-{n or 'own'}" for i, n in VARIANTS])
def test_each_isa_path_forms_delta_from_its_factor(monkeypatch, isa, lanes):
    """Inference with delta given as its factor (b, R, L) and delta_proj (d, R): the kernel forms the
    product itself, tile by tile (the factor read at its row stride), equal to the reference on the
    full delta; also split over threads, at R = 1, 14 and 4 N. Autograd, R > 4 N and R = 0 (delta is
    the bias alone) take the full delta, formed first, instead."""
    if not isa_runs(isa):
        pytest.skip(f"this CPU does not run {isa} (test_every_isa_path_compiles builds it)")
    lib = cpu_kernel.build(isa, lanes)
    monkeypatch.setattr(cpu_kernel, "load", lambda *a, **k: lib)
    monkeypatch.setattr(fast_scan, "_PARALLEL_MIN_WORK", 0)
    fused = []
    real = cpu_kernel.scan_forward
    monkeypatch.setattr(cpu_kernel, "scan_forward",
                        lambda *a, **k: fused.append(k.get("delta_proj") is not None) or real(*a, **k))
    prev = torch.get_num_threads()
    try:
        for b, d, L, n, rank, reverse, threads in [
                (2, 37, 70, 16, 14, False, 1),  # the bench projector's R, ragged vector, two tiles
                (1, 40, 130, 4, 16, True, 3),  # R = 4 N, reverse, three threads
                (3, 16, 1, 4, 1, False, 1)]:  # R = 1, L = 1
            t = factored_delta(_inputs(torch.float32, b=b, d=d, L=L, n=n, h0=b == 2), rank)
            full = dict(t, delta=t["delta_proj"] @ t["delta"], delta_proj=None)
            torch.set_num_threads(threads)
            fused.clear()
            with torch.no_grad():
                got = selective_scan(**t, delta_softplus=True, return_last_state=True, reverse=reverse)
            assert fused and all(fused), "the kernel did not form delta from its factor"
            want = selective_scan_reference(**full, delta_softplus=True, return_last_state=True, reverse=reverse)
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        torch.set_num_threads(1)
        for rank, grad in [(9, False), (9, True), (0, False)]:  # R > 4 N; autograd; R = 0
            t = factored_delta(_inputs(torch.float32, d=24, L=40, n=2), rank=rank)
            fused.clear()
            with torch.set_grad_enabled(grad):
                got = selective_scan(**t, delta_softplus=True)
            assert fused == [False]
            torch.testing.assert_close(got, selective_scan_reference(**t, delta_softplus=True), rtol=2e-5, atol=2e-5)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("isa,lanes", VARIANTS, ids=[f"{i}-{n or 'own'}" for i, n in VARIANTS])
def test_each_isa_path_reads_and_writes_bf16_in_inference(monkeypatch, isa, lanes):
    """bf16 u, delta, z (what the mixer hands over under bf16 autocast), without autograd — D and
    delta_bias requiring grad, as a model's parameters do under no_grad: the kernel reads them and
    writes y in bf16 itself (no float32 copies) and keeps no per-chunk states for a backward, the
    float32 kernel's result on the widened inputs rounded as torch rounds, bit for bit: time-major and
    channel-major, ragged vectors, constant C, reverse, a factored delta; the last state float32 as
    before. With autograd the inputs are widened, y rounded after and the states kept, as before."""
    if not isa_runs(isa):
        pytest.skip(f"this CPU does not run {isa} (test_every_isa_path_compiles builds it)")
    lib = cpu_kernel.build(isa, lanes)
    monkeypatch.setattr(cpu_kernel, "load", lambda *a, **k: lib)
    io = []
    real = cpu_kernel.scan_forward
    monkeypatch.setattr(cpu_kernel, "scan_forward",
                        lambda *a, **k: io.append((a[1].dtype, a[13].dtype, a[14] is not None)) or real(*a, **k))
    for b, d, L, n, const, reverse, time_major, rank in [(2, 37, 70, 16, "", False, True, 0),
                                                          (1, 40, 33, 5, "C", True, False, 0),
                                                          (2, 24, 130, 4, "", False, True, 14)]:
        t = _inputs(torch.float32, b=b, d=d, L=L, n=n, const=const, h0=b == 2)
        if rank:
            t = factored_delta(t, rank)
        t = {k: (v.detach().bfloat16() if k in ("u", "delta", "z") else
                 v.detach().requires_grad_(k in ("D", "delta_bias"))) for k, v in t.items()}
        if time_major:
            t = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v)
                 for k, v in t.items()}
        wide = {k: (v.float() if k in ("u", "delta", "z") else v) for k, v in t.items()}
        with torch.no_grad():
            io.clear()
            got, last = selective_scan(**t, delta_softplus=True, return_last_state=True, reverse=reverse)
            assert io and all(x == (torch.bfloat16, torch.bfloat16, False) for x in io), io
            want, want_last = selective_scan(**wide, delta_softplus=True, return_last_state=True, reverse=reverse)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
        assert last.dtype == torch.float32 and torch.equal(last, want_last)
    t = {k: (v.detach().bfloat16().requires_grad_() if k in ("u", "delta", "z") else v.detach())
         for k, v in _inputs(torch.float32, d=16, L=20, n=4).items()}
    io.clear()
    got = selective_scan(**t, delta_softplus=True)
    assert io == [(torch.float32, torch.float32, True)] and got.dtype == torch.bfloat16
    got.float().sum().backward()
    assert t["u"].grad is not None and t["u"].grad.dtype == torch.bfloat16


def test_channel_ranges_follow_the_vector_width(monkeypatch):
    monkeypatch.setattr(fast_scan, "_PARALLEL_MIN_WORK", 0)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fast_scan._kernel_ranges(40, 10**9, 16) == [(0, 32), (32, 40)]  # whole 16-channel vectors
        assert fast_scan._kernel_ranges(40, 10**9, 4) == [(0, 20), (20, 40)]
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("isa", list(cpu_kernel.ISAS))
def test_every_isa_path_compiles(isa):
    """Each path builds with its flags here, also the ones this CPU cannot run (compiled, not loaded)."""
    if isa != "generic" and cpu_kernel.platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 flags")
    spec = cpu_kernel.ISAS[isa]
    data, _ = cpu_kernel._library_bytes(shutil.which("cc") or "gcc", spec, spec.lanes)
    assert data[:4] == b"\x7fELF" or len(data) > 1000


def test_isa_detection_reads_cpu_flags_not_vendor(monkeypatch):
    def detect(flags, machine="x86_64", capability="DEFAULT"):
        monkeypatch.setattr(cpu_kernel, "cpu_flags", lambda: flags)
        monkeypatch.setattr(cpu_kernel.platform, "machine", lambda: machine)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        cpu_kernel.detect_isa.cache_clear()
        return cpu_kernel.detect_isa()

    try:
        skx = {"sse2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"}
        assert detect(skx) == "avx512"
        assert detect(skx | {"avx512_bf16"}) == "avx512bf16"  # Cooper Lake, Sapphire Rapids, Zen 4
        assert detect(skx - {"avx512vl"}) == "avx2"  # e.g. Xeon Phi's AVX-512F alone: the AVX2 build
        assert detect({"sse2", "avx", "avx2", "fma"}) == "avx2"
        assert detect({"sse2", "avx", "avx2"}) == "generic"  # no FMA
        assert detect({"sse2"}) == "generic"
        assert detect(skx, machine="aarch64") == "generic"
        assert detect(None, capability="AVX512") == "avx512"  # no /proc/cpuinfo: PyTorch's check
        assert detect(None, capability="AVX2") == "avx2"
        assert detect(None, capability="DEFAULT") == "generic"
    finally:
        cpu_kernel.detect_isa.cache_clear()


def test_env_forces_a_narrower_path_never_a_wider_one(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernel, "detect_isa", lambda: "avx2")
    monkeypatch.setattr(cpu_kernel, "_warned", set())
    monkeypatch.setenv(cpu_kernel.ENV_ISA, "generic")
    assert cpu_kernel.selected_isa() == "generic"
    lib = cpu_kernel.load()
    assert lib.storm_isa == "generic" and lib.storm_lanes == 4
    assert cpu_kernel.load() is lib
    for bad in ("avx512", "sse9"):
        monkeypatch.setenv(cpu_kernel.ENV_ISA, bad)
        with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
            assert cpu_kernel.selected_isa() == "avx2"
        assert f"{cpu_kernel.ENV_ISA}={bad}" in caplog.text
    monkeypatch.delenv(cpu_kernel.ENV_ISA)
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        assert cpu_kernel.selected_isa("avx512") == "avx2"  # an explicit request is held to the CPU too
    assert "asked for avx512 needs instructions this CPU does not report" in caplog.text


def test_a_path_that_fails_to_build_falls_back_to_a_narrower_one(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernel, "detect_isa", lambda: "avx2")
    monkeypatch.setattr(cpu_kernel, "_libs", {})
    monkeypatch.setattr(cpu_kernel, "_warned", set())
    broken = cpu_kernel.Isa("avx2", 8, ("-mno-such-flag",), ("avx2", "fma"))
    monkeypatch.setitem(cpu_kernel.ISAS, "avx2", broken)
    with caplog.at_level("WARNING", logger="storm_vlm.model.ssm"):
        lib = cpu_kernel.load("avx2")
    assert lib.storm_isa == "generic"
    assert "avx2 did not build" in caplog.text
