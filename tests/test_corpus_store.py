"""The corpus store: upserts, deletes, the change sequence and catch-up reads."""

import sqlite3
import threading
import time

import pytest

from indexer.corpus_store import CorpusStore, Document
from indexer.job_store import JobStore
from indexer.sqlite_db import SqliteDb
from workers.tasks import RETRY
from training.errors import NotFound, NotReady
from tests.conftest import SAMPLE_DOCS


def test_upsert_counts_and_sequence(corpus):
    first = corpus.upsert(SAMPLE_DOCS)
    assert (first.inserted, first.updated, first.unchanged, first.seq) == (5, 0, 0, 5)
    again = corpus.upsert(SAMPLE_DOCS)
    assert (again.inserted, again.unchanged, again.seq) == (0, 5, 5), "identical writes must not bump the sequence"
    changed = corpus.upsert([Document(id="d1", title="Quick fox", text="a different text")])
    assert (changed.updated, changed.seq) == (1, 6)
    assert corpus.get("d1").text == "a different text"
    assert corpus.count() == 5


def test_delete_leaves_a_tombstone_in_the_change_log(corpus):
    corpus.upsert(SAMPLE_DOCS)
    seq = corpus.delete("d2")
    assert seq == 6
    with pytest.raises(NotFound):
        corpus.get("d2")
    with pytest.raises(NotFound):
        corpus.delete("d2")
    changes = corpus.changes_since(5)
    assert [(c.doc_id, c.document) for c in changes] == [("d2", None)]


def test_changes_since_returns_latest_state_in_order(corpus):
    corpus.upsert(SAMPLE_DOCS[:2])
    corpus.upsert([Document(id="d1", text="new one")])
    corpus.upsert([SAMPLE_DOCS[2]])
    changes = corpus.changes_since(2)
    assert [c.doc_id for c in changes] == ["d1", "d3"]
    assert changes[0].document.text == "new one"


def test_failed_batch_commits_nothing(corpus):
    """Guards against half-applied batches when one document fails mid-transaction."""

    class Broken(Document):
        @property
        def content_hash(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        corpus.upsert([SAMPLE_DOCS[0], Broken(id="bad", text="x")])
    assert corpus.count() == 0 and corpus.seq == 0


def test_snapshot_is_consistent_and_survives_reopen(data_dir, corpus):
    corpus.upsert(SAMPLE_DOCS)
    corpus.delete("d5")
    seq, docs = corpus.snapshot()
    assert seq == 6 and [d.id for d in docs] == ["d1", "d2", "d3", "d4"]
    reopened = CorpusStore(data_dir / "corpus.sqlite3")
    assert reopened.seq == 6 and reopened.get("d1") == SAMPLE_DOCS[0]
    reopened.close()


def test_metadata_round_trips_and_get_many_skips_missing(corpus):
    corpus.upsert(SAMPLE_DOCS)
    found = corpus.get_many(["d5", "nope", "d1"])
    assert set(found) == {"d5", "d1"} and found["d5"].metadata == {"lang": "py"}


def test_every_commit_is_synced_to_disk(corpus, data_dir):
    """Guards against acknowledged writes that a power loss rolls back: under WAL with synchronous=NORMAL the
    last commits are not yet on disk, while a release's fsynced manifest may already record their sequence."""
    jobs = JobStore(data_dir / "jobs.sqlite3")
    try:
        for db in (corpus._store, jobs._db):
            assert db.db.execute("PRAGMA synchronous").fetchone()[0] == 2, "expected synchronous=FULL (2) for writes"
            assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    finally:
        jobs.close()


def test_a_write_waiting_out_another_writer_is_not_ready_and_writes_nothing(tmp_path):
    """Guards against SQLite's "database is locked" reaching the API as a 500 when a long ingest holds the lock."""
    db = SqliteDb(tmp_path / "x.sqlite3", "CREATE TABLE IF NOT EXISTS t (v INTEGER);", timeout=0.2)
    other = sqlite3.connect(tmp_path / "x.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(NotReady, match=r"x\.sqlite3 is locked by another writer .* longer than 0\.2 s; nothing was written") as raised:
        with db.transaction() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
    assert isinstance(raised.value, RETRY["autoretry_for"]), "a job task meeting a busy job store must retry, not fail"
    other.execute("COMMIT")
    with db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES (2)")
    assert [row[0] for row in db.query("SELECT v FROM t")] == [2]


def test_reads_do_not_wait_behind_a_write_that_waits_for_another_process(tmp_path):
    """Guards against a search's document fetch freezing for the whole busy timeout while one API write waits out
    another process's lock (a large ingest): reads have their own connection."""
    corpus = CorpusStore(tmp_path / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    corpus._store.timeout = 3.0
    corpus._store.db.execute("PRAGMA busy_timeout = 3000")
    ingest = sqlite3.connect(tmp_path / "corpus.sqlite3", isolation_level=None)
    ingest.execute("BEGIN IMMEDIATE")
    outcome = []
    writer = threading.Thread(target=lambda: outcome.append(_try(corpus.delete, "d1")))
    writer.start()
    time.sleep(0.3)
    started = time.perf_counter()
    found = corpus.get_many(["d1", "d2"])
    waited = time.perf_counter() - started
    assert sorted(found) == ["d1", "d2"] and corpus.get("d3").id == "d3" and corpus.count() == 5
    assert corpus.changes_since(4)[0].doc_id == "d5" and corpus.snapshot()[0] == 5
    assert waited < 1.5, f"a read waited {waited:.1f} s behind the blocked write"
    assert writer.is_alive(), "the write should still be waiting for the other process's lock"
    writer.join()
    ingest.execute("COMMIT")
    assert isinstance(outcome[0], NotReady)
    corpus.close()


def _try(call, *args):
    try:
        return call(*args)
    except NotReady as error:
        return error
