"""Numeric precision for training and encoding: bf16 autocast where the hardware runs it fast, int8 on request.

bf16 is used on CUDA GPUs that support it and on CPUs with AMX or AVX512-BF16
(Sapphire Rapids and later); elsewhere fp32. Autocast keeps master weights and the
loss in fp32, so only matrix multiplications run in bf16. int8 is an encoding-only
precision a release asks for explicitly: its transformer runs as a quantised model
(dynamically on ONNX Runtime, `training.int8`, or statically on OpenVINO,
`training.openvino_int8`), so `auto` never picks it and training refuses it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Literal

import torch

from training.errors import InvalidInput

Precision = Literal["auto", "fp32", "bf16", "int8"]
ConcretePrecision = Literal["fp32", "bf16", "int8"]
TrainingPrecision = Literal["fp32", "bf16"]

log = logging.getLogger(__name__)


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_supports_bf16() -> bool:
    """True on CPUs with AMX tiles or AVX512-BF16 instructions."""
    flags = _cpu_flags()
    return " amx_bf16" in flags or " avx512_bf16" in flags


def cpu_has_int8_dot() -> bool:
    """True on CPUs with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-int8), without which static
    int8 runs no faster than fp32: plain AVX2 takes three instructions for what VNNI does in one."""
    flags = _cpu_flags()
    return any(f" {flag}" in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def emulated(precision: str, device: torch.device) -> bool:
    """True when `precision` is bf16 on a CPU without bf16 instructions, where torch emulates it in software."""
    return precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16()


def resolve(precision: Precision, device: torch.device) -> ConcretePrecision:
    """The concrete precision for `device`: `auto` picks bf16 where it is supported and fast, never int8."""
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise InvalidInput(f"precision must be 'auto', 'fp32', 'bf16' or 'int8', got {precision!r}")
    if precision != "auto":
        if emulated(precision, device):
            log.warning("bf16 was asked for on a CPU without AMX or AVX512-BF16: torch emulates it there, several "
                        "times slower than fp32 at no gain; use precision auto or fp32 on this machine")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"


def resolve_training(precision: Precision, device: torch.device) -> TrainingPrecision:
    """Like `resolve`, for training, which runs in fp32 or bf16 only (int8 has no gradients)."""
    concrete = resolve(precision, device)
    if concrete == "int8":
        raise InvalidInput(
            "training runs in fp32 or bf16; int8 is an encoding precision for releases "
            "(`lockstep build --precision int8`); set the recipe's precision to 'auto', 'fp32' or 'bf16'"
        )
    return concrete


def autocast(precision: ConcretePrecision, device: torch.device) -> contextlib.AbstractContextManager:
    """An autocast context for `precision` on `device`: bf16 autocast, else a no-op.

    int8 is a no-op too: the int8 transformer runs outside torch, and the torch
    modules an int8 release also uses (its reranker) run in fp32.
    """
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def store_linear_weights(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Store every linear layer's weight and bias in `dtype`, for inference under autocast to `dtype` only.

    Autocast casts fp32 weights again in each region it enters, and a server enters one per
    request: for a one-query batch those casts cost as much as the arithmetic. Weights
    already in the autocast dtype are used as they are, so outputs stay bit-identical. The
    model no longer trains and no longer runs outside autocast.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(module.weight.to(dtype), requires_grad=False)
                if module.bias is not None:
                    module.bias = torch.nn.Parameter(module.bias.to(dtype), requires_grad=False)
