"""A real `lockstep serve` process over HTTP, and a real build killed mid-way."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from indexer.corpus_store import CorpusStore, Document
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore
from tests.conftest import SAMPLE_DOCS
from tests.processes import start_server

pytestmark = pytest.mark.integration


def lockstep(data_dir, *args, **popen):
    env = {**os.environ, "LOCKSTEP_POLL_INTERVAL_S": "0.2", "LOCKSTEP_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-m", "service.cli", "--data-dir", str(data_dir), *args], env=env, **popen)


@pytest.fixture
def server(data_dir, tiny_model_dir):
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    releases = ReleaseStore(data_dir)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
    process, base = start_server(data_dir)
    yield base, manifest, corpus, releases
    process.send_signal(signal.SIGINT)
    process.wait(timeout=20)
    corpus.close()


def test_search_embeddings_and_writes_over_real_http(server):
    base, manifest, _, _ = server
    with httpx.Client(base_url=base, timeout=30) as client:
        body = client.post("/v1/search", json={"query": "Proteins protein study of cancer cells and genes", "k": 2}).json()
        assert body["release"] == manifest.release_id and body["results"][0]["id"] == "d2"
        assert client.post("/v1/search", json={"query": ""}).status_code == 400
        emb = client.post("/v1/embeddings", json={"input": "apple"}).json()
        assert len(emb["data"][0]["embedding"]) == 32 and emb["release"] == manifest.release_id
        put = client.put("/v1/documents", json={"documents": [{"id": "h1", "text": "lazy dog data"}]})
        assert put.status_code == 200 and put.json()["release"] == manifest.release_id
        assert client.post("/v1/search", json={"query": "lazy dog data", "k": 1}).json()["results"][0]["id"] == "h1"
        assert "lockstep_http_request_seconds_bucket" in client.get("/metrics").text
        assert client.get("/openapi.json").json()["paths"]["/v1/search"]["post"]["responses"]["422"]


def test_writes_from_another_process_and_activation_reach_the_server(server, tiny_model_dir, other_model_dir):
    """Guards against a server that never sees the CLI's writes or activations (shared data dir)."""
    base, _, corpus, releases = server
    corpus.upsert([Document(id="cli-doc", title="From the CLI", text="small green apple")])
    newer = build_release(corpus, releases, BuildOptions(model_path=other_model_dir))
    releases.activate(newer.release_id)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        body = httpx.post(f"{base}/v1/search", json={"query": "From the CLI small green apple", "k": 1}).json()
        if body["release"] == newer.release_id:
            break
        time.sleep(0.1)
    assert body["release"] == newer.release_id and body["results"][0]["id"] == "cli-doc"


def test_build_killed_mid_way_leaves_the_active_release_serving(server, tmp_path, tiny_model_dir):
    """Guards against a crashed build listing a partial release or disturbing the live one."""
    base, manifest, corpus, releases = server
    data_dir = releases.data_dir
    corpus.upsert([Document(id=f"bulk{i}", text=f"quick brown fox {i} jumps over lazy dog " * 8) for i in range(8000)])
    build = lockstep(data_dir, "build", "--model", str(tiny_model_dir), "--activate",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(releases.releases_dir.glob(".staging-*")):
        time.sleep(0.05)
    assert build.poll() is None, "the build finished before it could be interrupted"
    time.sleep(0.5)
    build.send_signal(signal.SIGKILL)
    build.wait(timeout=10)
    assert releases.active() == manifest.release_id
    assert [m.release_id for m in releases.list()] == [manifest.release_id]
    time.sleep(0.5)
    body = httpx.post(f"{base}/v1/search", json={"query": "apple", "k": 1}, timeout=120).json()
    assert body["release"] == manifest.release_id
    assert json.loads((data_dir / "releases" / "ACTIVE.json").read_text())["active"] == manifest.release_id
