"""Background jobs on Celery workers: retrain -> re-embed -> evaluate -> promote, one step per task.

Start one with `lockstep worker` (or `python -m workers`); the API enqueues jobs by
task name and never imports this package.
"""

from indexer.openmp_spin import default_spin_count

default_spin_count()  # before torch loads its OpenMP runtime, which reads it once (see indexer.openmp_spin)
