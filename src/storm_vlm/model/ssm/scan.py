"""Selective scan (Mamba-1's S6 recurrence).

For every batch b, channel d and state n::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (h_0 = 0, or initial_state)
    y_t = sum_n C_t h_t + D * u_t ;   out_t = y_t * silu(z_t)    (when z is given)

with ``delta = softplus(delta + delta_bias)`` when asked. Argument layout and meaning
are mamba-ssm's ``selective_scan_fn``:

- ``u, delta, z``: (batch, dim, L)
- ``A``: (dim, N), real (negative for a stable scan)
- ``B, C``: (batch, N, L), or grouped (batch, groups, N, L) where channel d uses group
  ``d // (dim // groups)``, or constant over time (dim, N) — one row per channel, as mamba-ssm's
  ``selective_scan_ref`` reads a 2-D B or C (``B[d, n]`` for every step); B and C choose apart
- ``D, delta_bias``: (dim,)
- ``delta_proj`` (keyword, our extension): (dim, R). Then ``delta`` is (batch, R, L) and the scan
  uses ``delta_proj @ delta``, Mamba's dt_proj without its bias (which goes in ``delta_bias``). The
  CPU kernel forms that product tile by tile inside the scan when it runs without autograd, so the
  (batch, dim, L) step sizes never go through memory; every other path computes them first.
- ``initial_state`` (keyword, our extension; mamba-ssm has none): (batch, dim, N), the state h_0
  the scan starts from (the state entering position L-1 when ``reverse``); None means zeros. It is
  differentiable. Passing the ``last_state`` of one call as the next call's ``initial_state``
  scans a sequence in pieces exactly as in one go (see ``MambaMixer.forward(state=...)``).

``out`` is (batch, dim, L) in u's dtype; ``last_state`` (batch, dim, N) is returned in the
compute dtype (float32, or float64 for float64 inputs) like mamba-ssm's.

``selective_scan_reference`` is the definition: a plain loop over time. ``selective_scan``
gives the same results faster (see ``storm_vlm.model.ssm.fast_scan``) and dispatches to
mamba-ssm's CUDA kernel when the inputs live on CUDA, mamba-ssm imports with its kernel built,
and the kernel computes what was asked (see ``_takes_mamba_ssm``).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from storm_vlm.model.ssm.fast_scan import DEFAULT_CHUNK, chunked_scan, project_delta

__all__ = ["selective_scan", "selective_scan_reference", "ScanShapes", "check_scan_inputs"]


@dataclass(frozen=True)
class ScanShapes:
    batch: int
    dim: int
    length: int
    state: int
    groups: int  # of the per-step B / C (1 when both are constant)
    compute_dtype: torch.dtype
    variable_B: bool = True  # False: B is constant over time, (dim, N)
    variable_C: bool = True


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None,
                      delta_proj=None) -> ScanShapes:
    """Validate selective-scan arguments; raise ValueError naming the shapes/dtypes on mismatch."""
    names = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                 delta_proj=delta_proj)
    devices, compute = set(), torch.float32
    for name, t in names.items():
        if t is None:
            if name in ("u", "delta", "A", "B", "C"):
                raise ValueError(f"selective_scan: {name} is required, got None")
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            if t.is_complex():
                raise ValueError(f"selective_scan: complex {name} ({t.dtype}) is not supported; "
                                 "use a real A, B, C")
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {t.dtype}")
        devices.add(t.device)
        if t.dtype == torch.float64:
            compute = torch.float64

    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {_shape(u)}")
    batch, dim, length = u.shape
    if delta_proj is not None:
        if delta_proj.dim() != 2 or delta_proj.shape[0] != dim:
            raise ValueError(f"selective_scan: delta_proj must be (dim, R) = ({dim}, R), "
                             f"got shape {_shape(delta_proj)}")
        want = (batch, delta_proj.shape[1], length)
        if delta.shape != want:
            raise ValueError(f"selective_scan: with delta_proj {_shape(delta_proj)}, delta must be (batch, R, L) = "
                             f"{want}, got shape {_shape(delta)}")
    elif delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {_shape(delta)} must equal u shape {_shape(u)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {_shape(z)} must equal u shape {_shape(u)}")
    if delta.dtype != u.dtype or (z is not None and z.dtype != u.dtype):
        raise ValueError(
            f"selective_scan: u, delta and z must share a dtype, got u {u.dtype}, delta {delta.dtype}"
            + ("" if z is None else f", z {z.dtype}")
        )
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim, N) = ({dim}, N), got shape {_shape(A)} (u is {_shape(u)})")
    state = A.shape[1]
    groups = None
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2 and t.shape == (dim, state):
            continue  # constant over time
        if t.dim() == 3 and t.shape == (batch, state, length):
            g = 1
        elif t.dim() == 4 and t.shape[0] == batch and t.shape[2:] == (state, length) and t.shape[1] >= 1:
            g = t.shape[1]
        else:
            raise ValueError(
                f"selective_scan: {name} must be (batch, N, L) = ({batch}, {state}, {length}), "
                f"(batch, groups, N, L) or constant (dim, N) = ({dim}, {state}), got shape {_shape(t)} "
                f"(u {_shape(u)}, A {_shape(A)})"
            )
        if dim % g:
            raise ValueError(f"selective_scan: {name} has {g} groups, which does not divide dim {dim} (shape {_shape(t)})")
        if groups is not None and g != groups:
            raise ValueError(f"selective_scan: B shape {_shape(B)} and C shape {_shape(C)} have different group counts")
        groups = g
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim,) = ({dim},), got shape {_shape(t)}")
    if initial_state is not None and initial_state.shape != (batch, dim, state):
        raise ValueError(f"selective_scan: initial_state must be (batch, dim, N) = ({batch}, {dim}, {state}), "
                         f"got shape {_shape(initial_state)}")
    if len(devices) > 1:
        raise ValueError(f"selective_scan: all inputs must be on one device, got {sorted(map(str, devices))}")
    return ScanShapes(batch, dim, length, state, groups or 1, compute, B.dim() != 2, C.dim() != 2)


def _grouped(t: Tensor, groups: int) -> Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, G, N, L) view; a constant (dim, N) as it is."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _flip_time(t: Tensor | None) -> Tensor | None:
    """t reversed along L; a constant B / C (2-D, no time axis) as it is."""
    return t if t is None or t.dim() == 2 else t.flip(-1)


def _prepare_delta(delta: Tensor, delta_bias, delta_softplus: bool, dtype: torch.dtype) -> Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False, *, reverse: bool = False,
                             initial_state: Tensor | None = None, delta_proj: Tensor | None = None):
    """The definition of the selective scan: a sequential loop over time.

    Shapes as in the module docstring. Materialises (batch, dim, L, N) tensors; use it to
    check faster paths, not to train. Its autograd graph is linear in L (time steps are taken
    with ``unbind``, whose backward is one ``stack``; indexing ``t[:, :, i]`` in the loop would
    make the backward quadratic).
    """
    s = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_proj)
    if reverse:
        res = selective_scan_reference(u.flip(-1), delta.flip(-1), A, _flip_time(B), _flip_time(C), D,
                                       _flip_time(z), delta_bias, delta_softplus, return_last_state,
                                       initial_state=initial_state, delta_proj=delta_proj)
        return (res[0].flip(-1), res[1]) if return_last_state else res.flip(-1)
    if delta_proj is not None:
        delta = project_delta(delta, delta_proj)
    dt = s.compute_dtype
    b, d, L, n, g = s.batch, s.dim, s.length, s.state, s.groups
    h_per_g = d // g
    uf = u.to(dt)
    delta = _prepare_delta(delta, delta_bias, delta_softplus, dt)
    Af = A.to(dt)

    def per_step(t: Tensor) -> Tensor:
        """B or C as (b, d, L, n) per channel and step: a group's row repeated over its channels,
        or a constant (d, n) repeated over batch and time."""
        if t.dim() == 2:
            return t.to(dt)[None, :, None, :].expand(b, d, L, n)
        tg = _grouped(t, g).to(dt).transpose(-1, -2)  # (b, g, L, n)
        return tg.unsqueeze(2).expand(b, g, h_per_g, L, n).reshape(b, d, L, n)

    deltaA = torch.exp(delta.unsqueeze(-1) * Af.unsqueeze(1))  # (b, d, L, n)
    deltaB_u = (delta * uf).unsqueeze(-1) * per_step(B)  # (b, d, L, n)

    h = uf.new_zeros(b, d, n) if initial_state is None else initial_state.to(dt)
    ys = []
    for dA_t, dBu_t, C_t in zip(deltaA.unbind(2), deltaB_u.unbind(2), per_step(C).unbind(2)):
        h = dA_t * h + dBu_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=2) if ys else uf.new_zeros(b, d, 0)
    out = y if D is None else y + uf * D.to(dt)[:, None]
    if z is not None:
        out = out * F.silu(z.to(dt))
    out = out.to(u.dtype)
    return (out, h) if return_last_state else out


_MAMBA_SSM_DEVICE = "cuda"  # the device type mamba-ssm's kernel runs on
_MAMBA_SSM_MAX_STATE = 256  # its largest N (selective_scan_cuda refuses more)
_MAMBA_SSM_INPUTS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes it takes for u, delta, z, B, C


@functools.lru_cache(maxsize=None)
def _mamba_ssm_fn():
    """mamba-ssm's ``selective_scan_fn``, or None where it cannot run: not installed (silently), or
    installed but not importable or built without its CUDA kernel (a warning says why, once: CUDA
    then runs the slower PyTorch scan). mamba-ssm before 2.3 does not import with transformers 5
    (its ``mamba_ssm.utils.generation`` imports names transformers 5 removed); a mamba-ssm built
    without ``MAMBA_KEEP_CUDA_BUILD=TRUE`` (later releases' default) imports but has no kernel."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return None
    try:
        from mamba_ssm.ops import selective_scan_interface as interface
    except Exception as exc:  # noqa: BLE001 - anything a broken install raises
        warnings.warn(f"mamba-ssm is installed but does not import ({type(exc).__name__}: {exc}); selective_scan "
                      "runs its PyTorch path on CUDA (mamba-ssm >= 2.3 imports with transformers 5)", stacklevel=3)
        return None
    if getattr(interface, "selective_scan_cuda", True) is None:
        warnings.warn("mamba-ssm is installed without its CUDA kernel (selective_scan_cuda); selective_scan runs its "
                      "PyTorch path on CUDA (reinstall with MAMBA_KEEP_CUDA_BUILD=TRUE pip install "
                      "--no-build-isolation mamba-ssm)", stacklevel=3)
        return None
    return interface.selective_scan_fn


def _takes_mamba_ssm(s: ScanShapes, u: Tensor, B: Tensor, C: Tensor, tensors, return_last_state: bool,
                     initial_state: Tensor | None) -> bool:
    """Whether mamba-ssm's kernel computes this scan as ``selective_scan_reference`` defines it.

    It runs on CUDA, from a zero state, for N <= 256; it takes u, delta, z and per-step B, C in one
    of its dtypes (no float64, whose compute dtype it lacks); and its backward drops the last
    state's gradient, so a last state that autograd records stays on the PyTorch path."""
    if u.device.type != _MAMBA_SSM_DEVICE or initial_state is not None:
        return False
    if s.compute_dtype != torch.float32 or u.dtype not in _MAMBA_SSM_INPUTS or s.state > _MAMBA_SSM_MAX_STATE:
        return False
    if any(t.dim() > 2 and t.dtype != u.dtype for t in (B, C)):
        return False
    return not (return_last_state and torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in tensors))


