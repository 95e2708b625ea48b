"""int8 releases: a quantised ONNX encoder built, gated against fp32, stored with the release and served."""

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from indexer.corpus_store import Document
from indexer.live_release import LiveRelease
from indexer.manifest import INT8_MODEL_FILE, MANIFEST_FILE, Manifest
from indexer.release_builder import BuildOptions, build_release
from indexer.settings import Settings
from service.cli import app as cli
from training.bi_encoder import BiEncoder
from training.errors import IntegrityError, InvalidInput
from training.int8 import OnnxForward
from training.precision import resolve, resolve_training
from tests.conftest import SAMPLE_DOCS, build_tiny_model, require_shared

TEXTS = [
    "apple banana",
    "protein study of cancer cells and genes",
    "the quick brown fox jumps over the lazy dog " * 20,
    "a",
]
GATE = 0.98


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _refuse_torch(module: torch.nn.Module, monkeypatch) -> None:
    """Make the torch transformer unusable, so anything encoded afterwards went through ONNX."""

    def refuse(*args, **kwargs):
        raise AssertionError("the torch transformer ran on an int8 path")

    monkeypatch.setattr(module, "forward", refuse)


def _fragile_model(folder):
    """A tiny model int8 cannot represent: each row of the input projections has one huge weight, on a
    feature every LayerNorm zeroes, so fp32 ignores it but its per-channel scale rounds the rest to zero;
    the other weights are scaled up so the transformer, not the residual path, shapes the vectors."""
    encoder = BiEncoder.load(build_tiny_model(folder))
    with torch.no_grad():
        for name, module in encoder.model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight[0] = module.bias[0] = 0
            if isinstance(module, torch.nn.Linear) and name.startswith("encoder"):
                module.weight *= 10
                if name.endswith(("query", "key", "value", "intermediate.dense")):
                    module.weight[:, 0] = 1e4
    encoder.save(folder)
    return folder


def test_int8_encoding_agrees_with_fp32_in_every_batch_shape(tiny_model_dir, tmp_path):
    """Guards against an export that bakes in the traced batch or length, or drops the padding mask."""
    encoder = BiEncoder.load(tiny_model_dir)
    reference = {kind: encoder.encode(TEXTS, kind) for kind in ("query", "document")}
    encoder.use_int8(encoder.export_int8(tmp_path / INT8_MODEL_FILE))
    assert encoder.precision == "int8" and isinstance(encoder.forward, OnnxForward)
    for kind, expected in reference.items():
        for batch_size in (1, 3, 32):
            vectors = encoder.encode(TEXTS, kind, batch_size=batch_size)
            assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
            assert _cosines(vectors, expected).min() >= GATE



def test_the_onnx_session_uses_torchs_thread_count(tiny_model_dir, tmp_path):
    """Guards against ONNX Runtime starting a thread per visible core where `OMP_NUM_THREADS` (set from a
    container's CPU limit) asks for fewer, as OpenVINO and torch already honour."""
    path = BiEncoder.load(tiny_model_dir).export_int8(tmp_path / INT8_MODEL_FILE)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            session = OnnxForward(path).session
            assert session.get_session_options().intra_op_num_threads == threads
    finally:
        torch.set_num_threads(before)


def test_int8_release_serves_search_and_catch_up_through_onnx(corpus, releases, tiny_model_dir, monkeypatch):
    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="int8"), activate=True)
    folder = releases.path(manifest.release_id)
    assert manifest.precision == "int8" and Manifest.read(folder) == manifest
    assert set(manifest.files) == {"index.faiss", "ids.json", INT8_MODEL_FILE}
    agreement = manifest.int8_agreement
    assert agreement.sample == len(SAMPLE_DOCS) and GATE <= agreement.min_cosine <= agreement.mean_cosine <= 1.0 + 1e-6
    assert [entry.name for entry in folder.iterdir() if entry.name.startswith(".")] == []

    live = LiveRelease.load(releases, manifest.release_id)
    assert isinstance(live.encoder.forward, OnnxForward) and live.encoder.forward.path == folder / INT8_MODEL_FILE
    _refuse_torch(live.encoder.model, monkeypatch)
    assert live.search(corpus, "apple banana cherry", k=1).hits[0].document.id == "d3"

    fp32 = BiEncoder.load(tiny_model_dir)
    built = np.stack([live.index.reconstruct(doc.id) for doc in SAMPLE_DOCS])
    assert _cosines(built, fp32.encode([doc.embedding_text() for doc in SAMPLE_DOCS])).min() >= GATE

    new = Document(id="d6", title="Pie", text="green apple cherry pie")
    corpus.upsert([new])
    assert live.catch_up(corpus) == 1
    added = live.index.reconstruct("d6")
    assert np.allclose(added, live.encoder.encode([new.embedding_text()])[0], atol=1e-6)
    assert _cosines(added[None], fp32.encode([new.embedding_text()]))[0] >= GATE


