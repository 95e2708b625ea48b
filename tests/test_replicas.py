"""Two API replicas (real uvicorn processes) over one data dir serve the same release within seconds of a switch.

With Redis the announcement does it: the replicas poll only every 600 s here, so
nothing else could. Without Redis (the embedded default) there is nothing to announce
over, and they follow the pointer on disk by polling, whichever process (the CLI here)
moved it.
"""

import secrets
import subprocess
import sys
import time

import httpx
import pytest

from indexer.corpus_store import CorpusStore
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore
from tests.conftest import SAMPLE_DOCS
from tests.processes import REDIS_URL, lockstep_env, start_server, stop

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token"
SWITCH_WITHIN_S = 10.0  # generous for a loaded CI machine, and still far below the 600 s poll interval


@pytest.fixture
def two_releases(data_dir, tiny_model_dir, other_model_dir):
    """A data dir with two releases of different models, the first one active."""
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    releases = ReleaseStore(data_dir)
    first = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    second = build_release(corpus, releases, BuildOptions(model_path=other_model_dir, precision="fp32"))
    corpus.close()
    return data_dir, first.release_id, second.release_id


@pytest.fixture
def start_replicas():
    """Start two `lockstep serve` processes over a data dir; returns an admin client for each."""
    processes, clients = [], []

    def start(data_dir, **settings):
        for _ in range(2):
            process, base = start_server(data_dir, admin_token=TOKEN, precision="fp32", **settings)
            processes.append(process)
            clients.append(httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}))
        return clients

    yield start
    for client in clients:
        client.close()
    for process in processes:
        stop(process)


def _serving(client: httpx.Client) -> str:
    return client.post("/v1/search", json={"query": "quick brown fox", "k": 1}).json()["release"]


def _all_serve(clients, release_id: str, since: float) -> float:
    """Wait until every replica answers from `release_id`; fails unless that happens within `SWITCH_WITHIN_S` of `since`."""
    while True:
        serving = [_serving(client) for client in clients]
        if serving == [release_id] * len(clients):
            return time.monotonic() - since
        if time.monotonic() - since > SWITCH_WITHIN_S:
            pytest.fail(f"after {SWITCH_WITHIN_S} s the replicas serve {serving}, not {release_id}")
        time.sleep(0.02)


def test_replicas_switch_together_on_the_redis_announcement(two_releases, start_replicas):
    data_dir, first, second = two_releases
    clients = start_replicas(data_dir, broker_url=REDIS_URL, queue=f"lockstep-replicas-{secrets.token_hex(4)}",
                             poll_interval_s="600")
    assert [_serving(client) for client in clients] == [first, first]
    activated = time.monotonic()
    assert clients[0].post(f"/v1/admin/releases/{second}/activate").json()["serving"] == second
    _all_serve(clients, second, activated)
    rolled_back = time.monotonic()
    assert clients[1].post("/v1/admin/rollback").json()["serving"] == first
    _all_serve(clients, first, rolled_back)


def test_without_redis_replicas_follow_the_pointer_by_polling(two_releases, start_replicas):
    data_dir, first, second = two_releases
    clients = start_replicas(data_dir, poll_interval_s="0.2")
    assert [_serving(client) for client in clients] == [first, first]
    cli = subprocess.run([sys.executable, "-m", "service.cli", "releases", "activate", second],
                         env=lockstep_env(data_dir), capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and f"active release: {second}" in cli.stdout, cli.stderr
    _all_serve(clients, second, time.monotonic())
    rolled_back = time.monotonic()
    assert clients[0].post("/v1/admin/rollback").json()["serving"] == first
    _all_serve(clients, first, rolled_back)
