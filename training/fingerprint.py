"""A model fingerprint: one sha256 that changes whenever the model's outputs could change.

It covers the weights (names, dtypes, shapes, bytes), the tokenizer's vocabulary and
normalisation, the architecture settings that affect outputs, and the model's own
output settings: pooling and both max lengths for the bi-encoder, the pair max length
for the cross-encoder. Release manifests record it, and the service refuses a release
whose model no longer hashes to it. Deliberately left out: file timestamps, library
versions and config keys that do not change outputs, so a re-save of the same model
keeps its name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from training.bi_encoder import EncoderSettings

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
_TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "post_processor")


def _update_tensor(digest: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def _tokenizer_description(tokenizer: "PreTrainedTokenizerBase") -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts: dict[str, object] = {"vocab": sorted(tokenizer.get_vocab().items())}
    if backend is not None:
        spec = json.loads(backend.to_str())
        parts.update({key: spec.get(key) for key in _TOKENIZER_PARTS})
        parts["model_type"] = spec.get("model", {}).get("type")
    parts["special"] = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return json.dumps(parts, sort_keys=True, default=str)


def compute_fingerprint(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", settings: Mapping[str, object]
) -> str:
    """`sha256:<hex>` over weights, architecture, tokenizer and `settings` (JSON values that change outputs)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _update_tensor(digest, name, tensor)
    config = model.config.to_dict()
    digest.update(json.dumps({k: config.get(k) for k in _ARCHITECTURE_KEYS}, sort_keys=True).encode())
    digest.update(_tokenizer_description(tokenizer).encode())
    digest.update(json.dumps(dict(settings), sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()


def model_fingerprint(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", settings: "EncoderSettings"
) -> str:
    """The fingerprint string `sha256:<hex>` of a loaded model with its encoder settings."""
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
    return compute_fingerprint(model, tokenizer, described)
