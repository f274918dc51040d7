"""Worker threads (scan channel blocks, BiMambaMixer's two directions) under the caller's autocast,
inference mode and no_grad, on the C-kernel path and the pure-PyTorch path, batch > 1."""

import contextlib
import threading

import pytest
import torch

from storm_vlm.model.ssm import BiMambaMixer, cpu_kernel, fast_scan, selective_scan
from storm_vlm.model.ssm import mixer as mixer_mod
from test_scan import _inputs, _run

PATHS = ["kernel", "pytorch"]


@pytest.fixture
def two_threads(monkeypatch):
    """Two torch threads, and every size big enough to be split over them."""
    monkeypatch.setattr(mixer_mod, "_PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fast_scan, "_PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(fast_scan, "_MIN_BLOCK", 8)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


def _path(monkeypatch, path):
    if path == "kernel":
        if cpu_kernel.load() is None:
            pytest.skip("no C compiler: the kernel is optional")
    else:
        monkeypatch.setenv(cpu_kernel.ENV_SWITCH, "0")
        assert cpu_kernel.load() is None


def _threads_of(monkeypatch, obj, name):
    """The thread of every call to obj.<name> from now on."""
    seen = []
    real = getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **k: seen.append(threading.get_ident()) or real(*a, **k))
    return seen


def _split(calls) -> bool:
    """Several calls, some in a worker thread."""
    return len(calls) >= 2 and any(t != threading.get_ident() for t in calls)


def _block_threads(monkeypatch, path):
    """The threads that scan channel blocks, forward and backward, on this path."""
    if path == "kernel":
        fwd = _threads_of(monkeypatch, cpu_kernel, "scan_forward")
        bwd = _threads_of(monkeypatch, cpu_kernel, "scan_backward")
    else:
        fwd = _threads_of(monkeypatch, fast_scan, "_forward_block")
        bwd = _threads_of(monkeypatch, fast_scan, "_backward_block")
    return fwd, bwd


MODES = {
    "grad": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", list(MODES))
def test_bimamba_directions_in_threads_under_autocast(monkeypatch, two_threads, path, mode):
    """Under CPU autocast the worker running the backward direction must autocast too (x_proj_b on
    a bf16 input with an fp32 weight fails otherwise), and inherit inference mode / no_grad."""
    _path(monkeypatch, path)
    torch.manual_seed(0)
    m = BiMambaMixer(16)
    x = torch.randn(3, 40, 16)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False
    directions = _threads_of(monkeypatch, m, "_direction")

    def run(parallel):
        m.parallel_directions = parallel
        m.zero_grad()
        xr = x.clone().requires_grad_(mode == "grad")
        with MODES[mode](), torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xr, mask)
        assert out.dtype == torch.bfloat16
        grads = {}
        if mode == "grad":
            out.float().square().sum().backward()
            grads = {"x": xr.grad, **{k: p.grad for k, p in m.named_parameters()}}
        return out, grads

    par, par_grads = run(True)
    assert len(set(directions)) == 2, "the two directions did not run in two threads"
    assert torch.is_inference(par) == (mode == "inference_mode")
    serial, serial_grads = run(False)
    torch.testing.assert_close(par.float(), serial.float(), rtol=2e-2, atol=2e-2)
    for k, g in serial_grads.items():
        assert par_grads[k] is not None, k
        torch.testing.assert_close(par_grads[k], g, rtol=5e-2, atol=5e-2, msg=lambda s: f"{k}: {s}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_scan_channel_blocks_in_threads_under_inference_mode(monkeypatch, two_threads, path, mode):
    """The channel blocks write into tensors the caller made; under inference mode those are
    inference tensors, which a worker outside inference mode may not update in place."""
    _path(monkeypatch, path)
    t = {k: (v.detach() if v is not None else None) for k, v in _inputs(torch.float32, b=2, d=32, L=40).items()}
    want = selective_scan(**t, delta_softplus=True, return_last_state=True)
    blocks, _ = _block_threads(monkeypatch, path)
    with MODES[mode]():
        got = selective_scan(**t, delta_softplus=True, return_last_state=True)
    assert _split(blocks)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_scan_ignores_autocast(monkeypatch, two_threads, path, threads):
    """float32 inputs are scanned in float32 under autocast, forward and a backward run inside the
    autocast region, in the calling thread (batch > 1 makes a chunk's rows of y non-contiguous:
    y = C.h then takes the batched-matmul fallback) and in worker threads."""
    _path(monkeypatch, path)
    torch.set_num_threads(threads)
    t = _inputs(torch.float32, b=2, d=40, L=30, n=8)
    plain = _run(selective_scan, t, True, chunk=8)
    fwd, bwd = _block_threads(monkeypatch, path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = _run(selective_scan, t, True, chunk=8)
    if threads > 1:
        assert _split(fwd) and _split(bwd)  # forward and backward both split
    for k in plain:
        assert auto[k].dtype == torch.float32, k
        torch.testing.assert_close(auto[k], plain[k], rtol=1e-6, atol=1e-6, msg=lambda s: f"{k}: {s}")