def _mamba_ssm_scan(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse):
    """``fn`` (mamba-ssm's ``selective_scan_fn``) on the scan's inputs in the dtypes its kernel requires:
    A, D, delta_bias and constant B, C float32 (exact from float16 / bfloat16), D and delta_bias
    contiguous; ``reverse`` as the scan of the inputs flipped along L."""
    def f32(t):
        return None if t is None else t.float().contiguous()

    B, C = (f32(t) if t.dim() == 2 else t for t in (B, C))
    if reverse:
        u, delta, B, C, z = (_flip_time(t) for t in (u, delta, B, C, z))
    res = fn(u, delta, A.float(), B, C, f32(D), z, f32(delta_bias), delta_softplus, return_last_state)
    if not reverse:
        return res
    return (res[0].flip(-1), res[1]) if return_last_state else res.flip(-1)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, reverse: bool = False, chunk: int | None = DEFAULT_CHUNK,
                   initial_state: Tensor | None = None, delta_proj: Tensor | None = None):
    """Selective scan, same arguments and results as ``selective_scan_reference``; differentiable.

    On CUDA with mamba-ssm importable this calls its fused kernel (``selective_scan_fn``) wherever
    that computes what was asked (``_takes_mamba_ssm``: no ``initial_state``, no gradient through
    the last state, N <= 256, inputs in the kernel's dtypes). Elsewhere it runs the chunked
    pure-PyTorch scan (``fast_scan.chunked_scan``): compute in float32 (float64 for float64
    inputs), memory O(chunk * batch * dim * N) instead of O(L * batch * dim * N). ``out`` may be
    stored time-major (``out.transpose(1, 2)`` contiguous); inputs stored that way are read without
    copies.

    Extensions (keyword-only): ``reverse=True`` scans from position L-1 down to 0 (the same as
    flipping u, delta, z, B, C along L and flipping the output back; ``last_state`` is then the
    state after position 0). ``initial_state`` (batch, dim, N): the state to start from (see the
    module docstring); mamba-ssm's kernel has none, so with it CUDA runs the chunked path too.
    ``chunk`` (steps per chunk; None: chosen from the channel count by ``fast_scan.auto_chunk``)
    trades speed only. B and C may be constant (dim, N) on every path, the C kernel included.
    ``delta_proj`` (dim, R): delta is given as its factor (batch, R, L) (see the module docstring).
    """
    s = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_proj)
    if s.length == 0:  # nothing to scan (mamba-ssm's kernel would fail reading an empty sequence's last state)
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                        reverse=reverse, initial_state=initial_state, delta_proj=delta_proj)
    tensors = (u, delta, A, B, C, D, z, delta_bias, delta_proj)
    fn = _mamba_ssm_fn() if _takes_mamba_ssm(s, u, B, C, tensors, return_last_state, initial_state) else None
    if fn is not None:
        if delta_proj is not None:  # the product in u's dtype, whatever autocast made of it
            delta = project_delta(delta, delta_proj).to(u.dtype)
        return _mamba_ssm_scan(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
    return chunked_scan(u, delta, A, _grouped(B, s.groups), _grouped(C, s.groups), D, z, delta_bias,
                        delta_softplus, return_last_state, reverse=reverse, chunk=chunk,
                        compute_dtype=s.compute_dtype, initial_state=initial_state, delta_proj=delta_proj)
