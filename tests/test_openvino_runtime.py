"""The openvino runtime: fp32 and bf16 encoding through a compiled graph, recorded in the release and used for queries."""

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indexer.corpus_store import CorpusStore, Document
from indexer.embedding_shards import assemble_release, encode_shard, plan_shards
from indexer.job_store import SUCCEEDED, JobStore
from indexer.job_submission import submit_job
from indexer.live_release import LiveRelease
from indexer.manifest import MANIFEST_FILE, Manifest
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore, new_release_id
from indexer.settings import Settings
from indexer.vector_index import VectorIndex
from service.cli import app as cli
from service.job_queue import JobQueue
from training.bi_encoder import BiEncoder, TorchForward
from training.cross_encoder import CrossEncoder
from training.errors import IntegrityError, InvalidInput
from training.precision import cpu_supports_bf16
from tests.conftest import SAMPLE_DOCS
from tests.test_cross_encoder import PAIRS
from tests.processes import REDIS_URL, start_worker, stop

pytest.importorskip("openvino", reason="the openvino runtime needs `pip install 'lockstep[openvino]'`")

ROOT = Path(__file__).resolve().parents[1]

TEXTS = [
    "apple banana",
    "protein study of cancer cells and genes",
    "the quick brown fox jumps over the lazy dog " * 20,
    "a",
]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _refuse(*args, **kwargs):
    raise AssertionError("the torch transformer ran on the openvino path")


def _refuse_torch(monkeypatch) -> None:
    """Make the torch path unusable, so anything encoded afterwards went through OpenVINO's graph."""
    monkeypatch.setattr(TorchForward, "__call__", _refuse)


def test_openvino_fp32_matches_torch_in_every_batch_shape(tiny_model_dir, monkeypatch):
    """Guards against a graph that bakes in the traced batch or length, or drops the padding mask."""
    encoder = BiEncoder.load(tiny_model_dir)
    reference = {kind: encoder.encode(TEXTS, kind) for kind in ("query", "document")}
    encoder.use_openvino()
    assert encoder.runtime == "openvino" and encoder.precision == "fp32"
    _refuse_torch(monkeypatch)
    for kind, expected in reference.items():
        for batch_size in (1, 3, 32):
            vectors = encoder.encode(TEXTS, kind, batch_size=batch_size)
            assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
            assert np.abs(vectors - expected).max() < 1e-4


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no bf16 instructions for OpenVINO to use")
def test_openvino_bf16_agrees_with_fp32(tiny_model_dir):
    encoder = BiEncoder.load(tiny_model_dir)
    fp32 = encoder.encode(TEXTS)
    encoder.precision = "bf16"
    encoder.use_openvino()
    vectors = encoder.encode(TEXTS)
    assert _cosines(vectors, fp32).min() >= 0.999 and np.abs(vectors - fp32).max() > 0


def test_an_openvino_encoder_refuses_another_precision(tiny_encoder):
    tiny_encoder.use_openvino()
    tiny_encoder.precision = "bf16"
    with pytest.raises(InvalidInput, match="openvino model compiled for fp32 and cannot encode in bf16; load it again"):
        tiny_encoder.encode(["apple"])
    with pytest.raises(InvalidInput, match="fp32 or bf16, not int8"):
        tiny_encoder.precision = "int8"
        tiny_encoder.use_openvino()


