"""The FastAPI app factory. Heavy objects (corpus, model, index) load in the lifespan, never at import.

A background task polls the active-release pointer and the corpus sequence, so a
release activated by the CLI, a worker or another process, and documents written by
another process, reach this one within `poll_interval_s`. With a Redis broker the
process also listens for release announcements and switches at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from indexer.corpus_store import CorpusStore
from indexer.job_store import JobStore
from indexer.release_events import listen
from indexer.release_store import ReleaseStore
from indexer.serving_device import resolve_device
from indexer.settings import Settings
from indexer.thread_budget import apply_thread_budget
from service.admin_auth import AdminGate
from service.body_limit import BodySizeLimit
from service.deps import ServiceState
from service.http_errors import install_error_handlers
from service.job_queue import JobQueue
from service.metrics import ServiceMetrics, install_request_metrics
from service.query_batcher import QueryBatcher
from service.release_holder import ReleaseHolder
from service.rerank_gate import RerankGate
from service.request_logging import RequestLoggingMiddleware
from service.routes import admin, console, documents, embeddings, health, jobs, search

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
        apply_thread_budget()
        corpus = CorpusStore(settings.corpus_path)
        releases = ReleaseStore(settings.data_dir)
        device = resolve_device(settings.device)
        holder = ReleaseHolder(releases, corpus, settings.batch_size, settings.rerank_policy(), device)
        await run_in_threadpool(holder.refresh)
        batcher = QueryBatcher(
            settings.dynamic_batching, settings.batch_wait_ms, settings.max_query_batch, metrics.encoder_batch.observe
        )
        await batcher.start()
        job_store, queue = JobStore(settings.jobs_path), JobQueue(settings)
        metrics.watch(holder, job_store)
        app.state.lockstep = ServiceState(
            settings, corpus, releases, holder, metrics, batcher, job_store, queue, RerankGate(settings.max_waiting_reranks)
        )

        async def on_announcement(release_id: str) -> None:
            log.info("release %s was announced; switching", release_id)
            try:
                await run_in_threadpool(holder.refresh)
            except Exception:
                log.exception("switching to announced release %s failed; polling will retry", release_id)

        background = [
            asyncio.create_task(_watch_releases(holder, settings.poll_interval_s)),
            asyncio.create_task(listen(settings, on_announcement)),
        ]
        try:
            yield
        finally:
            await batcher.stop()
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            queue.close()
            job_store.close()
            corpus.close()

    app = FastAPI(
        title="Lockstep",
        version="0.1.0",
        description="Search whose model and index move in lockstep.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(AdminGate, token=settings.admin_token)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
        )
    routers = [module.router for module in (search, embeddings, documents, health, jobs, admin, console)]
    routes = [route for router in routers for route in router.routes]
    install_request_metrics(app, metrics, routes)
    app.add_middleware(RequestLoggingMiddleware, routes=routes)
    for router in routers:
        app.include_router(router)
    return app
