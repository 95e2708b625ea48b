"""The training report of a retrain job: chart data from the run directory its retrain step writes.

The report is read while the job runs too (curves grow as training logs), with the
thresholds of the job's own recipe, so an alert's line is drawn where it fires.
"""

from __future__ import annotations

from pathlib import Path

from indexer.job_steps import RUN_DIR, job_folder, job_recipe
from indexer.job_store import Job, JobStore
from training.errors import NotFound
from training.report import RunReport, run_report

MAX_POINTS = 400


def job_run_dir(data_dir: Path, job: Job) -> Path:
    """Where a retrain job's training run logs its metrics."""
    return job_folder(Path(data_dir), job.id) / RUN_DIR


def job_report(store: JobStore, data_dir: Path, job_id: str, max_points: int = MAX_POINTS) -> tuple[Job, RunReport]:
    """The job and its run's report so far; NotFound for a job that trains nothing."""
    job = store.get(job_id)
    if job.kind != "retrain":
        raise NotFound(f"job {job_id} is a {job.kind} job: it trains no model, so it has no training report")
    return job, run_report(job_run_dir(data_dir, job), job_recipe(job.params).diagnostics, max_points)
