"""`/v1/admin`: list releases with their manifests and gate metrics, roll forward, roll back, delete, probe drift;
index metadata fields for filters."""

from __future__ import annotations

import json
from dataclasses import asdict

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from indexer.drift_probe import probe_drift
from indexer.release_events import announce
from indexer.release_store import Pointer
from service.admin_auth import AdminDep
from service.deps import LiveDep, ServiceState, StateDep
from service.http_errors import ADMIN_ERROR_RESPONSES
from service.schemas import (
    DriftProbeOut,
    DriftProbeRequest,
    FieldIndexList,
    FieldIndexOut,
    PointerOut,
    ReleaseList,
    ReleaseOut,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ADMIN_ERROR_RESPONSES)


def _job_summary(state: ServiceState, release_id: str) -> dict | None:
    job = state.jobs.for_release(release_id)
    if job is None:
        return None
    return {"id": job.id, "kind": job.kind, "status": job.status, "message": job.message,
            "gate": job.metrics.get("gate"), "training": job.metrics.get("training")}


def _serving(state: ServiceState) -> str | None:
    live = state.holder.current
    return live.release_id if live else None


def _pointer_out(state: ServiceState, pointer: Pointer) -> PointerOut:
    """The pointer, the release this process serves, and why it serves another than the active one, if it does."""
    return PointerOut(active=pointer.active, history=pointer.history, serving=_serving(state),
                      load_error=state.holder.last_error)


async def _switched(state: ServiceState, pointer: Pointer) -> PointerOut:
    """Tell the other API processes, load the new release here, and report what is served."""
    await run_in_threadpool(announce, state.settings, pointer.active)
    await run_in_threadpool(state.holder.refresh)
    return _pointer_out(state, pointer)


def _release_list(state: ServiceState) -> ReleaseList:
    active = state.releases.active()
    releases = [
        ReleaseOut(release_id=m.release_id, active=m.release_id == active, manifest=json.loads(m.to_json()),
                   job=_job_summary(state, m.release_id))
        for m in reversed(state.releases.list())
    ]
    return ReleaseList(active=active, serving=_serving(state), releases=releases)


@router.get("/releases", response_model=ReleaseList)
async def list_releases(state: StateDep, _: AdminDep) -> ReleaseList:
    return await run_in_threadpool(_release_list, state)


@router.post("/releases/{release_id}/activate", response_model=PointerOut)
async def activate(release_id: str, state: StateDep, _: AdminDep) -> PointerOut:
    """Make a release live (also one the gate rejected); the previous one becomes the rollback target."""
    return await _switched(state, await run_in_threadpool(state.releases.activate, release_id))


@router.post("/rollback", response_model=PointerOut)
async def rollback(state: StateDep, _: AdminDep) -> PointerOut:
    """Re-activate the release that was live before the current one."""
    return await _switched(state, await run_in_threadpool(state.releases.rollback))


@router.delete("/releases/{release_id}", response_model=PointerOut)
async def delete(release_id: str, state: StateDep, _: AdminDep) -> PointerOut:
    """Delete a release that is not active (409 for the active one)."""
    await run_in_threadpool(state.releases.delete, release_id)
    pointer = await run_in_threadpool(state.releases.pointer)
    return _pointer_out(state, pointer)


@router.post("/drift-probe", response_model=DriftProbeOut)
async def drift_probe(body: DriftProbeRequest, live: LiveDep, state: StateDep, _: AdminDep) -> DriftProbeOut:
    """Re-encode a sample of the live release's documents with its model and compare with the stored vectors."""
    report = await run_in_threadpool(probe_drift, live, state.corpus, body.sample, body.threshold, body.seed)
    return DriftProbeOut(**asdict(report))


def _field_indexes(state: ServiceState) -> FieldIndexList:
    return FieldIndexList(fields=[FieldIndexOut(field=f, values=n) for f, n in state.corpus.indexed_fields().items()])


@router.get("/field-indexes", response_model=FieldIndexList)
async def list_field_indexes(state: StateDep, _: AdminDep) -> FieldIndexList:
    return await run_in_threadpool(_field_indexes, state)


@router.put("/field-indexes/{field}", response_model=FieldIndexOut)
async def add_field_index(field: str, state: StateDep, _: AdminDep) -> FieldIndexOut:
    """Index a metadata field (a dotted path), filled from the corpus before this answers; indexing twice is a
    no-op."""
    return FieldIndexOut(field=field, values=await run_in_threadpool(state.corpus.index_field, field))


@router.delete("/field-indexes/{field}", response_model=FieldIndexList)
async def drop_field_index(field: str, state: StateDep, _: AdminDep) -> FieldIndexList:
    await run_in_threadpool(state.corpus.drop_field_index, field)
    return await run_in_threadpool(_field_indexes, state)
