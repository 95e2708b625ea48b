"""Numeric precision for training and encoding: bf16 autocast where the hardware runs it fast.

bf16 is used on CUDA GPUs that support it and on CPUs with AMX or AVX512-BF16
(Sapphire Rapids and later); elsewhere fp32. Autocast keeps master weights and the
loss in fp32, so only matrix multiplications run in bf16.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from training.errors import InvalidInput

Precision = Literal["auto", "fp32", "bf16"]
ConcretePrecision = Literal["fp32", "bf16"]


def cpu_supports_bf16() -> bool:
    """True on CPUs with AMX tiles or AVX512-BF16 instructions."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve(precision: Precision, device: torch.device) -> ConcretePrecision:
    """The concrete precision for `device`: `auto` picks bf16 where it is supported and fast."""
    if precision not in ("auto", "fp32", "bf16"):
        raise InvalidInput(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"


def autocast(precision: ConcretePrecision, device: torch.device) -> contextlib.AbstractContextManager:
    """An autocast context for `precision` on `device` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
