"""`python -m workers`: one Lockstep worker (what `lockstep worker` and `lockstep up` start).

A worker runs one job step at a time in its own process (the solo pool): training
and encoding already use every core, and a step can then be stopped only by its
own cancellation checks or by killing the process, after which the job is recovered.
"""

from __future__ import annotations

import os
import sys

from indexer.settings import Settings
from indexer.thread_budget import apply_thread_budget
from workers.celery_app import configure


def main(argv: list[str]) -> None:
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    apply_thread_budget()
    app = configure(settings)
    app.worker_main([
        "worker", "--pool=solo", f"--queues={settings.queue}", f"--loglevel={settings.log_level.upper()}",
        "--concurrency=1", f"--hostname=lockstep-{os.getpid()}@%h", "--without-gossip", "--without-mingle", *argv,
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
