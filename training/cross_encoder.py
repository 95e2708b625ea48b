"""The cross-encoder (reranker): one transformer reads a query and a document together.

A bi-encoder embeds query and document apart, so document vectors can be precomputed;
a cross-encoder reads the pair `[CLS] query [SEP] document [SEP]` with full cross-attention
and returns one relevance logit. It is more accurate on close candidates and cannot
precompute anything, so it only reranks a short list the bi-encoder retrieved.

Loading follows the bi-encoder's rules (safetensors only, never remote code) and accepts
any BERT-like folder: a trained reranker, or a bi-encoder such as all-MiniLM-L6-v2, whose
encoder weights are kept and whose classification head is initialised from `seed`. A
folder whose encoder weights do not match the architecture is refused rather than
silently re-initialised. Scoring sorts pairs by token length and pads per batch, like
the bi-encoder. `save` writes a plain Hugging Face folder that
`sentence_transformers.CrossEncoder(path)` loads and scores identically: it declares the
identity activation, so both return raw logits, not sigmoid probabilities. A release on
the openvino runtime scores through a graph compiled from the same weights (`use_openvino`).
Left out here: training (`training.cross_encoder_training`), teacher score caching
(`training.teacher_cache`) and precision tricks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from training.bi_encoder import PROGRESS_BAR_MIN_TEXTS, _all_fp32, _require_safetensors
from training.errors import InvalidInput
from training.fingerprint import Fingerprints, compute_fingerprints
from training.openvino_runtime import CompiledGraph
from training.precision import ConcretePrecision
from training.token_prefix import CHARS_PER_TOKEN, token_prefixes

Pair = tuple[str, str]

DEFAULT_MAX_LENGTH = 512
MIN_MAX_LENGTH = 8
# What sentence-transformers' CrossEncoder applies to the logits; identity keeps them raw.
SCORE_ACTIVATION = "torch.nn.modules.linear.Identity"


@dataclass(frozen=True)
class PairBatch:
    """Tokenised, right-padded (query, document) pairs on the model's device."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None


def as_pairs(pairs: Sequence[tuple[str, str]]) -> list[Pair]:
    """Check that `pairs` is a list of (query, document) string pairs and return it as a list."""
    if isinstance(pairs, (str, bytes)) or (
        isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(part, str) for part in pairs)
    ):
        raise InvalidInput("pass a list of (query, document) pairs, not a single pair or string")
    checked = []
    for position, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise InvalidInput(f"pair {position} must be a (query, document) tuple of two strings, got {pair!r:.80}")
        checked.append((pair[0], pair[1]))
    return checked


def _is_classifier(config: PretrainedConfig) -> bool:
    """True when the folder was saved as a sequence classifier, so its weights should hold the head too."""
    return any(arch.endswith("ForSequenceClassification") for arch in config.architectures or ())


def _classifier_config(model_dir: Path) -> PretrainedConfig:
    """The folder's config with one output label; refuses classifiers trained for more labels."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    is_classifier = _is_classifier(config)
    if is_classifier and config.num_labels != 1:
        raise InvalidInput(
            f"{model_dir} is a classifier with {config.num_labels} labels; a reranker needs one relevance "
            "logit (num_labels=1). Start from its encoder by loading a folder without the classification head."
        )
    config.num_labels = 1
    return config


def _settings(max_length: int) -> dict[str, object]:
    """What besides weights and tokenizer the cross-encoder's fingerprint covers."""
    return {"kind": "cross-encoder", "max_length": max_length}


