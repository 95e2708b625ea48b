"""Indexes on metadata fields, so a filter on an indexed field reads only the documents it matches.

Without one, a new filter reads and parses every document's metadata (100-150 ms for
100,000 documents, docs/benchmarks.md), which a service whose queries each filter by a
different value (a tenant, a user, a source) pays on every query. An indexed field's
scalar values, each element of an array on its own, are kept in `field_values` keyed
by (field, kind, value), so `$eq`, `$in` and ranges on it are index lookups, as
Qdrant's payload indexes and MongoDB's indexes on array fields (multikey) do. Numbers
share the kind `number`, so an integer and a float compare as numbers and never as
text, exactly as the unindexed condition does (`metadata_filter.to_sql` compiles both,
and gives the same answers). The rows are written in the corpus store's own
transactions, like the BM25 index; indexing a field fills it from the live documents
at once, and dropping it deletes its rows. Conditions that need the field's absence or
presence (`$exists`) read the metadata as before.
"""

from __future__ import annotations

import sqlite3

from indexer.metadata_filter import json_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS indexed_fields (field TEXT PRIMARY KEY, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS field_values (
    field TEXT NOT NULL, kind TEXT NOT NULL, value NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (field, kind, value, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS field_values_id ON field_values(id);
"""
# A field's values as `metadata_filter` reads them: the value itself, or each element of an array; never an object's.
_ROWS = """
INSERT OR IGNORE INTO field_values(field, kind, value, id)
SELECT f.field, CASE WHEN e.type IN ('integer', 'real') THEN 'number' ELSE e.type END, e.value, d.id
FROM documents d JOIN indexed_fields f JOIN json_each(d.metadata, f.path) e
WHERE d.deleted = 0 AND json_type(d.metadata, f.path) != 'object'
  AND e.type IN ('integer', 'real', 'text', 'true', 'false')
"""


def fields(db: sqlite3.Connection) -> frozenset[str]:
    """The indexed fields."""
    return frozenset(row[0] for row in db.execute("SELECT field FROM indexed_fields"))


def add(db: sqlite3.Connection, field: str) -> int:
    """Index `field` and fill it from the live documents; returns how many values it holds (nothing changes if it
    was indexed already)."""
    if db.execute("INSERT OR IGNORE INTO indexed_fields(field, path) VALUES (?, ?)", (field, json_path(field))).rowcount:
        db.execute(_ROWS + " AND f.field = ?", (field,))
    return db.execute("SELECT COUNT(*) FROM field_values WHERE field = ?", (field,)).fetchone()[0]


def remove(db: sqlite3.Connection, field: str) -> bool:
    """Stop indexing `field`; returns whether it was indexed."""
    db.execute("DELETE FROM field_values WHERE field = ?", (field,))
    return db.execute("DELETE FROM indexed_fields WHERE field = ?", (field,)).rowcount > 0


def put(db: sqlite3.Connection, doc_id: str) -> None:
    """Index (or re-index) one document's values of every indexed field, as stored in the documents table."""
    drop(db, doc_id)
    db.execute(_ROWS + " AND d.id = ?", (doc_id,))


def drop(db: sqlite3.Connection, doc_id: str) -> None:
    """Remove one document's values."""
    db.execute("DELETE FROM field_values WHERE id = ?", (doc_id,))
