"""The FastAPI app factory. Heavy objects (corpus, model, index) load in the lifespan, never at import.

A background task polls the active-release pointer and the corpus sequence, so a
release activated by the CLI or another process, and documents written by another
process, reach this one within `poll_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from indexer.corpus_store import CorpusStore
from indexer.release_store import ReleaseStore
from indexer.settings import Settings
from service.deps import ServiceState
from service.http_errors import install_error_handlers
from service.metrics import ServiceMetrics, install_request_metrics
from service.query_batcher import QueryBatcher
from service.release_holder import ReleaseHolder
from service.routes import documents, embeddings, health, search

log = logging.getLogger(__name__)


async def _watch_releases(holder: ReleaseHolder, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await run_in_threadpool(holder.refresh)
        except Exception:
            log.exception("checking for a new active release failed; will retry in %.1fs", interval)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        corpus = CorpusStore(settings.corpus_path)
        releases = ReleaseStore(settings.data_dir)
        holder = ReleaseHolder(releases, corpus, settings.batch_size, settings.rerank_candidates)
        await run_in_threadpool(holder.refresh)
        batcher = QueryBatcher(
            settings.dynamic_batching, settings.batch_wait_ms, settings.max_query_batch, metrics.encoder_batch.observe
        )
        await batcher.start()
        app.state.lockstep = ServiceState(settings, corpus, releases, holder, metrics, batcher)
        watcher = asyncio.create_task(_watch_releases(holder, settings.poll_interval_s))
        try:
            yield
        finally:
            await batcher.stop()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            corpus.close()

    app = FastAPI(
        title="Lockstep",
        version="0.1.0",
        description="Search whose model and index move in lockstep.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_request_metrics(app, metrics)
    for module in (search, embeddings, documents, health):
        app.include_router(module.router)
    return app
