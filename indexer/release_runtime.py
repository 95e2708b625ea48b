"""How a release's encoder runs: the precision and runtime its manifest records, applied to a loaded encoder.

Queries must be encoded exactly as the corpus was, so every process that encodes for a
release (the server, a drift probe, a shard worker) attaches the runtime through here:
torch (fp32, or bf16 or fp16 autocast), openvino (fp32 or bf16 compiled for the CPU, or int8
with calibrated or dynamic activations, stored in the release) or onnxruntime (int8,
dynamically quantised and stored in the release). A release's reranker follows it onto
openvino.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from indexer.manifest import int8_model_files
from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.errors import InvalidInput
from training.precision import (
    ConcretePrecision,
    cpu_has_int8_dot,
    emulated,
    native_hardware,
)

log = logging.getLogger(__name__)

BuildRuntime = Literal["torch", "openvino"]
BUILD_RUNTIMES = ("torch", "openvino")
Int8Activations = Literal["auto", "calibrated", "dynamic"]
INT8_ACTIVATIONS = ("auto", "calibrated", "dynamic")


def choose_runtime(encoder: BiEncoder, precision: ConcretePrecision, runtime: BuildRuntime) -> None:
    """Set a new build's encoder to `precision` on `runtime`; int8 is attached later, by its quantisation gate."""
    if runtime not in BUILD_RUNTIMES:
        raise InvalidInput(f"runtime must be 'torch' or 'openvino', got {runtime!r}")
    if precision == "int8":
        return
    if precision == "fp16" and runtime == "openvino":
        raise InvalidInput("fp16 is for GPUs, on the torch runtime; on openvino use precision bf16 or fp32")
    encoder.precision = precision
    if runtime == "openvino":
        encoder.use_openvino()


def int8_activations(runtime: BuildRuntime, requested: str) -> str:
    """How an int8 build on `runtime` quantises activations: calibrated (ranges measured on a corpus sample, openvino
    only) or dynamic (measured per batch at run time); auto means calibrated on openvino and dynamic on torch."""
    if requested not in INT8_ACTIVATIONS:
        raise InvalidInput(f"int8 activations must be 'auto', 'calibrated' or 'dynamic', got {requested!r}")
    if requested == "auto":
        return "calibrated" if runtime == "openvino" else "dynamic"
    if requested == "calibrated" and runtime != "openvino":
        raise InvalidInput("calibrated int8 activations need the openvino runtime; build with runtime openvino, "
                           "or with int8 activations dynamic (ONNX Runtime)")
    return requested


def warn_if_int8_is_slow_here(runtime: str, subject: str) -> None:
    """Log a warning when static int8 on openvino would run on a CPU without int8 dot-product instructions.

    There it is no faster than fp32: on a 2-core AVX2 machine it encoded SciFact at 0.78x
    openvino fp32, where dynamic int8 on ONNX Runtime (the torch runtime) ran at 1.04x.
    """
    if runtime == "openvino" and not cpu_has_int8_dot():
        log.warning("%s on openvino runs on a CPU without int8 dot-product instructions (VNNI or AMX), where static "
                    "int8 is slower than fp32 on openvino; use precision fp32 with runtime openvino, or int8 with "
                    "runtime torch, on machines like this", subject)


def quantise_int8(
    encoder: BiEncoder, folder: Path, runtime: BuildRuntime, activations: str, calibration_texts: Sequence[str]
) -> Path:
    """Quantise the fp32 encoder for an int8 release on `runtime` into `folder`; returns the file to load.

    On torch: dynamically, to ONNX for ONNX Runtime. On openvino: to OpenVINO IR, with
    activations calibrated on `calibration_texts`, or with int8 weights and activations
    quantised at run time (`int8_activations` says which; `calibration_texts` are used
    only when calibrating).
    """
    if runtime != "openvino":
        return encoder.export_int8(folder / int8_model_files("onnxruntime")[0])
    warn_if_int8_is_slow_here(runtime, "an int8 build")
    path = folder / int8_model_files("openvino")[0]
    if int8_activations(runtime, activations) == "dynamic":
        return encoder.compress_openvino_int8(path)
    return encoder.quantise_openvino_int8(path, calibration_texts)


def attach_reranker_runtime(reranker: CrossEncoder, precision: str, runtime: str) -> None:
    """Score with the release's runtime: openvino at its precision, torch otherwise; an int8 release's reranker runs fp32."""
    if runtime == "openvino":
        reranker.use_openvino("fp32" if precision == "int8" else precision)


def attach_runtime(encoder: BiEncoder, folder: Path, precision: str, runtime: str) -> None:
    """Make `encoder` encode as the release in `folder` was built: its precision on its runtime."""
    if precision == "int8":
        warn_if_int8_is_slow_here(runtime, f"the int8 release in {folder}")
        encoder.use_int8(folder / int8_model_files(runtime)[0])
        return
    encoder.precision = precision
    if runtime == "openvino":
        encoder.use_openvino()
    elif runtime != "torch":
        raise InvalidInput(f"release in {folder} names runtime {runtime!r}, which this version cannot run; upgrade lockstep")
    elif emulated(precision, encoder.device):
        log.warning("the release in %s was built in %s, which this CPU runs emulated, far slower than fp32; serve it "
                    "from %s, or build one in fp32 for machines like this", folder, precision, native_hardware(precision))
