"""Chunked selective scan for the CPU, with a recomputing backward.

On the CPU in float32 both directions run the fused C kernel (``_scan_kernel.c`` through
``cpu_kernel``, built for the CPU's instruction set; per-machine figures in benchmarks/README.md)
when it builds; float64, other devices and machines without a C compiler use the pure-PyTorch
chunked scan below. Both save the state entering each chunk in the forward and recompute the chunk
in the backward, in the same layout, so either backward can follow either forward.

Computes exactly ``selective_scan_reference`` (see ``scan.py``)::

    delta = softplus(delta + delta_bias)                              (each optional)
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t ,   y_t = sum_n C_t h_t + D u_t
    out_t = y_t * silu(z_t)

from h_0 = the initial state (zeros unless given), B and C per step or constant per channel. Worker
threads (``_threads``) run under the caller's inference mode, and the scan computes with autocast
off, forward and backward, in its compute dtype.

Why the PyTorch path looks like this (measured on a 2-core AMD EPYC, fp32, 1 thread, d=2048, N=16):

- The scan is bound by its L*D*N exponentials. They are computed one chunk of T steps at a
  time, vectorised, with exp2 (log2 e folded into A: exp2 is ~1.5x faster than exp) into a
  reused buffer that stays in cache.
- The sequential part is one in-place ``h_t.addcmul_(a_t, h_{t-1})`` per step into a reused
  (batch, T, groups, N, dim/groups) buffer; the per-step views are built once, because Python
  indexing costs about as much as the op itself on a 32k-element step.
- y = C.h is one batched matmul per chunk; with N before the channel axis it is a
  (1 x N) @ (N x channels) product, far faster than N-length dot products.
- Everything runs time-major (batch, L, channels). Inputs already stored that way (the mixer
  produces them so) are used without a copy; others are transposed once with 2-D copies.
  The forward stages inputs ``_STAGE_STEPS`` (256) steps at a time: delta_bias + softplus,
  delta*u, D*u and the silu(z) gate are one op per stage into reused buffers, not per chunk,
  so autograd keeps no full-size intermediates and small widths pay less per-op overhead.
- The chunk length follows the width (``auto_chunk``: 16 steps at d=2048, 64 at d<=512).
- L-sized buffers ask Linux for transparent huge pages (``_empty``): faulting fresh memory in
  4 KiB pages was about a quarter of the forward at d=2048.
- Nothing of size (batch, dim, L, N) exists: memory is O(T * batch * dim * N) plus, when a
  gradient is needed, the state entering each chunk (L/T * batch * dim * N). The backward
  recomputes each chunk's decays and states from that state, then runs the adjoint recurrence
  ``G_t = C_t gy_t + a_{t+1} G_{t+1}`` the same way, chunk by chunk, in reverse.
- Cumulative-sum ("segsum") formulations need exp of a chunk's summed decay, which overflows
  with Mamba's dt initialisation; nothing here exponentiates anything but delta*A.

``reverse=True`` scans from the last position to the first (h_t depends on t, t+1, ..., L-1),
which equals flipping every input along L and the output back, without the copies.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from storm_vlm.huge_pages import advise_huge_pages
from storm_vlm.model.ssm import _threads, cpu_kernel

__all__ = ["chunked_scan", "project_delta", "DEFAULT_CHUNK", "FUSED_RANK_PER_STATE", "auto_chunk"]

LOG2E = 1.0 / math.log(2.0)
DEFAULT_CHUNK = None  # chosen per shape by ``auto_chunk``


def _empty(*shape, dtype, device) -> Tensor:
    """torch.empty for the large (L-sized) buffers, advised as transparent huge pages where Linux offers
    them (`storm_vlm.huge_pages.advise_huge_pages`). Fresh multi-MB CPU tensors are otherwise faulted in
    4 KiB pages on first touch: a full transpose into fresh memory measured 2x slower than into
    touched memory, about a quarter of the whole forward at d=2048."""
    return advise_huge_pages(torch.empty(*shape, dtype=dtype, device=device))


def auto_chunk(step_channels: int) -> int:
    """Steps per chunk for a block of ``step_channels`` = batch * channels scanned together:
    about 32k channel-steps per chunk, 16 to 64 steps. Measured (1 thread, N=16): d=2048 is
    fastest at 16 (32 is 10% slower), d=1024 at 32, d=448 at 64 (25% faster than 16), where
    per-op overhead dominates."""
    t = 32768 / max(1, step_channels)
    return int(min(64, max(16, 2 ** round(math.log2(t)))))


class _Buffers:
    """Reused per-chunk work buffers of shape (b, T, g, n, hd) and their per-step views."""

    def __init__(self, b, T, g, n, hd, dtype, device, count):
        self.full = [torch.empty(b, T, g, n, hd, dtype=dtype, device=device) for _ in range(count)]
        self.steps = [buf.unbind(1) for buf in self.full]

    def prefix(self, t_):
        """Buffers and step views for a chunk of t_ <= T steps."""
        b, T, g, n, hd = self.full[0].shape
        if t_ == T:
            return self.full, self.steps
        # a contiguous (b, t_, ...) view on the front of the same storage
        bufs = [buf.view(-1)[: b * t_ * g * n * hd].view(b, t_, g, n, hd) for buf in self.full]
        return bufs, [buf.unbind(1) for buf in bufs]


def _front(buf: Tensor, shape) -> Tensor:
    """A contiguous view of the first prod(shape) elements of buf."""
    return buf.view(-1)[: math.prod(shape)].view(shape)


def _time_major(x: Tensor | None) -> Tensor | None:
    """(b, c, L) -> (b, L, c) with unit channel stride: a free view when x is already stored
    time-major (as the mixer's tensors are), else per-batch 2-D copies, which hit PyTorch's
    blocked transpose kernel (much faster than ``permute(...).contiguous()`` on a 3-D tensor; it
    only applies to whole matrices, so the copy is not split into smaller blocks)."""
    if x is None:
        return None
    xt = x.transpose(1, 2)
    if xt.stride(-1) == 1:
        return xt
    b, c, L = x.shape
    out = _empty(b, L, c, dtype=x.dtype, device=x.device)
    for i in range(b):
        out[i].copy_(x[i].t())
    return out


def _like_input(gT: Tensor, time_major_input: bool) -> Tensor:
    """Gradient (b, L, c) time-major -> (b, c, L) in the layout of its input: a free view for
    time-major inputs, else a blocked 2-D transpose per batch (autograd would otherwise copy it
    through the slow 3-D permute path to match a channel-major leaf)."""
    if time_major_input:
        return gT.transpose(1, 2)
    b, L, c = gT.shape
    out = _empty(b, c, L, dtype=gT.dtype, device=gT.device)
    for i in range(b):
        out[i].copy_(gT[i].t())
    return out


def _A_layout(A: Tensor, g: int) -> Tensor:
    """A (d, n) -> (g, n, hd), channel d = (group, d % hd)."""
    d, n = A.shape
    return A.reshape(g, d // g, n).transpose(1, 2).contiguous()


def _bmm_into(x: Tensor, y: Tensor, dest: Tensor) -> None:
    """dest (any shape with as many elements) = bmm(x, y)."""
    if dest.is_contiguous():
        torch.bmm(x, y, out=dest.view(x.shape[0], x.shape[1], y.shape[2]))
    else:
        dest.copy_(torch.bmm(x, y).view(dest.shape))


def _ordered(steps, reverse):
    return steps[::-1] if reverse else steps


class _Chunk:
    """Index bookkeeping of one chunk: positions [s, e), processed k-th."""

    def __init__(self, k, T, L, nchunks, reverse):
        c = nchunks - 1 - k if reverse else k
        self.k = k
        self.s = c * T
        self.e = min(self.s + T, L)
        self.t = self.e - self.s


class _Prep:
    """Inputs in the scan's working layout, with the channel axis split as (g, hd)."""

    def __init__(self, shape, uT, dT, zT, A, BT, CT, D, delta_bias, g, cdt):
        b, L, d = shape
        hd = d // g
        self.b, self.L, self.d, self.g, self.hd, self.n = b, L, d, g, hd, A.shape[1]
        self.cdt = cdt
        # views (the channel axis has unit stride); None in the forward, which reads its own views
        self.u4 = None if uT is None else uT.reshape(b, L, g, hd)
        self.d4 = None if dT is None else dT.reshape(b, L, g, hd)
        self.z4 = None if zT is None else zT.reshape(b, L, g, hd)
        # B, C per step: BT, CT (b, L, g, n) contiguous; constant: Bc, Cc (g, n, hd) (compute dtype)
        self.BT, self.CT = (None if x.dim() == 2 else x for x in (BT, CT))
        self.Bc, self.Cc = (_A_layout(x, g) if x.dim() == 2 else None for x in (BT, CT))
        self.An = _A_layout(A.to(cdt), g)  # (g, n, hd)
        self.A2 = self.An * LOG2E
        self.D = None if D is None else D.to(cdt).view(g, hd)
        self.bias = None if delta_bias is None else delta_bias.to(cdt).view(g, hd)


def _B_operand(P: _Prep, s, e, j0, j1) -> Tensor:
    """B for ``_states``: (b, t, g, n, 1) per step, or the constant (g, n, w), broadcast alike."""
    return P.Bc[..., j0:j1] if P.BT is None else P.BT[:, s:e, :, :, None]


def _C_dot(P: _Prep, s, e, j0, j1, H: Tensor, dest: Tensor | None = None, clobber: bool = False) -> Tensor:
    """y[t, w] = sum_n C[t, n] H[t, n, w] for a chunk's states H (b, t, g, n, w), into dest (b, t, g, w)
    when given. ``clobber``: H may be overwritten."""
    b, t_, g, n, w = H.shape
    if P.CT is not None:  # (1 x n) @ (n x w) per step and group: MKL's fast shape
        tbg = b * t_ * g
        if dest is None:
            return torch.bmm(P.CT[:, s:e].reshape(tbg, 1, n), H.view(tbg, n, w)).view(b, t_, g, w)
        _bmm_into(P.CT[:, s:e].reshape(tbg, 1, n), H.view(tbg, n, w), dest)
        return dest
    Cc = P.Cc[..., j0:j1]
    y = (H.mul_(Cc) if clobber else H * Cc).sum(dim=3)
    return y if dest is None else dest.copy_(y)


_PARALLEL_MIN_WORK = 1 << 22  # b * L * d * N below this: one thread
_MIN_BLOCK = 64


def _blocks(hd: int, work: int, device: torch.device):
    """Channel blocks [j0, j1) of hd, one per worker thread (see ``_run_blocks``); one block off the
    CPU (a GPU runs each block's kernels in parallel already, launched from one thread)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1 or work < _PARALLEL_MIN_WORK or hd < 2 * _MIN_BLOCK:
        return [(0, hd)]
    p = min(threads, hd // _MIN_BLOCK)
    edges = [round(i * hd / p) for i in range(p + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _run_blocks(fn, blocks):
    """fn(j0, j1) for every block; several blocks run in worker threads with one intra-op thread
    each, under the caller's inference mode (the blocks write into the caller's tensors) with grad
    off (these are autograd.Function internals). Measured: 2 PyTorch intra-op threads on this
    scan's many small ops are slower than one (up to 10x slower on a busy machine), while
    splitting channels over threads scales."""
    if len(blocks) == 1:
        return [fn(*blocks[0])]

    def run(j0, j1):
        with torch.no_grad():
            return fn(j0, j1)

    futures = [_threads.submit(run, *blk, workers=len(blocks)) for blk in blocks]
    return [f.result() for f in futures]


def _autocast_off(device_type: str):
    """The scan computes in its own compute dtype: autocast (per thread, and still on in a backward
    run inside an autocast region) must not turn its matrix products into bf16 ones."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, reverse, chunk, want_last, cdt,
                grad_enabled):
        # u, delta, z: (b, d, L); A: (d, n); B, C: (b, g, n, L), or (d, n) when constant over time;
        # D, delta_bias: (d,); h0: initial state (b, d, n) or None.
        # grad_enabled: the caller's grad mode (forward runs without it, and needs_input_grad follows
        # requires_grad alone: a model's parameters, D and delta_bias here, require grad under no_grad too)
        b, d, L = u.shape
        n = A.shape[1]
        g = _groups(B, C)
        hd = d // g
        blocks = _blocks(hd, b * L * d * n, u.device)
        if chunk is None:
            chunk = auto_chunk(b * g * max(j1 - j0 for j0, j1 in blocks))
        T = max(1, min(chunk, L))
        need_grad = grad_enabled and any(ctx.needs_input_grad[:9])
        nchunks = (L + T - 1) // T
        BT, CT = _BC_layout(B, C, cdt)
        # h_in[k]: state entering the k-th processed chunk; h_in[nchunks]: the last state.
        h_in = _empty(nchunks + 1 if need_grad else 2, b, g, n, hd, dtype=cdt, device=u.device)
        if h0 is None:
            h_in[0].zero_()
        else:
            h_in[0].copy_(h0.reshape(b, g, hd, n).transpose(-1, -2))
        lib = _kernel_for(u, cdt)  # (inference without autograd takes the kernel in `_kernel_inference`)
        yT = _empty(b, L, d, dtype=cdt, device=u.device)
        last_bdn = None
        if want_last:  # a fresh contiguous (b, d, n) tensor, never a view of h_in
            last_bdn = torch.empty(b, d, n, dtype=cdt, device=u.device)
        if lib is not None:
            _kernel_forward(lib, u, delta, z, A, BT, CT, g, D, delta_bias, h0, softplus, reverse, yT,
                            h_in if need_grad else None, T, last_bdn)
        else:
            P = _Prep((b, L, d), None, None, None, A, BT, CT, D, delta_bias, g, cdt)
            src = [None if x is None else _time_major(x).reshape(b, L, g, hd) for x in (u, delta, z)]
            y4 = yT.view(b, L, g, hd)

            def block(j0, j1):
                _forward_block(P, src, j0, j1, T, nchunks, reverse, softplus, need_grad, h_in, y4)

            _run_blocks(block, blocks)
            if want_last:
                last = h_in[nchunks if need_grad else nchunks % 2]
                last_bdn.view(b, g, hd, n).copy_(last.transpose(-1, -2))
        if need_grad:
            ctx.save_for_backward(u, delta, z, A, BT, CT, D, delta_bias, h_in)
            ctx.cfg = (T, softplus, reverse, cdt, g, h0 is not None)
            ctx.time_major = tuple(x is not None and x.transpose(1, 2).stride(-1) == 1 for x in (u, delta, z))
        out = yT.transpose(1, 2)
        if u.dtype != cdt:
            out = out.to(u.dtype)
        return (out, last_bdn) if want_last else (out, out.new_empty(0))

    @staticmethod
    def backward(ctx, gout, glast):
        saved = ctx.saved_tensors  # unpacked once (activation checkpointing allows no second time)
        with _autocast_off(saved[0].device.type):
            return _ChunkedScan._backward(ctx, saved, gout, glast)

    @staticmethod
    def _backward(ctx, saved, gout, glast):
        u, delta, z, A, BT, CT, D, delta_bias, h_in = saved
        T, softplus, reverse, cdt, g, has_h0 = ctx.cfg
        lib = _kernel_for(u, cdt)
        if lib is not None:
            return _kernel_backward(lib, u, delta, z, A, BT, CT, g, D, delta_bias, h_in, has_h0, T, softplus, reverse,
                                    gout, glast, ctx.time_major) + (None,) * 7
        uT, dT, zT = _time_major(u), _time_major(delta), _time_major(z)
        b, L, d = uT.shape
        n = A.shape[1]
        hd = d // g
        device = uT.device
        P = _Prep((b, L, d), uT, dT, zT, A, BT, CT, D, delta_bias, g, cdt)
        goT = torch.zeros(b, L, d, dtype=cdt, device=device) if gout is None else _time_major(gout)
        go4 = goT.reshape(b, L, g, hd)
        grads = dict(
            u=_empty(b, L, d, dtype=cdt, device=device),
            delta=_empty(b, L, d, dtype=cdt, device=device),
            z=_empty(b, L, d, dtype=cdt, device=device) if zT is not None else None,
            A=torch.empty(g, n, hd, dtype=cdt, device=device),
            D=torch.empty(g, hd, dtype=cdt, device=device) if D is not None else None,
            bias=torch.empty(g, hd, dtype=cdt, device=device) if delta_bias is not None else None,
            # constant B, C: per channel, (g, n, hd) like A; the initial state: (b, g, n, hd) like h_in
            Bc=torch.empty(g, n, hd, dtype=cdt, device=device) if BT.dim() == 2 else None,
            Cc=torch.empty(g, n, hd, dtype=cdt, device=device) if CT.dim() == 2 else None,
            h0=torch.empty(b, g, n, hd, dtype=cdt, device=device) if has_h0 else None,
        )
        g4 = {k: (v.view(b, L, g, hd) if k in ("u", "delta", "z") and v is not None else v) for k, v in grads.items()}
        carry0 = torch.zeros(b, g, n, hd, dtype=cdt, device=device)
        if glast is not None and glast.numel():
            carry0.copy_(glast.to(cdt).reshape(b, g, hd, n).transpose(-1, -2))
        nchunks = (L + T - 1) // T

        def block(j0, j1):
            return _backward_block(P, j0, j1, T, nchunks, reverse, softplus, h_in, go4, carry0, g4)

        parts = _run_blocks(block, _blocks(hd, b * L * d * n, device))
        g_BT, g_CT = parts[0]
        for gb, gc in parts[1:]:
            if g_BT is not None:
                g_BT += gb
            if g_CT is not None:
                g_CT += gc

        def per_channel(x):  # (g, n, hd) -> (d, n)
            return x.transpose(1, 2).reshape(d, n)

        gA = per_channel(grads["A"])
        g_B = per_channel(grads["Bc"]) if g_BT is None else g_BT.permute(0, 2, 3, 1)
        g_C = per_channel(grads["Cc"]) if g_CT is None else g_CT.permute(0, 2, 3, 1)
        g_h0 = None if grads["h0"] is None else grads["h0"].transpose(-1, -2).reshape(b, d, n)
        g_D = None if grads["D"] is None else grads["D"].reshape(d)
        g_bias = None if grads["bias"] is None else grads["bias"].reshape(d)
        tm_u, tm_d, tm_z = ctx.time_major
        g_z = None if grads["z"] is None else _like_input(grads["z"], tm_z)
        return (_like_input(grads["u"], tm_u), _like_input(grads["delta"], tm_d), gA, g_B, g_C, g_D, g_z, g_bias,
                g_h0, None, None, None, None, None, None)