def test_an_int8_build_reports_every_document_encoded_though_the_gate_encoded_them(corpus, releases, tiny_model_dir):
    """Guards against the encode progress stopping short when the corpus encode reuses the gate's vectors: here the
    gate's sample is the whole corpus, so the corpus encode has nothing left to encode."""
    corpus.upsert(SAMPLE_DOCS)
    seen = []
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="int8"),
                  progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert [(done, total) for stage, done, total in seen if stage == "encode"] == [(len(SAMPLE_DOCS),) * 2]


def test_a_failed_gate_names_the_figure_and_leaves_nothing(corpus, releases, tmp_path):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=_fragile_model(tmp_path / "fragile"), precision="int8")
    with pytest.raises(InvalidInput, match=r"mean cosine 0\.\d{4} \(min 0\.\d{4}\) with fp32 on 5 .*bf16 or fp32 instead"):
        build_release(corpus, releases, options, activate=True)
    assert releases.list() == [] and releases.active() is None
    assert list(releases.releases_dir.glob(".staging-*")) == []


@pytest.mark.parametrize("damage, threshold, refusal", [
    (lambda row: row * float("nan"), 0.98, r"gave 1 of 5 sampled documents vectors that are not finite"),
    (lambda row: -row, 0.5, r"damages some .* min cosine -\d\.\d{4} .* below the 0\.5 any one document must keep"),
])
def test_the_gate_refuses_a_wrecked_document_behind_a_passing_mean(corpus, releases, tiny_model_dir, monkeypatch,
                                                                  damage, threshold, refusal):
    """Guards against NaN vectors passing the gate (NaN compares false with the bound) and against a few wrecked
    documents hiding behind a mean that passes."""
    corpus.upsert(SAMPLE_DOCS)
    run = OnnxForward.__call__

    def wreck_first_row(self, input_ids, attention_mask):
        hidden = run(self, input_ids, attention_mask)
        hidden[0] = damage(hidden[0])
        return hidden

    monkeypatch.setattr(OnnxForward, "__call__", wreck_first_row)
    options = BuildOptions(model_path=tiny_model_dir, precision="int8", int8_min_cosine=threshold)
    with pytest.raises(InvalidInput, match=refusal):
        build_release(corpus, releases, options, activate=True)
    assert releases.list() == [] and list(releases.releases_dir.glob(".staging-*")) == []


def test_a_modified_onnx_model_is_refused(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="int8"))
    onnx_file = releases.path(manifest.release_id) / INT8_MODEL_FILE
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match=f"{INT8_MODEL_FILE} does not match its manifest checksum"):
        LiveRelease.load(releases, manifest.release_id)


def test_a_manifest_written_before_int8_still_loads(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    path = releases.path(manifest.release_id) / MANIFEST_FILE
    older = json.loads(path.read_text())
    del older["int8_agreement"]
    path.write_text(json.dumps(older))
    assert Manifest.read(path.parent) == manifest and manifest.int8_agreement is None
    live = LiveRelease.load(releases, manifest.release_id)
    assert live.encoder.precision == "fp32" and live.search(corpus, "apple banana cherry", k=1).hits[0].document.id == "d3"


def test_int8_is_chosen_explicitly_and_never_for_training(tmp_path, tiny_model_dir, tiny_encoder):
    cpu = torch.device("cpu")
    assert resolve("int8", cpu) == "int8" and resolve("auto", cpu) in ("fp32", "bf16")
    assert Settings(precision="int8").precision == "int8"
    with pytest.raises(InvalidInput, match="training runs in fp32 or bf16"):
        resolve_training("int8", cpu)
    tiny_encoder.precision = "int8"
    with pytest.raises(InvalidInput, match="use_int8"):
        tiny_encoder.encode(["apple"])

    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in SAMPLE_DOCS))
    data = ["--data-dir", str(tmp_path / "data")]
    assert CliRunner().invoke(cli, [*data, "ingest", str(corpus_file)]).exit_code == 0
    result = CliRunner().invoke(cli, [*data, "build", "--model", str(tiny_model_dir), "--precision", "int8"])
    assert result.exit_code == 0 and re.search(r", int8 on onnxruntime with dynamic activations \(mean cosine [01]\.\d{4} with fp32\), model tiny-bert-0", result.output), result.output


@pytest.mark.integration
def test_minilm_int8_release_agrees_with_fp32_on_scifact(corpus, releases):
    """The packaged MiniLM passes the int8 gate on real documents, and its index holds what the gate measured."""
    from training.default_model import default_model_path

    lines = require_shared("scifact", "corpus.jsonl").read_text().splitlines()[:200]
    documents = [Document(id=r["_id"], title=r["title"], text=r["text"]) for r in map(json.loads, lines)]
    corpus.upsert(documents)
    manifest = build_release(corpus, releases, BuildOptions(model_path=default_model_path(), precision="int8"))
    assert manifest.int8_agreement.sample == len(documents) and manifest.int8_agreement.mean_cosine >= GATE
    live = LiveRelease.load(releases, manifest.release_id)
    built = np.stack([live.index.reconstruct(doc.id) for doc in documents])
    reference = BiEncoder.load(default_model_path()).encode([doc.embedding_text() for doc in documents], batch_size=32)
    assert _cosines(built, reference).mean() >= GATE
