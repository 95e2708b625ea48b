"""Prometheus metrics of one app instance (own registry, so test apps do not collide)."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lockstep_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "lockstep_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.active_release = Gauge(
            "lockstep_active_release", "1 for the release this process serves", ["release"], registry=self.registry
        )
        self.encoder_batch = Histogram(
            "lockstep_encoder_batch_texts",
            "Query texts per encoder call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.index_documents = Gauge("lockstep_index_documents", "Documents in the live index", registry=self.registry)

    def set_release(self, release_id: str | None, documents: int) -> None:
        self.active_release.clear()
        if release_id is not None:
            self.active_release.labels(release=release_id).set(1)
        self.index_documents.set(documents)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def install_request_metrics(app: FastAPI, metrics: ServiceMetrics) -> None:
    @app.middleware("http")
    async def _observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(request.method, route, str(response.status_code)).inc()
        metrics.latency.labels(request.method, route).observe(time.perf_counter() - started)
        return response
