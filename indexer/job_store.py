"""Durable job records: what a retrain or re-embed job was asked to do, where it is, and how it ended.

Records live in SQLite in the data dir, so they survive API and worker restarts and
every process sharing the data dir sees the same state. A job runs as a chain of
steps (retrain, reembed, evaluate, promote); each step is *claimed* by one worker in
a transaction, so a message delivered twice (late acks, broker redelivery) runs the
step once, and each step's output (model folder, release id) is recorded before the
next step is enqueued, so a rerun resumes instead of starting over. A worker that
dies leaves its job `running` with a stale heartbeat; `recover_lost` hands such jobs
back to the queue (or fails them after `max_attempts`).

The reembed step runs as shards on any number of workers: each shard has its own
row, claimed, heartbeated and recovered like a job (`recover_lost_shards`), and the
transaction that marks the last shard done says so (`complete_shard`), so exactly one
worker goes on to assemble the release without a Celery result backend.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from indexer.sqlite_db import SqliteDb
from training.errors import Conflict, InvalidInput, NotFound

QUEUED, RUNNING, SUCCEEDED, REJECTED, FAILED, CANCELLED = "queued", "running", "succeeded", "rejected", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, REJECTED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, REJECTED, FAILED, CANCELLED})
STEPS = {"retrain": ("retrain", "reembed", "evaluate", "promote"), "reembed": ("reembed", "evaluate", "promote")}
SHARD_DONE = "done"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    step TEXT NOT NULL,
    params TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    outputs TEXT NOT NULL DEFAULT '{}',
    message TEXT,
    error TEXT,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    updated REAL NOT NULL,
    finished REAL,
    heartbeat REAL
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created);
CREATE TABLE IF NOT EXISTS shards (
    job_id TEXT NOT NULL,
    shard INTEGER NOT NULL,
    documents INTEGER NOT NULL,
    status TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    checksum TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    heartbeat REAL,
    PRIMARY KEY (job_id, shard)
);
CREATE INDEX IF NOT EXISTS shards_status ON shards(status);
"""
_JSON_COLUMNS = ("params", "progress", "metrics", "outputs")


@dataclass
class Job:
    """One job's record. `outputs` holds what finished steps produced (model path, release id)."""

    id: str
    kind: str
    status: str
    step: str
    params: dict
    progress: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    message: str | None = None
    error: str | None = None
    worker: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    created: float = 0.0
    started: float | None = None
    updated: float = 0.0
    finished: float | None = None
    heartbeat: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def next_step(self) -> str | None:
        steps = STEPS[self.kind]
        position = steps.index(self.step)
        return steps[position + 1] if position + 1 < len(steps) else None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Shard:
    """One shard of a job's re-embed: its size, its state (queued, running, done), who encodes it, how often."""

    job_id: str
    shard: int
    documents: int
    status: str
    done: int = 0
    worker: str | None = None
    attempts: int = 0
    checksum: str | None = None
    created: float = 0.0
    updated: float = 0.0
    heartbeat: float | None = None


def _row_to_job(row) -> Job:
    data = dict(row)
    for column in _JSON_COLUMNS:
        data[column] = json.loads(data[column])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)


class ClaimLost(Conflict):
    """The worker no longer holds the job: it was presumed lost and another worker took over."""


