"""Mamba-1 mixers: ``MambaMixer`` (causal) and ``BiMambaMixer`` (bidirectional, Vim "v2").

Parameter names, shapes and initialisation follow mamba-ssm's ``Mamba`` so state dicts
interchange: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj. ``BiMambaMixer`` adds the
backward direction's conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b, shares in_proj/out_proj and
sums the two directions before out_proj.

Shapes: hidden_states (B, L, d_model); mask (B, L) bool, True = real token, padding a suffix.

``MambaMixer`` also runs a sequence piece by piece (mamba-ssm's prefill with ``inference_params``,
and a streaming encoder's chunks): ``forward(x, state=s, return_state=True)`` starts from the
``MambaState`` s (None: zeros) and returns the state after the piece, so feeding the pieces in
order gives the outputs and final state of the whole sequence, and ``step()`` continues from any
of them token by token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from storm_vlm.model.ssm import _threads, cpu_kernel
from storm_vlm.model.ssm._derived import derived
from storm_vlm.model.ssm import scan as _scan

__all__ = ["MambaMixer", "BiMambaMixer", "MambaState", "conv_taps", "state_matrix"]


class MambaState(NamedTuple):
    """A causal ``MambaMixer``'s recurrent state between calls, in mamba-ssm's layout (what its
    ``inference_params`` cache holds per layer, and what ``step`` takes).

    conv_state: (B, d_inner, d_conv), the conv's last d_conv inputs (x after in_proj), oldest first.
    ssm_state: (B, d_inner, d_state), the scan's state h after the last position.
    """

    conv_state: Tensor
    ssm_state: Tensor


def _init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
    """mamba-ssm's dt init: weight U(-r^-0.5, r^-0.5); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]."""
    std = dt_rank**-0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    d_inner = dt_proj.out_features
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    with torch.no_grad():
        dt_proj.bias.copy_(inv_dt)
    dt_proj.bias._no_reinit = True


def _A_log(d_inner: int, d_state: int) -> nn.Parameter:
    A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    p = nn.Parameter(torch.log(A))
    p._no_weight_decay = True
    return p


def _D(d_inner: int) -> nn.Parameter:
    p = nn.Parameter(torch.ones(d_inner))
    p._no_weight_decay = True
    return p


def _depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool,
                    prefix: Tensor | None = None) -> Tensor:
    """nn.Conv1d(d, d, K, groups=d, padding=K-1)(x)[..., :L] on time-major x (B, L, d).

    ``reverse``: the same conv applied to x flipped along L, flipped back (anti-causal).
    ``prefix`` (B, K-1, d): the inputs before x (a state carried from an earlier piece) instead of zeros.
    One fused multiply-add per tap into one buffer (3x faster on CPU than summing K products).
    Computed, as causal-conv1d does, in the dtype x and weight promote to (float32 for bf16 activations
    and float32 weights), in which the result comes (the caller rounds it once) and the gradient of x
    is summed over the taps before it is rounded to x's dtype."""
    Bsz, L, d = x.shape
    K = weight.shape[-1]
    w = weight[:, 0, :]  # (d, K)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    pad = x.new_zeros(Bsz, K - 1, d, dtype=dtype) if prefix is None else prefix.to(dtype)
    xp = torch.cat([x.to(dtype), pad] if reverse else [pad, x.to(dtype)], dim=1)  # (B, L + K - 1, d)

    def tap(k):  # the input slice multiplied by w[:, k]
        start = K - 1 - k if reverse else k
        return xp[:, start : start + L]

    out = tap(0) * w[:, 0] if bias is None else torch.addcmul(bias, tap(0), w[:, 0])
    for k in range(1, K):
        out.addcmul_(tap(k), w[:, k])
    return out


_CONV_ROWS = 256  # time steps per thread at least for the C conv (a hand-off costs tens of microseconds)
_CONV_KERNELS = {torch.float32: "storm_dwconv_silu_f32", torch.bfloat16: "storm_dwconv_silu_bf16"}  # by x's dtype


