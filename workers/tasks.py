"""The job steps as Celery tasks: each parses the job id, runs one step, and enqueues what comes next.

A job is the chain retrain -> reembed -> evaluate -> promote (a re-embed job starts
at reembed). The step's outputs are in the job store, so each task needs only the
job id. The reembed step fans out as a Celery group of `lockstep.embed_shard` tasks,
one per shard, over every worker; the worker that finishes the last shard (the job
store says which, so no result backend or chord is needed) sends `lockstep.reembed`
again to assemble the release. Brief database contention is absorbed by SQLite's busy
timeout (30 s); a task whose claim, or whose recording of a finished step or shard,
still finds the job store failing (`sqlite3.OperationalError`, or `Busy` when another
process held its write lock for the whole timeout) is retried with backoff,
up to 5 times, which is safe because steps and shards are idempotent. A failure inside
a step or shard, a database error included, is not retried: the step records it on the
job.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass

from celery import group, signals

from indexer.corpus_store import CorpusStore
from indexer.job_steps import Dispatch, recover_lost_work, run_step
from indexer.job_store import JobStore
from indexer.reembed_shards import run_shard
from indexer.settings import Settings
from training.errors import Busy
from workers.celery_app import app

log = logging.getLogger(__name__)
RECOVER_EVERY_S = 60.0
RETRY = {"autoretry_for": (sqlite3.OperationalError, Busy), "retry_backoff": True, "max_retries": 5}


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


def send(job_id: str, dispatch: Dispatch) -> None:
    """Enqueue what finished work asks for: shards to encode, as one group any worker takes from, and a next step."""
    if dispatch.shards:
        group(embed_shard.si(job_id, shard) for shard in dispatch.shards).apply_async()
    if dispatch.step is not None:
        enqueue(job_id, dispatch.step)


def _run(job_id: str, step: str) -> None:
    state = worker_state()
    send(job_id, run_step(state.settings, state.jobs, state.corpus, job_id, step))


@app.task(name="lockstep.retrain", **RETRY)
def retrain(job_id: str) -> None:
    _run(job_id, "retrain")


@app.task(name="lockstep.reembed", **RETRY)
def reembed(job_id: str) -> None:
    _run(job_id, "reembed")


@app.task(name="lockstep.embed_shard", **RETRY)
def embed_shard(job_id: str, shard: int) -> None:
    state = worker_state()
    send(job_id, run_shard(state.settings, state.jobs, job_id, int(shard)))


@app.task(name="lockstep.evaluate", **RETRY)
def evaluate(job_id: str) -> None:
    _run(job_id, "evaluate")


@app.task(name="lockstep.promote", **RETRY)
def promote(job_id: str) -> None:
    _run(job_id, "promote")


def recover_lost_jobs() -> None:
    """Give steps and shards whose worker died back to the queue (or fail jobs that used up their attempts)."""
    state = worker_state()
    recovery = recover_lost_work(state.settings, state.jobs)
    for job_id, dispatch in recovery.resend:
        log.warning("job %s lost a worker or a message; sending again: %s", job_id, dispatch)
        send(job_id, dispatch)
    for job in recovery.failed:
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
