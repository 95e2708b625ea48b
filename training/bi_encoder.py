"""The bi-encoder: one transformer that embeds queries and documents independently.

Loads a Hugging Face or sentence-transformers folder (safetensors only, never remote
code), pools token outputs, and returns L2-normalised float32 vectors so inner product
equals cosine. Encoding sorts texts by token length and pads per batch, so short texts
do not pay for long ones, and caps each batch's padded tokens as well as its texts: a
batch of long documents stays small enough for its activations to stay in cache, one of
short queries fills up to `batch_size`. `save` writes sentence-transformers' layout, so
`SentenceTransformer(path)` loads what we write. `fingerprint` names the exact model.
`precision` selects fp32, or bf16 or fp16 autocast, for encoding (see `training.precision`), or
int8, where `forward` runs a quantised model instead of the torch module: dynamically
quantised on ONNX Runtime (`training.int8`) or statically quantised on OpenVINO
(`training.openvino_int8`); `use_openvino` runs fp32 or bf16 through a graph OpenVINO
compiled (`training.openvino_runtime`). Tokenisation, batching and pooling are the same
for every runtime.
Left out here: training loops (they live in their own modules).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from training.errors import InvalidInput
from training.fingerprint import Fingerprints, model_fingerprints
from training.openvino_runtime import FLOAT_PRECISION, CompiledGraph, OpenVinoForward, convert_transformer
from training.pooling import Pooling, pool, read_pooling, write_pooling
from training.precision import AUTOCAST_DTYPE, ConcretePrecision, autocast, store_linear_weights
from training.st_pipeline import check_pipeline, read_prompts
from training.token_prefix import token_prefixes
from training.transformer_graph import feeds, input_names

TextKind = Literal["query", "document"]
ProgressCallback = Callable[[int, int], None]

LOCKSTEP_CONFIG = "lockstep.json"
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PROGRESS_BAR_MIN_TEXTS = 512
MAX_BATCH_TOKENS = 8192
CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class EncoderSettings:
    """What, besides weights and tokenizer, decides a model's vectors."""

    pooling: Pooling
    query_max_length: int
    document_max_length: int
    query_prompt: str = ""
    document_prompt: str = ""

    def max_length(self, kind: TextKind) -> int:
        return self.query_max_length if kind == "query" else self.document_max_length

    def prompt(self, kind: TextKind) -> str:
        """The text put before every text of `kind` (an instruction such as e5's "query: "), or ""."""
        return self.query_prompt if kind == "query" else self.document_prompt


@dataclass(frozen=True)
class Encoded:
    """Unit vectors, the norms they had before normalisation (a drift signal), and tokens read per text."""

    vectors: np.ndarray
    norms: np.ndarray
    lengths: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def rows(self, start: int, stop: int) -> Encoded:
        return Encoded(self.vectors[start:stop], self.norms[start:stop], self.lengths[start:stop])


Runtime = Literal["torch", "openvino", "onnxruntime"]


class TransformerForward(Protocol):
    """Runs the transformer: padded `(input_ids, attention_mask)` to the last hidden state `(batch, tokens, dim)`."""

    runtime: Runtime

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


class TorchForward:
    """The transformer run by torch: differentiable, fp32 or under bf16 autocast."""

    runtime = "torch"

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _require_safetensors(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise InvalidInput(f"model folder {model_dir} does not exist; pass a folder holding config.json and model.safetensors")
    if not any((model_dir / name).exists() for name in SAFETENSORS_FILES):
        raise InvalidInput(
            f"{model_dir} has no model.safetensors; Lockstep loads safetensors only "
            "(convert with `model.save_pretrained(path, safe_serialization=True)`)"
        )


def _all_fp32(model: torch.nn.Module) -> bool:
    return all(tensor.dtype == torch.float32 for tensor in model.state_dict().values() if tensor.is_floating_point())


def model_dimension(model_dir: Path) -> int:
    """The size of the vectors a model folder encodes to (its config's hidden size), read without the weights."""
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{model_dir}: its config.json cannot be read ({exc}); pass a model folder") from exc
    return int(config.hidden_size)


# Models whose position ids start after the padding index, so only max_position_embeddings - pad_token_id - 1
# tokens fit (RoBERTa's 514 position embeddings hold 512 tokens).
_POSITIONS_AFTER_PADDING = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer", "data2vec-text", "xmod",
    "roberta-prelayernorm", "ibert",
})


