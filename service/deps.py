"""Request dependencies: the service's state and the live release, as typed aliases.

They only read attributes and never block, so they are `async def`: FastAPI runs a plain
`def` dependency in the threadpool, a hop per dependency per request for nothing.
"""

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
from service.rerank_gate import RerankGate


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
    rerank_gate: RerankGate


async def get_state(request: Request) -> ServiceState:
    """The objects the lifespan built for this app."""
    return request.app.state.lockstep


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_live(state: StateDep) -> LiveRelease:
    """The release this request is served by, taken once so the whole request uses one release."""
    return state.holder.require()


LiveDep = Annotated[LiveRelease, Depends(get_live)]
