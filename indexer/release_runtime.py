"""How a release's encoder runs: the precision and runtime its manifest records, applied to a loaded encoder.

Queries must be encoded exactly as the corpus was, so every process that encodes for a
release (the server, a drift probe, a shard worker) attaches the runtime through here:
torch (fp32 or bf16 autocast), openvino (fp32 or bf16 compiled for the CPU, or int8
statically quantised and stored in the release) or onnxruntime (int8, dynamically
quantised and stored in the release). A release's reranker follows it onto openvino.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from indexer.manifest import int8_model_files
from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.errors import InvalidInput
from training.precision import ConcretePrecision

BuildRuntime = Literal["torch", "openvino"]
BUILD_RUNTIMES = ("torch", "openvino")


def choose_runtime(encoder: BiEncoder, precision: ConcretePrecision, runtime: BuildRuntime) -> None:
    """Set a new build's encoder to `precision` on `runtime`; int8 is attached later, by its quantisation gate."""
    if runtime not in BUILD_RUNTIMES:
        raise InvalidInput(f"runtime must be 'torch' or 'openvino', got {runtime!r}")
    if precision == "int8":
        return
    encoder.precision = precision
    if runtime == "openvino":
        encoder.use_openvino()


def quantise_int8(encoder: BiEncoder, folder: Path, runtime: BuildRuntime, calibration_texts: Sequence[str]) -> Path:
    """Quantise the fp32 encoder for an int8 release on `runtime` into `folder`; returns the file to load.

    On torch: dynamically, to ONNX for ONNX Runtime (`calibration_texts` unused). On
    openvino: statically, to OpenVINO IR calibrated on `calibration_texts`.
    """
    if runtime == "openvino":
        return encoder.quantise_openvino_int8(folder / int8_model_files("openvino")[0], calibration_texts)
    return encoder.export_int8(folder / int8_model_files("onnxruntime")[0])


def attach_reranker_runtime(reranker: CrossEncoder, precision: str, runtime: str) -> None:
    """Score with the release's runtime: openvino at its precision, torch otherwise; an int8 release's reranker runs fp32."""
    if runtime == "openvino":
        reranker.use_openvino("fp32" if precision == "int8" else precision)


def attach_runtime(encoder: BiEncoder, folder: Path, precision: str, runtime: str) -> None:
    """Make `encoder` encode as the release in `folder` was built: its precision on its runtime."""
    if precision == "int8":
        encoder.use_int8(folder / int8_model_files(runtime)[0])
        return
    encoder.precision = precision
    if runtime == "openvino":
        encoder.use_openvino()
    elif runtime != "torch":
        raise InvalidInput(f"release in {folder} names runtime {runtime!r}, which this version cannot run; upgrade lockstep")
