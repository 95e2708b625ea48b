"""`/healthz` (the process is up), `/readyz` (a release is loaded), `/metrics` (Prometheus)."""

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from service.deps import StateDep
from service.http_errors import ERROR_RESPONSES
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: ERROR_RESPONSES[503]})
async def readyz(state: StateDep) -> Health:
    live = state.holder.require()
    return Health(status="ready", release=live.release_id)


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Prometheus text, rendered in the threadpool: the job gauges read SQLite, which may wait on a writer's lock."""
    return await run_in_threadpool(state.metrics.render)
