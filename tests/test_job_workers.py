"""The job lifecycle over real HTTP, real Celery workers and real Redis: train, gate, swap, roll back, survive kills."""

import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from indexer.corpus_store import CorpusStore, Document
from indexer.live_release import LiveRelease
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore
from tests.job_data import TINY_RECIPE, write_task
from tests.processes import (
    REDIS_URL, finished, free_port, lockstep_env, start_server, start_worker, stop, wait_for_job, wait_ready,
)
from tests.test_job_steps import collapsed_model

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _redis_settings(**extra):
    return {"broker_url": REDIS_URL, "queue": f"lockstep-test-{secrets.token_hex(4)}", "admin_token": TOKEN,
            "precision": "fp32", **extra}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """An API process and a worker sharing a data dir with the synthetic task's corpus and a live release."""
    root = tmp_path_factory.mktemp("jobs")
    data_dir = root / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    files = write_task(root / "task", corpus)
    releases = ReleaseStore(data_dir)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    settings = _redis_settings(model=tiny_model_dir)
    server, base = start_server(data_dir, **settings)
    worker = start_worker(data_dir, root / "worker.log", **settings)
    with httpx.Client(base_url=base, timeout=60, headers=AUTH) as client:
        yield client, data_dir, corpus, releases, files, settings
    stop(worker, signal.SIGTERM)
    stop(server)
    corpus.close()


def _serving(client) -> str:
    return client.post("/v1/search", json={"query": "protein cells", "k": 1}).json()["release"]