def new_job_id() -> str:
    """A sortable, unique job id such as `j-20261128T150102Z-3fa9c1d2`."""
    return time.strftime("j-%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(4)


class JobStore:
    """Creates, claims, updates and lists job records; safe across threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self._db = SqliteDb(path, _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def create(self, kind: str, params: dict) -> Job:
        if kind not in STEPS:
            raise InvalidInput(f"unknown job kind {kind!r}; expected one of {', '.join(STEPS)}")
        now = time.time()
        job = Job(id=new_job_id(), kind=kind, status=QUEUED, step=STEPS[kind][0], params=params, created=now, updated=now)
        with self._db.transaction() as db:
            db.execute(
                "INSERT INTO jobs(id, kind, status, step, params, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, kind, QUEUED, job.step, json.dumps(params), now, now),
            )
        return job

    def get(self, job_id: str) -> Job:
        rows = self._db.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"job {job_id!r} does not exist; GET /v1/jobs lists the jobs")
        return _row_to_job(rows[0])

    def list(self, limit: int = 50, status: str | None = None) -> list[Job]:
        """The newest jobs first, optionally only those with `status`."""
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        rows = self._db.query(f"SELECT * FROM jobs {where} ORDER BY created DESC, id DESC LIMIT ?", (*args, limit))
        return [_row_to_job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        """How many jobs have each status (every status listed, 0 where none), counted by SQLite."""
        rows = self._db.query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        found = {row["status"]: row["n"] for row in rows}
        return {status: found.get(status, 0) for status in STATUSES}

    def for_release(self, release_id: str) -> Job | None:
        """The newest job that built `release_id`, if any."""
        rows = self._db.query(
            "SELECT * FROM jobs WHERE json_extract(outputs, '$.release_id') = ? ORDER BY created DESC LIMIT 1",
            (release_id,),
        )
        return _row_to_job(rows[0]) if rows else None

    def releases_in_flight(self) -> set[str]:
        """The releases jobs that are still queued or running have built (their candidates awaiting the gate or
        promotion), which `releases gc` must spare."""
        rows = self._db.query(
            "SELECT json_extract(outputs, '$.release_id') AS release_id FROM jobs "
            "WHERE status IN (?, ?) AND release_id IS NOT NULL", (QUEUED, RUNNING),
        )
        return {row["release_id"] for row in rows}

    def claim(self, job_id: str, step: str, worker: str, stale_after_s: float) -> Job | None:
        """Take `step` of a job for `worker`; None when it is finished, at another step, or held by a live worker.

        A claimed job may have a cancellation pending: the step checks it first and cleans up.
        """
        now = time.time()
        with self._db.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = _row_to_job(row)
            if job.terminal or job.step != step:
                return None
            held = job.worker is not None and job.worker != worker
            if job.status == RUNNING and held and now - (job.heartbeat or 0) < stale_after_s:
                return None
            attempts = job.attempts + (1 if job.status == QUEUED else 0)
            db.execute(
                "UPDATE jobs SET status = ?, worker = ?, heartbeat = ?, updated = ?, started = COALESCE(started, ?), "
                "attempts = ?, progress = ? WHERE id = ?",
                (RUNNING, worker, now, now, now, attempts, json.dumps({"step": step}), job_id),
            )
        return self.get(job_id)

    def report(self, job_id: str, progress: dict | None = None) -> bool:
        """Record progress (if given) and a heartbeat; returns True when cancellation was requested."""
        now = time.time()
        with self._db.transaction() as db:
            if progress is not None:
                db.execute(
                    "UPDATE jobs SET progress = ?, heartbeat = ?, updated = ? WHERE id = ?",
                    (json.dumps(progress), now, now, job_id),
                )
            else:
                db.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (now, job_id))
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _row(db, job_id: str, columns: str):
        row = db.execute(f"SELECT {columns} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return row

    @staticmethod
    def _check_owner(db, job_id: str, owner: str | None) -> None:
        if owner is None:
            return
        row = db.execute("SELECT worker, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["worker"] != owner or row["status"] != RUNNING:
            raise ClaimLost(f"job {job_id} is no longer held by {owner}; another worker took it over")

    def holds(self, job_id: str, owner: str) -> bool:
        """True while `owner` still holds the job's running step."""
        rows = self._db.query("SELECT 1 FROM jobs WHERE id = ? AND worker = ? AND status = ?", (job_id, owner, RUNNING))
        return bool(rows)

    def record(
        self, job_id: str, *, outputs: dict | None = None, metrics: dict | None = None, owner: str | None = None
    ) -> Job:
        """Merge step outputs and metrics into the record (only while `owner`, if given, holds the job)."""
        with self._db.transaction() as db:
            self._check_owner(db, job_id, owner)
            row = self._row(db, job_id, "outputs, metrics")
            merged_outputs = json.loads(row["outputs"]) | (outputs or {})
            merged_metrics = json.loads(row["metrics"]) | (metrics or {})
            db.execute(
                "UPDATE jobs SET outputs = ?, metrics = ?, updated = ? WHERE id = ?",
                (json.dumps(merged_outputs), json.dumps(merged_metrics), time.time(), job_id),
            )
        return self.get(job_id)

    def advance(self, job_id: str, next_step: str, owner: str | None = None) -> None:
        """Hand the job to a step (the next one, or back to an earlier one): any worker may claim it."""
        with self._db.transaction() as db:
            self._check_owner(db, job_id, owner)
            db.execute(
                "UPDATE jobs SET step = ?, worker = NULL, updated = ? WHERE id = ? AND status = ?",
                (next_step, time.time(), job_id, RUNNING),
            )

    def finish(
        self, job_id: str, status: str, message: str, error: str | None = None, owner: str | None = None
    ) -> Job:
        """End a job with a terminal status and a message for the user (only while `owner`, if given, holds it)."""
        if status not in TERMINAL:
            raise ValueError(f"{status} is not a terminal status")
        now = time.time()
        with self._db.transaction() as db:
            self._check_owner(db, job_id, owner)
            db.execute(
                "UPDATE jobs SET status = ?, message = ?, error = ?, finished = ?, updated = ?, worker = NULL "
                "WHERE id = ?",
                (status, message, error, now, now, job_id),
            )
        return self.get(job_id)

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued job now; ask a running one to stop at its next check."""
        now = time.time()
        with self._db.transaction() as db:
            row = self._row(db, job_id, "status")
            if row["status"] in TERMINAL:
                raise Conflict(f"job {job_id} already ended ({row['status']}); there is nothing to cancel")
            if row["status"] == QUEUED:
                db.execute(
                    "UPDATE jobs SET status = ?, cancel_requested = 1, message = ?, finished = ?, updated = ? WHERE id = ?",
                    (CANCELLED, "cancelled before it started", now, now, job_id),
                )
            else:
                db.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (now, job_id))
        return self.get(job_id)

    def rewind(self, job_id: str, step: str, drop_outputs: tuple[str, ...]) -> None:
        """Point a job back at an earlier step and forget outputs that no longer exist (e.g. a deleted release)."""
        with self._db.transaction() as db:
            row = self._row(db, job_id, "outputs")
            outputs = {k: v for k, v in json.loads(row["outputs"]).items() if k not in drop_outputs}
            db.execute("UPDATE jobs SET step = ?, outputs = ?, updated = ? WHERE id = ?",
                       (step, json.dumps(outputs), time.time(), job_id))

    def requeue(self, job_id: str) -> Job:
        """Run a failed or cancelled job again from the step it stopped at."""
        now = time.time()
        with self._db.transaction() as db:
            row = self._row(db, job_id, "status")
            if row["status"] not in (FAILED, CANCELLED):
                raise Conflict(f"job {job_id} is {row['status']}; only failed or cancelled jobs can be retried")
            db.execute(
                "UPDATE jobs SET status = ?, cancel_requested = 0, message = NULL, error = NULL, finished = NULL, "
                "worker = NULL, attempts = 0, updated = ? WHERE id = ?",
                (QUEUED, now, job_id),
            )
        return self.get(job_id)

    @staticmethod
    def _lost_message(what: str, attempts: int, job_id: str) -> str:
        return (f"the worker running {what} was lost {attempts} times; check the worker log (out of memory? "
                f"killed?) and retry with POST /v1/jobs/{job_id}/retry")

    def recover_lost(
        self, is_lost: Callable[[Job], bool], max_attempts: int
    ) -> tuple[list[Job], list[Job]]:
        """Give running jobs whose worker is lost back to the queue, or fail those that used up their attempts.

        A job no worker holds (queued, or between steps) whose message seems lost (it has
        waited past `is_lost`'s silence) is sent again without counting an attempt: a
        send that failed after the job was queued, or a message the broker dropped,
        would otherwise leave it waiting forever. A message that was only slow is then
        delivered twice, and the second claim finds the job taken. Every change is
        conditional on the record still being as it was read, so a worker that claims the
        job meanwhile keeps it. Returns (to enqueue again, failed).
        """
        resend, failed = [], []
        for job in [*self.list(limit=1000, status=RUNNING), *self.list(limit=1000, status=QUEUED)]:
            if not is_lost(job):
                continue
            unchanged = "WHERE id = ? AND status = ? AND worker IS ? AND updated = ?"
            args = (job.id, job.status, job.worker, job.updated)
            now = time.time()
            with self._db.transaction() as db:
                if job.worker is None:
                    changed = db.execute(f"UPDATE jobs SET updated = ?, heartbeat = ? {unchanged}", (now, now, *args))
                elif job.attempts >= max_attempts:
                    message = self._lost_message(f"step {job.step}", job.attempts, job.id)
                    changed = db.execute(
                        f"UPDATE jobs SET status = ?, message = ?, error = ?, finished = ?, updated = ?, worker = NULL "
                        f"{unchanged}", (FAILED, message, "worker lost", now, now, *args))
                else:
                    changed = db.execute(f"UPDATE jobs SET status = ?, worker = NULL, updated = ? {unchanged}",
                                         (QUEUED, now, *args))
            if changed.rowcount:
                recovered = self.get(job.id)
                (failed if recovered.status == FAILED else resend).append(recovered)
        return resend, failed

    def add_shards(self, job_id: str, sizes: list[int] | tuple[int, ...], owner: str | None = None) -> None:
        """Record the shards of a job's re-embed, all queued (only while `owner`, if given, holds the job)."""
        now = time.time()
        with self._db.transaction() as db:
            self._check_owner(db, job_id, owner)
            db.execute("DELETE FROM shards WHERE job_id = ?", (job_id,))
            db.executemany(
                "INSERT INTO shards(job_id, shard, documents, status, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                [(job_id, shard, size, QUEUED, now, now) for shard, size in enumerate(sizes)],
            )

    def shards(self, job_id: str) -> list[Shard]:
        """The shards of a job's re-embed in corpus order; empty before it is planned and after it is assembled."""
        rows = self._db.query("SELECT * FROM shards WHERE job_id = ? ORDER BY shard", (job_id,))
        return [Shard(**dict(row)) for row in rows]

    def remove_shards(self, job_id: str) -> None:
        with self._db.transaction() as db:
            db.execute("DELETE FROM shards WHERE job_id = ?", (job_id,))

    def claim_shard(self, job_id: str, shard: int, worker: str, stale_after_s: float) -> Shard | None:
        """Take a shard for `worker`; None when the job is not running, the shard is done, or a live worker holds it.

        Every claim is an attempt: the shard is encoded from the start (a matching file on disk is reused).
        """
        now = time.time()
        with self._db.transaction() as db:
            job = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            row = db.execute("SELECT * FROM shards WHERE job_id = ? AND shard = ?", (job_id, shard)).fetchone()
            if job is None or job["status"] != RUNNING or row is None or row["status"] == SHARD_DONE:
                return None
            held = row["worker"] is not None and row["worker"] != worker
            if row["status"] == RUNNING and held and now - (row["heartbeat"] or 0) < stale_after_s:
                return None
            db.execute(
                "UPDATE shards SET status = ?, worker = ?, attempts = attempts + 1, done = 0, heartbeat = ?, "
                "updated = ? WHERE job_id = ? AND shard = ?",
                (RUNNING, worker, now, now, job_id, shard),
            )
            db.execute("UPDATE jobs SET heartbeat = ?, updated = ? WHERE id = ?", (now, now, job_id))
        return self._shard(job_id, shard)

    def _shard(self, job_id: str, shard: int) -> Shard:
        rows = self._db.query("SELECT * FROM shards WHERE job_id = ? AND shard = ?", (job_id, shard))
        if not rows:
            raise NotFound(f"job {job_id!r} has no shard {shard}")
        return Shard(**dict(rows[0]))

    @staticmethod
    def _check_shard_owner(db, job_id: str, shard: int, owner: str) -> None:
        row = db.execute(
            "SELECT 1 FROM shards JOIN jobs ON jobs.id = shards.job_id WHERE shards.job_id = ? AND shard = ? "
            "AND shards.worker = ? AND shards.status = ? AND jobs.status = ?",
            (job_id, shard, owner, RUNNING, RUNNING),
        ).fetchone()
        if row is None:
            raise ClaimLost(f"shard {shard} of job {job_id} is no longer held by {owner} (taken over, or job ended)")

    def holds_shard(self, job_id: str, shard: int, owner: str) -> bool:
        """True while `owner` still holds the shard of a running job."""
        with self._db.reading() as db:
            try:
                self._check_shard_owner(db, job_id, shard, owner)
            except ClaimLost:
                return False
        return True

    def report_shard(self, job_id: str, shard: int, owner: str, done: int | None = None, phase: str = "") -> bool:
        """Heartbeat a held shard and, with `done`, record its progress and the job's over all shards.

        Returns True when cancellation was requested; raises ClaimLost once the shard is not held.
        """
        now = time.time()
        with self._db.transaction() as db:
            self._check_shard_owner(db, job_id, shard, owner)
            if done is None:
                db.execute("UPDATE shards SET heartbeat = ? WHERE job_id = ? AND shard = ?", (now, job_id, shard))
                db.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (now, job_id))
            else:
                db.execute("UPDATE shards SET done = ?, heartbeat = ?, updated = ? WHERE job_id = ? AND shard = ?",
                           (done, now, now, job_id, shard))
                progress = self._shards_progress(db, job_id, phase, now)
                db.execute("UPDATE jobs SET progress = ?, heartbeat = ?, updated = ? WHERE id = ?",
                           (json.dumps(progress), now, now, job_id))
            row = self._row(db, job_id, "cancel_requested")
        return bool(row[0])

    @staticmethod
    def _shards_progress(db, job_id: str, phase: str, now: float) -> dict:
        """The job's progress over its shards: documents encoded of all, an ETA, and shards done, running, retried."""
        row = db.execute(
            "SELECT SUM(done) AS done, SUM(documents) AS total, COUNT(*) AS shards, MIN(created) AS started, "
            "SUM(status = ?) AS finished, SUM(status = ?) AS running, SUM(attempts > 1) AS retried "
            "FROM shards WHERE job_id = ?",
            (SHARD_DONE, RUNNING, job_id),
        ).fetchone()
        done, total = row["done"] or 0, row["total"] or 0
        eta = (now - row["started"]) / done * (total - done) if done else None
        return {"step": "reembed", "phase": phase, "done": done, "total": total,
                "eta_s": round(eta, 1) if eta is not None else None,
                "shards": {"total": row["shards"], "done": row["finished"], "running": row["running"],
                           "retried": row["retried"]}}

    def complete_shard(self, job_id: str, shard: int, owner: str, checksum: str) -> bool:
        """Mark a held shard done with its file's checksum; True for the one completion that leaves none undone.

        The update and the count are one immediate transaction, and transactions on the
        database are serialised, so of several workers finishing shards at once exactly
        one sees zero left: that worker, and only it, goes on to assemble the release.
        """
        now = time.time()
        with self._db.transaction() as db:
            self._check_shard_owner(db, job_id, shard, owner)
            db.execute(
                "UPDATE shards SET status = ?, done = documents, checksum = ?, heartbeat = ?, updated = ? "
                "WHERE job_id = ? AND shard = ?",
                (SHARD_DONE, checksum, now, now, job_id, shard),
            )
            left = db.execute("SELECT COUNT(*) FROM shards WHERE job_id = ? AND status != ?",
                              (job_id, SHARD_DONE)).fetchone()[0]
            db.execute("UPDATE jobs SET heartbeat = ?, updated = ? WHERE id = ?", (now, now, job_id))
        return left == 0

    def recover_lost_shards(
        self, is_lost: Callable[[Shard], bool], max_attempts: int
    ) -> tuple[list[Shard], list[Job]]:
        """Queue again the running shards whose worker is lost, or fail their job once a shard used up its attempts.

        Like `recover_lost`, every change is conditional on the shard being as it was
        read. Returns (shards to send again, jobs failed).
        """
        rows = self._db.query(
            "SELECT shards.* FROM shards JOIN jobs ON jobs.id = shards.job_id "
            "WHERE shards.status = ? AND jobs.status = ?",
            (RUNNING, RUNNING),
        )
        resend, failed = [], []
        for shard in (Shard(**dict(row)) for row in rows):
            if not is_lost(shard):
                continue
            now, exhausted = time.time(), shard.attempts >= max_attempts
            with self._db.transaction() as db:
                unchanged = db.execute(
                    "SELECT 1 FROM shards "
                    "WHERE job_id = ? AND shard = ? AND status = ? AND worker IS ? AND updated = ?",
                    (shard.job_id, shard.shard, RUNNING, shard.worker, shard.updated),
                ).fetchone()
                if unchanged is None:
                    continue
                if exhausted:
                    message = self._lost_message(f"shard {shard.shard} of step reembed", shard.attempts, shard.job_id)
                    changed = db.execute(
                        "UPDATE jobs SET status = ?, message = ?, error = ?, finished = ?, updated = ?, worker = NULL "
                        "WHERE id = ? AND status = ?",
                        (FAILED, message, "worker lost", now, now, shard.job_id, RUNNING),
                    ).rowcount
                else:
                    changed = db.execute(
                        "UPDATE shards SET status = ?, worker = NULL, done = 0, updated = ? WHERE job_id = ? AND shard = ?",
                        (QUEUED, now, shard.job_id, shard.shard),
                    ).rowcount
                    db.execute("UPDATE jobs SET heartbeat = ?, updated = ? WHERE id = ?", (now, now, shard.job_id))
            if changed and exhausted:
                failed.append(self.get(shard.job_id))
            elif changed:
                resend.append(self._shard(shard.job_id, shard.shard))
        return resend, failed