def _default_max_length(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int:
    """The tokenizer's declared length (what `save` writes, what sentence-transformers reads), else 512.

    Capped by the model's position embeddings.
    """
    declared = tokenizer.model_max_length  # transformers reports ~1e30 when the folder declares none
    length = declared if declared < 1_000_000 else DEFAULT_MAX_LENGTH
    return min(length, getattr(config, "max_position_embeddings", length))


def _update_json(path: Path, **values: object) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class CrossEncoder:
    """A sequence-classification transformer with one output: the relevance logit of a (query, document) pair."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        if model.config.num_labels != 1:
            raise InvalidInput(f"a cross-encoder needs num_labels=1, the model has {model.config.num_labels}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if max_length < MIN_MAX_LENGTH or (limit is not None and max_length > limit):
            raise InvalidInput(
                f"max length {max_length} must be between {MIN_MAX_LENGTH} and the model's limit {limit}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._max_length = max_length
        self._fingerprints: tuple[tuple[int, ...], Fingerprints] | None = None
        self._graph: CompiledGraph | None = None

    @classmethod
    def load(
        cls, path: str | Path, *, max_length: int | None = None, seed: int = 0, device: str = "cpu"
    ) -> CrossEncoder:
        """Load a reranker or any BERT-like encoder folder; an encoder's missing head is initialised from `seed`.

        A folder saved as a classifier must hold its head: initialising a missing or renamed
        one would rank by noise. Weights load in fp32 whatever the checkpoint stores, as
        precision is chosen per release.
        """
        model_dir = Path(path)
        _require_safetensors(model_dir)
        config = _classifier_config(model_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_dir, config=config, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
            )
        prefix = f"{model.base_model_prefix}."
        missing = sorted(k for k in info["missing_keys"]
                         if ".pooler." not in k and (k.startswith(prefix) or _is_classifier(config)))
        if missing or info["mismatched_keys"]:
            raise InvalidInput(
                f"{model_dir}/model.safetensors does not hold this architecture's encoder weights "
                f"(missing {missing[:3]}, mismatched {sorted(info['mismatched_keys'])[:3]}); "
                "pass a folder saved from the same architecture as its config.json"
            )
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        length = _default_max_length(tokenizer, config) if max_length is None else max_length
        stored = None if _all_fp32(model) else Fingerprints(compute_fingerprints(model, tokenizer, _settings(length)))
        reranker = cls(model.to(device=device, dtype=torch.float32), tokenizer, length)
        if stored is not None:  # the weights as stored, as `BiEncoder.load` hashes a half-precision checkpoint
            reranker._fingerprints = (reranker._versions(), stored)
        return reranker

    @property
    def max_length(self) -> int:
        """Tokens per (query, document) pair, special tokens included; longer pairs are truncated."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def is_head_parameter(self, name: str) -> bool:
        """Whether parameter `name` is part of the relevance head: the classifier, or the pooler feeding it.

        A bi-encoder checkpoint trains neither (it pools token vectors), so training starts them from scratch.
        """
        prefix = f"{self.model.base_model_prefix}."
        return not name.startswith(prefix) or name.startswith(f"{prefix}pooler.")

    @property
    def fingerprints(self) -> Fingerprints:
        """sha256 over weights, tokenizer and max length, in every fingerprint version; recomputed only after the
        weights change in place."""
        versions = self._versions()
        if self._fingerprints is None or self._fingerprints[0] != versions:
            hashed = compute_fingerprints(self.model, self.tokenizer, _settings(self.max_length))
            self._fingerprints = (versions, Fingerprints(hashed))
        return self._fingerprints[1]

    @property
    def fingerprint(self) -> str:
        """The fingerprint a new build records (the current version's)."""
        return self.fingerprints.current

    def matches(self, fingerprint: str) -> bool:
        """Whether this model hashes to `fingerprint`, recorded by any fingerprint version."""
        return self.fingerprints.matches(fingerprint)

    def _versions(self) -> tuple[int, ...]:
        """Every in-place write to a tensor (optimiser steps, load_state_dict) bumps its version counter."""
        return tuple(tensor._version for tensor in self.model.state_dict().values())

    def _tokenize(self, pairs: list[Pair]) -> BatchEncoding:
        queries, documents = zip(*pairs)
        if max(map(len, documents)) > self.max_length * CHARS_PER_TOKEN:
            query_tokens = [len(ids) for ids in self.tokenizer(list(queries), add_special_tokens=False)["input_ids"]]
            documents = token_prefixes(self.tokenizer, documents, self.max_length, query_tokens)
        return self.tokenizer(
            list(queries), list(documents), truncation="longest_first", max_length=self.max_length, padding=False
        )

    def _pad(self, encoded: BatchEncoding, rows: Sequence[int]) -> PairBatch:
        width = max(len(encoded["input_ids"][row]) for row in rows)
        pad_id = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        has_types = "token_type_ids" in encoded
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long) if has_types else None
        for out, row in enumerate(rows):
            ids = encoded["input_ids"][row]
            input_ids[out, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[out, : len(ids)] = 1
            if token_type_ids is not None:
                token_type_ids[out, : len(ids)] = torch.tensor(encoded["token_type_ids"][row], dtype=torch.long)
        return PairBatch(
            input_ids.to(self.device),
            attention_mask.to(self.device),
            None if token_type_ids is None else token_type_ids.to(self.device),
        )

    def batch(self, pairs: Sequence[tuple[str, str]]) -> PairBatch:
        """Tokenise and pad pairs, in the given order, for one forward pass (training calls this)."""
        checked = as_pairs(pairs)
        if not checked:
            raise InvalidInput("a batch needs at least one (query, document) pair")
        return self._pad(self._tokenize(checked), range(len(checked)))

    def use_openvino(self, precision: ConcretePrecision) -> None:
        """Score through OpenVINO at `precision` (fp32 or bf16) from now on, as a release on that runtime does.

        `logits` stays the differentiable torch path for training; only `score` uses the graph.
        """
        self._graph = CompiledGraph.of_model(self.model, precision, output="logits")

    @property
    def runtime(self) -> str:
        """What runs `score`: torch, or openvino after `use_openvino`."""
        return "torch" if self._graph is None else "openvino"

    def _score_batch(self, batch: PairBatch) -> np.ndarray:
        """One batch's logits as float32, through the compiled graph when there is one."""
        if self._graph is None:
            return self.logits(batch.input_ids, batch.attention_mask, batch.token_type_ids).float().cpu().numpy()
        return self._graph.run(batch.input_ids, batch.attention_mask, batch.token_type_ids).reshape(-1)

    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One relevance logit per row, shape `(batch,)`; differentiable (training calls this)."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return output.logits.squeeze(-1)

    def score(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = 32, show_progress: bool | None = None
    ) -> np.ndarray:
        """Raw float32 logits, one per pair, in input order; higher means more relevant."""
        checked = as_pairs(pairs)
        if batch_size < 1:
            raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
        scores = np.zeros(len(checked), dtype=np.float32)
        if not checked:
            return scores
        encoded = self._tokenize(checked)
        order = np.argsort([-len(ids) for ids in encoded["input_ids"]], kind="stable")
        if show_progress is None:
            show_progress = len(checked) >= PROGRESS_BAR_MIN_TEXTS
        bar = tqdm(total=len(checked), desc="scoring pairs", unit="pair", disable=not show_progress)
        with torch.inference_mode(), bar:
            for start in range(0, len(checked), batch_size):
                rows = order[start : start + batch_size]
                scores[rows] = self._score_batch(self._pad(encoded, rows))
                bar.update(len(rows))
        return scores

    def rerank(self, query: str, docs: Sequence[str], top_n: int | None = None) -> list[tuple[int, float]]:
        """`(index into docs, score)` best first; ties keep the documents' order; at most `top_n` entries."""
        if isinstance(docs, str):
            raise InvalidInput("rerank takes a list of documents, not a single string")
        if top_n is not None and top_n < 1:
            raise InvalidInput(f"top_n must be at least 1 or None for all documents, got {top_n}")
        scores = self.score([(query, doc) for doc in docs])
        order = np.argsort(-scores, kind="stable")[:top_n]
        return [(int(i), float(scores[i])) for i in order]

    def save(self, path: str | Path) -> Path:
        """Write a Hugging Face folder that `sentence_transformers.CrossEncoder(path)` scores identically."""
        out = Path(path)
        if (out / "modules.json").exists():
            raise InvalidInput(
                f"{out} holds a sentence-transformers pipeline (modules.json); "
                "save the cross-encoder to an empty folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        _update_json(out / "config.json", sentence_transformers={"activation_fn": SCORE_ACTIVATION})
        _update_json(out / "tokenizer_config.json", model_max_length=self.max_length)
        return out
