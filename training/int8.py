"""int8 encoding: the bi-encoder's transformer exported to ONNX, quantised dynamically, run by ONNX Runtime.

Only the transformer is exported (inputs `input_ids`, `attention_mask` and, when the
model takes them, `token_type_ids`; output the last hidden state), so tokenisation,
length bucketing, pooling and normalisation stay in `BiEncoder` for every precision.
Weights are quantised per output channel to signed int8; activations are quantised
per batch at run time. Whether the result is close enough to fp32 is for the caller
to measure (the release builder gates on it).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import PreTrainedModel

from training.transformer_graph import OUTPUT_NAME, NamedOutput, example_inputs, feeds, input_names

OPSET_VERSION = 17
DYNAMIC_AXES = {0: "batch", 1: "sequence"}


def export_onnx(model: PreTrainedModel, path: Path) -> Path:
    """Export the transformer in fp32 with dynamic batch and sequence axes.

    Uses the TorchScript exporter (`dynamo=False`), which needs no packages beyond
    torch; its deprecation and tracer warnings are expected and silenced.
    """
    names = input_names(model)
    wrapper = NamedOutput(model, names).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            example_inputs(model, names),
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            dynamic_axes={name: DYNAMIC_AXES for name in (*names, OUTPUT_NAME)},
            opset_version=OPSET_VERSION,
        )
    return path


def export_int8(model: PreTrainedModel, path: Path) -> Path:
    """Write the transformer as a dynamically quantised ONNX model (int8 weights, per channel) to `path`.

    The fp32 export is an intermediate file, written beside `path` and removed.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as scratch:
        fp32 = export_onnx(model, Path(scratch) / "fp32.onnx")
        quantize_dynamic(fp32, path, per_channel=True, weight_type=QuantType.QInt8)
    return path


class OnnxForward:
    """A quantised transformer in an ONNX Runtime session on the CPU; called like `TorchForward`.

    As many intra-op threads as torch uses (`OMP_NUM_THREADS`, which a container's CPU
    limit should set, since the limit does not narrow the cores a process sees), no
    inter-op pool and no spinning between runs, so the session never competes with
    torch, FAISS or the server for the cores.
    """

    precision = "int8"
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = tuple(node.name for node in self.session.get_inputs())

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden state `(batch, tokens, dim)` as float32, on the inputs' device."""
        (hidden,) = self.session.run([OUTPUT_NAME], feeds(self.input_names, input_ids, attention_mask))
        return torch.from_numpy(hidden).to(input_ids.device)