def _position_limit(config) -> int | None:
    """The most tokens the model's position embeddings hold, None if it declares none."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in _POSITIONS_AFTER_PADDING and config.pad_token_id is not None:
        limit -= config.pad_token_id + 1
    return limit


def _folder_max_length(model_dir: Path, model: PreTrainedModel) -> int:
    """sentence-transformers' `max_seq_length` (v5 and older), else the tokenizer's `model_max_length`
    (where v6 keeps it), else the model's position embeddings (512 if it declares none), as sentence-transformers
    falls back; never beyond the position embeddings."""
    limit = _position_limit(model.config) or 512
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        path = model_dir / name
        value = json.loads(path.read_text()).get(key) if path.exists() else None
        if isinstance(value, int) and 0 < value < 100_000:
            return min(value, limit)
    return limit


def _batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Split `order` (longest first) into runs of at most `batch_size` rows whose padded size, rows times the
    first row's length, stays within `max_tokens`; a single row longer than that is a batch of its own."""
    batches, start = [], 0
    while start < len(order):
        rows = max(1, min(batch_size, max_tokens // max(int(lengths[order[start]]), 1)))
        batches.append(order[start : start + rows])
        start += rows
    return batches


class BiEncoder:
    """A transformer plus pooling that maps texts to unit vectors."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: EncoderSettings,
        name: str = "model",
    ) -> None:
        limit = _position_limit(model.config)
        for kind in ("query", "document"):
            length = settings.max_length(kind)
            if length < 2 or (limit is not None and length > limit):
                raise InvalidInput(f"{kind} max length {length} must be between 2 and the model's limit {limit}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings
        self.name = name
        self.precision: ConcretePrecision = "fp32"
        self.forward: TransformerForward = TorchForward(self.model)
        self._serving_precision: ConcretePrecision | None = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        pooling: Pooling | None = None,
        query_max_length: int | None = None,
        document_max_length: int | None = None,
        name: str | None = None,
        device: str = "cpu",
    ) -> BiEncoder:
        """Load a model folder; explicit arguments override what the folder declares."""
        model_dir = Path(path)
        _require_safetensors(model_dir)
        check_pipeline(model_dir)
        model = AutoModel.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        declared = {}
        if (model_dir / LOCKSTEP_CONFIG).exists():
            declared = json.loads((model_dir / LOCKSTEP_CONFIG).read_text())
        default_length = _folder_max_length(model_dir, model)
        settings = EncoderSettings(
            pooling=pooling or read_pooling(model_dir) or Pooling(declared.get("pooling", Pooling.MEAN.value)),
            query_max_length=query_max_length or declared.get("query_max_length", default_length),
            document_max_length=document_max_length or declared.get("document_max_length", default_length),
            **read_prompts(model_dir),
        )
        # Run in fp32 whatever the checkpoint stores (transformers 5 keeps an fp16 checkpoint in fp16): precision
        # is the release's choice, and the int8 gate's reference must be fp32. The fingerprint still hashes the
        # weights as stored, so a release built before this cast keeps matching its model.
        stored = None if _all_fp32(model) else Fingerprints(model_fingerprints(model, tokenizer, settings))
        encoder = cls(model.to(device=device, dtype=torch.float32), tokenizer, settings,
                      name=name or declared.get("name", model_dir.name))
        if stored is not None:
            encoder.fingerprints = stored
        return encoder

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def fingerprints(self) -> Fingerprints:
        """sha256 over weights, tokenizer, pooling and max lengths, in every fingerprint version; computed once per
        load."""
        return Fingerprints(model_fingerprints(self.model, self.tokenizer, self.settings))

    @property
    def fingerprint(self) -> str:
        """The fingerprint a new build records (the current version's)."""
        return self.fingerprints.current

    def matches(self, fingerprint: str) -> bool:
        """Whether this model hashes to `fingerprint`, recorded by any fingerprint version."""
        return self.fingerprints.matches(fingerprint)

    def tokenize(self, texts: Sequence[str], kind: TextKind) -> list[list[int]]:
        """Token ids per text, after the kind's prompt, truncated to the kind's max length, unpadded."""
        max_length = self.settings.max_length(kind)
        if prompt := self.settings.prompt(kind):
            texts = [prompt + text for text in texts]
        return self.tokenizer(
            token_prefixes(self.tokenizer, texts, max_length), truncation=True, max_length=max_length, padding=False
        )["input_ids"]

    def export_int8(self, path: str | Path) -> Path:
        """Write the transformer as a dynamically quantised int8 ONNX model to `path` (see `training.int8`)."""
        from training.int8 import export_int8

        return export_int8(self.model, Path(path))

    def quantise_openvino_int8(self, path: str | Path, calibration_texts: Sequence[str]) -> Path:
        """Write the transformer statically quantised to int8 as OpenVINO IR at `path` (see `training.openvino_int8`).

        The quantisation ranges are measured on `calibration_texts`, encoded as documents
        in length-sorted batches of `CALIBRATION_BATCH` as `encode` would batch them.
        """
        from training.openvino_int8 import quantise

        token_ids = sorted(self.tokenize(calibration_texts, "document"), key=len, reverse=True)
        batches = [self._pad(token_ids[start : start + CALIBRATION_BATCH])
                   for start in range(0, len(token_ids), CALIBRATION_BATCH)]
        names = input_names(self.model)
        return quantise(self.openvino_graph(), [feeds(names, *batch) for batch in batches], Path(path))

    def compress_openvino_int8(self, path: str | Path) -> Path:
        """Write the transformer with int8 weights and dynamically quantised activations as OpenVINO IR at `path`
        (see `training.openvino_int8.compress`); needs no calibration texts."""
        from training.openvino_int8 import compress

        return compress(self.openvino_graph(), Path(path))

    def openvino_graph(self):
        """The transformer as an uncompiled OpenVINO graph to quantise: a copy of the graph this encoder runs when it
        runs its weights in fp32 or bf16 on OpenVINO (as an int8 build's fp32 reference does), else converted anew.

        Converting traces the model, about a second for MiniLM; the copy shares the weights.
        """
        if isinstance(self.forward, OpenVinoForward) and self.forward.precision in FLOAT_PRECISION:
            return self.forward.graph.source.clone()
        return convert_transformer(self.model)

    def use_int8(self, path: str | Path) -> None:
        """Encode through the int8 model at `path` from now on; the torch weights stay for the fingerprint.

        The file says which runtime runs it: `.onnx` on ONNX Runtime, `.xml` (OpenVINO IR) on
        OpenVINO. Either package is imported only here, so other processes never load it.
        """
        path = Path(path)
        if path.suffix == ".xml":
            self.forward = OpenVinoForward(CompiledGraph.of_file(path, "int8"))
        else:
            from training.int8 import OnnxForward

            self.forward = OnnxForward(path)
        self.precision = "int8"

    def use_openvino(self) -> None:
        """Encode through OpenVINO at the current precision (fp32 or bf16) from now on (see `training.openvino_runtime`).

        The torch weights stay for the fingerprint and for training; the openvino package
        itself is imported only when the graph is compiled, so other processes never load it.
        """
        self.forward = OpenVinoForward(CompiledGraph.of_model(self.model, self.precision))

    @property
    def runtime(self) -> Runtime:
        """What runs the transformer: torch, openvino (fp32, bf16 or static int8), or onnxruntime (dynamic int8)."""
        return self.forward.runtime

    def prepare_for_serving(self) -> None:
        """Fix this encoder to its current precision for many small encode calls, as a release serves queries.

        Under bf16 or fp16 the linear weights are stored in that format once
        (`precision.store_linear_weights`), which saves a third of a lone query's encode time
        and changes no output bit. The fingerprint is taken first, from the weights as loaded.
        """
        _ = self.fingerprints
        if self.precision in AUTOCAST_DTYPE and isinstance(self.forward, TorchForward):
            store_linear_weights(self.model, AUTOCAST_DTYPE[self.precision])
        self._serving_precision = self.precision

    def _check_forward(self) -> None:
        """Refuse to encode when `precision` and `forward` disagree, so vectors never carry the wrong precision."""
        if self._serving_precision is not None and self.precision != self._serving_precision:
            raise InvalidInput(
                f"this encoder was prepared to serve in {self._serving_precision} and cannot encode in "
                f"{self.precision}; load it again"
            )
        runs_torch = isinstance(self.forward, TorchForward)
        if self.precision == "int8" and runs_torch:
            raise InvalidInput("int8 encoding runs a quantised model; attach one with `use_int8(path)` first")
        if not runs_torch and self.forward.precision != self.precision:
            raise InvalidInput(
                f"this encoder runs a {self.runtime} model compiled for {self.forward.precision} and cannot encode "
                f"in {self.precision}; load it again"
            )

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled, not yet normalised embeddings; differentiable through `TorchForward` (training calls this)."""
        return pool(self.forward(input_ids, attention_mask), attention_mask, self.settings.pooling)

    def token_batch(self, texts: Sequence[str], kind: TextKind) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise and pad texts into `(input_ids, attention_mask)` on the model's device (for training)."""
        return self._pad(self.tokenize(texts, kind))

    def _pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def encode_with_norms(
        self,
        texts: Sequence[str],
        kind: TextKind = "document",
        *,
        batch_size: int = 32,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        show_progress: bool | None = None,
        progress: ProgressCallback | None = None,
    ) -> Encoded:
        """Encode texts in length-sorted batches of at most `batch_size` texts and `max_batch_tokens` padded
        tokens (one text at least); returns unit vectors in input order and raw norms."""
        if isinstance(texts, str):
            raise InvalidInput("encode takes a list of texts, not a single string")
        self._check_forward()
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        norms = np.zeros(len(texts), dtype=np.float32)
        if not texts:
            return Encoded(vectors, norms, np.zeros(0, dtype=np.int64))
        token_ids = self.tokenize(texts, kind)
        lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")
        if show_progress is None:
            show_progress = len(texts) >= PROGRESS_BAR_MIN_TEXTS
        desc = "encoding queries" if kind == "query" else "encoding documents"
        bar = tqdm(total=len(texts), desc=desc, unit="text", disable=not show_progress)
        done = 0
        with torch.inference_mode(), autocast(self.precision, self.device), bar:
            for rows in _batches(order, lengths, batch_size, max_batch_tokens):
                input_ids, attention_mask = self._pad([token_ids[i] for i in rows])
                pooled = self.embed(input_ids, attention_mask).float()
                batch_norms = pooled.norm(dim=1)
                vectors[rows] = (pooled / batch_norms.clamp(min=1e-12).unsqueeze(1)).cpu().numpy()
                norms[rows] = batch_norms.cpu().numpy()
                bar.update(len(rows))
                done += len(rows)
                if progress is not None:
                    progress(done, len(texts))
        return Encoded(vectors, norms, lengths)

    def encode(self, texts: Sequence[str], kind: TextKind = "document", **kwargs) -> np.ndarray:
        """Unit float32 vectors `(len(texts), dim)`, in input order."""
        return self.encode_with_norms(texts, kind, **kwargs).vectors

    def settings_prompts(self) -> dict[str, str]:
        """The prompts in sentence-transformers' naming (`encode_query` reads "query", `encode_document`
        "document"), those that are set."""
        named = {"query": self.settings.query_prompt, "document": self.settings.document_prompt}
        return {name: prompt for name, prompt in named.items() if prompt}

    def save(self, path: str | Path) -> Path:
        """Write the model in sentence-transformers' folder layout (safetensors weights)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        write_pooling(out, self.settings.pooling, self.dim)
        (out / "2_Normalize").mkdir(exist_ok=True)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (out / "modules.json").write_text(json.dumps(modules, indent=2))
        st_config = {"max_seq_length": self.settings.document_max_length, "do_lower_case": False}
        (out / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2))
        (out / "config_sentence_transformers.json").write_text(
            json.dumps({"similarity_fn_name": "cosine", "prompts": self.settings_prompts(), "default_prompt_name": None},
                       indent=2)
        )
        lockstep = {
            "name": self.name,
            "pooling": self.settings.pooling.value,
            "query_max_length": self.settings.query_max_length,
            "document_max_length": self.settings.document_max_length,
        }
        (out / LOCKSTEP_CONFIG).write_text(json.dumps(lockstep, indent=2))
        return out
