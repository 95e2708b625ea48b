"""The Celery app of the workers, configured from Lockstep's settings when a worker starts.

With `LOCKSTEP_BROKER_URL=redis://...` Redis is the broker; with nothing set, a
SQLite file in the data dir is (kombu's SQLAlchemy transport), so `lockstep up`
runs real worker processes on a laptop with no server. Job state lives in the job
store, not in Celery, so no result backend is needed; for the same reason a re-embed's
shards are joined in the job store rather than by a chord (see `indexer/reembed_shards.py`).
Messages are acknowledged after the step ran (`acks_late`) and one at a time per
worker, so a worker that dies does not lose its job; the job store's step and shard
claims make redelivery harmless.
"""

from __future__ import annotations

from celery import Celery

from indexer.settings import Settings

# Redis redelivers an unacknowledged message after this long; steps can run for
# hours, and the job store's claim (not this timeout) decides whether a redelivered
# step runs again.
VISIBILITY_TIMEOUT_S = 24 * 3600

app = Celery("lockstep", include=["workers.tasks"])


def configure(settings: Settings) -> Celery:
    """Point the app at the configured broker and queue."""
    app.conf.update(
        broker_url=settings.broker(),
        broker_connection_retry_on_startup=True,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S} if settings.redis_url() else {},
    )
    app.conf.lockstep_settings = settings
    return app
