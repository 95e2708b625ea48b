"""Sending job steps to the workers by task name, through the configured broker.

The API only knows task names (`lockstep.<step>`), never the worker code; the
broker is the same one the workers read (Redis, or the SQLite file of the
embedded default).
"""

from __future__ import annotations

from celery import Celery

from indexer.settings import Settings

SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


class JobQueue:
    """A Celery client that can only send."""

    def __init__(self, settings: Settings) -> None:
        self.queue = settings.queue
        self._app = Celery("lockstep-api", broker=settings.broker(), set_as_current=False)
        self._app.conf.update(task_ignore_result=True, broker_connection_retry_on_startup=False)

    def enqueue(self, job_id: str, step: str) -> None:
        self._app.send_task(f"lockstep.{step}", args=[job_id], queue=self.queue, retry=True,
                            retry_policy=SEND_RETRY_POLICY)

    def close(self) -> None:
        self._app.close()
