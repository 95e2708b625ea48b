"""A model fingerprint: one sha256 that changes whenever the model's outputs could change.

It covers the weights (names, dtypes, shapes, bytes), the tokenizer, the architecture
settings that affect outputs, and the model's own output settings: pooling and both max
lengths for the bi-encoder, the pair max length for the cross-encoder. Release
manifests record it, and the service refuses a release whose model no longer hashes to
it. Deliberately left out: file timestamps, library versions and config keys that do
not change outputs, so a re-save of the same model keeps its name.

Fingerprints are versioned by their prefix. Version 1 (`sha256:`) covers the tokenizer's
vocabulary, normalisation, pre-tokenisation and post-processing, and eleven architecture
keys. Version 2 (`sha256-v2:`), which new builds record, adds what version 1 missed and
two models can differ in with the same vocabulary: the tokenizer model's own settings
(BPE merges and their order, the unknown token, the subword prefix, byte fallback), the
added tokens and how they match, the padding id (RoBERTa-style models count positions
from it), and architecture keys of other model families (rotary bases, relative
positions, grouped key/value heads, embedding factorisation). Version 1 fingerprints
stay verifiable, so releases built before version 2 keep serving.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from training.errors import IntegrityError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from training.bi_encoder import EncoderSettings

FINGERPRINT_VERSION = 2
PREFIXES = {1: "sha256:", 2: "sha256-v2:"}

_ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "position_embedding_type",
    "max_position_embeddings",
    "type_vocab_size",
    "vocab_size",
)
_ARCHITECTURE_KEYS_V2 = _ARCHITECTURE_KEYS + (
    "pad_token_id",
    "embedding_size",
    "num_hidden_groups",
    "inner_group_num",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rope_parameters",
    "rotary_emb_base",
    "global_rope_theta",
    "local_rope_theta",
    "local_attention",
    "global_attn_every_n_layers",
    "relative_attention",
    "max_relative_positions",
    "position_buckets",
    "pos_att_type",
    "position_biased_input",
    "rms_norm_eps",
    "norm_eps",
)
_TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "post_processor")
_TOKENIZER_MODEL_KEYS = (
    "type", "unk_token", "unk_id", "continuing_subword_prefix", "end_of_word_suffix", "max_input_chars_per_word",
    "byte_fallback", "fuse_unk", "ignore_merges",
)
_ADDED_TOKEN_KEYS = ("id", "content", "single_word", "lstrip", "rstrip", "normalized", "special")


def fingerprint_version(fingerprint: str) -> int:
    """The version a fingerprint was computed with, read from its prefix."""
    for version, prefix in sorted(PREFIXES.items(), key=lambda item: -len(item[1])):
        if fingerprint.startswith(prefix):
            return version
    raise IntegrityError(
        f"fingerprint {fingerprint[:24]!r} has none of the known prefixes {sorted(PREFIXES.values())}; "
        "the manifest was written by a newer Lockstep or was edited"
    )


def fingerprint_hex(fingerprint: str) -> str:
    """The digest of a fingerprint without its version prefix."""
    return fingerprint.removeprefix(PREFIXES[fingerprint_version(fingerprint)])


def short_fingerprint(fingerprint: str) -> str:
    """The version prefix and the first 12 hex digits, for listings."""
    return PREFIXES[fingerprint_version(fingerprint)] + fingerprint_hex(fingerprint)[:12]


def _update_tensor(digest: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def _tokenizer_description(tokenizer: "PreTrainedTokenizerBase", version: int) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts: dict[str, object] = {"vocab": sorted(tokenizer.get_vocab().items())}
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts.update({key: spec.get(key) for key in _TOKENIZER_PARTS})
        model = spec.get("model", {})
        parts["model_type"] = model.get("type")
        if version >= 2:
            parts["model"] = {key: model.get(key) for key in _TOKENIZER_MODEL_KEYS}
            # Older tokenizers write a merge as "a b", newer ones as ["a", "b"]; the order of merges is their priority.
            parts["merges"] = [merge.split(" ", 1) if isinstance(merge, str) else list(merge)
                               for merge in model.get("merges") or []]
            parts["added_tokens"] = [[token.get(key) for key in _ADDED_TOKEN_KEYS]
                                     for token in sorted(spec.get("added_tokens") or [], key=lambda t: t.get("id", 0))]
    parts["special"] = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    if version >= 2:
        parts["pad_token_id"] = tokenizer.pad_token_id
    return json.dumps(parts, sort_keys=True, default=str)


def compute_fingerprints(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", settings: Mapping[str, object]
) -> dict[int, str]:
    """Every version's fingerprint over weights, architecture, tokenizer and `settings` (JSON values that change
    outputs); the weights, the costly part, are hashed once."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _update_tensor(weights, name, tensor)
    config = model.config.to_dict()
    fingerprints = {}
    for version, prefix in PREFIXES.items():
        digest = weights.copy()
        keys = _ARCHITECTURE_KEYS if version == 1 else _ARCHITECTURE_KEYS_V2
        digest.update(json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str).encode())
        digest.update(_tokenizer_description(tokenizer, version).encode())
        digest.update(json.dumps(dict(settings), sort_keys=True).encode())
        fingerprints[version] = prefix + digest.hexdigest()
    return fingerprints


def model_fingerprints(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", settings: "EncoderSettings"
) -> dict[int, str]:
    """`compute_fingerprints` of a loaded bi-encoder model with its encoder settings."""
    described: dict[str, object] = {
        "pooling": settings.pooling.value,
        "query_max_length": settings.query_max_length,
        "document_max_length": settings.document_max_length,
    }
    # Only set prompts and a left truncation are hashed, so a model with neither keeps the fingerprint it had before
    # they were taken into account.
    described.update({name: prompt for name, prompt in (("query_prompt", settings.query_prompt),
                                                         ("document_prompt", settings.document_prompt)) if prompt})
    if tokenizer.truncation_side != "right":
        described["truncation_side"] = tokenizer.truncation_side
    return compute_fingerprints(model, tokenizer, described)


class Fingerprints:
    """A loaded model's fingerprints, one per version: `current` is what a new build records, `matches` verifies one
    recorded by any version."""

    def __init__(self, by_version: Mapping[int, str]) -> None:
        self.by_version = dict(by_version)

    @property
    def current(self) -> str:
        return self.by_version[FINGERPRINT_VERSION]

    def matches(self, fingerprint: str) -> bool:
        return self.by_version.get(fingerprint_version(fingerprint)) == fingerprint
