"""Releases: build, list, activate, roll back, delete, gc; integrity checks; interrupted builds."""

import dataclasses
import json
import os
import shutil
import threading
import time

import faiss
import numpy as np
import pytest

from indexer import release_builder
from indexer.corpus_store import CorpusStore, Document
from indexer.live_release import LiveRelease
from indexer.manifest import Manifest
from indexer.model_store import ModelStore
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import STAGING_PREFIX, STALE_SECONDS
from training.bi_encoder import BiEncoder
from training.errors import Conflict, IntegrityError, InvalidInput, NotFound
from tests.conftest import SAMPLE_DOCS
from tests.training_data import synthetic_task


def _build(corpus, releases, model_dir, **kwargs):
    return build_release(corpus, releases, BuildOptions(model_path=model_dir), **kwargs)


def _age(path, seconds=STALE_SECONDS + 3600):
    """Set a folder's mtime `seconds` in the past, as if nothing had touched it since."""
    moment = time.time() - seconds
    os.utime(path, (moment, moment))


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


def test_a_stored_model_is_reused_without_writing_it_again_and_a_damaged_copy_is_replaced(releases, tiny_model_dir, monkeypatch):
    """Guards against every build from an outside folder writing the whole model again, and against a release
    being built on a stored copy whose files no longer hash to its name (it would be refused when served)."""
    store = ModelStore(releases.data_dir)
    first, ref = store.put(tiny_model_dir)
    folder = releases.data_dir / ref.path
    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    saves = []
    original_save = BiEncoder.save
    monkeypatch.setattr(BiEncoder, "save", lambda self, out: saves.append(out) or original_save(self, out))
    again, same = store.put(tiny_model_dir, name="renamed")
    assert same == dataclasses.replace(ref, name="renamed")
    assert saves == [] and weights.stat().st_mtime_ns == written and again.name == "renamed"
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": 1e-05'))
    repaired, fixed = store.put(tiny_model_dir)
    assert len(saves) == 1 and fixed.path == ref.path and repaired.fingerprint == ref.fingerprint
    assert store.load(ref).fingerprint == ref.fingerprint, "the damaged copy should have been replaced"
    assert sorted(p.name for p in (releases.data_dir / "models").iterdir()) == [folder.name]


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
    in_use = releases.data_dir / releases.manifest(old).model.path
    unused = next(p for p in releases.models_dir.iterdir() if p != in_use)
    assert releases.gc(keep=5) == [] and unused.is_dir(), "an unused model touched within a day may be a build's"
    with pytest.raises(InvalidInput, match="unused_for must be 0 or more seconds"):
        releases.gc(keep=5, unused_for=-1)
    assert releases.gc(keep=5, unused_for=3600) == [] and unused.is_dir()
    _age(unused)
    assert releases.gc(keep=5) == []
    assert len(list((releases.data_dir / "models").iterdir())) == 1, "unused models are collected once stale"
    with pytest.raises(NotFound):
        releases.delete(ids[2])


def test_gc_with_no_wait_frees_an_unused_model_at_once(corpus, releases, tiny_model_dir, other_model_dir):
    """Guards against a full disk that gc cannot relieve: `unused_for=0` removes a model unused since just now."""
    corpus.upsert(SAMPLE_DOCS)
    kept = _build(corpus, releases, tiny_model_dir).release_id
    dropped = _build(corpus, releases, other_model_dir).release_id
    releases.activate(kept)
    unused = releases.data_dir / releases.manifest(dropped).model.path
    releases.delete(dropped)
    assert releases.gc(keep=5) == [] and unused.is_dir()
    assert releases.gc(keep=5, unused_for=0) == [] and not unused.exists()
    assert (releases.data_dir / releases.manifest(kept).model.path).is_dir()


def test_gc_keeps_the_rollback_target(corpus, releases, tiny_model_dir):
    """Guards against gc leaving `rollback` nothing to return to: the release active before the current one
    stays however few releases are kept."""
    corpus.upsert(SAMPLE_DOCS)
    first, second, third = (_build(corpus, releases, tiny_model_dir).release_id for _ in range(3))
    releases.activate(first)
    releases.activate(second)
    assert releases.gc(keep=1) == [] and {m.release_id for m in releases.list()} == {first, second, third}
    assert releases.rollback().active == first

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


