"""The C linear kernel (ssm/_linear_kernel.c), the matmul backend's third choice: F.linear's result
within float rounding on every vector width the CPU runs, for any row count, width and input layout;
the same bits however the rows are split over threads; and its packed weight follows the weight."""

import pytest
import torch
import torch.nn.functional as F

from storm_vlm.model import matmul_backend
from helpers import KERNEL_ISAS, use_kernel_library

# (rows, in, out): rows that are not whole register blocks or row blocks, outputs narrower than one
# vector and not whole vectors, the bench model's shapes
SHAPES = [(1, 5, 3), (7, 13, 17), (65, 72, 269), (130, 448, 46), (200, 224, 896), (64, 1, 40)]


def _max_error(y, x, w, b):
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    return (y.double() - ref).abs().max().item(), ref


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("rows, k, n", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
def teststorm_linear_is_f_linear(monkeypatch, isa, rows, k, n, bias):
    lib = use_kernel_library(monkeypatch, isa)
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = matmul_backend.storm_linear(x, w, b, lib)
    ours, ref = _max_error(y, x, w, b)
    theirs, _ = _max_error(F.linear(x, w, b), x, w, b)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    # summed in order of the inner index: a little further from float64 than BLAS's blocked sums
    assert ours <= 4 * theirs + 1e-6 * ref.abs().max().item()


def test_any_input_layout_and_leading_dims(monkeypatch):
    lib = use_kernel_library(monkeypatch, "generic")
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(10, 12, generator=g), torch.randn(10, generator=g)
    x = torch.randn(2, 40, 24, generator=g)
    for view in (x[..., :12], x[..., ::2], x.transpose(0, 1)[..., 12:]):
        y = matmul_backend.storm_linear(view, w, b, lib)
        assert y.shape == (*view.shape[:-1], 10)
        torch.testing.assert_close(y, F.linear(view, w, b), rtol=1e-5, atol=1e-5)


def test_thread_split_changes_no_bit():
    lib = matmul_backend.cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(1000, 64, generator=g), torch.randn(50, 64, generator=g), torch.randn(50, generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 3):
            torch.set_num_threads(n)
            outs.append(matmul_backend.storm_linear(x, w, b, lib))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_packed_weight_follows_the_weight():
    """New values written into the weight or bias, or a new bias tensor, are used at the next call;
    weights made under inference mode (no version counter) are packed at every call."""
    lib = matmul_backend.cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(70, 8, generator=g), torch.randn(20, 8, generator=g), torch.randn(20, generator=g)
    matmul_backend.storm_linear(x, w, b, lib)
    w.mul_(2.0)
    torch.testing.assert_close(matmul_backend.storm_linear(x, w, b, lib), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    b.add_(1.0)
    torch.testing.assert_close(matmul_backend.storm_linear(x, w, b, lib), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    b2 = torch.randn(20, generator=g)
    torch.testing.assert_close(matmul_backend.storm_linear(x, w, b2, lib), F.linear(x, w, b2), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        wi = torch.randn(20, 8, generator=g)
        first = matmul_backend.storm_linear(x, wi, None, lib)
        wi.add_(1.0)
        torch.testing.assert_close(matmul_backend.storm_linear(x, wi, None, lib), F.linear(x, wi),
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first, F.linear(x, wi - 1.0), rtol=1e-5, atol=1e-5)
