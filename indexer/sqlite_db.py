"""Two SQLite connections in WAL mode, one for writes and one for reads, shared by a process's threads.

Used by the corpus store and the job store: both are read and written by the API
and the workers at once, so every write takes the database lock up front
(`BEGIN IMMEDIATE`) and waits up to `timeout` seconds for another writer, then gives
up with Busy (HTTP 503: retry), having written nothing. Reads go through a
connection of their own: in WAL mode a reader never waits for a writer, so a search
fetching its documents does not queue behind a write that waits out another
process's lock (a large ingest). Commits are
synchronous (`synchronous=FULL`: the WAL is fsynced at each commit), so a write the API
has acknowledged survives a power loss; with NORMAL the last commits could roll back
while a release's fsynced manifest already records their change sequence, and writes
made after the restart would reuse sequence numbers that catch-up then skips.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from training.errors import Busy


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.row_factory = sqlite3.Row
    return db


class SqliteDb:
    """Thread-safe write and read connections with a schema applied on open."""

    def __init__(self, path: str | Path, schema: str, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.timeout = timeout
        self.db = _connect(self.path, timeout)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(schema)
        self._read_lock = threading.Lock()
        self._reader = _connect(self.path, timeout)

    def close(self) -> None:
        with self.lock, self._read_lock:
            self.db.close()
            self._reader.close()

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The read connection, for statements that only read; several in one block see one snapshot when the
        block opens a transaction (`BEGIN` ... `COMMIT`)."""
        with self._read_lock:
            yield self._reader

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception.

        SQLite rolls back by itself on some errors (a full disk); then there is nothing
        left to roll back and the original error is the one raised.
        """
        with self.lock:
            self._begin()
            try:
                yield self.db
            except BaseException:
                self._rollback()
                raise
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                self._rollback()
                raise

    def _begin(self) -> None:
        """Take the write lock, or Busy (NotReady) when another process held it for the whole timeout."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            raise Busy(
                f"{self.path.name} is locked by another writer (a large ingest, or another process's transaction) "
                f"for longer than {self.timeout:g} s; nothing was written; retry when it finishes"
            ) from exc

    def _rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.reading() as db:
            return db.execute(sql, args).fetchall()