_KERNEL_IO = (torch.float32, torch.bfloat16)  # what the kernel's forward reads and writes as it is


def _kernel_for(u: Tensor, cdt: torch.dtype):
    """The C kernel library when it applies (a float32 scan on the CPU and the kernel builds), else None."""
    return cpu_kernel.load() if u.device.type == "cpu" and cdt == torch.float32 else None


def _kernel_inputs(u, delta, z, A, D, delta_bias, io_dtype=torch.float32):
    """The kernel's arguments: u, delta, z (any strides) in `io_dtype` (float32, or bfloat16 for the
    forward), A (d, n) and D, delta_bias (d,) contiguous float32."""
    return (u.to(io_dtype), delta.to(io_dtype), None if z is None else z.to(io_dtype), _f32(A), _f32(D),
            _f32(delta_bias))


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _groups(B: Tensor, C: Tensor) -> int:
    """The groups of per-step B or C (b, g, n, L); 1 where both are constant (d, n)."""
    return next((x.shape[1] for x in (B, C) if x.dim() == 4), 1)


def _BC_layout(B: Tensor, C: Tensor, cdt: torch.dtype, steps_apart: bool = False) -> tuple[Tensor, Tensor]:
    """B and C as the kernel and the chunk loops read them: per step (b, L, g, n), constant (d, n),
    contiguous. ``steps_apart`` (the kernel's forward): per-step ones may keep their batch and step
    strides (as where x_proj wrote them) as long as each step's g x n values are contiguous."""
    def layout(x):
        if x.dim() == 2:
            return x.to(cdt).contiguous()
        x = x.permute(0, 3, 1, 2).to(cdt)
        if steps_apart and x.stride(3) == 1 and x.stride(2) == x.shape[3]:
            return x
        return x.contiguous()

    return layout(B), layout(C)


