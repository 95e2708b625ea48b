"""int8 graphs for OpenVINO: the transformer's matrix products calibrated on real texts, or with dynamic activations.

ONNX Runtime's dynamic int8 (`training.int8`) quantises each activation tensor with one
range per batch and leaves attention, softmax and the elementwise work in fp32, so on a
CPU it gains little over bf16 and loses accuracy. Two better ways run on OpenVINO:

- `quantise` (calibrated): NNCF's post-training quantisation measures each activation's
  range on a calibration sample of the corpus once, with its transformer preset
  (SmoothQuant moves outliers from activations into weights; softmax and LayerNorm stay
  in float), and OpenVINO runs the result on the CPU's int8 dot-product units (VNNI,
  AMX-int8). The fastest, at a mean cosine near 0.997 with fp32 for MiniLM.
- `compress` (dynamic): only the weights are stored in int8 (per output channel), and
  OpenVINO quantises each token's activations at run time in groups of
  `ACTIVATION_GROUP` values before the int8 products. No calibration, so it costs a
  build under a second instead of 15 s, and fine-grained ranges keep it near fp32 (mean cosine
  0.999 for MiniLM), at a speed between bf16 and calibrated int8. This is the
  scheme of Hugging Face Optimum's `OVDynamicQuantizationConfig`.

Either graph is stored as OpenVINO IR (an `.xml` beside its `.bin`) with the float
precision of its unquantised operations and, for dynamic activations, their group
size, so every process serving the release loads the very graph the corpus was
encoded with and runs it alike; NNCF is needed only to build it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.errors import InvalidInput
from training.openvino_runtime import (
    ACTIVATION_GROUP_KEY, FLOAT_HINT_KEY, INSTALL_HINT, openvino_module, recorded_float_hint, stored_float_hint,
)

ACTIVATION_GROUP = 64  # the largest group that kept MiniLM's SciFact vectors at mean cosine 0.999 (docs/benchmarks.md)
# NNCF reads this at every weight compression; set (to anything), it rounds in numpy instead of compiled graphs.
ROUND_IN_NUMPY = ("NNCF_DISABLE_OPTIMIZED_COMPRESSION", "1")


def nncf_module(path: Path):
    """The `nncf` package for writing a graph to `path`, or InvalidInput: if `path` is not an `.xml` file name, or
    if nncf is not installed (saying how to install it). openvino is imported first, declining the telemetry NNCF
    would otherwise start at import (`decline_telemetry`)."""
    if Path(path).suffix != ".xml":
        raise InvalidInput(f"an OpenVINO model is written as .xml with its .bin beside it, not {Path(path).name}")
    openvino_module()
    try:
        import nncf
    except ImportError as error:
        raise InvalidInput(f"int8 on the openvino runtime is quantised with nncf, which is not installed; {INSTALL_HINT}") from error
    return nncf


def quantise(graph, calibration: Sequence[dict[str, np.ndarray]], path: Path) -> Path:
    """Write `graph` (a transformer converted by `convert_transformer`) statically quantised to int8 as OpenVINO IR
    at `path` (`.xml`; the weights go to `.bin` beside it).

    `calibration` holds padded batches as the graph is fed (input name to array); their
    activations set the quantisation ranges, so they should look like what will be encoded.
    """
    if not calibration:
        raise InvalidInput("int8 quantisation needs at least one calibration batch")
    nncf = nncf_module(path)
    quantised = nncf.quantize(
        graph, nncf.Dataset(list(calibration)), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
    )
    return _save(quantised, path)


def compress(graph, path: Path) -> Path:
    """Write `graph` (a transformer converted by `convert_transformer`, changed in place) with int8 weights and
    activations quantised at run time in groups of `ACTIVATION_GROUP`, as OpenVINO IR at `path` (`.xml`; the
    weights go to `.bin` beside it).

    The weights are rounded in numpy (`ROUND_IN_NUMPY`): NNCF's default compiles an
    OpenVINO graph per weight matrix to round it, which pays off for billions of
    parameters, but for MiniLM's 39 matrices took 1.85 s against 0.52 s, to the same bytes.
    """
    nncf = nncf_module(path)
    os.environ.setdefault(*ROUND_IN_NUMPY)
    compressed = nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_ASYM)
    compressed.set_rt_info(str(ACTIVATION_GROUP), ACTIVATION_GROUP_KEY)
    return _save(compressed, path)


def _save(graph, path: Path) -> Path:
    """Store `graph` at `path` with the float precision its unquantised operations run in (`stored_float_hint`)."""
    graph.set_rt_info(stored_float_hint(), FLOAT_HINT_KEY)
    openvino_module().save_model(graph, str(path), compress_to_fp16=False)
    return Path(path)


def stored_hint(path: Path) -> str:
    """The float precision the OpenVINO IR at `path` runs its unquantised operations in (f32 if it records none)."""
    return recorded_float_hint(openvino_module().Core().read_model(str(path)))


def store_hint(path: Path, hint: str) -> Path:
    """Rewrite the IR at `path` to run its unquantised operations in `hint`. The new files replace the old ones by
    rename, so a graph already compiled from the old ones keeps its (mapped) weights."""
    ov = openvino_module()
    graph = ov.Core().read_model(str(path))
    graph.set_rt_info(hint, FLOAT_HINT_KEY)
    staged = path.with_name(f".{path.stem}.staged.xml")
    ov.save_model(graph, str(staged), compress_to_fp16=False)
    os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(staged, path)
    return path
