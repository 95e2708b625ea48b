"""Inference through OpenVINO: a transformer converted in-process and compiled for the CPU.

PyTorch runs a BERT layer as a dozen separate kernels, each a pass over memory;
OpenVINO's CPU plugin fuses attention, GELU, LayerNorm and the residual adds into the
matrix products around them, which is where eager bf16 loses most of its time on a
CPU. An fp32 or bf16 graph is converted from the loaded weights each time a release
loads (a second or two), so such a release stores nothing beyond its model; an int8
graph is quantised once, at build time, and stored in the release
(`training.openvino_int8`). The manifest records the runtime, and queries run through
the same compiled graph as the corpus did. A release's reranker runs on the same
runtime (`CrossEncoder.use_openvino`).
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from training.errors import IntegrityError, InvalidInput
from training.precision import ConcretePrecision, cpu_supports_bf16
from training.transformer_graph import OUTPUT_NAME, NamedOutput, example_inputs, feeds, input_names

FLOAT_PRECISION = {"fp32": "f32", "bf16": "bf16"}
INSTALL_HINT = "install it with `pip install 'lockstep[openvino]'`"


def openvino_module():
    """The `openvino` package with its usage telemetry declined (`decline_telemetry`), or InvalidInput saying how
    to install it."""
    decline_telemetry()
    try:
        import openvino
    except ImportError as error:
        raise InvalidInput(f"the openvino runtime needs the openvino package, which is not installed; {INSTALL_HINT}") from error
    return openvino


def _declined(*_args, **_kwargs):
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult

    return ConsentCheckResult.DECLINED


def decline_telemetry() -> None:
    """Answer OpenVINO's and NNCF's usage-telemetry consent check with "declined" for this process.

    Unless a user has opted out, both send usage events to Intel on every model conversion
    and quantisation and keep a client id and usage counts under `~/intel`, starting when
    openvino is imported, so this runs first. A search service should not call out from
    its servers, and where it cannot (offline) each attempt costs a conversion about a
    second.
    """
    try:
        from openvino_telemetry.utils.opt_in_checker import OptInChecker
    except ImportError:
        return
    OptInChecker.check = _declined


FLOAT_HINT_KEY = ["lockstep", "float_precision"]
ACTIVATION_GROUP_KEY = ["lockstep", "activation_group"]


def stored_float_hint() -> str:
    """What a graph quantised here runs its unquantised operations in: bf16 where this CPU has it, as `auto` picks.

    The quantised matrix products run in int8 whatever the hint; softmax, LayerNorm and
    GELU run in this, 7% faster in bf16 than f32 at the same agreement with fp32. The hint
    is stored in the graph (`FLOAT_HINT_KEY`) so every process serving it computes alike.
    """
    return "bf16" if cpu_supports_bf16() else "f32"


def recorded_float_hint(graph) -> str:
    """The float precision a graph records for its unquantised operations (`FLOAT_HINT_KEY`), f32 if none."""
    return graph.get_rt_info(FLOAT_HINT_KEY).astype(str) if graph.has_rt_info(FLOAT_HINT_KEY) else "f32"


def convert_transformer(model: PreTrainedModel, output: str = OUTPUT_NAME):
    """The transformer as an OpenVINO model whose inputs carry `input_names(model)` and whose output is `output`."""
    if next(model.parameters()).device.type != "cpu":
        raise InvalidInput("the openvino runtime runs on the CPU; use the torch runtime on a GPU")
    ov = openvino_module()
    names = input_names(model)
    wrapper = NamedOutput(model, names, output).eval()
    # Tracing reads attributes transformers warns about (an unset loss type); they do not affect the graph.
    verbosity = hf_logging.get_verbosity()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        hf_logging.set_verbosity_error()
        try:
            graph = ov.convert_model(wrapper, example_input=example_inputs(model, names))
        finally:
            hf_logging.set_verbosity(verbosity)
    for port, name in zip(graph.inputs, names):
        port.get_tensor().set_names({name})
    graph.outputs[0].get_tensor().set_names({output})
    return graph


class CompiledGraph:
    """A transformer graph compiled by OpenVINO for the CPU at one precision, with one output.

    Compiled for throughput: OpenVINO splits the threads into streams (on two cores, two
    streams of one thread), and each run splits its batch's rows across them, since one
    thread per stream keeps every core busy through the elementwise work a single
    multi-threaded stream leaves partly serial (10% more documents/s on two cores). A
    single row runs on one stream. Runs are serialised (requests are not re-entrant),
    and outputs are copied out before the next run. Threads follow torch's setting
    (`OMP_NUM_THREADS`), so one knob sizes both runtimes. A float graph's uncompiled form
    stays as `source` (sharing its weights), so an int8 build quantises it without
    converting again; a graph read from a file (int8) keeps none, as nothing quantises it again.
    """

    def __init__(self, graph, precision: ConcretePrecision, hint: str, activation_group: int = 0) -> None:
        ov = openvino_module()
        self.precision = precision
        self.source = graph
        self.input_names = tuple(port.get_any_name() for port in graph.inputs)
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "THROUGHPUT",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": activation_group}
        self.compiled = ov.Core().compile_model(graph, "CPU", config)
        if precision not in FLOAT_PRECISION:
            self.source = None  # an int8 graph is never quantised again; drop its uncompiled copy
        compiled_for = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if compiled_for != hint:
            remedy = ("build the release again on a CPU like this one, or serve an fp32 or bf16 release"
                      if precision == "int8" else "build with precision auto or fp32")
            raise InvalidInput(
                f"OpenVINO compiled this {precision} model's float arithmetic for {compiled_for}, not {hint}: "
                f"the CPU lacks the instructions; {remedy}"
            )
        streams = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._requests = [self.compiled.create_infer_request() for _ in range(max(1, streams))]
        self._lock = threading.Lock()

    @classmethod
    def of_model(cls, model: PreTrainedModel, precision: ConcretePrecision, output: str = OUTPUT_NAME) -> CompiledGraph:
        """The loaded transformer converted and compiled at `precision` (fp32 or bf16)."""
        if precision not in FLOAT_PRECISION:
            raise InvalidInput(
                f"a graph converted at load time runs in fp32 or bf16, not {precision}; "
                "int8 graphs are quantised at build time and loaded with `CompiledGraph.of_file`"
            )
        return cls(convert_transformer(model, output), precision, FLOAT_PRECISION[precision])

    @classmethod
    def of_file(cls, path: Path, precision: ConcretePrecision) -> CompiledGraph:
        """A graph stored as OpenVINO IR (`.xml` beside its `.bin`), compiled at `precision` with the float
        precision it records (`stored_float_hint`; f32 if it records none) and, for a graph with int8 weights and
        dynamic activations, the activation group size it records (`training.openvino_int8.compress`)."""
        ov = openvino_module()
        path = Path(path)
        for part in (path, path.with_suffix(".bin")):
            if not part.is_file():
                raise IntegrityError(f"the OpenVINO model {path.name} lacks {part}; build the release again")
        graph = ov.Core().read_model(str(path))
        hint = recorded_float_hint(graph)
        group = graph.get_rt_info(ACTIVATION_GROUP_KEY).astype(int) if graph.has_rt_info(ACTIVATION_GROUP_KEY) else 0
        return cls(graph, precision, hint, group)

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

    def __init__(self, graph: CompiledGraph) -> None:
        self.graph = graph
        self.precision = graph.precision

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden state `(batch, tokens, dim)` as float32, on the inputs' device (the graph runs on the CPU)."""
        return torch.from_numpy(self.graph.run(input_ids, attention_mask)).to(input_ids.device)