def _kernel_inference(lib, u, delta, A, B, C, D, z, delta_bias, h0, softplus, reverse, want_last, cdt,
                      delta_proj):
    """The forward through the C kernel without autograd (no states kept for a backward, no
    autograd.Function around it: its bookkeeping costs more than a short scan). Arguments as
    ``chunked_scan``'s; returns (out (b, d, L) in u's dtype, stored time-major, last state (b, d, n)
    in ``cdt`` or None), what ``_ChunkedScan`` returns for the same inputs."""
    b, d, L = u.shape
    g = _groups(B, C)
    BT, CT = _BC_layout(B, C, cdt, steps_apart=True)
    yT = _empty(b, L, d, dtype=u.dtype if u.dtype in _KERNEL_IO else cdt, device=u.device)
    last = torch.empty(b, d, A.shape[1], dtype=cdt, device=u.device) if want_last else None
    _kernel_forward(lib, u, delta, z, A, BT, CT, g, D, delta_bias, h0, softplus, reverse, yT, None, 0, last,
                    delta_proj)
    return yT.transpose(1, 2).to(u.dtype), last


def _kernel_forward(lib, u, delta, z, A, BT, CT, g, D, delta_bias, h0, softplus, reverse, yT, h_in, T, last_bdn,
                    delta_proj=None):
    """The forward through the fused C kernel (float32 CPU), from the initial state h0 (b, d, n) when
    given: writes yT (b, L, d), h_in[1:] when given (the states the backward restarts from) and
    last_bdn (b, d, n) when given. yT float32, or bfloat16: then u, delta and z are read in bfloat16
    (cast to it if they are not). With ``delta_proj`` (d, R), delta is its factor (b, R, L). Channel
    ranges run in worker threads when there are several intra-op threads (ctypes drops the GIL)."""
    u, delta, z, A, D, bias = _kernel_inputs(u, delta, z, A, D, delta_bias, yT.dtype)
    delta_proj, h0 = _f32(delta_proj), _f32(h0)
    b, d, L = u.shape
    out = yT.transpose(1, 2)
    parts = _kernel_ranges(d, b * L * d * A.shape[1], lib.storm_lanes)

    def run(c0, c1):
        cpu_kernel.scan_forward(lib, u, delta, z, A, BT, CT, g, D, bias, softplus, reverse, h0, out, h_in, T,
                                last_bdn, c0, c1, delta_proj=delta_proj)

    _run_blocks(run, parts)


