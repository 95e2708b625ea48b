"""Durable job records: what a retrain or re-embed job was asked to do, where it is, and how it ended.

Records live in SQLite in the data dir, so they survive API and worker restarts and
every process sharing the data dir sees the same state. A job runs as a chain of
steps (retrain, reembed, evaluate, promote); each step is *claimed* by one worker in
a transaction, so a message delivered twice (late acks, broker redelivery) runs the
step once, and each step's output (model folder, release id) is recorded before the
next step is enqueued, so a rerun resumes instead of starting over. A worker that
dies leaves its job `running` with a stale heartbeat; `recover_lost` hands such jobs
back to the queue (or fails them after `max_attempts`).
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

    def for_release(self, release_id: str) -> Job | None:
        """The newest job that built `release_id`, if any."""
        rows = self._db.query(
            "SELECT * FROM jobs WHERE json_extract(outputs, '$.release_id') = ? ORDER BY created DESC LIMIT 1",
            (release_id,),
        )
        return _row_to_job(rows[0]) if rows else None

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

    def recover_lost(
        self, is_lost: Callable[[Job], bool], max_attempts: int
    ) -> tuple[list[Job], list[Job]]:
        """Give running jobs whose worker is lost back to the queue, or fail those that used up their attempts.

        A job between steps (no worker holds it) whose next message seems lost is sent
        again without counting an attempt. Every change is conditional on the record
        still being as it was read, so a worker that claims the job meanwhile keeps it.
        Returns (to enqueue again, failed).
        """
        resend, failed = [], []
        for job in self.list(limit=1000, status=RUNNING):
            if not is_lost(job):
                continue
            unchanged = "WHERE id = ? AND status = ? AND worker IS ? AND updated = ?"
            args = (job.id, RUNNING, job.worker, job.updated)
            now = time.time()
            with self._db.transaction() as db:
                if job.worker is None:
                    changed = db.execute(f"UPDATE jobs SET updated = ?, heartbeat = ? {unchanged}", (now, now, *args))
                elif job.attempts >= max_attempts:
                    message = (f"the worker running step {job.step} was lost {job.attempts} times; check the worker "
                               f"log (out of memory? killed?) and retry with POST /v1/jobs/{job.id}/retry")
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
