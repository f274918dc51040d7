"""Chunked selective scan in pure PyTorch (CPU fast path), with a recomputing backward.

Core recurrence only (no D, z, delta_bias, softplus — those are cheap elementwise ops left
to autograd in ``scan.selective_scan``)::

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t ,   y_t = sum_n C_t h_t

Why it looks like this (measured on a 2-core AMD EPYC, fp32, 1 thread):

- The scan is bound by its L*D*N exponentials. They are computed a chunk of T steps at a
  time, vectorised, with exp2 (log2 e folded into A; exp2 runs ~1.5x faster than exp).
- The sequential part is one in-place ``h_t.addcmul_(a_t, h_{t-1})`` per step into a reused
  (T, batch, groups, N, dim/groups) buffer; per-step views are built once, because Python
  indexing cost is comparable to the op itself for 32k-element steps.
- y = C.h is one batched matmul per chunk; putting N before the channel axis makes it a
  (1 x N) @ (N x channels) product, far faster than N-length dot products.
- Nothing of size (batch, dim, L, N) exists: memory is O(chunk * batch * dim * N) plus, when
  a gradient is needed, the state entering each chunk (L/T * batch * dim * N). The backward
  recomputes each chunk's decays and states from that saved state, then runs the adjoint
  recurrence ``g_t = C_t gy_t + a_{t+1} g_{t+1}`` the same way, chunk by chunk, in reverse.
- Cumulative-sum ("segsum") formulations need exp of a chunk's summed decay, which overflows
  with Mamba's dt initialisation; nothing here exponentiates anything but delta*A <= 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["chunked_scan", "DEFAULT_CHUNK"]

LOG2E = 1.0 / math.log(2.0)
DEFAULT_CHUNK = 16


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


def _time_major(x: Tensor) -> Tensor:
    """(b, c, L) -> contiguous (b, L, c). Per-batch 2-D copies hit PyTorch's blocked transpose
    kernel, ~5x faster than ``permute(...).contiguous()`` on a 3-D tensor."""
    b, c, L = x.shape
    out = torch.empty(b, L, c, dtype=x.dtype, device=x.device)
    for i in range(b):
        out[i].copy_(x[i].t())
    return out


def _channel_major(x: Tensor) -> Tensor:
    """(b, L, c) -> contiguous (b, c, L); inverse of ``_time_major``."""
    b, L, c = x.shape
    out = torch.empty(b, c, L, dtype=x.dtype, device=x.device)
    for i in range(b):
        out[i].copy_(x[i].t())
    return out


def _A_layout(A: Tensor, g: int) -> Tensor:
    """A (d, n) -> (g, n, hd), channel d = (group, d % hd)."""
    d, n = A.shape
    return A.reshape(g, d // g, n).transpose(1, 2).contiguous()


def _bmm_into(x: Tensor, y: Tensor, dest: Tensor) -> None:
    """dest (any shape with x.shape[0] * y.shape[-1] * x.shape[1] elements) = bmm(x, y)."""
    if dest.is_contiguous():
        torch.bmm(x, y, out=dest.view(x.shape[0], x.shape[1], y.shape[2]))
    else:
        dest.copy_(torch.bmm(x, y).view(dest.shape))


def _forward_chunk(a, H, aS, HS, dlt, du, Bc, A2, h_prev):
    """Fill a (decays) and H (states) for one chunk, starting from h_prev (b, g, n, hd).

    a, H: (b, t, g, n, hd); dlt, du: (b, t, g, 1, hd); Bc: (b, t, g, n, 1)."""
    torch.mul(dlt, A2, out=a)
    a.exp2_()
    torch.mul(du, Bc, out=H)
    HS[0].addcmul_(aS[0], h_prev)
    for t in range(1, len(HS)):
        HS[t].addcmul_(aS[t], HS[t - 1])


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta, u, A, B, C, chunk, want_last):
        # delta, u: (b, d, L) compute dtype; A: (d, n); B, C: (b, g, n, L)
        b, d, L = u.shape
        n = A.shape[1]
        g = B.shape[1]
        hd = d // g
        T = max(1, min(chunk, L))
        dtype, device = u.dtype, u.device
        A2 = _A_layout(A, g) * LOG2E  # (g, n, hd)
        need_grad = any(ctx.needs_input_grad[:5])
        nchunks = (L + T - 1) // T
        dT = _time_major(delta)  # (b, L, d)
        uT = _time_major(u)
        BT = _time_major(B.reshape(b, g * n, L)).view(b, L, g, n)
        CT = _time_major(C.reshape(b, g * n, L)).view(b, L, g, n)
        bufs = _Buffers(b, T, g, n, hd, dtype, device, 2)
        # h_in[c] is the state entering chunk c; h_in[nchunks] the last state.
        h_in = torch.empty(nchunks + 1 if need_grad else 2, b, g, n, hd, dtype=dtype, device=device)
        h_in[0].zero_()
        yT = torch.empty(b, L, d, dtype=dtype, device=device)
        for c in range(nchunks):
            s = c * T
            e = min(s + T, L)
            t_ = e - s
            (a, H), (aS, HS) = bufs.prefix(t_)
            dlt = dT[:, s:e].view(b, t_, g, 1, hd)
            du = dlt * uT[:, s:e].view(b, t_, g, 1, hd)
            i_prev, i_next = (c, c + 1) if need_grad else (c % 2, (c + 1) % 2)
            _forward_chunk(a, H, aS, HS, dlt, du, BT[:, s:e, :, :, None], A2, h_in[i_prev])
            h_in[i_next].copy_(HS[t_ - 1])
            tbg = b * t_ * g
            _bmm_into(CT[:, s:e].reshape(tbg, 1, n), H.view(tbg, n, hd), yT[:, s:e])
        last = h_in[nchunks if need_grad else nchunks % 2]
        last_bdn = None
        if want_last:  # a fresh contiguous (b, d, n) tensor, never a view of h_in
            last_bdn = torch.empty(b, d, n, dtype=dtype, device=device)
            last_bdn.view(b, g, hd, n).copy_(last.transpose(-1, -2))
        if need_grad:
            ctx.save_for_backward(dT, uT, A, BT, CT, h_in)
            ctx.chunk = T
        y = _channel_major(yT)
        return (y, last_bdn) if want_last else (y, y.new_empty(0))

    @staticmethod
    def backward(ctx, gy, glast):
        dT, uT, A, BT, CT, h_in = ctx.saved_tensors
        T = ctx.chunk
        b, L, d = uT.shape
        n = A.shape[1]
        g = BT.shape[2]
        hd = d // g
        dtype, device = uT.dtype, uT.device
        An = _A_layout(A, g)
        A2 = An * LOG2E
        gyT = torch.zeros_like(uT) if gy is None else _time_major(gy.to(dtype))
        bufs = _Buffers(b, T, g, n, hd, dtype, device, 3)
        accA = torch.zeros(b, T, g, n, hd, dtype=dtype, device=device)
        g_dT = torch.empty(b, L, d, dtype=dtype, device=device)
        g_uT = torch.empty(b, L, d, dtype=dtype, device=device)
        g_BT = torch.empty(b, L, g, n, dtype=dtype, device=device)
        g_CT = torch.empty(b, L, g, n, dtype=dtype, device=device)
        # carry = a_{t+1} * G_{t+1} from the chunk after the current one (or d last_state).
        carry = torch.zeros(b, g, n, hd, dtype=dtype, device=device)
        if glast is not None and glast.numel():
            carry.copy_(glast.to(dtype).reshape(b, g, hd, n).transpose(-1, -2))
        nchunks = (L + T - 1) // T
        for c in range(nchunks - 1, -1, -1):
            s = c * T
            e = min(s + T, L)
            t_ = e - s
            (a, H, G), (aS, HS, GS) = bufs.prefix(t_)
            acc = accA if t_ == T else accA.view(-1)[: accA[:, :t_].numel()].view(b, t_, g, n, hd)
            dlt = dT[:, s:e].view(b, t_, g, 1, hd)
            uc = uT[:, s:e].view(b, t_, g, 1, hd)
            du = dlt * uc
            Bc = BT[:, s:e, :, :, None]
            Cc = CT[:, s:e, :, :, None]
            gyc = gyT[:, s:e].view(b, t_, g, 1, hd)
            h0 = h_in[c]
            _forward_chunk(a, H, aS, HS, dlt, du, Bc, A2, h0)
            # adjoint states: G_t = C_t gy_t + a_{t+1} G_{t+1}
            torch.mul(gyc, Cc, out=G)
            GS[t_ - 1].add_(carry)
            for t in range(t_ - 2, -1, -1):
                GS[t].addcmul_(aS[t + 1], GS[t + 1])
            torch.mul(aS[0], GS[0], out=carry)
            tbg = b * t_ * g
            # g_C[t, n] = sum_hd gy[t, hd] H[t, n, hd];  g_B[t, n] = sum_hd G[t, n, hd] du[t, hd]
            _bmm_into(H.view(tbg, n, hd), gyc.reshape(tbg, hd, 1), g_CT[:, s:e])
            _bmm_into(G.view(tbg, n, hd), du.view(tbg, hd, 1), g_BT[:, s:e])
            # S[t, hd] = sum_n B[t, n] G[t, n, hd]: the gradient of du = delta * u
            S = torch.bmm(BT[:, s:e].reshape(tbg, 1, n), G.view(tbg, n, hd)).view(b, t_, g, 1, hd)
            # W = dLoss/d(delta*A) = G_t * h_{t-1} * a_t, built in place in a
            a.mul_(G)
            if t_ > 1:
                a[:, 1:].mul_(H[:, :-1])
            aS[0].mul_(h0)
            acc.addcmul_(a, dlt)
            a.mul_(An)
            gd = g_dT[:, s:e].view(b, t_, g, 1, hd)
            torch.sum(a, dim=3, keepdim=True, out=gd) if gd.is_contiguous() else gd.copy_(a.sum(3, keepdim=True))
            gd.addcmul_(S, uc)
            torch.mul(S, dlt, out=g_uT[:, s:e].view(b, t_, g, 1, hd))
        gA = accA.sum(dim=(0, 1)).transpose(1, 2).reshape(d, n)  # (g, n, hd) -> (d, n)
        g_B = _channel_major(g_BT.view(b, L, g * n)).view(b, g, n, L)
        g_C = _channel_major(g_CT.view(b, L, g * n)).view(b, g, n, L)
        return _channel_major(g_dT), _channel_major(g_uT), gA, g_B, g_C, None, None


def chunked_scan(delta: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int = DEFAULT_CHUNK,
                 return_last_state: bool = False):
    """Core scan. delta (post bias/softplus), u: (b, d, L); A: (d, n); B, C: (b, g, n, L); all one
    floating dtype. Returns y (b, d, L) = sum_n C h (no D, no gate) and, if asked, h_L (b, d, n)."""
    y, last = _ChunkedScan.apply(delta.contiguous(), u.contiguous(), A.contiguous(), B.contiguous(),
                                 C.contiguous(), int(chunk), bool(return_last_state))
    return (y, last) if return_last_state else y
