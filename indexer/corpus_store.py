"""The corpus store: documents in SQLite (WAL), each write stamped with a change sequence.

Every upsert or delete bumps one monotonically increasing sequence and stamps the
row with it; deletes leave a tombstone. A release records the sequence it was built
at, so whoever serves it can replay exactly the writes that came after ("catch up").
Writes of identical content are no-ops and do not bump the sequence.
Every write also updates the BM25 index of titles and texts (`indexer.lexical_index`)
and the indexes on metadata fields (`indexer.field_index`) in the same transaction.
Left out: document versions (only the latest content is kept).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from indexer import field_index, lexical_index
from indexer.metadata_filter import Filter, check_field, to_sql
from indexer.sqlite_db import SqliteDb
from training.errors import NotFound

FILTER_CACHE_SIZE = 64  # metadata filters whose matching ids are kept until the corpus changes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    seq INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS documents_seq ON documents(seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters(name, value) VALUES ('seq', 0);
"""


@dataclass(frozen=True)
class Document:
    """One corpus document."""

    id: str
    title: str = ""
    text: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        payload = json.dumps([self.title, self.text, self.metadata], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def embedding_text(self) -> str:
        """The text the encoder sees: title and body joined as BEIR does."""
        return f"{self.title} {self.text}".strip()


@dataclass(frozen=True)
class Change:
    """One write after some sequence number: the document's current state, or a deletion."""

    seq: int
    doc_id: str
    document: Document | None


@dataclass(frozen=True)
class WriteResult:
    """What an upsert batch did."""

    inserted: int
    updated: int
    unchanged: int
    seq: int
    changed: tuple[str, ...] = ()  # ids inserted or updated, in input order


def _row_to_document(row: sqlite3.Row) -> Document:
    return Document(id=row["id"], title=row["title"], text=row["text"], metadata=json.loads(row["metadata"]))


def _row_to_change(row: sqlite3.Row) -> Change:
    return Change(seq=row["seq"], doc_id=row["id"], document=None if row["deleted"] else _row_to_document(row))


class CorpusStore:
    """SQLite-backed corpus; safe to share between threads and between processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._store = SqliteDb(self.path, _SCHEMA + lexical_index.SCHEMA + field_index.SCHEMA)
        self._reading = self._store.reading
        self._transaction = self._store.transaction
        with self._reading() as db:
            built = lexical_index.is_built(db)
        if not built:
            with self._transaction() as db:
                lexical_index.ensure_built(db)
        self._filter_cache: OrderedDict[str, tuple[int, frozenset[str]]] = OrderedDict()
        self._filter_lock = threading.Lock()

    def close(self) -> None:
        self._store.close()

    def _next_seq(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq'")
        return db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    def upsert(self, documents: Iterable[Document]) -> WriteResult:
        """Insert or replace documents in one transaction; all or nothing."""
        inserted = updated = unchanged = 0
        changed = []
        with self._transaction() as db:
            indexed = field_index.fields(db)  # none in most corpora: their writes then skip the field index
            for doc in documents:
                digest = doc.content_hash
                row = db.execute("SELECT content_hash, deleted FROM documents WHERE id = ?", (doc.id,)).fetchone()
                if row is not None and not row["deleted"] and row["content_hash"] == digest:
                    unchanged += 1
                    continue
                seq = self._next_seq(db)
                db.execute(
                    "INSERT INTO documents(id, title, text, metadata, content_hash, seq, deleted) "
                    "VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT(id) DO UPDATE SET title=excluded.title, "
                    "text=excluded.text, metadata=excluded.metadata, content_hash=excluded.content_hash, "
                    "seq=excluded.seq, deleted=0",
                    (doc.id, doc.title, doc.text, json.dumps(doc.metadata, ensure_ascii=False), digest, seq),
                )
                lexical_index.put(db, doc.id, doc.title, doc.text)
                if indexed:
                    field_index.put(db, doc.id)
                if row is None or row["deleted"]:
                    inserted += 1
                else:
                    updated += 1
                changed.append(doc.id)
            seq = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]
        return WriteResult(inserted=inserted, updated=updated, unchanged=unchanged, seq=seq, changed=tuple(changed))

    def delete(self, doc_id: str) -> int:
        """Delete a document (leaving a tombstone); returns the new sequence."""
        with self._transaction() as db:
            row = db.execute("SELECT deleted FROM documents WHERE id = ?", (doc_id,)).fetchone()
            if row is None or row["deleted"]:
                raise NotFound(f"document {doc_id!r} does not exist")
            seq = self._next_seq(db)
            db.execute(
                "UPDATE documents SET title='', text='', metadata='{}', content_hash='', seq=?, deleted=1 WHERE id=?",
                (seq, doc_id),
            )
            lexical_index.drop(db, doc_id)
            if field_index.fields(db):
                field_index.drop(db, doc_id)
        return seq

    def get(self, doc_id: str) -> Document:
        with self._reading() as db:
            row = db.execute("SELECT * FROM documents WHERE id = ? AND deleted = 0", (doc_id,)).fetchone()
        if row is None:
            raise NotFound(f"document {doc_id!r} does not exist")
        return _row_to_document(row)

    def get_many(self, doc_ids: list[str]) -> dict[str, Document]:
        """The live documents among `doc_ids`, keyed by id (missing ids are absent)."""
        return {row["id"]: _row_to_document(row) for row in self._rows_by_id(doc_ids, live_only=True)}

    def matching_ids(self, where: Filter) -> frozenset[str]:
        """The ids of the live documents whose metadata `where` matches (see `indexer.metadata_filter`).

        Without indexes on its fields (`index_field`), SQLite reads every document's metadata
        for a filter (about 100-200 ms for 100,000 documents, docs/benchmarks.md), so the
        answers to the last `FILTER_CACHE_SIZE` filters are kept with the change sequence
        they were read at, and reused until any process writes to the corpus.
        """
        key = repr(where)  # keeps types apart, unlike the tree's equality (True == 1)
        with self._reading() as db:
            db.execute("BEGIN")
            try:
                seq = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]
                with self._filter_lock:
                    cached = self._filter_cache.get(key)
                    if cached is not None and cached[0] == seq:
                        self._filter_cache.move_to_end(key)
                        return cached[1]
                sql, params = to_sql(where, field_index.fields(db))
                rows = db.execute(f"SELECT id FROM documents WHERE deleted = 0 AND {sql}", params)
                ids = frozenset(row[0] for row in rows)
            finally:
                db.execute("COMMIT")
        with self._filter_lock:
            self._filter_cache[key] = (seq, ids)
            self._filter_cache.move_to_end(key)
            while len(self._filter_cache) > FILTER_CACHE_SIZE:
                self._filter_cache.popitem(last=False)
        return ids

    def lexical_search(self, query: str, limit: int, where: Filter | None = None) -> list[tuple[str, float]]:
        """The `limit` live documents that best match `query`'s words by BM25, best first, as (id, score); only
        those whose metadata `where` matches, if given (see `indexer.lexical_index`)."""
        with self._reading() as db:
            condition, params = to_sql(where, field_index.fields(db), table="d") if where is not None else ("", [])
            return lexical_index.search(db, query, limit, condition, params)

    def page(self, limit: int, after: str | None = None, where: Filter | None = None) -> list[Document]:
        """Up to `limit` live documents in id order, those with ids after `after` (the last id of the previous page)
        and, with `where`, whose metadata it matches. Paging by id stays consistent while documents are written:
        nothing is skipped or repeated that existed throughout."""
        with self._reading() as db:
            sql, params = to_sql(where, field_index.fields(db)) if where is not None else ("1", [])
            rows = db.execute(
                f"SELECT * FROM documents WHERE deleted = 0 AND id > ? AND {sql} ORDER BY id LIMIT ?",
                [after or "", *params, limit],
            ).fetchall()
        return [_row_to_document(row) for row in rows]

    def index_field(self, field: str) -> int:
        """Index metadata field `field` (a dotted path) for filters, filling the index from the live documents in one
        transaction; returns how many values it holds. Indexing a field twice changes nothing."""
        check_field(field, "field")
        with self._transaction() as db:
            return field_index.add(db, field)

    def drop_field_index(self, field: str) -> None:
        """Stop indexing `field`; NotFound if it is not indexed."""
        with self._transaction() as db:
            if not field_index.remove(db, field):
                raise NotFound(f"metadata field {field!r} is not indexed")

    def indexed_fields(self) -> dict[str, int]:
        """Each indexed metadata field and how many values its index holds."""
        with self._reading() as db:
            counts = dict(db.execute("SELECT field, COUNT(*) FROM field_values GROUP BY field").fetchall())
            return {field: counts.get(field, 0) for field in sorted(field_index.fields(db))}

    def _rows_by_id(self, doc_ids: list[str], live_only: bool) -> list[sqlite3.Row]:
        """The rows of `doc_ids` (tombstones too unless `live_only`), read 500 ids per statement."""
        condition = "deleted = 0 AND " if live_only else ""
        rows: list[sqlite3.Row] = []
        with self._reading() as db:
            for start in range(0, len(doc_ids), 500):
                chunk = doc_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows += db.execute(f"SELECT * FROM documents WHERE {condition}id IN ({marks})", chunk).fetchall()
        return rows

    @property
    def seq(self) -> int:
        """The sequence of the latest write."""
        with self._reading() as db:
            return db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    def count(self) -> int:
        with self._reading() as db:
            return db.execute("SELECT COUNT(*) FROM documents WHERE deleted = 0").fetchone()[0]

    def snapshot(self) -> tuple[int, list[Document]]:
        """All live documents and the sequence they are consistent with, read in one transaction."""
        with self._reading() as db:
            db.execute("BEGIN")
            try:
                seq = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]
                rows = db.execute("SELECT * FROM documents WHERE deleted = 0 ORDER BY id").fetchall()
            finally:
                db.execute("COMMIT")
        return seq, [_row_to_document(row) for row in rows]

    def states(self, doc_ids: list[str]) -> list[Change]:
        """The current state of each of `doc_ids` that was ever written, deletions included, with its sequence."""
        found = {row["id"]: _row_to_change(row) for row in self._rows_by_id(doc_ids, live_only=False)}
        return [found[doc_id] for doc_id in doc_ids if doc_id in found]

    def changes_since(self, seq: int, limit: int = -1) -> list[Change]:
        """Every document written after `seq`, in sequence order (deletions have no document); the first `limit`
        of them when `limit` is not negative."""
        with self._reading() as db:
            rows = db.execute("SELECT * FROM documents WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [_row_to_change(row) for row in rows]
