"""Numeric precision for training and encoding: bf16 or fp16 autocast where the hardware runs it fast, int8 on request.

`auto` means bf16 on CUDA GPUs that support it and on CPUs with AMX or AVX512-BF16
(Sapphire Rapids and later); for encoding on a GPU without bf16 (Volta, Turing: V100,
T4) it means fp16, whose tensor cores those GPUs have; elsewhere fp32. Autocast keeps
master weights and the loss in fp32, so only matrix multiplications run in 16 bits.
Training runs in fp32 or bf16 only: fp16's narrow exponent needs loss scaling for
gradients, so `auto` trains in fp32 on a GPU without bf16. int8 is an encoding-only
precision a release asks for explicitly: its transformer runs as a quantised model
(dynamically on ONNX Runtime, `training.int8`, or statically on OpenVINO,
`training.openvino_int8`), so `auto` never picks it and training refuses it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Literal, get_args

import torch

from training.errors import InvalidInput

Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
ConcretePrecision = Literal["fp32", "bf16", "fp16", "int8"]
TrainingPrecision = Literal["fp32", "bf16"]
PRECISIONS = get_args(Precision)
AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags that run each 16-bit format natively; without them torch emulates it.
NATIVE_FLAGS = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}

log = logging.getLogger(__name__)


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_has(*names: str) -> bool:
    flags = _cpu_flags()
    return any(f" {name}" in flags for name in names)


def cpu_supports_bf16() -> bool:
    """True on CPUs with AMX tiles or AVX512-BF16 instructions."""
    return _cpu_has(*NATIVE_FLAGS["bf16"])


def cpu_has_int8_dot() -> bool:
    """True on CPUs with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-int8), without which static
    int8 runs no faster than fp32: plain AVX2 takes three instructions for what VNNI does in one."""
    return _cpu_has("avx512_vnni", "avx_vnni", "amx_int8")


def emulated(precision: str, device: torch.device) -> bool:
    """True when `precision` is bf16 or fp16 on a CPU without instructions for it, where torch emulates it in
    software: bf16 several times slower than fp32, fp16 about a hundred times (1 GFLOP/s on an AVX-512 CPU)."""
    return precision in NATIVE_FLAGS and device.type == "cpu" and not _cpu_has(*NATIVE_FLAGS[precision])


def native_hardware(precision: str) -> str:
    """Where a 16-bit `precision` runs natively, in words for a message."""
    return "GPUs" if precision == "fp16" else "CPUs with bf16 instructions or GPUs"


def emulation_warning(precision: str) -> str:
    """What to tell someone whose CPU would emulate `precision` (see `emulated`)."""
    native = " or ".join(name.upper().replace("_", "-") for name in NATIVE_FLAGS[precision])
    return (f"{precision} on a CPU without {native} is emulated by torch, far slower than fp32 at no gain; "
            f"{precision} is for {native_hardware(precision)}: use precision auto or fp32 on this machine")


def resolve(precision: Precision, device: torch.device) -> ConcretePrecision:
    """The concrete precision for `device`: `auto` picks bf16 where it is supported and fast, fp16 on a GPU without
    bf16, never int8."""
    if precision not in PRECISIONS:
        raise InvalidInput(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        if emulated(precision, device):
            log.warning("%s was asked for: %s", precision, emulation_warning(precision))
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"


def resolve_training(precision: Precision, device: torch.device) -> TrainingPrecision:
    """Like `resolve`, for training, which runs in fp32 or bf16 only (int8 has no gradients, and fp16's would
    underflow without loss scaling): `auto` on a GPU without bf16 trains in fp32."""
    if precision in ("int8", "fp16"):
        raise InvalidInput(
            f"training runs in fp32 or bf16; {precision} is an encoding precision for releases "
            f"(`lockstep build --precision {precision}`); set the recipe's precision to 'auto', 'fp32' or 'bf16'"
        )
    concrete = resolve(precision, device)
    return "fp32" if concrete == "fp16" else concrete


def autocast(precision: ConcretePrecision, device: torch.device) -> contextlib.AbstractContextManager:
    """An autocast context for `precision` on `device`: bf16 or fp16 autocast, else a no-op.

    int8 is a no-op too: the int8 transformer runs outside torch, and the torch
    modules an int8 release also uses (its reranker) run in fp32.
    """
    if precision not in AUTOCAST_DTYPE:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPE[precision])


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