def test_a_corpus_restored_from_an_older_backup_than_the_release_is_refused(corpus, releases, tiny_model_dir, tmp_path):
    """Guards against catch-up silently skipping writes: a corpus behind the release's sequence hands out sequence
    numbers the release already counts as applied."""
    corpus.upsert(SAMPLE_DOCS)
    manifest = _build(corpus, releases, tiny_model_dir, activate=True)
    older = CorpusStore(tmp_path / "older.sqlite3")
    older.upsert(SAMPLE_DOCS[:3])
    live = LiveRelease.load(releases, manifest.release_id)
    with pytest.raises(IntegrityError, match=r"corpus has seen 3 writes, fewer than the 5 release .* same backup"):
        live.catch_up(older)
    older.close()


def test_catch_up_encodes_a_backlog_one_batch_per_hold_of_the_query_lock(corpus, releases, tiny_model_dir, monkeypatch):
    """Guards against encoding a whole backlog (a large ingest) under the lock every search's query encode needs."""
    corpus.upsert(SAMPLE_DOCS)
    manifest = _build(corpus, releases, tiny_model_dir, activate=True)
    live = LiveRelease.load(releases, manifest.release_id, batch_size=4)
    backlog = [Document(id=f"n{i}", title="note", text=f"apple {i} banana {i % 3}") for i in range(10)]
    corpus.upsert(backlog)
    held, encode = [], live.encoder.encode

    def recording(texts, kind="query", **kwargs):
        if kind == "document":
            held.append((len(texts), live._encode_lock.locked()))
        return encode(texts, kind, **kwargs)

    monkeypatch.setattr(live.encoder, "encode", recording)
    assert live.catch_up(corpus) == 10
    assert held == [(4, True), (4, True), (2, True)]
    assert all(doc.id in live.index for doc in backlog)
    assert np.allclose(live.index.reconstruct("n7"), encode([backlog[7].embedding_text()], "document")[0], atol=1e-5)


def test_a_device_failure_while_storing_never_replaces_an_intact_stored_model(releases, tiny_model_dir, monkeypatch):
    """Guards against a passing device error (a GPU out of memory) while checking a stored copy being taken for
    damage: the intact folder every release of that model uses was deleted and written again."""
    store = ModelStore(releases.data_dir)
    _, ref = store.put(tiny_model_dir)
    folder = releases.data_dir / ref.path
    inode = (folder / "model.safetensors").stat().st_ino
    load, failures = BiEncoder.load, []

    def gpu_out_of_memory_once(path, **kwargs):
        if kwargs.get("device", "cpu") != "cpu" and not failures:
            failures.append(path)
            raise RuntimeError("CUDA out of memory")
        return load(path, **{**kwargs, "device": "cpu"})

    monkeypatch.setattr(BiEncoder, "load", gpu_out_of_memory_once)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        store.put(tiny_model_dir, device="cuda")
    assert (folder / "model.safetensors").stat().st_ino == inode
    assert store.put(tiny_model_dir, device="cuda")[1] == ref and (folder / "model.safetensors").stat().st_ino == inode


def test_storing_a_model_another_build_stored_meanwhile_reuses_that_copy(releases, tiny_model_dir):
    """Guards against the second of two concurrent builds of a new model failing on its final rename (the folder
    appeared after its check), and against a damaged folder in the way surviving the store."""
    from indexer.model_store import _put_in_place

    store = ModelStore(releases.data_dir)
    _, ref = store.put(tiny_model_dir)
    folder = releases.data_dir / ref.path
    inode = (folder / "model.safetensors").stat().st_ino
    staging = releases.data_dir / "models" / f"{STAGING_PREFIX}race"
    shutil.copytree(folder, staging)
    _put_in_place(staging, folder, ref.fingerprint, BiEncoder)
    assert (folder / "model.safetensors").stat().st_ino == inode and staging.is_dir()
    (folder / "tokenizer.json").write_text("{}")
    _put_in_place(staging, folder, ref.fingerprint, BiEncoder)
    assert not staging.exists() and store.load(ref).fingerprint == ref.fingerprint
    assert [p.name for p in (releases.data_dir / "models").iterdir()] == [folder.name]


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


def test_a_plain_query_does_not_wait_behind_a_rerank(corpus, releases, tiny_model_dir, monkeypatch):
    """A rerank of long documents takes seconds on a CPU; searches without rerank must not queue behind it."""
    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, reranker_path=tiny_model_dir))
    live = LiveRelease.load(releases, manifest.release_id)
    scoring, release = threading.Event(), threading.Event()
    score = type(live.reranker).score

    def held(reranker, *args, **kwargs):
        scoring.set()
        assert release.wait(30), "the test never released the rerank"
        return score(reranker, *args, **kwargs)

    monkeypatch.setattr(type(live.reranker), "score", held)
    reranked = []
    rerank = threading.Thread(target=lambda: reranked.append(live.search(corpus, "apple banana cherry", k=3, rerank=True)))
    rerank.start()
    try:
        assert scoring.wait(30)
        plain = []
        search = threading.Thread(target=lambda: plain.append(live.search(corpus, "apple banana cherry", k=1)))
        search.start()
        search.join(20)
        assert plain and plain[0].hits[0].document.id == "d3", "the plain search waited for the rerank"
    finally:
        release.set()
        rerank.join(30)
    assert reranked and reranked[0].hits[0].document.id == "d3"


