"""Prometheus `/metrics` after real requests, request ids, and JSON access logs from a real uvicorn process."""

import json
import logging
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from indexer.corpus_store import CorpusStore
from indexer.job_store import JobStore
from indexer.release_builder import BuildOptions, build_release
from indexer.settings import Settings
from service.app import create_app
from service.request_logging import request_id
from tests.conftest import SAMPLE_DOCS
from tests.processes import free_port, lockstep_env, stop, wait_ready


@pytest.fixture
def built(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    return build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)


@pytest.fixture
def client(data_dir, built):
    with TestClient(create_app(Settings(data_dir=data_dir, poll_interval_s=0.1))) as client:
        yield client


def _scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics keyed by (name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_requests_errors_and_latency_are_counted_per_route_template(client):
    assert client.post("/v1/search", json={"query": "apple", "k": 2}).status_code == 200
    assert client.post("/v1/search", json={"query": "cells"}).status_code == 200
    assert client.post("/v1/search", json={"query": "  "}).status_code == 400
    assert client.get("/v1/documents/no-such-document").status_code == 404
    assert client.get("/no/such/route").status_code == 404
    samples = _scrape(client)
    assert _value(samples, "lockstep_http_requests_total", method="POST", route="/v1/search", status="200") == 2
    assert _value(samples, "lockstep_http_requests_total", method="GET", route="/v1/documents/{doc_id}", status="404") == 1
    assert _value(samples, "lockstep_http_errors_total", method="POST", route="/v1/search", status="400") == 1
    assert _value(samples, "lockstep_http_errors_total", method="GET", route="/v1/documents/{doc_id}", status="404") == 1
    assert _value(samples, "lockstep_http_errors_total", method="GET", route="unmatched", status="404") == 1
    assert _value(samples, "lockstep_http_errors_total", method="POST", route="/v1/search", status="200") is None
    assert _value(samples, "lockstep_http_request_seconds_count", method="POST", route="/v1/search") == 3
    assert _value(samples, "lockstep_http_request_seconds_bucket", method="POST", route="/v1/search", le="+Inf") == 3
    assert not any("no-such-document" in dict(labels).get("route", "") for _, labels in samples)
    assert _value(samples, "lockstep_encoder_batch_texts_count") >= 1


def test_the_served_release_and_its_index_size(client, built):
    samples = _scrape(client)
    assert _value(samples, "lockstep_active_release", release=built.release_id) == 1
    assert _value(samples, "lockstep_index_documents") == len(SAMPLE_DOCS)
    info = {"release": built.release_id, "model": built.model.name, "fingerprint": built.model.fingerprint,
            "precision": "fp32", "runtime": "torch", "index_type": "Flat"}
    assert _value(samples, "lockstep_release_info", **info) == 1
    client.put("/v1/documents", json={"documents": [{"id": "extra", "text": "green apple"}]})
    assert _value(_scrape(client), "lockstep_index_documents") == len(SAMPLE_DOCS) + 1


def test_jobs_by_status_and_training_progress_are_read_at_scrape_time(client, data_dir):
    store = JobStore(data_dir / "jobs.sqlite3")
    try:
        queued = store.create("reembed", {})
        running = store.create("retrain", {"recipe": "quick"})
        samples = _scrape(client)
        assert _value(samples, "lockstep_jobs", status="queued") == 2
        assert _value(samples, "lockstep_jobs", status="running") == 0
        assert not [key for key in samples if key[0] == "lockstep_job_progress_ratio"]
        store.claim(running.id, "retrain", "test-worker", 300)
        store.report(running.id, {"step": "retrain", "phase": "retrain: in-batch", "done": 6, "total": 24,
                                  "eta_s": 12.5, "metrics": {"loss": 0.75}})
        store.request_cancel(queued.id)
        samples = _scrape(client)
    finally:
        store.close()
    assert {status: _value(samples, "lockstep_jobs", status=status) for status in ("queued", "running", "cancelled")} == {
        "queued": 0, "running": 1, "cancelled": 1}
    labels = {"job": running.id, "kind": "retrain", "step": "retrain"}
    assert _value(samples, "lockstep_job_progress_ratio", phase="retrain: in-batch", **labels) == 0.25
    assert _value(samples, "lockstep_job_eta_seconds", **labels) == 12.5
    assert _value(samples, "lockstep_training_loss", job=running.id) == 0.75


def test_every_response_carries_a_request_id(client):
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32 and generated != client.get("/healthz").headers["x-request-id"]
    assert client.get("/healthz", headers={"X-Request-ID": "trace-42.a"}).headers["x-request-id"] == "trace-42.a"
    replaced = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert replaced != "bad id\twith spaces" and len(replaced) == 32
    assert client.post("/v1/search", json={"query": ""}).headers["x-request-id"]


def test_refusals_before_routing_are_counted_under_their_route(data_dir, built):
    """Guards against the admin gate's 401/403 and the body limit's 413 bypassing the request metrics (they answer
    before the metrics middleware used to see the request)."""
    settings = Settings(data_dir=data_dir, poll_interval_s=0.1, admin_token="s3cret", max_request_bytes=1024)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/jobs").status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.post("/v1/search", json={"query": "x" * 4096}).status_code == 413
        samples = _scrape(client)
    assert _value(samples, "lockstep_http_errors_total", method="GET", route="/v1/jobs", status="401") == 1
    assert _value(samples, "lockstep_http_errors_total", method="GET", route="/v1/jobs", status="403") == 1
    assert _value(samples, "lockstep_http_errors_total", method="POST", route="/v1/search", status="413") == 1


def test_an_unexpected_error_is_a_500_that_keeps_the_request_id(client, monkeypatch):
    """Guards against the 500 losing `X-Request-ID`, and its logged traceback the request's id: the generic handler
    used to run outside the middleware that sets both."""
    seen = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append((record.getMessage(), request_id.get(), record.exc_info is not None))

    def broken(self, doc_id):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(CorpusStore, "get", broken)
    handler = Capture()
    logging.getLogger("service.http_errors").addHandler(handler)
    try:
        with TestClient(client.app, raise_server_exceptions=False) as plain:
            reply = plain.get("/v1/documents/d1", headers={"X-Request-ID": "trace-500"})
    finally:
        logging.getLogger("service.http_errors").removeHandler(handler)
    assert reply.status_code == 500 and reply.headers["x-request-id"] == "trace-500"
    assert reply.json() == {"error": "internal error (RuntimeError); see the server log", "error_type": "internal"}
    assert ("unhandled error on GET /v1/documents/d1", "trace-500", True) in seen


SERVE_WITH_JSON_LOGS = """
import sys
from service.app import create_app
from service.request_logging import request_id
from service.request_logging import run_with_json_logs
run_with_json_logs(create_app(), "127.0.0.1", int(sys.argv[1]), "info")
"""


@pytest.mark.integration
def test_a_real_server_logs_json_lines_with_the_request_id(data_dir, built, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-c", SERVE_WITH_JSON_LOGS, str(port)],
                                  env=lockstep_env(data_dir), stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base, log=log)
        reply = httpx.post(f"{base}/v1/search", json={"query": "apple", "k": 1}, headers={"X-Request-ID": "trace-42"})
        assert reply.status_code == 200 and reply.headers["x-request-id"] == "trace-42"
        httpx.get(f"{base}/v1/documents/missing")
    finally:
        stop(server)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "lockstep.access"]
    search = next(line for line in access if line["request_id"] == "trace-42")
    assert search["route"] == "/v1/search" and search["status"] == 200 and search["method"] == "POST"
    assert search["level"] == "info" and search["duration_ms"] > 0 and search["time"].endswith("+00:00")
    missing = next(line for line in access if line["path"] == "/v1/documents/missing")
    assert missing["status"] == 404 and missing["route"] == "/v1/documents/{doc_id}" and len(missing["request_id"]) == 32
    assert any(line["logger"] == "uvicorn.error" and "startup complete" in line["message"] for line in lines)
