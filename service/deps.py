"""Request dependencies: the service's state and the live release, as typed aliases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from indexer.corpus_store import CorpusStore
from indexer.job_store import JobStore
from indexer.live_release import LiveRelease
from indexer.release_store import ReleaseStore
from indexer.settings import Settings
from service.job_queue import JobQueue
from service.metrics import ServiceMetrics
from service.query_batcher import QueryBatcher
from service.release_holder import ReleaseHolder


@dataclass
class ServiceState:
    """Everything the lifespan builds, shared by the routes of one app."""

    settings: Settings
    corpus: CorpusStore
    releases: ReleaseStore
    holder: ReleaseHolder
    metrics: ServiceMetrics
    batcher: QueryBatcher
    jobs: JobStore
    queue: JobQueue


def get_state(request: Request) -> ServiceState:
    return request.app.state.lockstep


def get_live(request: Request) -> LiveRelease:
    """The release this request is served by, taken once so the whole request uses one release."""
    return get_state(request).holder.require()


StateDep = Annotated[ServiceState, Depends(get_state)]
LiveDep = Annotated[LiveRelease, Depends(get_live)]
