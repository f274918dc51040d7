"""One precision vocabulary for every command and config, and the resolver that turns it into dtypes.

Names: ``auto``, ``float32``, ``bfloat16``, ``float16`` (``fp32``, ``bf16``, ``fp16`` are accepted
as spellings of the same). `resolve_precision(name, device)` says what runs:

- ``float32``: float32 weights, no autocast.
- ``bfloat16``: on CUDA bfloat16 weights; on CPU float32 weights under bfloat16 autocast (CPU
  matmuls read bf16 operands and accumulate in fp32), the LLM's linear layers stored in bfloat16
  (`llm_linears`): autocast would cast them to exactly that at every call, and stored so they take
  half the memory and a decode step streams half the bytes (`storm_vlm.inference.prepare_for_inference`
  sets this up); every other weight keeps full precision.
- ``float16``: float16 weights on CUDA; refused on CPU, where fp16 matmuls are emulated.
- ``auto``: ``bfloat16`` on CUDA GPUs with native bf16 (compute capability 8.0 and up: A100, H100,
  ...), else ``float32`` (older GPUs only emulate bf16, slowly, though `torch.cuda.is_bf16_supported()`
  says True for them); on CPU ``bfloat16`` only where the CPU has native bf16 matrix instructions
  (AVX512-BF16 or AMX, as oneDNN reports — without them oneDNN emulates bf16 and it is far slower
  than fp32), else ``float32``.

The names and `parse_precision` need no torch (every command's ``--help`` lists them); torch is
imported when a precision is resolved.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storm_vlm.errors import StormError

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "PRECISION_HELP", "Precision", "parse_precision", "resolve_precision", "cpu_has_fast_bf16",
           "cuda_has_native_bf16"]

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
PRECISION_HELP = ("auto: bfloat16 where the GPU or CPU has native bf16 (CUDA: compute capability 8.0+; CPU: bf16 "
                  "autocast), else float32; float16: CUDA only")
_SPELLINGS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def cuda_has_native_bf16(device) -> bool:
    """True when the CUDA (or ROCm) device `device` computes in bf16 natively: compute capability 8.0
    and up. `torch.cuda.is_bf16_supported()` also says True where bf16 is only emulated (V100, T4),
    and asks about the current device rather than `device`."""
    import torch

    if not torch.cuda.is_available():
        return False
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (oneDNN's own check: AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def parse_precision(value) -> str:
    """The canonical name of `value` (one of PRECISIONS); StormError naming the choices otherwise."""
    name = _SPELLINGS.get(value, value) if isinstance(value, str) else value
    if name not in PRECISIONS:
        raise StormError(f"precision must be one of {', '.join(PRECISIONS)} (or fp32/bf16/fp16), got {value!r}")
    return name


@dataclass(frozen=True)
class Precision:
    """What a precision name means on one device: the weights' dtype, the autocast dtype (or None), and
    the dtype of the LLM's linear layers where it differs from the weights' (or None)."""

    name: str
    device_type: str
    weights: torch.dtype
    autocast: torch.dtype | None = None
    llm_linears: torch.dtype | None = None

    def context(self):
        """The autocast context to run the model under (a null context without autocast)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device_type, dtype=self.autocast)

    def describe(self) -> str:
        if self.autocast is None:
            return _dtype_name(self.weights)
        linears = f" (the LLM's linear layers {_dtype_name(self.llm_linears)})" if self.llm_linears else ""
        return f"{_dtype_name(self.weights)} weights{linears}, {_dtype_name(self.autocast)} autocast"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_precision(value, device: str | torch.device = "cpu") -> Precision:
    """`value` (a name of PRECISIONS or a spelling of one) on `device` (see the module docstring)."""
    import torch

    name = parse_precision(value)
    device = torch.device(device)
    device_type = device.type
    on_cpu = device_type == "cpu"
    if name == "auto":
        if on_cpu:
            name = "bfloat16" if cpu_has_fast_bf16() else "float32"
        else:
            name = "bfloat16" if device_type != "cuda" or cuda_has_native_bf16(device) else "float32"
    if name == "float32":
        return Precision(name, device_type, torch.float32)
    if name == "float16":
        if on_cpu:
            raise StormError("float16 is not used on CPU (emulated, far slower than float32): use float32 or bfloat16")
        return Precision(name, device_type, torch.float16)
    if on_cpu:
        return Precision(name, device_type, torch.float32, torch.bfloat16, llm_linears=torch.bfloat16)
    return Precision(name, device_type, torch.bfloat16)
