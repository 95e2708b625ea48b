"""The drift probe: stored vectors against the live model's re-encoding, in-process and over the admin API."""

import pytest
from fastapi.testclient import TestClient

from indexer.corpus_store import Document
from indexer.drift_probe import WORST_SHOWN, probe_drift
from indexer.live_release import LiveRelease
from indexer.release_builder import BuildOptions, build_release
from indexer.settings import Settings
from service.app import create_app
from tests.conftest import SAMPLE_DOCS
from training.bi_encoder import BiEncoder
from training.errors import Conflict

AUTH = {"Authorization": "Bearer secret"}
MORE_DOCS = [Document(id=f"m{i}", title=f"Note {i}", text=f"note {i} about the {word} and the data")
             for i, word in enumerate(["fox", "gene", "index", "apple", "python", "trial", "query", "cell"] * 3)]


def _live(corpus, releases, model_dir, index_type="Flat"):
    corpus.upsert(SAMPLE_DOCS + MORE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=model_dir, index_type=index_type,
                                                            precision="fp32"), activate=True)
    return LiveRelease.load(releases, manifest.release_id)


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32"])
def test_a_release_re_encodes_to_the_vectors_it_stores(corpus, releases, tiny_model_dir, index_type):
    live = _live(corpus, releases, tiny_model_dir, index_type)
    report = probe_drift(live, corpus, sample=1000)
    assert report.sample == len(SAMPLE_DOCS + MORE_DOCS) and report.release == live.release_id
    assert report.mean_cosine == pytest.approx(1.0, abs=1e-5) and report.min_cosine > 0.9999
    assert report.below_threshold == 0 and report.share_below == 0 and report.index_type == index_type
    assert len(report.worst) == WORST_SHOWN
    assert [doc.cosine for doc in report.worst] == sorted(doc.cosine for doc in report.worst)


def test_the_probe_encodes_under_the_query_lock_one_batch_at_a_time_and_skips_deleted_documents(
    corpus, releases, tiny_model_dir, monkeypatch
):
    """Guards against the probe sharing the release's tokenizer with searches unlocked (a query tokenized at the
    document length, or the tokenizer's "Already borrowed"), and against a document deleted mid-probe failing it."""
    live = _live(corpus, releases, tiny_model_dir)
    live.batch_size = 8
    held, encode = [], live.encoder.encode

    def recording(texts, kind="query", **kwargs):
        held.append((kind, len(texts), live._encode_lock.locked()))
        return encode(texts, kind, **kwargs)

    monkeypatch.setattr(live.encoder, "encode", recording)
    read = live.index.stored_vectors

    def deleted_meanwhile(doc_ids):
        live.index.remove([doc_ids[0]])
        return read(doc_ids)

    monkeypatch.setattr(live.index, "stored_vectors", deleted_meanwhile)
    report = probe_drift(live, corpus, sample=1000)
    assert report.sample == len(SAMPLE_DOCS + MORE_DOCS) - 1 and report.mean_cosine == pytest.approx(1.0, abs=1e-5)
    assert held == [("document", 8, True)] * 3 + [("document", 4, True)]


def test_vectors_another_model_made_show_up_as_drift(corpus, releases, tiny_model_dir, other_model_dir):
    live = _live(corpus, releases, tiny_model_dir)
    swapped = ["d2", "m3", "m7"]
    texts = [corpus.get(doc_id).embedding_text() for doc_id in swapped]
    live.index.add(swapped, BiEncoder.load(other_model_dir).encode(texts, "document"))
    report = probe_drift(live, corpus, sample=1000, threshold=0.99)
    assert report.below_threshold == 3 and report.share_below == pytest.approx(3 / report.sample)
    assert {doc.id for doc in report.worst[:3]} == set(swapped) and report.worst[3].cosine > 0.9999
    assert report.min_cosine < 0.99 and report.min_cosine == report.worst[0].cosine
    assert report.worst[0].title == corpus.get(report.worst[0].id).title


def test_the_sample_is_seeded_and_capped(corpus, releases, tiny_model_dir):
    live = _live(corpus, releases, tiny_model_dir)
    runs = [probe_drift(live, corpus, sample=12, seed=seed) for seed in (1, 1, 2)]
    assert [run.sample for run in runs] == [12, 12, 12]
    assert [d.id for d in runs[0].worst] == [d.id for d in runs[1].worst] != [d.id for d in runs[2].worst]


def test_an_ivf_release_is_refused_with_a_reason(corpus, releases, tiny_model_dir):
    live = _live(corpus, releases, tiny_model_dir, "IVF2,Flat")
    with pytest.raises(Conflict, match="cannot return a stored vector by document id; the drift probe works on Flat"):
        probe_drift(live, corpus)


@pytest.fixture
def client(data_dir, corpus, releases, tiny_model_dir):
    _live(corpus, releases, tiny_model_dir)
    with TestClient(create_app(Settings(data_dir=data_dir, poll_interval_s=0.1, admin_token="secret"))) as client:
        yield client


def test_the_admin_api_runs_the_probe_on_the_live_release(client, releases):
    body = client.post("/v1/admin/drift-probe", json={"sample": 10, "threshold": 0.995, "seed": 3}, headers=AUTH).json()
    assert body["release"] == releases.active() and body["sample"] == 10 and body["threshold"] == 0.995
    assert body["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and body["below_threshold"] == 0
    assert set(body["worst"][0]) == {"id", "title", "cosine"}


@pytest.mark.parametrize(
    ("payload", "headers", "status", "fragment"),
    [
        ({}, {}, 401, "Authorization: Bearer"),
        ({"sample": 0}, AUTH, 422, "sample: Input should be greater than or equal to 1"),
        ({"threshold": 1.5}, AUTH, 422, "threshold: Input should be less than or equal to 1"),
        ({"samples": 5}, AUTH, 422, "samples: Extra inputs are not permitted"),
    ],
)
def test_bad_probe_requests_say_what_to_fix(client, payload, headers, status, fragment):
    response = client.post("/v1/admin/drift-probe", json=payload, headers=headers)
    assert response.status_code == status and fragment in response.json()["error"]
