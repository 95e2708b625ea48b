"""The public edge: oversized bodies, unauthenticated admin calls, CORS, weak tokens, refused releases, secrets in logs."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from indexer.release_builder import BuildOptions, build_release
from indexer.settings import Settings
from service.admin_auth import check_exposure, is_weak_token
from service.app import create_app
from service.release_holder import ReleaseHolder
from tests.conftest import SAMPLE_DOCS
from tests.processes import start_server, stop
from training.errors import InvalidInput

TOKEN = "k9Zq-3vT8wLm2RxYp7Hs"


@pytest.fixture
def built(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    return build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)


def _client(data_dir, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir, poll_interval_s=0.1, admin_token=TOKEN, **settings)))


def test_a_body_over_the_limit_is_refused_with_413_and_nothing_is_written(data_dir, built):
    documents = [{"id": f"big-{i}", "text": "x" * 1000} for i in range(5)]
    with _client(data_dir, max_request_bytes=2048) as client:
        declared = client.put("/v1/documents", json={"documents": documents})
        streamed = client.put("/v1/documents", content=iter([json.dumps({"documents": documents}).encode()]),
                              headers={"content-type": "application/json"})
        small = client.put("/v1/documents", json={"documents": [{"id": "small", "text": "fits"}]})
        missing = client.get("/v1/documents/big-0")
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["error_type"] == "too_large" and "LOCKSTEP_MAX_REQUEST_BYTES" in response.json()["error"]
    assert small.status_code == 200 and missing.status_code == 404


def test_a_client_leaving_mid_upload_never_reaches_the_route(data_dir, caplog):
    """Guards against a body cut short by a disconnect being handed to the route as if whole (a truncated upload
    that happened to parse would be applied for a client that is gone), and against the middleware around the
    body limit taking its silence for a server error (a logged 500 and a false 5xx count)."""
    app = create_app(Settings(data_dir=data_dir))
    messages = iter([{"type": "http.request", "body": b'{"documents": []}', "more_body": True},
                     {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "PUT", "path": "/v1/documents", "raw_path": b"/v1/documents", "root_path": "",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "scheme": "http",
             "http_version": "1.1", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 400 and b"client_closed" in sent[1]["body"]
    assert "unhandled error" not in caplog.text and not any(r.levelno >= logging.ERROR for r in caplog.records)
    assert any(getattr(r, "status", None) == 400 for r in caplog.records if r.name == "lockstep.access")


def test_the_token_is_checked_before_the_body_is_parsed(data_dir, built):
    with _client(data_dir) as client:
        malformed = client.post("/v1/jobs/retrain", content=b"{not json", headers={"content-type": "application/json"})
        wrong = client.post("/v1/jobs/retrain", content=b"{not json",
                            headers={"content-type": "application/json", "Authorization": "Bearer nope"})
        authorised = client.post("/v1/jobs/retrain", content=b"{not json",
                                 headers={"content-type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert malformed.status_code == 401 and malformed.headers["www-authenticate"] == "Bearer"
    assert malformed.json()["error_type"] == "unauthorized"
    assert wrong.status_code == 403 and wrong.json() == {"error": "the admin token is wrong", "error_type": "forbidden"}
    assert authorised.status_code == 422


def test_cors_is_closed_by_default_and_opens_only_to_configured_origins(data_dir, built):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    with _client(data_dir) as client:
        closed = client.options("/v1/search", headers=preflight)
        simple = client.post("/v1/search", json={"query": "apple"}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in closed.headers
    assert "access-control-allow-origin" not in simple.headers
    with _client(data_dir, cors_origins=["https://app.example"]) as client:
        allowed = client.options("/v1/search", headers=preflight | {"Origin": "https://app.example"})
        refused = client.options("/v1/search", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize("token", ["", "short-token", "changeme-changeme-changeme", "aaaaaaaaaaaaaaaaaaaaaaaa",
                                   "my-lockstep-password-2026", "replace-with-a-long-random-string"])
def test_a_public_bind_refuses_missing_weak_and_placeholder_tokens(token):
    with pytest.raises(InvalidInput, match="LOCKSTEP_ADMIN_TOKEN"):
        check_exposure("0.0.0.0", SecretStr(token))
    check_exposure("127.0.0.1", SecretStr(token))


def test_a_random_token_is_accepted_on_a_public_bind():
    assert not is_weak_token(TOKEN)
    check_exposure("0.0.0.0", SecretStr(TOKEN))


def test_a_refused_release_is_not_reloaded_at_every_poll(corpus, releases, built, tiny_model_dir, caplog):
    holder = ReleaseHolder(releases, corpus)
    holder.refresh()
    broken = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir))
    releases.activate(broken.release_id)
    (releases.path(broken.release_id) / "ids.json").write_text("{}")
    with caplog.at_level(logging.ERROR, logger="service.release_holder"):
        for _ in range(5):
            assert holder.refresh() is False
    refusals = [record for record in caplog.records if "could not be loaded" in record.getMessage()]
    assert len(refusals) == 1 and "checksum" in refusals[0].getMessage()
    assert holder.current.release_id == built.release_id and "checksum" in holder.last_error
    releases.rollback()
    holder.refresh()
    assert holder.current.release_id == built.release_id and holder.last_error is None


def _build_with_corrupt_weights(corpus, releases, model_dir):
    """A release whose stored model weights are garbage: every checksum in its folder still matches."""
    broken = build_release(corpus, releases, BuildOptions(model_path=model_dir))
    weights = sorted((releases.data_dir / broken.model.path).rglob("*.safetensors"))
    assert weights, "the stored model has no safetensors file to corrupt"
    for path in weights:
        path.write_bytes(b"not a safetensors file")
    return broken


def test_a_corrupt_model_file_is_reported_as_not_ready_not_a_crash(data_dir, corpus, releases, other_model_dir, caplog):
    """Guards against a load error that is not a LockstepError crashing startup, hiding its cause from /readyz,
    or being re-read and re-hashed at every poll."""
    corpus.upsert(SAMPLE_DOCS)
    broken = _build_with_corrupt_weights(corpus, releases, other_model_dir)
    releases.activate(broken.release_id)
    with caplog.at_level(logging.ERROR, logger="service.release_holder"), _client(data_dir) as client:
        time.sleep(0.6)
        ready = client.get("/readyz")
        search = client.post("/v1/search", json={"query": "apple"})
    assert ready.status_code == 503 and ready.json()["error_type"] == "unhealthy"
    assert f"release {broken.release_id} could not be loaded" in ready.json()["error"]
    assert search.status_code == 503
    refusals = [record for record in caplog.records if "could not be loaded" in record.getMessage()]
    assert len(refusals) == 1 and refusals[0].exc_info is not None


def test_admins_index_metadata_fields_over_http_and_filtered_searches_read_the_index(data_dir, built):
    """Guards against the field-index routes answering 500 for a bad field or an unindexed one, being open without
    the token, or an index whose answers differ from reading the metadata."""
    admin = {"Authorization": f"Bearer {TOKEN}"}
    docs = [{"id": f"t{i}", "text": "apple banana cherry", "metadata": {"tenant": f"acme-{i % 2}"}} for i in range(4)]
    query = {"query": "apple banana cherry", "k": 10, "filter": {"tenant": "acme-1"}}
    with _client(data_dir) as client:
        assert client.put("/v1/documents", json={"documents": docs}).status_code == 200
        unindexed = client.post("/v1/search", json=query).json()["results"]
        assert client.put("/v1/admin/field-indexes/tenant").status_code == 401
        added = client.put("/v1/admin/field-indexes/tenant", headers=admin)
        assert added.status_code == 200 and added.json() == {"field": "tenant", "values": 4}
        assert client.get("/v1/admin/field-indexes", headers=admin).json() == {"fields": [{"field": "tenant", "values": 4}]}
        indexed = client.post("/v1/search", json=query).json()["results"]
        assert [r["id"] for r in indexed] == [r["id"] for r in unindexed] and {r["id"] for r in indexed} == {"t1", "t3"}
        bad = client.put("/v1/admin/field-indexes/a..b", headers=admin)
        assert bad.status_code == 422 and "field 'a..b' must be a dotted path" in bad.json()["error"]
        dropped = client.delete("/v1/admin/field-indexes/tenant", headers=admin)
        assert dropped.status_code == 200 and dropped.json() == {"fields": []}
        missing = client.delete("/v1/admin/field-indexes/tenant", headers=admin)
        assert missing.status_code == 404 and "metadata field 'tenant' is not indexed" in missing.json()["error"]


def test_activating_a_corrupt_release_keeps_serving_and_says_why(data_dir, built, corpus, releases, other_model_dir):
    """Guards against admin activate answering 500 for a release that fails to load, instead of the reason."""
    broken = _build_with_corrupt_weights(corpus, releases, other_model_dir)
    with _client(data_dir) as client:
        response = client.post(f"/v1/admin/releases/{broken.release_id}/activate",
                               headers={"Authorization": f"Bearer {TOKEN}"})
        ready = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["active"] == broken.release_id and body["serving"] == built.release_id
    assert f"release {broken.release_id} could not be loaded" in body["load_error"]
    assert ready.json() == {"status": "ready", "release": built.release_id}


@pytest.mark.integration
def test_the_admin_token_and_broker_password_never_reach_the_logs(data_dir, built, tmp_path):
    log_file = tmp_path / "server.log"
    process, base = start_server(data_dir, log=log_file, admin_token=TOKEN, log_level="debug",
                                 broker_url="redis://:hunter2-broker-pass@127.0.0.1:1/0")
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 403
        assert client.post("/v1/jobs/reembed", json={}, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 503
    stop(process)
    logged = log_file.read_text()
    assert "GET /v1/jobs" in logged or "/v1/jobs" in logged
    assert TOKEN not in logged and "hunter2-broker-pass" not in logged
