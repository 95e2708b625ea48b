"""One shard of a job's re-embed on a worker: claim it, encode it with heartbeats, progress and cancellation, record it.

The reembed step hands its job to shards that any number of workers encode at once,
and something must notice when the last one is done. A Celery chord would, but a
chord needs a result backend and Lockstep runs without one: job state lives in the
durable job store, workers acknowledge late and prefetch one message, and the default
broker is a SQLite file. So each finished shard is recorded in the job store, and the
one transaction that marks the last shard done says so to its worker
(`JobStore.complete_shard`); that worker, and only it, sends the reembed step again,
which assembles the release. A redelivered shard finds itself done (or its file
already written) and redoes nothing; a shard whose worker dies is queued again by
recovery, which costs that shard alone. Nothing here knows about Celery.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from indexer.embedding_shards import encode_shard
from indexer.job_steps import (
    REPORT_EVERY_S, SHARDS_DIR, Dispatch, JobCancelled, end_job, heartbeating, job_folder, worker_identity,
)
from indexer.job_store import ClaimLost, JobStore
from indexer.release_store import ReleaseStore
from indexer.serving_device import resolve_device
from indexer.settings import Settings

log = logging.getLogger(__name__)

STEP = "reembed"
ENCODE_PHASE = f"{STEP}: encode"


@dataclass
class ShardProgress:
    """Reports a held shard's progress (throttled) into the job; raises JobCancelled once cancellation is requested."""

    store: JobStore
    job_id: str
    shard: int
    owner: str
    _last_report: float = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_report < REPORT_EVERY_S and done < total:
            return
        self._last_report = now
        if self.store.report_shard(self.job_id, self.shard, self.owner, done, ENCODE_PHASE):
            raise JobCancelled(f"job {self.job_id} was cancelled during {ENCODE_PHASE}")


def run_shard(settings: Settings, store: JobStore, job_id: str, shard: int) -> Dispatch:
    """Encode one shard of a job's re-embed if this worker can claim it; returns the reembed step after the last one."""
    owner = worker_identity()
    claimed = store.claim_shard(job_id, shard, owner, settings.job_stale_after_s)
    if claimed is None:
        log.info("job %s shard %d: nothing to do (done, job ended, or held by another worker)", job_id, shard)
        return Dispatch()
    log.info("job %s: shard %d of %s started (attempt %d)", job_id, shard, STEP, claimed.attempts)
    progress = ShardProgress(store, job_id, shard, owner)
    try:
        with heartbeating(lambda: store.report_shard(job_id, shard, owner), f"job {job_id} shard {shard}"):
            if store.report_shard(job_id, shard, owner):
                raise JobCancelled(f"job {job_id} was cancelled before shard {shard} started")
            encoded = encode_shard(settings.data_dir, job_folder(settings.data_dir, job_id) / SHARDS_DIR, shard,
                                   settings.batch_size, progress, device=resolve_device(settings.device))
    except ClaimLost as exc:
        log.warning("%s; dropping this worker's work on it", exc)
        return Dispatch()
    except Exception as exc:
        end_job(store, ReleaseStore(settings.data_dir), job_id, f"{STEP} (shard {shard})", exc,
                lambda: store.holds_shard(job_id, shard, owner))
        return Dispatch()
    try:
        last = store.complete_shard(job_id, shard, owner, encoded.checksum)
    except ClaimLost as exc:
        log.warning("%s; dropping this worker's result of shard %d", exc, shard)
        return Dispatch()
    log.info("job %s: shard %d %s%s", job_id, shard, "was already on disk" if encoded.reused else "encoded",
             "; it was the last, assembling next" if last else "")
    return Dispatch(step=STEP) if last else Dispatch()