def test_an_openvino_release_records_its_runtime_and_serves_queries_through_it(corpus, releases, tiny_model_dir, monkeypatch):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, precision="fp32", runtime="openvino")
    manifest = build_release(corpus, releases, options, activate=True)
    folder = releases.path(manifest.release_id)
    assert (manifest.runtime, manifest.precision) == ("openvino", "fp32") and Manifest.read(folder) == manifest
    assert set(manifest.files) == {"index.faiss", "ids.json"}

    torch_vectors = BiEncoder.load(tiny_model_dir).encode([doc.embedding_text() for doc in SAMPLE_DOCS])
    live = LiveRelease.load(releases, manifest.release_id)
    assert live.encoder.runtime == "openvino"
    _refuse_torch(monkeypatch)
    assert live.search(corpus, "apple banana cherry", k=1).hits[0].document.id == "d3"
    built = np.stack([live.index.reconstruct(doc.id) for doc in SAMPLE_DOCS])
    assert np.abs(built - torch_vectors).max() < 1e-4

    new = Document(id="d6", title="Pie", text="green apple cherry pie")
    corpus.upsert([new])
    assert live.catch_up(corpus) == 1
    assert np.array_equal(live.index.reconstruct("d6"), live.encoder.encode([new.embedding_text()])[0])


def test_a_release_is_not_served_by_an_encoder_on_another_runtime(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, precision="fp32", runtime="openvino")
    manifest = build_release(corpus, releases, options)
    index = VectorIndex.load(releases.path(manifest.release_id))
    with pytest.raises(IntegrityError, match="built in fp32 on openvino but was given an encoder in fp32 on torch"):
        LiveRelease(manifest, BiEncoder.load(tiny_model_dir), index)


def test_an_openvino_reranker_scores_like_torch_in_every_batch_shape(tiny_model_dir, monkeypatch):
    """Guards against a graph that drops the token types of the pair, which BERT's cross-attention reads."""
    reranker = CrossEncoder.load(tiny_model_dir, max_length=48, seed=2)
    reference = reranker.score(PAIRS)
    reranker.use_openvino("fp32")
    assert reranker.runtime == "openvino"
    monkeypatch.setattr(CrossEncoder, "logits", _refuse)
    for batch_size in (1, 3, 32):
        assert np.abs(reranker.score(PAIRS, batch_size=batch_size) - reference).max() < 1e-4


def test_an_openvino_release_reranks_through_openvino(corpus, releases, tiny_model_dir, monkeypatch):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, reranker_path=tiny_model_dir, precision="fp32", runtime="openvino")
    manifest = build_release(corpus, releases, options)
    torch_live = LiveRelease.load(releases, build_release(corpus, releases, replace(options, runtime="torch")).release_id)
    expected = torch_live.search(corpus, "apple banana cherry", k=3, rerank=True)
    live = LiveRelease.load(releases, manifest.release_id)
    assert live.reranker.runtime == "openvino"
    monkeypatch.setattr(CrossEncoder, "logits", _refuse)
    _refuse_torch(monkeypatch)
    found = live.search(corpus, "apple banana cherry", k=3, rerank=True)
    assert [hit.document.id for hit in found.hits] == [hit.document.id for hit in expected.hits]
    assert np.allclose([hit.score for hit in found.hits], [hit.score for hit in expected.hits], atol=1e-4)


def test_shards_of_an_openvino_plan_encode_through_openvino(corpus, releases, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, precision="fp32", runtime="openvino")
    plan = plan_shards(corpus, releases, options, new_release_id(), tmp_path / "plan", shard_size=2)
    assert plan.spec.runtime == "openvino" and plan.count == 3
    _refuse_torch(monkeypatch)
    for shard in range(plan.count):
        assert not encode_shard(data_dir, tmp_path / "plan", shard, batch_size=4).reused
    manifest = assemble_release(releases, tmp_path / "plan")
    assert manifest.runtime == "openvino" and LiveRelease.load(releases, manifest.release_id).encoder.runtime == "openvino"


