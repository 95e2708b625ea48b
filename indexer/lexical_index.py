"""A BM25 index of the corpus in SQLite's FTS5, kept in the corpus store's own transactions.

Dense retrievers miss what exact words catch (names, numbers, rare terms), and on
SciFact BM25 alone beats the base MiniLM (docs/benchmarks.md); fusing the two is the
usual remedy (Wang, Zhuang and Zuccon, ICTIR 2021). The index covers title and text
with the Porter stemmer over Unicode words. FTS5 rows are keyed by an integer that
`lexical_ids` assigns each document id once (an INTEGER PRIMARY KEY, which VACUUM
keeps, unlike the implicit rowid of the documents table). It follows the corpus, not
a release: a document written a moment ago is found by its words at once.

A query is the OR of its distinct words (up to `MAX_TERMS`), each quoted, so no FTS5
syntax in user text (`NEAR`, `*`, `-`, quotes) is ever interpreted.
"""

from __future__ import annotations

import re
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS lexical_ids (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE);
CREATE VIRTUAL TABLE IF NOT EXISTS documents_fts USING fts5(title, text, tokenize = 'porter unicode61');
"""
BUILT = "lexical_index"  # the counters row that marks a corpus whose existing documents were indexed
MAX_TERMS = 64
WORD = re.compile(r"[^\W_]+")


def is_built(db: sqlite3.Connection) -> bool:
    """Whether the corpus's documents are all in the index (false once, for a corpus written before it existed)."""
    return db.execute("SELECT 1 FROM counters WHERE name = ?", (BUILT,)).fetchone() is not None


def ensure_built(db: sqlite3.Connection) -> None:
    """Index the live documents of a corpus written before this index existed, once (inside the caller's write
    transaction, which a second process opening the same corpus waits for and then finds the work done)."""
    if is_built(db):
        return
    db.execute("INSERT OR IGNORE INTO lexical_ids(id) SELECT id FROM documents WHERE deleted = 0")
    db.execute("DELETE FROM documents_fts")
    db.execute("INSERT INTO documents_fts(rowid, title, text) SELECT l.row, d.title, d.text FROM lexical_ids l "
               "JOIN documents d ON d.id = l.id WHERE d.deleted = 0")
    db.execute("INSERT INTO counters(name, value) VALUES (?, 1)", (BUILT,))


def put(db: sqlite3.Connection, doc_id: str, title: str, text: str) -> None:
    """Index (or re-index) one document."""
    db.execute("INSERT OR IGNORE INTO lexical_ids(id) VALUES (?)", (doc_id,))
    row = db.execute("SELECT row FROM lexical_ids WHERE id = ?", (doc_id,)).fetchone()[0]
    db.execute("DELETE FROM documents_fts WHERE rowid = ?", (row,))
    db.execute("INSERT INTO documents_fts(rowid, title, text) VALUES (?, ?, ?)", (row, title, text))


def drop(db: sqlite3.Connection, doc_id: str) -> None:
    """Remove one document from the index."""
    found = db.execute("SELECT row FROM lexical_ids WHERE id = ?", (doc_id,)).fetchone()
    if found is not None:
        db.execute("DELETE FROM documents_fts WHERE rowid = ?", (found[0],))
        db.execute("DELETE FROM lexical_ids WHERE row = ?", (found[0],))


def match_expression(query: str) -> str:
    """The FTS5 query for `query`: its distinct words, quoted, joined by OR; empty if it has no word."""
    words = list(dict.fromkeys(word.lower() for word in WORD.findall(query)))[:MAX_TERMS]
    return " OR ".join(f'"{word}"' for word in words)


def search(
    db: sqlite3.Connection, query: str, limit: int, condition: str = "", params: list | None = None
) -> list[tuple[str, float]]:
    """The `limit` best documents for `query` by BM25, best first, as (id, score), the score positive (FTS5's
    `bm25` is lower for better matches). `condition` is an SQL condition on the documents table as `d` (a metadata
    filter's), with its `params`."""
    expression = match_expression(query)
    if not expression:
        return []
    where = f" AND d.deleted = 0 AND {condition}" if condition else ""
    rows = db.execute(
        "SELECT l.id, -bm25(documents_fts) FROM documents_fts JOIN lexical_ids l ON l.row = documents_fts.rowid "
        f"JOIN documents d ON d.id = l.id WHERE documents_fts MATCH ?{where} ORDER BY bm25(documents_fts) LIMIT ?",
        [expression, *(params or []), limit],
    ).fetchall()
    return [(row[0], float(row[1])) for row in rows]
