"""Static int8 quantisation through OpenVINO: the transformer's matrix products calibrated on real texts.

Dynamic int8 (`training.int8`) quantises activations anew on every batch and leaves
attention, softmax and the elementwise work in fp32, so on a CPU it gains little over
bf16. Here NNCF's post-training quantisation measures each activation's range on a
calibration sample of the corpus once, with its transformer preset (SmoothQuant moves
outliers from activations into weights; softmax and LayerNorm stay in float), and
OpenVINO runs the result on the CPU's int8 dot-product units (VNNI, AMX-int8). The
quantised graph is stored as OpenVINO IR (an `.xml` beside its `.bin`), with the float
precision of its unquantised operations, so every process serving the release loads
the very graph the corpus was encoded with and runs it alike; NNCF is needed only to
build it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import PreTrainedModel

from training.errors import InvalidInput
from training.openvino_runtime import (
    FLOAT_HINT_KEY, INSTALL_HINT, convert_transformer, openvino_module, stored_float_hint,
)


def nncf_module():
    """The `nncf` package, or InvalidInput saying how to install it; import it after `openvino_module`, which
    declines the telemetry NNCF would otherwise start at import."""
    try:
        import nncf
    except ImportError as error:
        raise InvalidInput(f"int8 on the openvino runtime is quantised with nncf, which is not installed; {INSTALL_HINT}") from error
    return nncf


def quantise(model: PreTrainedModel, calibration: Sequence[dict[str, np.ndarray]], path: Path) -> Path:
    """Write `model` statically quantised to int8 as OpenVINO IR at `path` (`.xml`; the weights go to `.bin` beside it).

    `calibration` holds padded batches as the graph is fed (input name to array); their
    activations set the quantisation ranges, so they should look like what will be encoded.
    """
    if not calibration:
        raise InvalidInput("int8 quantisation needs at least one calibration batch")
    path = Path(path)
    if path.suffix != ".xml":
        raise InvalidInput(f"an OpenVINO model is written as .xml with its .bin beside it, not {path.name}")
    ov = openvino_module()
    nncf = nncf_module()
    graph = convert_transformer(model)
    quantised = nncf.quantize(
        graph, nncf.Dataset(list(calibration)), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration)
    )
    quantised.set_rt_info(stored_float_hint(), FLOAT_HINT_KEY)
    ov.save_model(quantised, str(path), compress_to_fp16=False)
    return path
