"""Faults that must lose nothing: a full disk during a build or a write, the API killed mid-swap, Redis restarted mid-job."""

from __future__ import annotations

import errno
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from indexer.corpus_store import CorpusStore, Document
from indexer.live_release import LiveRelease
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import STAGING_PREFIX, ReleaseStore
from tests.conftest import SAMPLE_DOCS
from tests.processes import finished, free_port, lockstep_env, start_server, start_worker, stop, wait_for_job

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs; skipped where mounting needs privileges the test lacks."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({result.stderr.strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write a filler file until the filesystem is full; removing it frees the space again."""
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=lockstep_env(data_dir),
                          capture_output=True, text=True, timeout=300)


def test_a_build_on_a_full_disk_fails_cleanly_and_the_live_release_is_untouched(small_disk, tiny_model_dir, other_model_dir):
    data_dir = small_disk / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    corpus.close()
    releases = ReleaseStore(data_dir)
    live = build_release(CorpusStore(data_dir / "corpus.sqlite3"), releases, BuildOptions(model_path=tiny_model_dir),
                         activate=True)
    filler = _fill(small_disk)

    failed = _cli(data_dir, "build", "--model", str(other_model_dir), "--activate")

    assert failed.returncode == 1, failed.stderr
    assert "no space left" in failed.stderr.lower() and "Traceback" not in failed.stderr
    assert [m.release_id for m in releases.list()] == [live.release_id] and releases.active() == live.release_id
    assert not [entry for entry in releases.releases_dir.iterdir() if entry.name.startswith(STAGING_PREFIX)]
    LiveRelease.load(releases, live.release_id)
    filler.unlink()
    rebuilt = _cli(data_dir, "build", "--model", str(other_model_dir), "--activate")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert releases.active() != live.release_id


def test_a_write_on_a_full_disk_is_refused_with_507_and_search_keeps_answering(small_disk, tiny_model_dir, tmp_path):
    data_dir = small_disk / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, ReleaseStore(data_dir), BuildOptions(model_path=tiny_model_dir), activate=True)
    corpus.close()
    server, base = start_server(data_dir, log=tmp_path / "server.log")
    try:
        _fill(small_disk)
        with httpx.Client(base_url=base, timeout=30) as client:
            written = client.put("/v1/documents", json={"documents": [{"id": f"n{i}", "text": "x" * 50_000}
                                                                      for i in range(40)]})
            searched = client.post("/v1/search", json={"query": "apple", "k": 3})
            missing = client.get("/v1/documents/n0")
    finally:
        stop(server)
    assert written.status_code == 507, written.text
    assert written.json()["error_type"] == "storage_full" and "free space" in written.json()["error"]
    assert searched.status_code == 200 and searched.json()["results"]
    assert missing.status_code == 404


TOKEN = "faults-token-0a9b8c7d6e5f"


def _corpus_with_release(data_dir: Path, model: Path, documents: int = 0) -> str:
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    if documents:
        words = "apple banana cherry protein gene cell search index model vector query".split()
        rng = random.Random(0)
        corpus.upsert([Document(id=f"doc-{i}", title=f"title {i}", text=" ".join(rng.choices(words, k=120)))
                       for i in range(documents)])
    manifest = build_release(corpus, ReleaseStore(data_dir), BuildOptions(model_path=model, precision="fp32"),
                             activate=True)
    corpus.close()
    return manifest.release_id


def _serves(base: str, release_id: str) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        assert client.get("/readyz").json()["release"] == release_id
        searched = client.post("/v1/search", json={"query": "apple", "k": 3}).json()
        assert searched["release"] == release_id and searched["results"]


def test_an_api_killed_mid_swap_serves_the_active_release_after_restart(data_dir, tiny_model_dir, other_model_dir):
    first = _corpus_with_release(data_dir, tiny_model_dir)
    releases = ReleaseStore(data_dir)
    second = build_release(CorpusStore(data_dir / "corpus.sqlite3"), releases,
                           BuildOptions(model_path=other_model_dir, precision="fp32")).release_id
    rng = random.Random(7)
    for _ in range(3):
        server, base = start_server(data_dir, admin_token=TOKEN)
        target = second if releases.active() == first else first

        def activate() -> None:
            try:
                httpx.post(f"{base}/v1/admin/releases/{target}/activate", headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=30)
            except httpx.TransportError:
                pass

        caller = threading.Thread(target=activate)
        caller.start()
        time.sleep(rng.uniform(0.0, 0.3))
        server.send_signal(signal.SIGKILL)
        server.wait()
        caller.join()
        assert releases.active() in (first, second)
        assert sorted(m.release_id for m in releases.list()) == sorted([first, second])
        restarted, base = start_server(data_dir, admin_token=TOKEN)
        try:
            _serves(base, releases.active())
        finally:
            stop(restarted)


def test_redis_stopped_mid_job_keeps_search_answering_and_corrupts_nothing(tmp_path, tiny_model_dir):
    port = free_port()
    redis_command = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
    redis = subprocess.Popen(redis_command, stdout=subprocess.DEVNULL)
    data_dir = tmp_path / "data"
    live = _corpus_with_release(data_dir, tiny_model_dir, documents=3000)
    settings = {"broker_url": f"redis://127.0.0.1:{port}/0", "admin_token": TOKEN, "precision": "fp32",
                "model": str(tiny_model_dir), "job_stale_after_s": "5"}
    server, base = start_server(data_dir, **settings)
    worker = start_worker(data_dir, tmp_path / "worker.log", **settings)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=base, timeout=30, headers=auth) as client:
            job_id = client.post("/v1/jobs/reembed", json={}).json()["id"]
            wait_for_job(client, job_id, lambda job: job["status"] == "running", timeout=60)
            redis.terminate()
            redis.wait(timeout=20)
            outage = [client.post("/v1/search", json={"query": "apple gene", "k": 5}) for _ in range(20)]
            assert all(response.status_code == 200 and response.json()["release"] == live for response in outage)
            time.sleep(2)
            redis = subprocess.Popen(redis_command, stdout=subprocess.DEVNULL)
            job = wait_for_job(client, job_id, finished, timeout=180)
            if job["status"] != "succeeded":
                assert job["status"] == "failed" and job["message"], job
                client.post(f"/v1/jobs/{job_id}/retry").raise_for_status()
                job = wait_for_job(client, job_id, finished, timeout=180)
            assert job["status"] == "succeeded", job
            releases = ReleaseStore(data_dir)
            assert releases.active() == job["outputs"]["release_id"] != live
            assert not [e for e in releases.releases_dir.iterdir() if e.name.startswith(STAGING_PREFIX)]
            for manifest in releases.list():
                LiveRelease.load(releases, manifest.release_id)
            deadline = time.monotonic() + 10
            while client.get("/readyz").json()["release"] != releases.active() and time.monotonic() < deadline:
                time.sleep(0.2)
            _serves(base, releases.active())
    finally:
        stop(worker, signal.SIGTERM)
        stop(server)
        redis.kill()
        redis.wait()
