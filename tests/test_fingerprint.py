"""Versioned fingerprints: version 2 tells apart models version 1 took for one, version 1 still hashes as it shipped,
and releases recorded with either version verify."""

import dataclasses
import hashlib
import json

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from indexer.live_release import LiveRelease
from indexer.manifest import MANIFEST_FILE
from indexer.release_builder import BuildOptions, build_release
from tests.conftest import SAMPLE_DOCS
from training.bi_encoder import BiEncoder
from training.errors import IntegrityError
from training.fingerprint import (
    FINGERPRINT_VERSION,
    PREFIXES,
    compute_fingerprints,
    fingerprint_hex,
    fingerprint_version,
    short_fingerprint,
)

V1_ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                        "hidden_act", "layer_norm_eps", "position_embedding_type", "max_position_embeddings",
                        "type_vocab_size", "vocab_size")


def _version_1_as_shipped(model, tokenizer, settings) -> str:
    """The version-1 algorithm as releases before version 2 recorded it: the oracle their manifests were written by."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    config = model.config.to_dict()
    digest.update(json.dumps({k: config.get(k) for k in V1_ARCHITECTURE_KEYS}, sort_keys=True).encode())
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    parts = {"vocab": sorted(tokenizer.get_vocab().items()), "model_type": spec["model"]["type"],
             "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
             **{key: spec.get(key) for key in ("normalizer", "pre_tokenizer", "post_processor")}}
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(json.dumps(dict(settings), sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()


def _bpe_tokenizer(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4, "ab": 5, "bc": 6, "abc": 7}
    backend = Tokenizer(BPE(vocab, merges, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def test_version_1_still_hashes_as_it_shipped(tiny_encoder):
    """Guards against a change to version 1 that would make every release built before version 2 refuse to serve."""
    settings = {"kind": "cross-encoder", "max_length": 64}
    hashed = compute_fingerprints(tiny_encoder.model, tiny_encoder.tokenizer, settings)
    assert hashed[1] == _version_1_as_shipped(tiny_encoder.model, tiny_encoder.tokenizer, settings)
    assert set(hashed) == set(PREFIXES) and hashed[FINGERPRINT_VERSION].startswith("sha256-v2:")
    assert tiny_encoder.fingerprint == tiny_encoder.fingerprints.by_version[2]


def test_version_2_tells_apart_merge_orders_and_padding_ids_version_1_took_for_one(tiny_encoder):
    """Guards against two models with one vocabulary but another BPE merge order (so other token ids for the same
    text) or another padding id (RoBERTa counts positions from it) sharing a name, and so a store folder."""
    model = tiny_encoder.model
    first = _bpe_tokenizer([("a", "b"), ("b", "c"), ("ab", "c")])
    swapped = _bpe_tokenizer([("b", "c"), ("a", "b"), ("ab", "c")])
    assert first("abc")["input_ids"] == [7] and swapped("abc")["input_ids"] == [2, 6], "the merge order changes the tokens"
    one, other = compute_fingerprints(model, first, {}), compute_fingerprints(model, swapped, {})
    assert one[1] == other[1] and one[2] != other[2]
    original = model.config.pad_token_id
    try:
        model.config.pad_token_id = 1
        repadded = compute_fingerprints(model, first, {})
    finally:
        model.config.pad_token_id = original
    assert repadded[1] == one[1] and repadded[2] != one[2]


def test_a_fingerprint_names_its_version_and_an_unknown_one_is_refused():
    assert fingerprint_version("sha256:ab12") == 1 and fingerprint_version("sha256-v2:ab12") == 2
    assert fingerprint_hex("sha256-v2:ab12") == "ab12" == fingerprint_hex("sha256:ab12")
    assert short_fingerprint("sha256-v2:" + "0123456789abcdef" * 4) == "sha256-v2:0123456789ab"
    with pytest.raises(IntegrityError, match="none of the known prefixes"):
        fingerprint_version("md5:ab12")


def test_a_release_recorded_with_a_version_1_fingerprint_still_serves_and_a_wrong_one_is_refused(
    corpus, releases, tiny_model_dir
):
    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    assert manifest.model.fingerprint == BiEncoder.load(tiny_model_dir).fingerprint
    stored = BiEncoder.load(releases.data_dir / manifest.model.path)
    manifest_file = releases.path(manifest.release_id) / MANIFEST_FILE

    def record(fingerprint: str) -> None:
        model = dataclasses.replace(manifest.model, fingerprint=fingerprint)
        manifest_file.write_text(dataclasses.replace(manifest, model=model).to_json())

    record(stored.fingerprints.by_version[1])
    live = LiveRelease.load(releases, manifest.release_id)
    assert live.manifest.model.fingerprint.startswith("sha256:") and len(live.search_vectors(live.encode_queries(["fox"]), 1)[0]) == 1
    record("sha256:" + "0" * 64)
    with pytest.raises(IntegrityError, match="refusing to serve"):
        LiveRelease.load(releases, manifest.release_id)
