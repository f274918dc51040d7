"""The code paths that only run on a CUDA GPU, checked on CPU.

mamba-ssm's `selective_scan_fn` is stood in for by `fake_selective_scan_fn`, which refuses what the
real one's C++ entry point (csrc/selective_scan/selective_scan.cpp, `selective_scan_fwd`) refuses,
returns what it returns (including its last state's missing gradient), and computes with
`selective_scan_reference`; `scan._MAMBA_SSM_DEVICE` is pointed at the CPU so the dispatch takes it.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from storm_vlm import precision
from storm_vlm.model.ssm import BiMambaMixer, MambaMixer, selective_scan, selective_scan_reference
from storm_vlm.model.ssm import scan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

KERNEL_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def fake_selective_scan_fn(calls, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """mamba-ssm's selective_scan_fn: its Python wrapper makes u, delta, B, C, z, D contiguous in the
    last dim, then the C++ checks dtypes and shapes; its last state is x[:, :, -1, 1::2] of the
    (b, d, n_chunks, 2N) chunk states (none for L = 0); its backward ignores that state's gradient."""
    itype = u.dtype
    assert itype in KERNEL_INPUTS and A.dtype == torch.float32, (itype, A.dtype)
    assert delta.dtype == itype and (z is None or z.dtype == itype), (delta.dtype, z)
    for t in (B, C):  # constant B / C in A's dtype, per-step ones in u's
        assert t.dtype == (torch.float32 if t.dim() == 2 else itype), (t.dtype, itype)
    for t in (D, delta_bias):
        assert t is None or t.dtype == torch.float32, t.dtype
    assert delta_bias is None or delta_bias.stride(-1) == 1
    b, d, length = u.shape
    assert delta.shape == (b, d, length) and A.shape[0] == d, (delta.shape, A.shape)
    assert A.shape[1] <= 256, "selective_scan only supports state dimension <= 256"
    calls.append(itype)
    out, last = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
    if length == 0:
        raise IndexError("index -1 is out of bounds for dimension 2 with size 0")
    return (out, last.detach()) if return_last_state else out


@pytest.fixture
def kernel_calls(monkeypatch):
    """The dtypes of the scans that reached the (fake) mamba-ssm kernel."""
    calls = []
    monkeypatch.setattr(scan, "_MAMBA_SSM_DEVICE", "cpu")
    monkeypatch.setattr(scan, "_mamba_ssm_fn", lambda: functools.partial(fake_selective_scan_fn, calls))
    return calls


