"""Teacher scores computed once per teacher and reused across distillation runs.

MarginMSE and KL distillation regress a student onto a cross-encoder teacher's scores
for the same (query, document) pairs in every epoch and every run; the teacher is the
expensive part. This SQLite table keys each score by the teacher's fingerprint and the
sha256 of the query and of the document, so a retrained teacher (new fingerprint)
never answers with its predecessor's scores, and the texts themselves are not stored.
Missing scores are computed in one `score` call and inserted in one transaction.
Left out here: eviction (rows are small; delete the file to start over) and scores
from anything but a `CrossEncoder`.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.cross_encoder import CrossEncoder, as_pairs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS teacher_scores (
    teacher TEXT NOT NULL,
    query_sha256 TEXT NOT NULL,
    document_sha256 TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (teacher, query_sha256, document_sha256)
) WITHOUT ROWID
"""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TeacherScoreCache:
    """Cross-encoder scores stored by (teacher fingerprint, query hash, document hash)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(self.path, timeout=30.0)
        with self._connection:
            self._connection.execute(_SCHEMA)

    def __len__(self) -> int:
        return self._connection.execute("SELECT COUNT(*) FROM teacher_scores").fetchone()[0]

    def get_or_score(
        self, teacher: CrossEncoder, pairs: Sequence[tuple[str, str]], batch_size: int = 32
    ) -> np.ndarray:
        """float32 teacher logits in input order; only pairs this teacher never scored reach the model."""
        checked = as_pairs(pairs)
        scores = np.zeros(len(checked), dtype=np.float32)
        fingerprint = teacher.fingerprint
        missing: dict[tuple[str, str], list[int]] = {}
        for row, (query, document) in enumerate(checked):
            key = (_sha256(query), _sha256(document))
            found = self._connection.execute(
                "SELECT score FROM teacher_scores WHERE teacher = ? AND query_sha256 = ? AND document_sha256 = ?",
                (fingerprint, *key),
            ).fetchone()
            if found is None:
                missing.setdefault(key, []).append(row)
            else:
                scores[row] = found[0]
        if not missing:
            return scores
        first_rows = [rows[0] for rows in missing.values()]
        fresh = teacher.score([checked[row] for row in first_rows], batch_size=batch_size)
        for rows, value in zip(missing.values(), fresh):
            scores[rows] = value
        with self._connection:
            self._connection.executemany(
                "INSERT OR IGNORE INTO teacher_scores VALUES (?, ?, ?, ?)",
                [(fingerprint, *key, float(value)) for key, value in zip(missing, fresh)],
            )
        return scores

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> TeacherScoreCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