def _conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None, reverse: bool, prefix: Tensor | None = None) -> Tensor:
    """``F.silu(_depthwise_conv(x, weight, bias, reverse, prefix))``, x (B, L, d) time-major. For CPU
    inference with float32 weights, one pass of the C kernel (``_elementwise_kernel.c``) split over
    torch's threads by time steps, where PyTorch takes six passes over (B, L, d): x float32, or
    bfloat16 (in_proj's output under autocast). Elsewhere (autograd, other dtypes or devices, no C
    compiler): the tensor operations. Both compute in the weights' dtype (float32 for bf16
    activations) and round to x's dtype once, as causal-conv1d does, so training and inference see
    the same activations."""
    bsz, L, d = x.shape
    K = weight.shape[-1]
    use_kernel = (x.device.type == "cpu" and x.dtype in _CONV_KERNELS and weight.dtype == torch.float32
                  and weight.shape == (d, 1, K)
                  and (bias is None or (bias.dtype == torch.float32 and bias.shape == (d,)))
                  and (prefix is None or (prefix.shape == (bsz, K - 1, d) and not reverse))
                  and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                        or (bias is not None and bias.requires_grad))))
    lib = cpu_kernel.load_library() if use_kernel else None
    if lib is None:
        return F.silu(_depthwise_conv(x, weight, bias, reverse, prefix)).to(x.dtype)
    if x.stride(2) != 1:  # rows may sit apart (x a column slice of in_proj's output), channels not
        x = x.contiguous()
    w_t = conv_taps(weight)
    bias = None if bias is None else bias.contiguous()
    prefix = None if prefix is None else prefix.to(torch.float32).contiguous()  # (B, K - 1, d)
    out = x.new_empty(bsz, L, d)
    size = x.element_size()
    calls = [(x.data_ptr() + b * x.stride(0) * size, x.stride(1), w_t.data_ptr(),
              None if bias is None else bias.data_ptr(), None if prefix is None else prefix[b].data_ptr(),
              out.data_ptr() + b * L * d * size, L, d, K, int(reverse), t0, t1)
             for b in range(bsz) for t0, t1 in _threads.spans(L, _CONV_ROWS)]
    if calls:  # (none for an empty batch)
        _threads.run_all(getattr(lib, _CONV_KERNELS[x.dtype]), calls)
    return out


def conv_taps(weight: Tensor) -> Tensor:
    """A depthwise conv's weight (d, 1, K) as the C kernels read it: (K, d), one tap's weights for every
    channel contiguous; kept while the weight is unchanged (for the kernels: no autograd graph)."""
    return derived("conv taps", lambda w: w[:, 0, :].t().contiguous(), weight)


def state_matrix(A_log: Tensor) -> Tensor:
    """A = -exp(A_log) in float32; kept while A_log is unchanged where no gradient is recorded."""
    if torch.is_grad_enabled():
        return -torch.exp(A_log.float())
    return derived("A", lambda a: -torch.exp(a.float()), A_log)


def _a_log_name(sfx: str) -> str:
    """A_log's attribute name for a direction suffix: mamba-ssm's "A_log", Vim's "A_b_log"."""
    return "A_log" if not sfx else "A" + sfx + "_log"


def _check_inputs(hidden_states: Tensor, mask: Tensor | None, d_model: int) -> None:
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != d_model:
        raise ValueError(f"mixer: hidden_states must be (B, L, {d_model}), got shape {tuple(hidden_states.shape)}")
    if mask is not None:
        if mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"mixer: mask shape {tuple(mask.shape)} must be (B, L) = {tuple(hidden_states.shape[:2])}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mixer: mask must be bool (True = real token), got {mask.dtype}")