def _kernel_backward(lib, u, delta, z, A, BT, CT, g, D, delta_bias, h_in, has_h0, T, softplus, reverse, gout, glast,
                     time_major):
    """The backward through the fused C kernel (float32 CPU), from the states the forward saved.
    Input gradients are written straight into their input's layout; each worker thread adds its
    channels' share of per-step B and C gradients into its own (b, L, g, n) pair, summed here
    (constant ones are per channel: the pairs are (d, n) and each thread fills its own channels)."""
    f32 = torch.float32
    b, d, L = u.shape
    n = A.shape[1]
    u, delta, z, A, Dc, bias = _kernel_inputs(u, delta, z, A, D, delta_bias)
    gout = torch.zeros(b, d, L, dtype=f32) if gout is None else gout.to(f32)
    glast = None if glast is None or not glast.numel() else glast.to(f32).contiguous()

    def like(tm: bool) -> Tensor:  # (b, d, L), stored time-major when its input was
        return _empty(b, L, d, dtype=f32, device=u.device).transpose(1, 2) if tm else _empty(b, d, L, dtype=f32,
                                                                                           device=u.device)

    gu, gdelta = like(time_major[0]), like(time_major[1])
    gz = None if z is None else like(time_major[2])
    gA = torch.zeros(d, n, dtype=f32)
    gD = None if D is None else torch.zeros(d, dtype=f32)
    gbias = None if delta_bias is None else torch.zeros(d, dtype=f32)
    gh0 = torch.empty(b, d, n, dtype=f32) if has_h0 else None
    ranges = _kernel_ranges(d, b * L * d * n, lib.storm_lanes)
    partial = {r: tuple(torch.zeros(x.shape, dtype=f32) for x in (BT, CT)) for r in ranges}

    def run(c0, c1):
        gBT, gCT = partial[(c0, c1)]
        cpu_kernel.scan_backward(lib, u, delta, z, gout, A, BT, CT, g, Dc, bias, softplus, reverse, h_in, T, glast,
                                 gu, gdelta, gz, gA, gD, gbias, gBT, gCT, gh0, c0, c1)

    _run_blocks(run, ranges)
    gBT, gCT = partial[ranges[0]]
    for r in ranges[1:]:
        gBT += partial[r][0]
        gCT += partial[r][1]
    gB, gC = (x if x.dim() == 2 else x.permute(0, 2, 3, 1) for x in (gBT, gCT))
    return gu, gdelta, gA, gB, gC, gD, gz, gbias, gh0


