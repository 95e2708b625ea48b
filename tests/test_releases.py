"""Releases: build, list, activate, roll back, delete, gc; integrity checks; interrupted builds."""

import json
import shutil

import faiss
import numpy as np
import pytest

from indexer.corpus_store import Document
from indexer.live_release import LiveRelease
from indexer.manifest import Manifest
from indexer.model_store import ModelStore
from indexer.release_builder import BuildOptions, build_release
from training.bi_encoder import BiEncoder
from training.errors import Conflict, IntegrityError, InvalidInput, NotFound
from tests.conftest import SAMPLE_DOCS
from tests.training_data import synthetic_task


def _build(corpus, releases, model_dir, **kwargs):
    return build_release(corpus, releases, BuildOptions(model_path=model_dir), **kwargs)


def test_build_writes_a_complete_manifest(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    manifest = _build(corpus, releases, tiny_model_dir, activate=True)
    assert releases.active() == manifest.release_id
    on_disk = Manifest.read(releases.path(manifest.release_id))
    assert on_disk == manifest
    assert manifest.doc_count == 5 and manifest.corpus_seq == 5 and manifest.dim == 32
    assert manifest.metric == "inner_product" and manifest.index_type == "Flat"
    assert manifest.model.fingerprint == BiEncoder.load(tiny_model_dir).fingerprint
    assert (releases.data_dir / manifest.model.path / "model.safetensors").exists()
    assert set(manifest.files) == {"index.faiss", "ids.json"}
    assert 0 < manifest.document_norms.min <= manifest.document_norms.p50 <= manifest.document_norms.max


def test_served_release_finds_each_document_by_its_own_text(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    manifest = _build(corpus, releases, tiny_model_dir, activate=True)
    live = LiveRelease.load(releases, manifest.release_id)
    for doc in SAMPLE_DOCS:
        outcome = live.search(corpus, doc.embedding_text(), 3)
        assert outcome.hits[0].document.id == doc.id
        assert outcome.hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert outcome.release_id == manifest.release_id


def test_model_is_stored_once_by_content(corpus, releases, tiny_model_dir, other_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    first = _build(corpus, releases, tiny_model_dir)
    second = _build(corpus, releases, tiny_model_dir)
    third = _build(corpus, releases, other_model_dir)
    assert first.model.path == second.model.path != third.model.path
    assert len(list((releases.data_dir / "models").iterdir())) == 2


def test_activate_rollback_and_history(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    a, b, c = (_build(corpus, releases, tiny_model_dir).release_id for _ in range(3))
    assert [m.release_id for m in releases.list()] == [a, b, c]
    for release_id in (a, b, c):
        releases.activate(release_id)
    assert releases.rollback().active == b
    assert releases.rollback().active == a
    with pytest.raises(Conflict, match="no earlier release"):
        releases.rollback()
    assert releases.active() == a


def test_delete_and_gc_never_touch_the_active_release(corpus, releases, tiny_model_dir, other_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    old = _build(corpus, releases, other_model_dir).release_id
    ids = [_build(corpus, releases, tiny_model_dir).release_id for _ in range(3)]
    releases.activate(old)
    with pytest.raises(Conflict, match="is active"):
        releases.delete(old)
    removed = releases.gc(keep=1)
    assert removed == ids[:2]
    assert {m.release_id for m in releases.list()} == {old, ids[2]}
    releases.delete(ids[2])
    assert [m.release_id for m in releases.list()] == [old]
    assert releases.gc(keep=5) == []
    assert len(list((releases.data_dir / "models").iterdir())) == 1, "unused models are collected"
    with pytest.raises(NotFound):
        releases.delete(ids[2])


@pytest.mark.parametrize("bad_id", ["../../etc", "r-1", ".staging-x", "ACTIVE.json"])
def test_release_ids_cannot_escape_the_store(releases, bad_id):
    with pytest.raises(InvalidInput, match="not a release id"):
        releases.path(bad_id)


def test_a_release_refuses_to_load_with_another_model(corpus, releases, tiny_model_dir, other_model_dir):
    """Guards against embedding-space drift: vectors of one model scored with another's queries."""
    corpus.upsert(SAMPLE_DOCS)
    manifest = _build(corpus, releases, tiny_model_dir, activate=True)
    stored = releases.data_dir / manifest.model.path
    shutil.rmtree(stored)
    shutil.copytree(other_model_dir, stored)
    with pytest.raises(IntegrityError, match="refusing to serve"):
        LiveRelease.load(releases, manifest.release_id)
    with pytest.raises(IntegrityError, match="only served with its own model"):
        LiveRelease(manifest, BiEncoder.load(other_model_dir), None)


def test_a_tampered_index_is_refused(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    manifest = _build(corpus, releases, tiny_model_dir)
    ids_file = releases.path(manifest.release_id) / "ids.json"
    data = json.loads(ids_file.read_text())
    data["doc_ids"].reverse()
    ids_file.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="checksum"):
        LiveRelease.load(releases, manifest.release_id)


def test_interrupted_build_leaves_active_release_and_listing_untouched(corpus, releases, tiny_model_dir):
    """Guards against half-written releases being listed or activated after a crash."""
    corpus.upsert(SAMPLE_DOCS)
    good = _build(corpus, releases, tiny_model_dir, activate=True)

    def crash(stage, done, total):
        if stage == "index":
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        _build(corpus, releases, tiny_model_dir, activate=True, progress=crash)
    assert releases.active() == good.release_id
    assert [m.release_id for m in releases.list()] == [good.release_id]
    assert not [p for p in releases.releases_dir.iterdir() if p.name.startswith(".staging")]


def test_empty_corpus_cannot_be_built(corpus, releases, tiny_model_dir):
    with pytest.raises(InvalidInput, match="corpus is empty"):
        _build(corpus, releases, tiny_model_dir)


def test_catch_up_applies_writes_made_after_the_build(corpus, releases, tiny_model_dir):
    """Guards against losing writes that land between a build's snapshot and serving."""
    corpus.upsert(SAMPLE_DOCS)
    manifest = _build(corpus, releases, tiny_model_dir, activate=True)
    corpus.upsert([Document(id="d6", title="New", text="green apple cherry pie")])
    corpus.delete("d2")
    corpus.upsert([Document(id="d1", title="Changed", text="small blue data model")])
    live = LiveRelease.load(releases, manifest.release_id)
    assert live.catch_up(corpus) == 3
    assert "d2" not in live.index and "d6" in live.index
    assert live.search(corpus, "Changed small blue data model", 1).hits[0].document.id == "d1"
    expected = live.encoder.encode(["New green apple cherry pie"])[0]
    assert np.allclose(live.index.reconstruct("d6"), expected, atol=1e-5)
    assert live.catch_up(corpus) == 0


def test_model_store_reuses_a_stored_model(releases, tiny_model_dir):
    store = ModelStore(releases.data_dir)
    encoder, ref = store.put(tiny_model_dir)
    again, ref_again = store.put(releases.data_dir / ref.path)
    assert ref_again == ref and again.fingerprint == encoder.fingerprint
    assert store.load(ref).fingerprint == ref.fingerprint


def test_a_tampered_reranker_is_refused(corpus, releases, tiny_model_dir, other_model_dir):
    from training.cross_encoder import CrossEncoder

    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, reranker_path=tiny_model_dir))
    assert Manifest.read(releases.path(manifest.release_id)).reranker == manifest.reranker
    stored = releases.data_dir / manifest.reranker.path
    shutil.rmtree(stored)
    CrossEncoder.load(other_model_dir).save(stored)
    with pytest.raises(IntegrityError, match="reranker at"):
        LiveRelease.load(releases, manifest.release_id)


def test_release_records_and_serves_its_precision(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    fp32 = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    bf16 = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="bf16"))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert LiveRelease.load(releases, bf16.release_id).encoder.precision == "bf16"
    with pytest.raises(InvalidInput, match="precision must be"):
        build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp16"))


def test_approximate_indexes_record_search_params_and_recall_against_exact(corpus, releases, tiny_model_dir):
    task = synthetic_task(300)
    corpus.upsert(Document(id=i, title="", text=t) for i, t in task.documents.items())
    options = BuildOptions(model_path=tiny_model_dir, index_type="HNSW8", ef_search=200, ef_construction=100,
                           precision="fp32")
    manifest = build_release(corpus, releases, options)
    assert faiss.downcast_index(LiveRelease.load(releases, manifest.release_id).index._index.index).hnsw.efConstruction == 100
    assert manifest.search_params == {"ef_search": 200}
    assert manifest.recall.k == 10 and manifest.recall.sample == 300 and manifest.recall.search_params == {"ef_search": 200}
    assert manifest.recall.recall > 0.95
    narrow = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, index_type="IVF16,Flat", nprobe=1,
                                                          precision="fp32"))
    wide = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, index_type="IVF16,Flat", nprobe=16,
                                                        precision="fp32"))
    assert narrow.recall.recall < wide.recall.recall == pytest.approx(1.0)
    assert LiveRelease.load(releases, narrow.release_id).index.search_params() == {"nprobe": 1}
    exact = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    assert exact.recall is None and exact.search_params == {}
