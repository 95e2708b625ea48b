"""The release manifest: everything needed to serve, audit and compare a release.

It names the exact model (fingerprint and content-addressed folder) and the numeric
precision and runtime (torch, openvino or onnxruntime) its vectors were computed with
(queries use the same), the corpus
state the vectors reflect (change sequence, document count), the index (factory,
dimension, metric, search parameters and, for approximate kinds, recall@10 against
exact search measured at build time), the document norms before normalisation (a drift signal),
evaluation metrics if any, and a sha256 of every file in the release. An int8 release
also holds its quantised encoder (`int8_model_files`: an ONNX model on onnxruntime, an
OpenVINO IR pair on openvino, checksummed like the index), how its activations are
quantised (calibrated on a corpus sample, or dynamically at run time) and how closely
its document vectors agreed with fp32 when it was built.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from indexer.recall_check import RecallCheck
from training.errors import InvalidInput
from training.typed_fields import check_field_types

MANIFEST_FILE = "manifest.json"
INT8_MODEL_FILE = "encoder.int8.onnx"
OPENVINO_INT8_FILES = ("encoder.int8.xml", "encoder.int8.bin")
INT8_FILES = {"onnxruntime": (INT8_MODEL_FILE,), "openvino": OPENVINO_INT8_FILES}
FORMAT_VERSION = 1


def int8_model_files(runtime: str) -> tuple[str, ...]:
    """The files an int8 release on `runtime` stores its quantised encoder in; the first is the one to load."""
    if runtime not in INT8_FILES:
        raise InvalidInput(f"an int8 release on runtime {runtime!r} is one this version cannot run; upgrade lockstep")
    return INT8_FILES[runtime]


@dataclass(frozen=True)
class ModelRef:
    """Which model built the release, and where its stored copy lives (relative to the data dir)."""

    fingerprint: str
    path: str
    name: str
    pooling: str
    query_max_length: int
    document_max_length: int


@dataclass(frozen=True)
class RerankerRef:
    """The cross-encoder a release reranks with, stored like the bi-encoder."""

    fingerprint: str
    path: str
    name: str
    max_length: int


@dataclass(frozen=True)
class NormStats:
    """Distribution of vector norms before L2 normalisation."""

    mean: float
    std: float
    min: float
    p05: float
    p50: float
    p95: float
    max: float

    @classmethod
    def of(cls, norms: np.ndarray) -> NormStats:
        if len(norms) == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        p05, p50, p95 = np.percentile(norms, [5, 50, 95])
        return cls(
            mean=float(norms.mean()),
            std=float(norms.std()),
            min=float(norms.min()),
            p05=float(p05),
            p50=float(p50),
            p95=float(p95),
            max=float(norms.max()),
        )


@dataclass(frozen=True)
class Int8Agreement:
    """Cosine between int8 and fp32 document vectors on a seeded sample of the corpus (the int8 gate's figures)."""

    mean_cosine: float
    min_cosine: float
    sample: int

    @classmethod
    def of(cls, cosines: np.ndarray) -> Int8Agreement:
        return cls(mean_cosine=float(cosines.mean()), min_cosine=float(cosines.min()), sample=len(cosines))


@dataclass(frozen=True)
class Manifest:
    """The contents of `manifest.json`."""

    release_id: str
    created: str
    model: ModelRef
    corpus_seq: int
    doc_count: int
    index_type: str
    dim: int
    metric: str
    document_norms: NormStats
    files: dict[str, str]
    evaluation: dict[str, float] = field(default_factory=dict)
    reranker: RerankerRef | None = None
    precision: str = "fp32"
    int8_agreement: Int8Agreement | None = None
    runtime: str = "torch"
    int8_activations: str | None = None
    search_params: dict[str, int] = field(default_factory=dict)
    recall: RecallCheck | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """The manifest in parsed JSON; InvalidInput (or TypeError for a missing or unknown field) naming a value of
        the wrong type, so a hand-edited manifest is refused when read rather than failing where a value is used."""
        if not isinstance(data, dict):
            raise InvalidInput(f"a manifest is a JSON object, got {type(data).__name__}")
        data = dict(data)
        for key, part in (("model", ModelRef), ("document_norms", NormStats), ("reranker", RerankerRef),
                          ("int8_agreement", Int8Agreement), ("recall", RecallCheck)):
            if isinstance(data.get(key), dict):
                check_field_types(part, data[key], key)
                data[key] = part(**data[key])
        data.setdefault("runtime", "onnxruntime" if data.get("precision") == "int8" else "torch")
        if data.get("precision") == "int8":
            data.setdefault("int8_activations", "calibrated" if data["runtime"] == "openvino" else "dynamic")
        check_field_types(cls, data, "manifest")
        return cls(**data)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        return cls.from_dict(json.loads((Path(folder) / MANIFEST_FILE).read_text()))