def _kernel_ranges(d: int, work: int, lanes: int = 8):
    """Channel ranges [c0, c1) for the kernel's worker threads, in whole vectors of ``lanes`` channels."""
    threads = torch.get_num_threads()
    blocks = (d + lanes - 1) // lanes
    if threads <= 1 or work < _PARALLEL_MIN_WORK or blocks < 2:
        return [(0, d)]
    p = min(threads, blocks)
    edges = [min(d, lanes * round(i * blocks / p)) for i in range(p + 1)]
    return list(zip(edges[:-1], edges[1:]))


_STAGE_STEPS = 256  # time steps whose inputs are prepared (bias, softplus, delta*u, silu) at once


def _forward_block(P: _Prep, src, j0, j1, T, nchunks, reverse, softplus, need_grad, h_in, y4):
    """Forward scan of channels [j0, j1) of every group; writes y4[..., j0:j1] and h_in[..., j0:j1].

    src: u, delta, z (z may be None) as time-major (b, L, g, hd) views. Inputs are staged
    ``_STAGE_STEPS`` steps at a time: delta (bias, softplus), delta*u, D*u and silu(z) each
    become one op per stage, not per chunk."""
    b, L, g, n, cdt = P.b, P.L, P.g, P.n, P.cdt
    w = j1 - j0
    dev = h_in.device
    bufs = _Buffers(b, T, g, n, w, cdt, dev, 2)
    A2 = P.A2[..., j0:j1]
    Dc = None if P.D is None else P.D[:, j0:j1]
    bias = None if P.bias is None else P.bias[:, j0:j1]
    K = max(1, _STAGE_STEPS // T)  # chunks per stage
    S = min(K * T, L)
    st_u, st_d, st_du = (torch.empty(b, S, g, w, dtype=cdt, device=dev) for _ in range(3))
    st_z = None if src[2] is None else torch.empty(b, S, g, w, dtype=cdt, device=dev)
    for k0 in range(0, nchunks, K):
        chunks = [_Chunk(k, T, L, nchunks, reverse) for k in range(k0, min(k0 + K, nchunks))]
        s0, s1 = min(c.s for c in chunks), max(c.e for c in chunks)
        shape = (b, s1 - s0, g, w)
        ub, db = src[0][:, s0:s1, :, j0:j1], src[1][:, s0:s1, :, j0:j1]
        if ub.dtype != cdt:
            ub = _front(st_u, shape).copy_(ub)
        if db.dtype != cdt:
            db = _front(st_d, shape).copy_(db)
        if bias is not None:
            db = torch.add(db, bias, out=_front(st_d, shape))
        if softplus:  # F.softplus (beta 1, threshold 20) into the stage buffer
            db = torch._C._nn.softplus(db, 1, 20, out=_front(st_d, shape))
        du = torch.mul(db, ub, out=_front(st_du, shape))
        for ch in chunks:
            s, e, t_ = ch.s, ch.e, ch.t
            o = s - s0
            (a, H), (aS, HS) = bufs.prefix(t_)
            i_prev, i_next = (ch.k, ch.k + 1) if need_grad else (ch.k % 2, (ch.k + 1) % 2)
            _states(a, H, aS, HS, db[:, o:o + t_].unsqueeze(3), du[:, o:o + t_].unsqueeze(3),
                    _B_operand(P, s, e, j0, j1), A2, h_in[i_prev][..., j0:j1], reverse)
            h_in[i_next][..., j0:j1].copy_(_ordered(HS, reverse)[-1])
            _C_dot(P, s, e, j0, j1, H, y4[:, s:e, :, j0:j1], clobber=True)
        yb = y4[:, s0:s1, :, j0:j1]
        if Dc is not None:
            yb.addcmul_(ub, Dc)
        if st_z is not None:
            zb = src[2][:, s0:s1, :, j0:j1]
            if zb.dtype != cdt:
                zb = _front(st_z, shape).copy_(zb)
            yb.mul_(torch._C._nn.silu(zb, out=_front(st_z, shape)))


def _backward_block(P: _Prep, j0, j1, T, nchunks, reverse, softplus, h_in, go4, carry0, g4):
    """Backward of channels [j0, j1): writes their slices of g4's u, delta, z, A, D, bias (and of the
    constant B, C and the initial state's gradients, when those are given) and returns this block's
    contribution to the per-step B and C gradients, (b, L, g, n) each (None when constant)."""
    b, L, g, n, cdt = P.b, P.L, P.g, P.n, P.cdt
    w = j1 - j0
    device = P.u4.device
    bufs = _Buffers(b, T, g, n, w, cdt, device, 3)
    An = P.An[..., j0:j1].contiguous()
    A2 = P.A2[..., j0:j1]
    Dc = None if P.D is None else P.D[:, None, j0:j1]
    bias = None if P.bias is None else P.bias[:, j0:j1]
    accA = torch.zeros(b, T, g, n, w, dtype=cdt, device=device)
    accD = torch.zeros(b, T, g, w, dtype=cdt, device=device) if Dc is not None else None
    accBias = torch.zeros(b, T, g, w, dtype=cdt, device=device) if bias is not None else None
    g_BT = torch.empty(b, L, g, n, dtype=cdt, device=device) if P.BT is not None else None
    g_CT = torch.empty(b, L, g, n, dtype=cdt, device=device) if P.CT is not None else None
    accB = torch.zeros(g, n, w, dtype=cdt, device=device) if P.BT is None else None
    accC = torch.zeros(g, n, w, dtype=cdt, device=device) if P.CT is None else None
    # carry = a * G of the first-processed step of the chunk processed after this one
    carry = carry0[..., j0:j1].clone()
    for k in range(nchunks - 1, -1, -1):
        ch = _Chunk(k, T, L, nchunks, reverse)
        s, e, t_ = ch.s, ch.e, ch.t
        (a, H, G), (aS, HS, GS) = bufs.prefix(t_)
        acc = accA if t_ == T else _front(accA, (b, t_, g, n, w))
        dlt, draw = _delta_chunk(P.d4[:, s:e, :, j0:j1], bias, softplus, cdt)
        dlt = dlt.unsqueeze(3)  # (b, t, g, 1, w)
        uc = P.u4[:, s:e, :, j0:j1].to(cdt).unsqueeze(3)
        du = dlt * uc
        h0 = h_in[k][..., j0:j1]
        Bop = _B_operand(P, s, e, j0, j1)
        _states(a, H, aS, HS, dlt, du, Bop, A2, h0, reverse)
        tbg = b * t_ * g
        gy = go4[:, s:e, :, j0:j1].to(cdt)  # (b, t, g, w): gradient of y before the gate
        if P.z4 is not None:
            zc = P.z4[:, s:e, :, j0:j1].to(cdt)
            sz = torch.sigmoid(zc)
            ypre = _C_dot(P, s, e, j0, j1, H)
            if Dc is not None:
                ypre.unsqueeze(3).addcmul_(uc, Dc)
            # d silu(z)/dz = s (1 + z (1 - s))
            dsilu = (1 - sz).mul_(zc).add_(1).mul_(sz)
            g4["z"][:, s:e, :, j0:j1].copy_((gy * ypre).mul_(dsilu))
            gy = gy * (zc * sz)
        gy5 = gy.unsqueeze(3)
        if accD is not None:
            (accD if t_ == T else _front(accD, (b, t_, g, w))).unsqueeze(3).addcmul_(gy5, uc)
        # adjoint states, in the opposite order of the forward steps
        torch.mul(gy5, P.Cc[..., j0:j1] if P.CT is None else P.CT[:, s:e, :, :, None], out=G)
        aO, GO = _ordered(aS, reverse), _ordered(GS, reverse)
        GO[-1].add_(carry)
        for i in range(t_ - 2, -1, -1):
            GO[i].addcmul_(aO[i + 1], GO[i + 1])
        torch.mul(aO[0], GO[0], out=carry)
        # g_C[t, n] = sum_w gy[t, w] H[t, n, w];  g_B[t, n] = sum_w G[t, n, w] du[t, w]
        # (as row-vector @ transposed matrix: ~10x faster in MKL than matrix @ column-vector)
        # (constant B, C: the same products, summed over batch and time per channel)
        if g_CT is not None:
            _bmm_into(gy5.reshape(tbg, 1, w), H.view(tbg, n, w).transpose(1, 2), g_CT[:, s:e])
        else:
            accC.add_((gy5 * H).sum(dim=(0, 1)))
        if g_BT is not None:
            _bmm_into(du.reshape(tbg, 1, w), G.view(tbg, n, w).transpose(1, 2), g_BT[:, s:e])
        else:
            accB.add_((du * G).sum(dim=(0, 1)))
        # S[t, w] = sum_n B[t, n] G[t, n, w]: the gradient of du = delta * u
        if g_BT is not None:
            S = torch.bmm(P.BT[:, s:e].reshape(tbg, 1, n), G.view(tbg, n, w)).view(b, t_, g, 1, w)
        else:
            S = (G * Bop).sum(dim=3, keepdim=True)
        # W = dLoss/d(delta*A) = G_t * h_prev(t) * a_t, built in place in a
        a.mul_(G)
        if t_ > 1:
            if reverse:
                a[:, :-1].mul_(H[:, 1:])
            else:
                a[:, 1:].mul_(H[:, :-1])
        _ordered(aS, reverse)[0].mul_(h0)
        acc.addcmul_(a, dlt)
        a.mul_(An)
        gd = a.sum(dim=3, keepdim=True)  # (b, t, g, 1, w)
        gd.addcmul_(S, uc)
        if softplus:
            gd.mul_(torch.sigmoid(draw).unsqueeze(3))
        g4["delta"][:, s:e, :, j0:j1].copy_(gd.squeeze(3))
        if accBias is not None:
            (accBias if t_ == T else _front(accBias, (b, t_, g, w))).add_(gd.squeeze(3))
        gu = torch.mul(S, dlt)
        if Dc is not None:
            gu.addcmul_(gy5, Dc)
        g4["u"][:, s:e, :, j0:j1].copy_(gu.squeeze(3))
    g4["A"][..., j0:j1] = accA.sum(dim=(0, 1))
    if accB is not None:
        g4["Bc"][..., j0:j1] = accB
    if accC is not None:
        g4["Cc"][..., j0:j1] = accC
    if g4["h0"] is not None:  # what is left of the adjoint after the first step
        g4["h0"][..., j0:j1] = carry
    if accD is not None:
        g4["D"][:, j0:j1] = accD.sum(dim=(0, 1))
    if accBias is not None:
        g4["bias"][:, j0:j1] = accBias.sum(dim=(0, 1))
    return g_BT, g_CT


def _delta_chunk(draw: Tensor, bias, softplus: bool, cdt):
    """(delta after bias/softplus, delta + bias) for one chunk slice (b, t, g, w), in cdt."""
    draw = draw.to(cdt)
    if bias is not None:
        draw = draw + bias
    return (F.softplus(draw) if softplus else draw), draw


def _states(a, H, aS, HS, dlt, du, Bc, A2, h_prev, reverse):
    """Fill a (decays) and H (states) for one chunk, starting from h_prev (b, g, n, hd).

    a, H: (b, t, g, n, hd); dlt, du: (b, t, g, 1, hd); Bc: (b, t, g, n, 1)."""
    torch.mul(dlt, A2, out=a)
    a.exp2_()
    torch.mul(du, Bc, out=H)
    aO, HO = _ordered(aS, reverse), _ordered(HS, reverse)
    HO[0].addcmul_(aO[0], h_prev)
    for i in range(1, len(HO)):
        HO[i].addcmul_(aO[i], HO[i - 1])


def project_delta(delta: Tensor, delta_proj: Tensor) -> Tensor:
    """delta_proj @ delta: the factor (b, R, L) times (d, R) -> (b, d, L), stored time-major as the
    mixer's tensors are (the product runs as one (b·L, R) x (R, d) matrix product)."""
    return F.linear(delta.transpose(1, 2), delta_proj.to(delta.dtype)).transpose(1, 2)


# The kernel forms delta from its factor (R multiply-adds per channel and step, in the scan's own
# vector loop) while the step's N states cost ~16 N operations; a BLAS product does the R at its
# higher rate but writes and reads back a (b, L, d) delta. The fused form wins while R is small next
# to N (Mamba's dt_rank = d_model / 16 is 14 at d_model 224, 224 at 3584).
FUSED_RANK_PER_STATE = 4


def chunked_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                 z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                 return_last_state: bool = False, reverse: bool = False, chunk: int | None = DEFAULT_CHUNK,
                 compute_dtype: torch.dtype = torch.float32, initial_state: Tensor | None = None,
                 delta_proj: Tensor | None = None):
    """The selective scan (arguments as ``selective_scan``, already validated; B, C grouped
    (b, g, n, L), or (d, n) when constant over time). Any strides; inputs stored time-major
    (``x.transpose(1, 2)`` with unit last stride) are read without a copy. Starts from
    ``initial_state`` (b, d, n) when given. With ``delta_proj`` (d, R), delta is its factor
    (b, R, L): the C kernel forms the product tile by tile where it runs (a float32 CPU scan without
    autograd: its backward takes a full delta) and 0 < R <= 4 N, else it is computed first. Returns
    out (b, d, L) in u's dtype, stored time-major, and the last state (b, d, n) in ``compute_dtype``
    when asked (the state after position 0 when ``reverse``)."""
    grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_proj))
    lib = None if grads else _kernel_for(u, compute_dtype)
    if delta_proj is not None and not (lib is not None
                                       and 0 < delta_proj.shape[1] <= FUSED_RANK_PER_STATE * A.shape[1]):
        delta, delta_proj = project_delta(delta, delta_proj), None
    if lib is not None:
        out, last = _kernel_inference(lib, u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
                                      bool(reverse), bool(return_last_state), compute_dtype, delta_proj)
        return (out, last) if return_last_state else out
    with _autocast_off(u.device.type):
        out, last = _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus),
                                       bool(reverse), None if chunk is None else int(chunk), bool(return_last_state),
                                       compute_dtype, torch.is_grad_enabled())
    return (out, last) if return_last_state else out