def test_release_records_and_serves_its_precision(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    fp32 = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    bf16 = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="bf16"))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert LiveRelease.load(releases, bf16.release_id).encoder.precision == "bf16"
    with pytest.raises(InvalidInput, match="precision must be"):
        build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="half"))


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


def test_activating_a_damaged_release_is_refused_and_the_pointer_kept(corpus, releases, tiny_model_dir):
    """Guards against pointing the service at a release whose files no longer match what was built."""
    corpus.upsert(SAMPLE_DOCS)
    good = _build(corpus, releases, tiny_model_dir, activate=True).release_id
    bad = _build(corpus, releases, tiny_model_dir).release_id
    before = releases.pointer()
    index_file = releases.path(bad) / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(IntegrityError, match=r"index\.faiss does not match its manifest checksum.*build the release"):
        releases.activate(bad)
    assert releases.pointer() == before and releases.active() == good


@pytest.mark.parametrize("damage", ["manifest", "manifest types", "model", "missing file"])
def test_activate_checks_the_manifest_files_and_model_folder(corpus, releases, tiny_model_dir, other_model_dir, damage):
    corpus.upsert(SAMPLE_DOCS)
    good = _build(corpus, releases, tiny_model_dir, activate=True).release_id
    other = _build(corpus, releases, other_model_dir)
    folder = releases.path(other.release_id)
    if damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
        message = r"manifest\.json cannot be read"
    elif damage == "manifest types":
        edited = json.loads((folder / "manifest.json").read_text())
        edited["model"]["document_max_length"] = "256"
        (folder / "manifest.json").write_text(json.dumps(edited))
        message = r"manifest\.json cannot be read \(InvalidInput: model: document_max_length must be an integer, got '256'\)"
    elif damage == "model":
        shutil.rmtree(releases.data_dir / other.model.path)
        message = f"model folder {other.model.path} is missing"
    else:
        (folder / "ids.json").unlink()
        message = r"missing ids\.json"
    with pytest.raises(IntegrityError, match=message):
        releases.activate(other.release_id)
    assert releases.active() == good and releases.pointer().history == []