def _until_serving(client, release_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _serving(client) == release_id:
            return
        time.sleep(0.05)
    pytest.fail(f"{client.base_url} did not switch to {release_id} in {timeout:.0f} s")


def test_admin_routes_require_the_token(stack):
    client = stack[0]
    anonymous = httpx.Client(base_url=client.base_url, timeout=30)
    for method, path in [("GET", "/v1/jobs"), ("POST", "/v1/jobs/reembed"), ("GET", "/v1/admin/releases"),
                         ("POST", "/v1/admin/rollback")]:
        missing = anonymous.request(method, path, json={} if method == "POST" else None)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in missing.json()["error"]
        wrong = anonymous.request(method, path, headers={"Authorization": "Bearer nope"}, json={} if method == "POST" else None)
        assert wrong.status_code == 403 and wrong.json()["error"] == "the admin token is wrong"
    assert anonymous.post("/v1/search", json={"query": "fox"}).status_code == 200
    assert client.get("/v1/jobs").status_code == 200


def test_a_retrain_job_over_http_goes_live_and_rollback_restores_the_previous_release(stack):
    client, _, _, releases, files, _ = stack
    before = releases.active()
    response = client.post("/v1/jobs/retrain", json={**files, "recipe_toml": TINY_RECIPE})
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["status"] == "queued" and queued["step"] == "retrain"
    seen_training = wait_for_job(client, queued["id"], lambda j: j["progress"].get("phase", "").startswith("retrain: ") or finished(j))
    job = wait_for_job(client, queued["id"], finished)
    assert job["status"] == "succeeded", job
    assert seen_training["progress"].get("total") or finished(seen_training)
    new = job["outputs"]["release_id"]
    assert job["metrics"]["gate"]["passed"] and job["metrics"]["gate"]["shadow"]["queries"] == 20
    assert job["metrics"]["training"]["final"]["ndcg@10"] > job["metrics"]["training"]["base"]["ndcg@10"]
    _until_serving(client, new)
    listing = client.get("/v1/admin/releases").json()
    assert listing["active"] == new and listing["releases"][0]["job"]["id"] == job["id"]
    assert listing["releases"][0]["manifest"]["model"]["name"].endswith(f"fine-tuned by {job['id']}")
    assert any(item["job"] and item["job"]["id"] == job["id"] for item in listing["releases"])
    rolled = client.post("/v1/admin/rollback").json()
    assert rolled["active"] == before and rolled["serving"] == before
    assert _serving(client) == before
    assert client.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"][0]["id"] == job["id"]


def test_a_regressing_candidate_is_rejected_and_an_admin_may_still_activate_it(stack, tmp_path):
    client, _, _, releases, files, settings = stack
    live = releases.active()
    bad = collapsed_model(settings["model"], tmp_path / "collapsed")
    job_id = client.post("/v1/jobs/reembed", json={"model": str(bad), "dev_queries": files["queries"],
                                                   "dev_qrels": files["qrels"]}).json()["id"]
    job = wait_for_job(client, job_id, finished)
    assert job["status"] == "rejected" and not job["metrics"]["gate"]["passed"]
    assert job["metrics"]["gate"]["live"]["ndcg@10"] > job["metrics"]["gate"]["candidate"]["ndcg@10"]
    assert _serving(client) == live and releases.active() == live
    rejected = job["outputs"]["release_id"]
    listed = {item["release_id"]: item for item in client.get("/v1/admin/releases").json()["releases"]}
    assert listed[rejected]["job"]["status"] == "rejected" and not listed[rejected]["active"]
    assert client.post(f"/v1/admin/releases/{rejected}/activate").json()["serving"] == rejected
    assert client.post("/v1/admin/rollback").json()["serving"] == live
    deleted = client.delete(f"/v1/admin/releases/{rejected}")
    assert deleted.status_code == 200 and rejected not in deleted.json()["history"]
    refused = client.delete(f"/v1/admin/releases/{live}")
    assert refused.status_code == 409 and "is active" in refused.json()["error"]


def test_search_across_two_swaps_never_fails_and_scores_match_the_named_release(stack, other_model_dir):
    client, data_dir, corpus, releases, _, _ = stack
    first = releases.active()
    second = build_release(corpus, releases, BuildOptions(model_path=other_model_dir, precision="fp32")).release_id
    queries = ["protein cells", "quick brown fox", "python library error", "red apple banana"]
    expected = {}
    for release_id in (first, second):
        live = LiveRelease.load(releases, release_id)
        expected[release_id] = {q: {h.document.id: h.score for h in live.search(corpus, q, 80).hits} for q in queries}
    responses, failures, stop_flag = [], [], threading.Event()

    def hammer(offset):
        with httpx.Client(base_url=client.base_url, timeout=30) as own:
            i = offset
            while not stop_flag.is_set():
                query = queries[i % len(queries)]
                reply = own.post("/v1/search", json={"query": query, "k": 5})
                (responses if reply.status_code == 200 else failures).append((query, reply))
                i += 1

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert client.post(f"/v1/admin/releases/{second}/activate").json()["serving"] == second
    time.sleep(1.0)
    assert client.post(f"/v1/admin/releases/{first}/activate").json()["serving"] == first
    time.sleep(0.5)
    stop_flag.set()
    for thread in threads:
        thread.join()
    assert not failures, [(q, r.status_code, r.text) for q, r in failures[:3]]
    assert {reply.json()["release"] for _, reply in responses} == {first, second}
    for query, reply in responses:
        body = reply.json()
        for result in body["results"]:
            assert result["score"] == pytest.approx(expected[body["release"]][query][result["id"]], abs=1e-4)


@pytest.fixture
def slow_stack(tmp_path, tiny_model_dir):
    """Thousands of documents in six shards and a worker encoding four at a time, so a re-embed lasts long enough
    to interfere with."""
    data_dir = tmp_path / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(Document(id=f"d{i}", title="", text=f"document {i} about protein cells and the quick fox")
                  for i in range(3000))
    releases = ReleaseStore(data_dir)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32", batch_size=256), activate=True)
    settings = _redis_settings(model=tiny_model_dir, batch_size="4", shard_size="500")
    server, base = start_server(data_dir, **settings)
    workers = []
    with httpx.Client(base_url=base, timeout=60, headers=AUTH) as client:
        yield client, data_dir, releases, settings, workers, tmp_path
    for worker in workers:
        stop(worker, signal.SIGKILL)
    stop(server)
    corpus.close()


def _encoding(job):
    return job["progress"].get("phase") == "reembed: encode" and job["progress"].get("done", 0) > 0


def test_a_killed_worker_leaves_search_serving_and_the_rerun_catches_up_writes_made_during_it(slow_stack):
    client, data_dir, releases, settings, workers, tmp_path = slow_stack
    live = releases.active()
    workers.append(start_worker(data_dir, tmp_path / "worker-1.log", **settings))
    job_id = client.post("/v1/jobs/reembed", json={}).json()["id"]
    wait_for_job(client, job_id, _encoding, timeout=120)
    os.killpg(workers[0].pid, signal.SIGKILL)
    workers[0].wait()
    assert [m.release_id for m in releases.list()] == [live], "no partial release is listed"
    assert _serving(client) == live
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"

    workers.append(start_worker(data_dir, tmp_path / "worker-2.log", **settings))
    wait_for_job(client, job_id, lambda j: j["progress"].get("shards", {}).get("done", 0) >= 1, timeout=120)
    written = client.put("/v1/documents", json={"documents": [
        {"id": "late", "text": "zebra giraffe written while the corpus was being re-embedded"}]})
    assert written.status_code == 200
    assert client.delete("/v1/documents/d7").status_code == 200
    job = wait_for_job(client, job_id, finished, timeout=180)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert sorted(job["metrics"]["reembed"]["shard_attempts"]) == [1] * 5 + [2], "only the killed shard is redone"
    new = job["outputs"]["release_id"]
    _until_serving(client, new)
    hits = client.post("/v1/search", json={"query": "zebra giraffe written while the corpus was being re-embedded",
                                           "k": 3}).json()
    assert hits["release"] == new and hits["results"][0]["id"] == "late"
    everything = client.post("/v1/search", json={"query": "document 7 about protein cells", "k": 1000}).json()
    assert "d7" not in {r["id"] for r in everything["results"]}
    assert releases.manifest(new).doc_count == 3000


def test_a_running_job_can_be_cancelled_and_leaves_nothing_behind(slow_stack):
    client, data_dir, releases, settings, workers, tmp_path = slow_stack
    live = releases.active()
    workers.append(start_worker(data_dir, tmp_path / "worker.log", **settings))
    job_id = client.post("/v1/jobs/reembed", json={}).json()["id"]
    wait_for_job(client, job_id, _encoding, timeout=120)
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"]
    job = wait_for_job(client, job_id, finished, timeout=60)
    assert job["status"] == "cancelled" and "nothing was published" in job["message"]
    assert [m.release_id for m in releases.list()] == [live]
    assert not list(releases.releases_dir.glob(".staging-*"))
    again = client.post(f"/v1/jobs/{job_id}/retry")
    assert again.status_code == 202 and again.json()["status"] == "queued"
    assert wait_for_job(client, job_id, finished, timeout=180)["status"] == "succeeded"


def test_the_embedded_default_runs_the_same_job_without_redis(tmp_path, tiny_model_dir):
    data_dir = tmp_path / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    files = write_task(tmp_path / "task", corpus)
    releases = ReleaseStore(data_dir)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    settings = {"admin_token": TOKEN, "precision": "fp32", "model": tiny_model_dir}
    server, base = start_server(data_dir, **settings)
    worker = start_worker(data_dir, tmp_path / "worker.log", **settings)
    try:
        with httpx.Client(base_url=base, timeout=60, headers=AUTH) as client:
            job_id = client.post("/v1/jobs/retrain", json={**files, "recipe_toml": TINY_RECIPE}).json()["id"]
            job = wait_for_job(client, job_id, finished)
            assert job["status"] == "succeeded", job
            _until_serving(client, job["outputs"]["release_id"])
        assert (data_dir / "broker.sqlite3").is_file()
    finally:
        stop(worker, signal.SIGTERM)
        stop(server)
        corpus.close()


def _start_up(tmp_path, tiny_model_dir) -> tuple[subprocess.Popen, list[str], str, int]:
    """`lockstep up` with no admin token set; returns it, its output so far, its URL once ready and the worker's pid."""
    port = free_port()
    env = {**lockstep_env(tmp_path / "data", model=tiny_model_dir, precision="fp32"), "PYTHONUNBUFFERED": "1"}
    env.pop("LOCKSTEP_ADMIN_TOKEN", None)
    up = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    while not any("job worker started" in line for line in lines):
        line = up.stdout.readline()
        if not line:
            up.kill()
            pytest.fail(f"lockstep up exited early: {lines}")
        lines.append(line)
    worker_pid = int(next(line for line in lines if "job worker started" in line).split("pid ")[1].split(")")[0])
    base = f"http://127.0.0.1:{port}"
    wait_ready(up, base)
    return up, lines, base, worker_pid


def test_lockstep_up_serves_with_a_worker_prints_a_token_and_ctrl_c_stops_both(tmp_path, tiny_model_dir):
    up, lines, base, worker_pid = _start_up(tmp_path, tiny_model_dir)
    try:
        token = next(line.rsplit(" ", 1)[1].strip() for line in lines if line.startswith("admin token"))
        with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"}) as client:
            job = wait_for_job(client, client.post("/v1/jobs/reembed", json={}).json()["id"], finished)
            assert job["status"] == "succeeded", job
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)


def test_lockstep_up_stopped_with_sigterm_stops_its_worker_too(tmp_path, tiny_model_dir):
    """Guards against `docker stop` or `kill` leaving `lockstep up`'s job worker running as an orphan."""
    up, _, _, worker_pid = _start_up(tmp_path, tiny_model_dir)
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)
