"""Background jobs on Celery workers: retrain -> re-embed -> evaluate -> promote, one step per task.

Start one with `lockstep worker` (or `python -m workers`); the API enqueues jobs by
task name and never imports this package.
"""
