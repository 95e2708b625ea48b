"""fp32 and bf16 inference through OpenVINO: a transformer converted in-process and compiled for the CPU.

PyTorch runs a BERT layer as a dozen separate kernels, each a pass over memory;
OpenVINO's CPU plugin fuses attention, GELU, LayerNorm and the residual adds into the
matrix products around them, which is where eager bf16 loses most of its time on a
CPU. The graph is converted from the loaded weights each time a release loads (a few
seconds), so a release stores nothing beyond its model; the manifest records the
runtime, and queries run through the same compiled graph as the corpus did. A
release's reranker runs on the same runtime (`CrossEncoder.use_openvino`).
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from training.errors import InvalidInput
from training.precision import ConcretePrecision
from training.transformer_graph import OUTPUT_NAME, NamedOutput, example_inputs, feeds, input_names

INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16"}
INSTALL_HINT = "install it with `pip install 'lockstep[openvino]'`"


def openvino_module():
    """The `openvino` package, or InvalidInput saying how to install it."""
    try:
        import openvino
    except ImportError as error:
        raise InvalidInput(f"the openvino runtime needs the openvino package, which is not installed; {INSTALL_HINT}") from error
    return openvino


class CompiledGraph:
    """A transformer compiled by OpenVINO for the CPU at one precision, with one named output.

    Compiled for throughput: OpenVINO splits the threads into streams (on two cores, two
    streams of one thread), and each run splits its batch's rows across them, since one
    thread per stream keeps every core busy through the elementwise work a single
    multi-threaded stream leaves partly serial (10% more documents/s on two cores). A
    single row runs on one stream. Runs are serialised (requests are not re-entrant),
    and outputs are copied out before the next run. Threads follow torch's setting
    (`OMP_NUM_THREADS`), so one knob sizes both runtimes.
    """

    def __init__(self, model: PreTrainedModel, precision: ConcretePrecision, output: str = OUTPUT_NAME) -> None:
        if precision not in INFERENCE_PRECISION:
            raise InvalidInput(f"the openvino runtime encodes in fp32 or bf16, not {precision}")
        if next(model.parameters()).device.type != "cpu":
            raise InvalidInput("the openvino runtime runs on the CPU; use the torch runtime on a GPU")
        ov = openvino_module()
        self.precision = precision
        self.input_names = input_names(model)
        wrapper = NamedOutput(model, self.input_names, output).eval()
        # Tracing reads attributes transformers warns about (an unset loss type); they do not affect the graph.
        verbosity = hf_logging.get_verbosity()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            hf_logging.set_verbosity_error()
            try:
                graph = ov.convert_model(wrapper, example_input=example_inputs(model, self.input_names))
            finally:
                hf_logging.set_verbosity(verbosity)
        config = {
            "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
            "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        self.compiled = ov.Core().compile_model(graph, "CPU", config)
        compiled_for = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if compiled_for != INFERENCE_PRECISION[precision]:
            raise InvalidInput(
                f"OpenVINO compiled this model for {compiled_for}, not {precision}: the CPU lacks the instructions; "
                "build with precision auto or fp32"
            )
        streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._requests = [self.compiled.create_infer_request() for _ in range(max(1, streams))]
        self._lock = threading.Lock()

    def run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> np.ndarray:
        """The output for one padded batch (token type ids all zero unless given)."""
        arrays = list(feeds(self.input_names, input_ids, attention_mask, token_type_ids).values())
        parts = np.array_split(np.arange(len(arrays[0])), min(len(self._requests), len(arrays[0])))
        with self._lock:
            for request, rows in zip(self._requests, parts):
                request.start_async([array[rows[0] : rows[-1] + 1] for array in arrays])
            outputs = []
            for request, _ in zip(self._requests, parts):
                request.wait()
                outputs.append(request.get_output_tensor(0).data.copy())
        return np.concatenate(outputs)


class OpenVinoForward:
    """The bi-encoder's transformer as a `CompiledGraph` of its last hidden state; called like `TorchForward`."""

    runtime = "openvino"

    def __init__(self, model: PreTrainedModel, precision: ConcretePrecision) -> None:
        self.graph = CompiledGraph(model, precision)
        self.precision = precision

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden state `(batch, tokens, dim)` as float32 on the CPU."""
        return torch.from_numpy(self.graph.run(input_ids, attention_mask))