def _inputs(dtype=torch.float32, b=2, d=8, n=4, length=12, constant_B=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    u, z, delta = r(b, d, length).to(dtype), r(b, d, length).to(dtype), r(b, d, length, scale=0.5).to(dtype)
    A = -torch.exp(r(d, n, scale=0.5))
    B = r(d, n).to(dtype) if constant_B else r(b, n, length).to(dtype)
    C = r(b, n, length).to(dtype)
    return [u, delta, A, B, C, r(d), z, r(d, scale=0.1)]


def _close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype,constant_B", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_dispatch_gives_the_reference_results(kernel_calls, reverse, dtype, constant_B):
    """Reverse scans flip the kernel's inputs and output; a constant B reaches it in float32."""
    x = _inputs(dtype, constant_B=constant_B)
    y, last = selective_scan(*x, delta_softplus=True, return_last_state=True, reverse=reverse)
    y_ref, last_ref = selective_scan_reference(*x, delta_softplus=True, return_last_state=True, reverse=reverse)
    assert kernel_calls == [dtype]
    _close(y, y_ref, dtype)
    _close(last, last_ref, dtype)


def test_gradient_through_the_last_state_is_not_dropped(kernel_calls):
    """mamba-ssm's backward ignores the last state's gradient: a scan whose last state autograd
    records runs the PyTorch path (MambaMixer.forward(return_state=True) promises both differentiable);
    without autograd the kernel still runs."""
    x = _inputs()
    leaves = [t.clone().requires_grad_(True) for t in x]
    ref_leaves = [t.clone().requires_grad_(True) for t in x]
    gy, gl = torch.randn(2, 8, 12), torch.randn(2, 8, 4)
    for ins, fn in ((leaves, selective_scan), (ref_leaves, selective_scan_reference)):
        y, last = fn(*ins, delta_softplus=True, return_last_state=True)
        ((y * gy).sum() + (last * gl).sum()).backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        selective_scan(*leaves, delta_softplus=True, return_last_state=True)
    assert kernel_calls == [torch.float32]


@pytest.mark.parametrize("case", ["float32 B beside bfloat16 u", "float64 A", "N = 257", "empty sequence",
                                  "initial_state"])
def test_what_the_kernel_refuses_runs_the_pytorch_path(kernel_calls, case):
    dtype = torch.bfloat16 if "bfloat16" in case else torch.float32
    x = _inputs(dtype, n=257 if case == "N = 257" else 4, length=0 if case == "empty sequence" else 12)
    extra = {}
    if case == "float32 B beside bfloat16 u":
        x[3] = x[3].float()
    elif case == "float64 A":
        x[2] = x[2].double()
    elif case == "initial_state":
        extra["initial_state"] = torch.randn(2, 8, 4)
    y, last = selective_scan(*x, delta_softplus=True, return_last_state=True, **extra)
    y_ref, last_ref = selective_scan_reference(*x, delta_softplus=True, return_last_state=True, **extra)
    assert kernel_calls == []
    _close(y, y_ref, dtype)
    _close(last, last_ref, dtype)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("cls", [MambaMixer, BiMambaMixer])
def test_mixers_hand_the_kernel_what_it_takes(kernel_calls, monkeypatch, cls, autocast):
    """bf16 weights, or float32 ones under bf16 autocast (as training on CUDA runs), with and without
    padding: every scan reaches the kernel in bf16 and the mixer's output matches the PyTorch path's."""
    torch.manual_seed(0)
    mixer = cls(16).eval()
    if not autocast:
        mixer = mixer.to(torch.bfloat16)
    x = torch.randn(2, 10, 16, dtype=torch.float32 if autocast else torch.bfloat16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    outs = []
    for m in (None, mask):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs.append(mixer(x, mask=m))
    assert kernel_calls == [torch.bfloat16] * (4 if cls is BiMambaMixer else 2)
    monkeypatch.setattr(scan, "_MAMBA_SSM_DEVICE", "cuda")  # the PyTorch path, for comparison
    for m, out in zip((None, mask), outs):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.testing.assert_close(out.float(), mixer(x, mask=m).float(), rtol=3e-2, atol=3e-2)


# ---- finding mamba-ssm ------------------------------------------------------------------------------


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """write(interface_source, init_source): a `mamba_ssm` package on sys.path, forgotten afterwards."""
    def write(interface: str, init: str = ""):
        ops = tmp_path / "mamba_ssm" / "ops"
        ops.mkdir(parents=True)
        (tmp_path / "mamba_ssm" / "__init__.py").write_text(init)
        (ops / "__init__.py").write_text("")
        (ops / "selective_scan_interface.py").write_text(interface)
        monkeypatch.syspath_prepend(str(tmp_path))
        scan._mamba_ssm_fn.cache_clear()

    yield write
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    scan._mamba_ssm_fn.cache_clear()


def test_a_mamba_ssm_that_does_not_import_is_reported(fake_package):
    """mamba-ssm 2.2's package __init__ reaches transformers names that transformers 5 removed."""
    fake_package("def selective_scan_fn(*args):\n    pass\n",
                 init="from transformers.generation import GreedySearchDecoderOnlyOutput\n")
    with pytest.warns(UserWarning, match="does not import.*GreedySearchDecoderOnlyOutput"):
        assert scan._mamba_ssm_fn() is None


def test_a_mamba_ssm_without_its_kernel_is_not_called(fake_package):
    """Later mamba-ssm builds selective_scan_cuda only with MAMBA_KEEP_CUDA_BUILD=TRUE; without it
    selective_scan_fn imports and raises when called."""
    fake_package("selective_scan_cuda = None\n\ndef selective_scan_fn(*args):\n"
                 "    raise RuntimeError('selective_scan_cuda is not installed')\n")
    with pytest.warns(UserWarning, match="without its CUDA kernel"):
        assert scan._mamba_ssm_fn() is None


def test_no_mamba_ssm_is_quiet():
    scan._mamba_ssm_fn.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan._mamba_ssm_fn() is None


# ---- precision --------------------------------------------------------------------------------------


@pytest.mark.parametrize("capability,expected", [((7, 0), "float32"), ((7, 5), "float32"), ((8, 0), "bfloat16"),
                                                 ((9, 0), "bfloat16")])
def test_auto_precision_wants_native_bf16_on_cuda(monkeypatch, capability, expected):
    """torch.cuda.is_bf16_supported() says True where bf16 is only emulated (V100, T4): auto must not
    pick bf16 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    resolved = precision.resolve_precision("auto", "cuda")
    assert resolved.name == expected and resolved.autocast is None


# ---- benchmarks/gpu_check.py ------------------------------------------------------------------------


def test_gpu_check_scan_reaches_the_kernel(kernel_calls):
    """Outputs and gradients, and the last state, each through mamba-ssm's kernel."""
    out = gpu_check.check_scan("cpu")
    assert out["mamba_ssm"] is True
    assert [c["mamba_ssm_calls"] for c in out["cases"]] == [2, 2, 2, 2]


def test_gpu_check_keeps_its_json_when_cut_short(tmp_path, monkeypatch):
    """A run its time limit stops (here: in the profile) leaves the finished checks on disk."""
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "dry_profile", killed)
    out = tmp_path / "gpu_check.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--dry-run", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["scan_vs_reference"]["ok"] and result["bf16_train_step"]["ok"]
    assert result["profile"] == {"ok": None, "running": True}


def test_gpu_check_ddp_worker_binds_its_gpu_before_nccl(monkeypatch):
    order = []

    class Stop(Exception):
        pass

    def init_process_group(backend, **kwargs):
        order.append(("init_process_group", backend))
        raise Stop

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: order.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        gpu_check.ddp_worker()
    assert order == [("set_device", 1), ("init_process_group", "nccl")]


FAKE_TORCHRUN = """
import os, signal, subprocess, sys
worker = None
def stop(*_):  # as torchrun's agent: SIGTERM closes every worker's session
    os.killpg(worker.pid, signal.SIGTERM)
    sys.exit(1)
signal.signal(signal.SIGTERM, stop)
worker = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a hung worker, in a session of its own
open(sys.argv[1], "w").write(str(worker.pid))
worker.wait()
"""


def test_gpu_check_stops_a_hung_torchrun_with_its_workers(tmp_path):
    """A hung NCCL step must not leave torchrun's workers (each in a session of its own) on the GPUs."""
    pid_file = tmp_path / "worker.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        gpu_check.run_torchrun([sys.executable, "-c", FAKE_TORCHRUN, str(pid_file)], dict(os.environ), timeout_s=3)
    worker = int(pid_file.read_text())

    def alive():
        try:
            return Path(f"/proc/{worker}/stat").read_text().split()[2] != "Z"  # a zombie is dead, not yet reaped
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive():
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the hung worker outlived the timeout")