class MambaMixer(nn.Module):
    """Mamba-1 block mixer (causal over L): (B, L, d_model) -> (B, L, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self._make_direction("", conv_bias, dt_min, dt_max, dt_init_floor)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _make_direction(self, sfx: str, conv_bias: bool, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        di = self.d_inner
        conv = nn.Conv1d(di, di, kernel_size=self.d_conv, groups=di, padding=self.d_conv - 1, bias=conv_bias)
        x_proj = nn.Linear(di, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        _init_dt_proj(dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
        setattr(self, "conv1d" + sfx, conv)
        setattr(self, "x_proj" + sfx, x_proj)
        setattr(self, "dt_proj" + sfx, dt_proj)
        setattr(self, _a_log_name(sfx), _A_log(di, self.d_state))
        setattr(self, "D" + sfx, _D(di))

    def _direction_params(self, sfx: str) -> tuple:
        """(conv1d, x_proj, dt_proj, A_log, D) of the direction named by ``sfx`` ("": forward, "_b":
        BiMambaMixer's backward)."""
        return (getattr(self, "conv1d" + sfx), getattr(self, "x_proj" + sfx), getattr(self, "dt_proj" + sfx),
                getattr(self, _a_log_name(sfx)), getattr(self, "D" + sfx))

    # -- one direction ------------------------------------------------------------------------
    # Everything runs time-major, (B, L, d_inner): that is how in_proj produces x and z and how
    # out_proj consumes y, and the scan reads such tensors through a transpose without copies.
    def _direction(self, x: Tensor, z: Tensor, valid: Tensor | None, sfx: str, reverse: bool,
                   state: MambaState | None = None, want_state: bool = False, add_to: Tensor | None = None):
        """x, z: (B, L, d_inner); valid: (B, L, 1) bool or None. Returns (gated y (B, L, d_inner),
        the MambaState after the last valid position when ``want_state``, else None). ``add_to``
        (B, L, d_inner), the other direction's y: ``add_to + y`` is returned for y (a fast path may
        add in add_to's memory).

        ``reverse``: the backward direction of BiMambaMixer, i.e. this direction applied to the
        sequence flipped along L (conv and scan run anti-causally), without flipping anything.
        ``state``: start from it (forward direction only) instead of zeros.

        Padded positions leave the state as it was: x and u are zeroed there and delta is -inf
        (softplus gives 0, so the decay is exp(0) = 1 and nothing is added)."""
        conv, x_proj, dt_proj, A_log, D = self._direction_params(sfx)
        if valid is not None:
            x = x.masked_fill(~valid, 0.0)
        prefix = None if state is None else state.conv_state[:, :, 1:].transpose(1, 2)  # (B, d_conv - 1, d)
        u = _conv_silu(x, conv.weight, conv.bias, reverse, prefix)
        if valid is not None:
            u = u.masked_fill(~valid, 0.0)
        x_dbl = x_proj(u)  # (B, L, dt_rank + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj's weight is applied by the scan (the CPU kernel forms delta itself) or, where padding must
        # be masked, here; its bias goes in delta_bias either way
        if valid is None:
            delta, delta_proj = dt, dt_proj.weight
        else:
            delta, delta_proj = F.linear(dt, dt_proj.weight).masked_fill(~valid, float("-inf")), None
        A = state_matrix(A_log)
        res = _scan.selective_scan(
            u.transpose(1, 2),
            delta.transpose(1, 2),
            A,
            Bm.transpose(1, 2),
            Cm.transpose(1, 2),
            D.float(),
            z=z.transpose(1, 2),
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=want_state,
            reverse=reverse,
            initial_state=None if state is None else state.ssm_state,
            delta_proj=delta_proj,
        )
        y, last = res if want_state else (res, None)
        y = y.transpose(1, 2).to(x.dtype)
        if add_to is not None:
            y = add_to + y
        if not want_state:
            return y, None
        return y, MambaState(self._last_conv_inputs(x, valid, state), last if state is None else
                             last.to(state.ssm_state.dtype))

    def _last_conv_inputs(self, x: Tensor, valid: Tensor | None, state: MambaState | None) -> Tensor:
        """The conv state after x (B, L, d_inner): the last d_conv inputs up to each row's last valid
        position, the carried ones (or zeros) before x, as (B, d_inner, d_conv) contiguous."""
        K = self.d_conv
        bsz, L, d = x.shape
        dtype = x.dtype if state is None else state.conv_state.dtype
        before = x.new_zeros(bsz, K, d) if state is None else state.conv_state.transpose(1, 2).to(x.dtype)
        xs = torch.cat([before, x], dim=1)  # (B, K + L, d): position t of x is row K + t
        if valid is None:
            last = xs[:, L:]
        else:  # padding is a suffix: a row with n valid positions ends at row K + n - 1
            n = valid[..., 0].sum(dim=1)
            last = xs[torch.arange(bsz, device=x.device)[:, None], n[:, None] + torch.arange(K, device=x.device)]
        return last.transpose(1, 2).to(dtype).contiguous()

    def _in(self, hidden_states: Tensor, mask: Tensor | None):
        _check_inputs(hidden_states, mask, self.d_model)
        if mask is not None:  # whatever sits in the padding (even NaN) must not reach gradients
            hidden_states = hidden_states.masked_fill(~mask[..., None], 0.0)
        xz = self.in_proj(hidden_states)  # (B, L, 2*d_inner)
        x, z = xz.chunk(2, dim=-1)
        valid = None if mask is None else mask[..., None]
        return x, z, valid

    def _out(self, y: Tensor, mask: Tensor | None) -> Tensor:
        out = self.out_proj(y)
        if mask is not None:
            out = out.masked_fill(~mask[..., None], 0.0)
        return out

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None, state: MambaState | None = None,
                return_state: bool = False):
        """hidden_states (B, L, d_model), mask (B, L) bool or None -> (B, L, d_model); with
        ``return_state``, ``(out, MambaState)``.

        Padded positions (mask False, always a suffix) come out as zeros and do not affect
        the valid ones. ``state`` (a ``MambaState``, or a (conv_state, ssm_state) pair as
        ``allocate_inference_cache`` makes): continue a sequence from where an earlier call or
        ``step`` left it; it is not modified. The returned state is the one after each row's last
        valid position (padding leaves it unchanged), ready for the next piece or for ``step``; it
        keeps the given state's dtypes, else conv_state takes the activations' dtype and ssm_state
        the scan's compute dtype (float32; float64 for a float64 model). Both are differentiable.
        """
        x, z, valid = self._in(hidden_states, mask)
        if state is not None:
            state = self._check_state(MambaState(*state), x.shape[0])
        y, new_state = self._direction(x, z, valid, "", False, state, return_state)
        out = self._out(y, mask)
        return (out, new_state) if return_state else out

    def _check_state(self, state: MambaState, bsz: int) -> MambaState:
        want = ((bsz, self.d_inner, self.d_conv), (bsz, self.d_inner, self.d_state))
        if (tuple(state.conv_state.shape), tuple(state.ssm_state.shape)) != want:
            raise ValueError(
                f"state: conv_state {tuple(state.conv_state.shape)} / ssm_state {tuple(state.ssm_state.shape)} must be "
                f"{want[0]} / {want[1]}"
            )
        return state

    # -- recurrent form -----------------------------------------------------------------------
    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None, dtype=None, device=None):
        """Zero states for ``step``: conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state)."""
        device = device if device is not None else self.in_proj.weight.device
        conv_dtype = dtype if dtype is not None else self.conv1d.weight.dtype
        ssm_dtype = dtype if dtype is not None else self.dt_proj.weight.dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    allocate_step_states = allocate_inference_cache

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor):
        """One token of the causal recurrence.

        hidden_states (B, d_model) or (B, 1, d_model); conv_state (B, d_inner, d_conv); ssm_state
        (B, d_inner, d_state). The states are updated in place (as mamba-ssm does) and returned:
        ``(out, conv_state, ssm_state)`` with out shaped like hidden_states.
        """
        squeeze = hidden_states.dim() == 2
        hs = hidden_states if squeeze else hidden_states.squeeze(1)
        if hs.dim() != 2 or hs.shape[-1] != self.d_model:
            raise ValueError(f"step: hidden_states must be (B, {self.d_model}) or (B, 1, {self.d_model}), got {tuple(hidden_states.shape)}")
        bsz = hs.shape[0]
        if conv_state.shape != (bsz, self.d_inner, self.d_conv) or ssm_state.shape != (bsz, self.d_inner, self.d_state):
            raise ValueError(
                f"step: conv_state {tuple(conv_state.shape)} / ssm_state {tuple(ssm_state.shape)} must be "
                f"({bsz}, {self.d_inner}, {self.d_conv}) / ({bsz}, {self.d_inner}, {self.d_state})"
            )
        dtype = hs.dtype
        x, z = self.in_proj(hs).chunk(2, dim=-1)  # (B, d_inner) each
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = (conv_state * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x).to(dtype)
        dt, Bm, Cm = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight) + self.dt_proj.bias.to(dt.dtype))
        A = state_matrix(self.A_log)
        dA = torch.exp(dt.float()[..., None] * A)
        dBu = (dt * x).float()[..., None] * Bm.float()[:, None, :]
        ssm_state.copy_(ssm_state * dA + dBu)
        y = (ssm_state.to(dtype) * Cm[:, None, :]).sum(-1) + self.D.to(dtype) * x
        y = y * F.silu(z)
        out = self.out_proj(y)
        return (out if squeeze else out.unsqueeze(1)), conv_state, ssm_state