def test_rollback_to_a_damaged_release_is_refused_and_the_pointer_kept(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    first = _build(corpus, releases, tiny_model_dir, activate=True).release_id
    _build(corpus, releases, tiny_model_dir, activate=True)
    before = releases.pointer()
    (releases.path(first) / "ids.json").write_text("{}")
    with pytest.raises(IntegrityError, match=f"release {first}: ids\\.json does not match"):
        releases.rollback()
    assert releases.pointer() == before


def test_listing_skips_vanished_releases_and_reports_unreadable_ones(
    corpus, releases, tiny_model_dir, monkeypatch, caplog
):
    """Guards against one bad or concurrently deleted release breaking `releases list` and the admin API."""
    corpus.upsert(SAMPLE_DOCS)
    kept, broken, vanishing = (_build(corpus, releases, tiny_model_dir).release_id for _ in range(3))
    (releases.path(broken) / "manifest.json").write_text('{"release_id": "truncated')
    read = Manifest.read

    def deleted_while_listing(folder):
        if folder.name == vanishing:
            releases.delete(vanishing)
        return read(folder)

    monkeypatch.setattr(Manifest, "read", staticmethod(deleted_while_listing))
    assert [m.release_id for m in releases.list()] == [kept]
    assert broken in caplog.text and "cannot be read" in caplog.text
    listing = releases.scan()
    assert [m.release_id for m in listing.manifests] == [kept]
    assert list(listing.unreadable) == [broken] and "JSONDecodeError" in listing.unreadable[broken]


def test_gc_keeps_models_while_a_manifest_is_unreadable(corpus, releases, tiny_model_dir, other_model_dir):
    """Guards against deleting the model of a release gc cannot read."""
    corpus.upsert(SAMPLE_DOCS)
    live = _build(corpus, releases, tiny_model_dir, activate=True)
    unreadable = _build(corpus, releases, other_model_dir)
    (releases.path(unreadable.release_id) / "manifest.json").write_text("")
    model = releases.data_dir / unreadable.model.path
    _age(model)
    assert releases.gc(keep=1) == []
    assert model.is_dir() and releases.path(unreadable.release_id).is_dir()
    releases.delete(unreadable.release_id)
    assert releases.gc(keep=1) == [] and not model.exists()
    assert releases.list() == [live]


def test_gc_removes_only_stale_staging_of_releases_and_models(releases):
    fresh = [releases.releases_dir / f"{STAGING_PREFIX}r-fresh", releases.models_dir / f"{STAGING_PREFIX}0a1b"]
    stale = [releases.releases_dir / f"{STAGING_PREFIX}r-stale", releases.models_dir / f"{STAGING_PREFIX}2c3d"]
    for folder in fresh + stale:
        folder.mkdir()
        (folder / "part").write_text("x")
    for folder in stale:
        _age(folder)
    releases.gc(keep=1)
    assert all(folder.is_dir() for folder in fresh) and not any(folder.exists() for folder in stale)


def test_storing_or_reusing_a_model_touches_its_folder(releases, tiny_model_dir):
    """Guards against gc taking a reused model as stale while a build that stored it is still encoding."""
    store = ModelStore(releases.data_dir)
    _, ref = store.put(tiny_model_dir)
    folder = releases.data_dir / ref.path
    for source in (tiny_model_dir, folder):
        _age(folder)
        store.put(source)
        assert time.time() - folder.stat().st_mtime < 60


def test_gc_during_a_long_build_leaves_its_staging_and_model(corpus, releases, tiny_model_dir, monkeypatch):
    """Guards against gc deleting a running build's model (stored at the start, referenced only at publish) or
    staging folder (created at the start, written only at the end)."""
    corpus.upsert(SAMPLE_DOCS)
    monkeypatch.setattr(release_builder, "ENCODE_CHUNK", 2)
    store = releases.data_dir / "models"

    def gc_mid_build(stage, done, total):
        if stage != "encode":
            return
        building = [*releases.releases_dir.glob(f"{STAGING_PREFIX}*"), *store.iterdir()]
        if done == 2:
            for folder in building:
                _age(folder)
        if done == 4:
            releases.gc(keep=1)
            assert all(folder.is_dir() for folder in building)

    manifest = _build(corpus, releases, tiny_model_dir, progress=gc_mid_build)
    live = LiveRelease.load(releases, manifest.release_id)
    assert live.search(corpus, SAMPLE_DOCS[0].embedding_text(), 1).hits[0].document.id == SAMPLE_DOCS[0].id


def test_ivf_lists_may_outnumber_an_encoding_chunk(corpus, releases, tiny_model_dir, monkeypatch):
    """Guards against training IVF on the first encoded chunk only: too few vectors, or centroids of a biased sample."""
    task = synthetic_task(120)
    corpus.upsert(Document(id=i, title="", text=t) for i, t in task.documents.items())
    monkeypatch.setattr(release_builder, "ENCODE_CHUNK", 8)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, index_type="IVF16,Flat",
                                                            nprobe=16, precision="fp32"))
    assert manifest.doc_count == 120 and manifest.recall.recall == pytest.approx(1.0)
    assert len(LiveRelease.load(releases, manifest.release_id).index) == 120


@pytest.mark.parametrize("index_type", ["SQ8", "PQ8x4"])
def test_lossy_indexes_get_a_recall_figure(corpus, releases, tiny_model_dir, index_type):
    """Guards against skipping the recall check for PQ/SQ codes, which are approximate without HNSW or IVF."""
    task = synthetic_task(120)
    corpus.upsert(Document(id=i, title="", text=t) for i, t in task.documents.items())
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, index_type=index_type,
                                                            precision="fp32"))
    assert manifest.recall is not None and manifest.recall.sample == 120 and 0 < manifest.recall.recall <= 1


def test_the_recall_check_does_not_count_each_query_finding_itself():
    """Guards against a recall figure lifted by the sampled documents' own vectors, which any index returns: an IVF
    index with about one vector per list, probing one list, finds a query's own vector and little else."""
    from indexer.recall_check import measure_recall
    from indexer.vector_index import VectorIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((256, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"v{i}" for i in range(len(vectors))]
    index = VectorIndex(16, "IVF256,Flat")
    index.train(vectors)
    index.add(ids, vectors)
    index.set_search_params(nprobe=1)
    assert all(hits[0].doc_id == ids[row] for row, hits in enumerate(index.search(vectors, 1))), "each finds itself"
    assert measure_recall(index, ids, vectors).recall < 0.05
    index.set_search_params(nprobe=256)
    assert measure_recall(index, ids, vectors).recall == pytest.approx(1.0)
