"""The packaged all-MiniLM-L6-v2 against sentence-transformers, and SciFact end to end."""

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sentence_transformers import SentenceTransformer
from typer.testing import CliRunner

from indexer.corpus_store import Document
from indexer.settings import Settings
from service.app import create_app
from service.cli import app as cli
from training.bi_encoder import BiEncoder
from training.default_model import default_model_path
from training.fingerprint import short_fingerprint
from training.precision import cpu_supports_bf16
from tests.conftest import require_shared

pytestmark = pytest.mark.integration

TEXTS = [
    "What is the role of p53 in tumour suppression?",
    "Vitamin D deficiency is associated with an increased risk of respiratory infections in adults.",
    "short",
    "The quick brown fox jumps over the lazy dog. " * 60,
]


@pytest.fixture(scope="module")
def minilm() -> BiEncoder:
    return BiEncoder.load(default_model_path())


@pytest.fixture(scope="module")
def oracle() -> SentenceTransformer:
    return SentenceTransformer(str(default_model_path()), device="cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_embeddings_match_sentence_transformers(minilm, oracle):
    """Guards against pooling, truncation or padding differences from the reference implementation."""
    ours = minilm.encode(TEXTS, "document")
    theirs = oracle.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert _cosines(ours, theirs).min() >= 0.9999


def test_scifact_documents_match_sentence_transformers(minilm, oracle):
    lines = require_shared("scifact", "corpus.jsonl").read_text().splitlines()[:200]
    texts = [Document(id=r["_id"], title=r["title"], text=r["text"]).embedding_text() for r in map(json.loads, lines)]
    ours = minilm.encode(texts, "document", batch_size=32)
    theirs = oracle.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=32)
    assert _cosines(ours, theirs).min() >= 0.9999


def test_bf16_agrees_with_fp32_on_scifact(minilm):
    """Guards against the default bf16 path drifting from fp32 beyond the 0.999 cosine budget. A CPU without bf16
    instructions emulates it about six times slower than fp32, so there it checks the first 48 documents."""
    lines = require_shared("scifact", "corpus.jsonl").read_text().splitlines()[: 200 if cpu_supports_bf16() else 48]
    texts = [Document(id=r["_id"], title=r["title"], text=r["text"]).embedding_text() for r in map(json.loads, lines)]
    reference = minilm.encode(texts, "document", batch_size=32)
    minilm.precision = "bf16"
    try:
        lowered = minilm.encode(texts, "document", batch_size=32)
    finally:
        minilm.precision = "fp32"
    assert _cosines(reference, lowered).min() >= 0.999


def test_a_model_we_save_loads_in_sentence_transformers_identically(minilm, tmp_path):
    minilm.save(tmp_path / "saved")
    reloaded = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    theirs = reloaded.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert np.allclose(minilm.encode(TEXTS), theirs, atol=1e-5)
    assert BiEncoder.load(tmp_path / "saved").fingerprint == minilm.fingerprint


def test_scifact_ingest_build_eval_and_search(tmp_path):
    """Reproduces the base model's SciFact quality through the CLI, then answers over HTTP."""
    scifact = require_shared("scifact")
    data = tmp_path / "data"
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, ["--data-dir", str(data), *args])
        assert result.exit_code == 0, result.output
        return result.output

    assert "5183 inserted" in run("ingest", str(scifact / "corpus.jsonl"))
    assert "5183 documents" in run("build", "--activate")
    output = run("eval", "--queries", str(scifact / "queries.jsonl"), "--qrels", str(scifact / "qrels" / "train.tsv"), "--json")
    metrics = json.loads(output.strip().splitlines()[-1])
    assert 0.62 <= metrics["ndcg@10"] <= 0.72, metrics
    assert metrics["recall@100"] >= 0.88, metrics

    with TestClient(create_app(Settings(data_dir=data))) as client:
        body = client.post("/v1/search", json={"query": "0-dimensional biomaterials show inductive properties.", "k": 10}).json()
        assert len(body["results"]) == 10 and body["results"][0]["score"] > 0.3


def test_a_folder_saved_by_sentence_transformers_loads_with_the_same_settings(minilm, oracle, tmp_path):
    """Guards against misreading sentence-transformers 6's layout (pooling mode, max length in the tokenizer config)."""
    oracle.save(str(tmp_path / "st-saved"))
    loaded = BiEncoder.load(tmp_path / "st-saved")
    assert loaded.settings == minilm.settings
    assert loaded.fingerprint == minilm.fingerprint


def test_the_packaged_model_keeps_the_version_1_fingerprint_its_releases_recorded(minilm):
    """Guards against a fingerprint change that strands every MiniLM release built before version 2: this is the
    version-1 fingerprint `lockstep build` printed for the packaged model before version 2 existed."""
    assert short_fingerprint(minilm.fingerprints.by_version[1]) == "sha256:593b5341e22c"
    assert minilm.matches(minilm.fingerprints.by_version[1]) and minilm.fingerprint.startswith("sha256-v2:")