_PARALLEL_MIN_ELEMENTS = 1 << 20


def _in_parallel(f1, f2):
    """(f1(), f2()), f2 in a worker thread (under this thread's grad, inference-mode and autocast
    state, see ``_threads``) while f1 runs here, each with one intra-op thread."""
    fut = _threads.submit(f2)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r1 = f1()
    finally:
        torch.set_num_threads(prev)
    return r1, fut.result()


class BiMambaMixer(MambaMixer):
    """Bidirectional Mamba mixer (Vim v2): forward scan + scan over the reversed sequence, summed.

    Every output position sees the whole (valid part of the) sequence. Same arguments as
    ``MambaMixer``; (B, L, d_model) -> (B, L, d_model). No ``step``: it is not causal.

    ``divide_out=True`` halves the sum of the two directions before ``out_proj``, as Vim's released
    bidirectional models do (its ``if_devide_out=True``): their state dicts load here with
    ``strict=True`` either way, and give twice the activation without it. Default False (STORM's
    projector sums).

    On CPU with more than one torch thread, the two directions run in two threads with one
    intra-op thread each (set ``parallel_directions = False`` to turn that off); results are
    identical either way.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, divide_out: bool = False):
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, conv_bias, bias)
        self._make_direction("_b", conv_bias, dt_min, dt_max, dt_init_floor)
        self.divide_out = bool(divide_out)
        self.parallel_directions = True

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None, state=None,
                return_state: bool = False) -> Tensor:
        """hidden_states (B, L, d_model), mask (B, L) bool or None -> (B, L, d_model).
        ``state`` / ``return_state`` are refused (NotImplementedError): see ``MambaMixer.forward``."""
        if state is not None or return_state:
            raise NotImplementedError(
                "BiMambaMixer cannot carry a state from one call to the next: its backward direction "
                "reads the sequence's future. Stream with the causal MambaMixer (bidirectional=False).")
        x, z, valid = self._in(hidden_states, mask)
        if self._parallel_ok(x):
            (y_f, _), (y_b, _) = _in_parallel(lambda: self._direction(x, z, valid, "", False),
                                              lambda: self._direction(x, z, valid, "_b", True))
            y = y_f + y_b
        else:
            y_f, _ = self._direction(x, z, valid, "", False)
            y, _ = self._direction(x, z, valid, "_b", True, add_to=y_f)
        return self._out(y * 0.5 if self.divide_out else y, mask)

    def extra_repr(self) -> str:
        return f"divide_out={self.divide_out}"

    def _parallel_ok(self, x: Tensor) -> bool:
        """Run the two directions in two threads? Only on CPU, with >1 intra-op thread, for big
        inputs. (Autograd's CPU backward of the two directions still runs serially.)"""
        return (self.parallel_directions and x.device.type == "cpu" and torch.get_num_threads() > 1
                and x.shape[0] * x.shape[1] * self.d_inner >= _PARALLEL_MIN_ELEMENTS)

    def step(self, *args, **kwargs):
        raise NotImplementedError("BiMambaMixer is bidirectional and has no recurrent step; use MambaMixer")

    def allocate_inference_cache(self, *args, **kwargs):
        raise NotImplementedError("BiMambaMixer is bidirectional and has no recurrent step; use MambaMixer")

    allocate_step_states = allocate_inference_cache
