"""`/v1/jobs`: start retrain and re-embed jobs, follow them and their training reports, cancel, retry (admin token)."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from indexer.job_report import job_report
from indexer.job_steps import cancel_job
from indexer.job_store import Job
from indexer.job_submission import retry_job, submit_job
from service.admin_auth import AdminDep
from service.deps import StateDep
from service.http_errors import ADMIN_ERROR_RESPONSES
from service.schemas import (
    JobList, JobOut, RecipeList, RecipeOut, ReembedRequest, RetrainRequest, TrainingReportOut,
)
from training.recipe import named_recipe, shipped_recipes

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ADMIN_ERROR_RESPONSES)


def _iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds") if timestamp else None


def job_out(job: Job) -> JobOut:
    data = job.as_dict()
    for key in ("created", "started", "updated", "finished"):
        data[key] = _iso(data[key])
    return JobOut(**data)


async def _submit(state, kind: str, params: dict) -> JobOut:
    live = state.holder.current
    settings = state.settings
    roots = [settings.data_dir, *settings.training_roots]
    job = await run_in_threadpool(submit_job, state.jobs, state.queue.enqueue, settings.data_dir, kind, params,
                                  live.manifest.dim if live else None, roots, settings.model_path())
    return job_out(job)


@router.post("/retrain", status_code=202, response_model=JobOut)
async def retrain(body: RetrainRequest, state: StateDep, _: AdminDep) -> JobOut:
    """Fine-tune the live model, re-embed the corpus, gate the candidate and promote it."""
    return await _submit(state, "retrain", body.model_dump())


@router.post("/reembed", status_code=202, response_model=JobOut)
async def reembed(body: ReembedRequest, state: StateDep, _: AdminDep) -> JobOut:
    """Re-embed the current corpus with a model (default: the live one), gate it and promote it."""
    return await _submit(state, "reembed", body.model_dump())


@router.get("", response_model=JobList)
async def list_jobs(
    state: StateDep,
    _: AdminDep,
    status: str | None = Query(None, description="Only jobs with this status"),
    limit: int = Query(50, ge=1, le=1000),
) -> JobList:
    return JobList(jobs=[job_out(job) for job in await run_in_threadpool(state.jobs.list, limit, status)])


@router.get("/recipes", response_model=RecipeList)
def recipes(_: AdminDep) -> RecipeList:
    """The shipped recipes a retrain job may name, with their stages."""
    return RecipeList(recipes=[RecipeOut(name=name, stages=[stage.name for stage in named_recipe(name).stages])
                               for name in shipped_recipes()])


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, state: StateDep, _: AdminDep) -> JobOut:
    return job_out(await run_in_threadpool(state.jobs.get, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel(job_id: str, state: StateDep, _: AdminDep) -> JobOut:
    """Cancel a queued job at once, or ask a running one to stop; whatever it built is removed."""
    return job_out(await run_in_threadpool(cancel_job, state.jobs, state.releases, job_id))


@router.post("/{job_id}/retry", status_code=202, response_model=JobOut)
async def retry(job_id: str, state: StateDep, _: AdminDep) -> JobOut:
    """Run a failed or cancelled job again from the step it stopped at."""
    return job_out(await run_in_threadpool(retry_job, state.jobs, state.queue.enqueue, job_id))


@router.get("/{job_id}/report", response_model=TrainingReportOut)
async def report(job_id: str, state: StateDep, _: AdminDep) -> TrainingReportOut:
    """A retrain job's training curves and failure-mode diagnostics so far, with thresholds, alerts and remedies."""
    job, run = await run_in_threadpool(job_report, state.jobs, state.settings.data_dir, job_id)
    return TrainingReportOut(job=job.id, status=job.status, **asdict(run))