def test_manifests_without_a_runtime_read_as_torch_or_onnxruntime(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    assert manifest.runtime == "torch"
    path = releases.path(manifest.release_id) / MANIFEST_FILE
    older = json.loads(path.read_text())
    del older["runtime"]
    assert Manifest.from_dict(older) == manifest
    assert Manifest.from_dict({**older, "precision": "int8"}).runtime == "onnxruntime"


def test_cli_build_takes_the_runtime_and_says_it(tmp_path, tiny_model_dir):
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in SAMPLE_DOCS))
    data = ["--data-dir", str(tmp_path / "data")]
    assert CliRunner().invoke(cli, [*data, "ingest", str(corpus_file)]).exit_code == 0
    build = [*data, "build", "--model", str(tiny_model_dir), "--precision", "fp32", "--runtime"]
    result = CliRunner().invoke(cli, [*build, "openvino"])
    assert result.exit_code == 0 and re.search(r", fp32 on openvino, model tiny-bert-0", result.output), result.output
    result = CliRunner().invoke(cli, [*build, "tensorrt"])
    assert result.exit_code == 1 and "runtime (LOCKSTEP_RUNTIME): Input should be 'torch' or 'openvino', got 'tensorrt'" \
        in result.output, "a bad runtime is refused as its setting, before the model is stored"


def test_a_process_without_openvino_refuses_an_openvino_release_and_says_how_to_install_it(
    corpus, releases, tiny_model_dir, monkeypatch
):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, precision="fp32", runtime="openvino")
    manifest = build_release(corpus, releases, options, activate=True)
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(InvalidInput, match=r"needs the openvino package, which is not installed; install it with "
                                           r"`pip install 'lockstep\[openvino\]'`"):
        LiveRelease.load(releases, manifest.release_id)


@pytest.mark.integration
def test_a_real_worker_reembeds_through_openvino_and_the_release_goes_live(tmp_path, tiny_model_dir):
    """A Celery worker on Redis, told `LOCKSTEP_RUNTIME=openvino`, runs a sharded re-embed whose release records it."""
    data_dir = tmp_path / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    releases = ReleaseStore(data_dir)
    live_id = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True).release_id
    env = {"broker_url": REDIS_URL, "queue": f"lockstep-openvino-{secrets.token_hex(4)}", "precision": "fp32",
           "runtime": "openvino", "model": tiny_model_dir, "shard_size": "2"}
    settings = Settings(data_dir=data_dir, **env)
    worker = start_worker(data_dir, tmp_path / "worker.log", **env, log_level="info")
    store, queue = JobStore(settings.jobs_path), JobQueue(settings)
    try:
        job = submit_job(store, queue.enqueue, data_dir, "reembed", {})
        deadline = time.monotonic() + 180
        while not store.get(job.id).terminal and time.monotonic() < deadline:
            time.sleep(0.1)
        done = store.get(job.id)
        assert done.status == SUCCEEDED, (done, (tmp_path / "worker.log").read_text()[-3000:])
        assert releases.active() == done.outputs["release_id"] != live_id
        assert releases.manifest(releases.active()).runtime == "openvino"
        assert LiveRelease.load(releases, releases.active()).search(corpus, "apple banana cherry", k=1).hits[0].document.id == "d3"
    finally:
        stop(worker, signal.SIGKILL)
        queue.close()
        store.close()
        corpus.close()


def test_converting_and_quantising_send_no_telemetry_and_write_nothing_home(tiny_model_dir, tmp_path):
    """OpenVINO (from its import on) and NNCF otherwise keep a client id and usage counts under ~/intel and send
    usage events to Intel; run in a fresh process outside CI, where both would."""
    pytest.importorskip("nncf", reason="quantising needs `pip install 'lockstep[openvino]'`")
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    script = (
        "from training.bi_encoder import BiEncoder\n"
        f"encoder = BiEncoder.load({str(tiny_model_dir)!r})\n"
        f"encoder.quantise_openvino_int8({str(out / 'encoder.int8.xml')!r}, ['apple banana', 'the quick brown fox'])\n"
        "encoder.use_openvino()\n"
        "assert encoder.encode(['apple']).shape == (1, encoder.dim)\n"
    )
    env = {name: value for name, value in os.environ.items() if name not in ("CI", "TF_BUILD", "JENKINS_URL")}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "HOME": str(home)}, check=True, timeout=300)
    assert list(home.iterdir()) == []
