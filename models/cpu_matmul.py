"""Wide matrix products of bfloat16 weights in float32, on CPUs that have no native bfloat16.

Without AVX512-BF16 or AMX, bfloat16 matrix products are emulated: one decode row is fine (reading
the weights dominates, and bfloat16 halves that), but a prefill of hundreds of tokens runs several
times slower than in float32. So for inputs of `min_rows` rows or more, each linear layer converts
its weight to float32 for that call and multiplies in float32; the weights stay bfloat16 in
memory. Accumulation is float32 either way, so results agree with the bfloat16 path to rounding.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_MIN_ROWS = 16  # below this the conversion costs more than the emulated product


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: keep torch's own kernels
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _wide_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() < self._wide_min_rows * x.shape[-1] or x.dtype != torch.bfloat16:
        return F.linear(x, self.weight, self.bias)
    bias = None if self.bias is None else self.bias.float()
    return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def use_float32_for_wide_inputs(model: torch.nn.Module, min_rows: int = DEFAULT_MIN_ROWS) -> int:
    """Route wide inputs of the model's bfloat16 linear layers through float32; return how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16:
            module._wide_min_rows = min_rows
            module.forward = types.MethodType(_wide_linear, module)
            count += 1
    return count
