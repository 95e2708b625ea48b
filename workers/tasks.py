"""The job steps as Celery tasks: each parses the job id, runs one step, and enqueues the next.

A job is the chain retrain -> reembed -> evaluate -> promote (a re-embed job starts
at reembed). The step's outputs are in the job store, so each task needs only the
job id. Transient database contention is retried; every other failure is recorded
on the job by the step itself.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass

from celery import signals

from indexer.corpus_store import CorpusStore
from indexer.job_steps import is_lost, run_step
from indexer.job_store import JobStore
from indexer.settings import Settings
from workers.celery_app import app

log = logging.getLogger(__name__)
RECOVER_EVERY_S = 60.0
RETRY = {"autoretry_for": (sqlite3.OperationalError,), "retry_backoff": True, "max_retries": 5}


@dataclass
class WorkerState:
    settings: Settings
    jobs: JobStore
    corpus: CorpusStore


@functools.cache
def worker_state() -> WorkerState:
    """The stores this worker process uses, opened on first use."""
    settings = app.conf.lockstep_settings
    return WorkerState(settings, JobStore(settings.jobs_path), CorpusStore(settings.corpus_path))


def enqueue(job_id: str, step: str) -> None:
    app.send_task(f"lockstep.{step}", args=[job_id])


def _run(job_id: str, step: str) -> None:
    state = worker_state()
    next_step = run_step(state.settings, state.jobs, state.corpus, job_id, step)
    if next_step is not None:
        enqueue(job_id, next_step)


@app.task(name="lockstep.retrain", **RETRY)
def retrain(job_id: str) -> None:
    _run(job_id, "retrain")


@app.task(name="lockstep.reembed", **RETRY)
def reembed(job_id: str) -> None:
    _run(job_id, "reembed")


@app.task(name="lockstep.evaluate", **RETRY)
def evaluate(job_id: str) -> None:
    _run(job_id, "evaluate")


@app.task(name="lockstep.promote", **RETRY)
def promote(job_id: str) -> None:
    _run(job_id, "promote")


def recover_lost_jobs() -> None:
    """Give jobs whose worker died back to the queue (or fail them once they used up their attempts)."""
    state = worker_state()
    stale = state.settings.job_stale_after_s
    resend, failed = state.jobs.recover_lost(lambda job: is_lost(job, stale), state.settings.job_max_attempts)
    for job in resend:
        log.warning("job %s lost its worker or its message at step %s; queueing that step again", job.id, job.step)
        enqueue(job.id, job.step)
    for job in failed:
        log.error("job %s failed: %s", job.id, job.message)


def _recover_periodically(interval: float) -> None:
    while True:
        try:
            recover_lost_jobs()
        except Exception:
            log.exception("recovering lost jobs failed; trying again in %.0fs", interval)
        time.sleep(interval)


@signals.worker_ready.connect
def start_recovery(**_) -> None:
    """Recover lost jobs now and then every quarter of the stale timeout, so no job waits for a worker restart."""
    interval = min(RECOVER_EVERY_S, worker_state().settings.job_stale_after_s / 4)
    threading.Thread(target=_recover_periodically, args=(interval,), name="job-recovery", daemon=True).start()
