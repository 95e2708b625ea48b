"""Prometheus metrics of one app instance (own registry, so test apps do not collide).

Requests are counted and timed per route template (`/v1/jobs/{job_id}`, never the raw
path), errors counted by status, and the encoder's batch sizes recorded, as they happen.
Everything else is read at scrape time: the served release and its index size from the
release holder, and what lives in other processes' hands (the job records the workers
update): jobs by status, and the progress, ETA and training loss of each running job.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from indexer.job_store import RUNNING

if TYPE_CHECKING:
    from indexer.job_store import JobStore
    from service.release_holder import ReleaseHolder

log = logging.getLogger(__name__)

RUNNING_JOBS_LISTED = 1000
_CONVERTER = re.compile(r"{(\w+):\w+}")


class _ScrapeTimeCollector(Collector):
    """Release info and job gauges read from the release holder and the job store when Prometheus scrapes."""

    def __init__(self) -> None:
        self.holder: ReleaseHolder | None = None
        self.jobs: JobStore | None = None

    def collect(self) -> Iterator[Metric]:
        if self.holder is not None:
            yield from self._release_metrics()
        if self.jobs is not None:
            try:
                counts, running = self.jobs.counts(), self.jobs.list(RUNNING_JOBS_LISTED, RUNNING)
            except sqlite3.Error:
                log.exception("reading the job store for /metrics failed; job metrics are left out of this scrape")
                return
            yield from self._job_metrics(counts, running)

    def _release_metrics(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "lockstep_release_info", "1 for the release this process serves, labelled with its model and index",
            labels=["release", "model", "fingerprint", "precision", "runtime", "index_type"],
        )
        active = GaugeMetricFamily("lockstep_active_release", "1 for the release this process serves", labels=["release"])
        live = self.holder.current
        if live is not None:
            manifest = live.manifest
            info.add_metric([manifest.release_id, manifest.model.name, manifest.model.fingerprint,
                             manifest.precision, manifest.runtime, manifest.index_type], 1)
            active.add_metric([manifest.release_id], 1)
        documents = GaugeMetricFamily("lockstep_index_documents", "Documents in the live index",
                                      value=len(live.index) if live is not None else 0)
        yield from (info, active, documents)

    @staticmethod
    def _job_metrics(counts: dict[str, int], running) -> Iterator[Metric]:
        by_status = GaugeMetricFamily("lockstep_jobs", "Job records by status", labels=["status"])
        for status, count in counts.items():
            by_status.add_metric([status], count)
        yield by_status
        progress = GaugeMetricFamily(
            "lockstep_job_progress_ratio", "Done/total of the running phase of each running job",
            labels=["job", "kind", "step", "phase"],
        )
        eta = GaugeMetricFamily("lockstep_job_eta_seconds", "Estimated seconds left in the running phase",
                                labels=["job", "kind", "step"])
        loss = GaugeMetricFamily("lockstep_training_loss", "Last training loss of each running retrain job",
                                 labels=["job"])
        for job in running:
            report = job.progress
            if not report.get("total"):
                continue
            step = report.get("step", job.step)
            progress.add_metric([job.id, job.kind, step, report.get("phase", "")], report["done"] / report["total"])
            if report.get("eta_s") is not None:
                eta.add_metric([job.id, job.kind, step], report["eta_s"])
            if (report.get("metrics") or {}).get("loss") is not None:
                loss.add_metric([job.id], report["metrics"]["loss"])
        yield from (progress, eta, loss)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lockstep_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.errors = Counter(
            "lockstep_http_errors", "HTTP responses with a 4xx or 5xx status", ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lockstep_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.encoder_batch = Histogram(
            "lockstep_encoder_batch_texts",
            "Query texts per encoder call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self._scraped = _ScrapeTimeCollector()
        self.registry.register(self._scraped)

    def watch(self, holder: ReleaseHolder, jobs: JobStore) -> None:
        """Report the served release's details and the job records at each scrape."""
        self._scraped.holder, self._scraped.jobs = holder, jobs

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count and time one request by route template."""
        self.requests.labels(method, route, str(status)).inc()
        if status >= 400:
            self.errors.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The request method as a label, `OTHER` for anything else: the server accepts any token as a method, and
    one label value per invented method would grow the metrics without bound."""
    return method if method in HTTP_METHODS else "OTHER"


def route_template(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The path template of the route that handled a request (`/v1/jobs/{job_id}`), or `unmatched`.

    A request refused before routing (401, 403, 413 from the middleware) is labelled with
    the first of `routes` that matches it fully. Path converters are left out
    (`{doc_id:path}` reads `{doc_id}`), so a label does not change with them.
    """
    route = scope.get("route") or next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return _CONVERTER.sub(r"{\1}", getattr(route, "path", "unmatched"))


def install_request_metrics(app: FastAPI, metrics: ServiceMetrics, routes: Sequence[BaseRoute] = ()) -> None:
    """Count and time every request; install it after the middleware that refuses requests (the admin gate, the
    body limit), so that it wraps them and their refusals are counted too, under the first of `routes` to match."""

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        started, status = time.perf_counter(), 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.observe(method_label(request.method), route_template(request.scope, routes), status,
                            time.perf_counter() - started)
