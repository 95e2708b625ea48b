"""The jobs and admin routes in-process: auth, refusals with a clear message, and an unreachable queue."""

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer, BertConfig, BertModel

from indexer.job_store import JobStore
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore
from indexer.settings import Settings
from service.app import create_app
from tests.conftest import SAMPLE_DOCS

AUTH = {"Authorization": "Bearer secret"}


@pytest.fixture
def built(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    return build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)


def _client(data_dir, **settings):
    return TestClient(create_app(Settings(data_dir=data_dir, poll_interval_s=0.1, **settings)))


def test_without_a_configured_token_admin_routes_are_closed(data_dir, built):
    with _client(data_dir) as client:
        for path in ("/v1/jobs", "/v1/admin/releases"):
            response = client.get(path, headers=AUTH)
            assert response.status_code == 403 and "LOCKSTEP_ADMIN_TOKEN" in response.json()["error"]
            assert response.json()["error_type"] == "forbidden"


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "fragment"),
    [
        ("POST", "/v1/jobs/retrain", {}, 422, "needs training data"),
        ("POST", "/v1/jobs/retrain", {"pairs": "/no/such.jsonl"}, 422, "pairs: /no/such.jsonl is outside the folders"),
        ("POST", "/v1/jobs/retrain", {"pairs": [{"query": "q"}]}, 422, 'pairs.jsonl:1: needs a non-empty "positive"'),
        ("POST", "/v1/jobs/retrain", {"pairs": 3}, 422, "pairs"),
        ("POST", "/v1/jobs/retrain", {"pairs": [{"query": "q", "positive": "p"}], "recipe_toml": " "}, 422,
         "recipe_toml is blank"),
        ("POST", "/v1/jobs/retrain", {"pairs": [{"query": "q", "positive": "p"}], "recipe": ""}, 422, "recipe is blank"),
        ("POST", "/v1/jobs/retrain", {"pairs": [{"query": "q", "positive": "p"}], "recipe": "quick",
                                      "recipe_toml": "[[stage]]"}, 422, "not both"),
        ("POST", "/v1/jobs/reembed", {"model": "/etc"}, 422, "model: /etc is outside the folders jobs may read"),
        ("POST", "/v1/jobs/reembed", {"dev_qrels": "a\u0000b"}, 422, "is not a usable path (embedded null byte)"),
        ("POST", "/v1/jobs/reembed", {"modle": "x"}, 422, "modle: Extra inputs are not permitted"),
        ("GET", "/v1/jobs/j-missing", None, 404, "job 'j-missing' does not exist"),
        ("POST", "/v1/jobs/j-missing/cancel", None, 404, "does not exist"),
        ("GET", "/v1/jobs?status=done", None, 422, "unknown status 'done'"),
        ("POST", "/v1/admin/releases/not-a-release/activate", None, 422, "is not a release id"),
        ("POST", "/v1/admin/releases/r-20200101T000000Z-000000/activate", None, 404, "does not exist"),
        ("POST", "/v1/admin/rollback", None, 409, "no earlier release"),
    ],
)
def test_bad_job_and_admin_requests_say_what_to_fix(data_dir, built, method, path, payload, status, fragment):
    with _client(data_dir, admin_token="secret") as client:
        response = client.request(method, path, json=payload, headers=AUTH)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_a_jobs_index_type_is_checked_against_the_model_it_will_build_with(data_dir, corpus, tiny_model_dir):
    """Guards against an index type being checked only while a release is live (and then against the live model's
    size even for a re-embed naming another model): the job was queued and failed later in the worker."""
    corpus.upsert(SAMPLE_DOCS)
    with _client(data_dir, admin_token="secret", model=data_dir / "no-such-model") as client:
        assert client.post("/v1/jobs/reembed", json={}, headers=AUTH).status_code == 202, \
            "without an index type the configured model's size is not needed"
    with _client(data_dir, admin_token="secret", model=tiny_model_dir) as client:
        for index_type, fragment in (("NotAFactory,Whatever", "not a valid FAISS factory string"),
                                     ("IVF99999999,Flat", "99999999 IVF lists")):
            response = client.post("/v1/jobs/reembed", json={"index_type": index_type}, headers=AUTH)
            assert response.status_code == 422 and fragment in response.json()["error"], response.text
    build_release(corpus, ReleaseStore(data_dir), BuildOptions(model_path=tiny_model_dir), activate=True)
    wider = data_dir / "wider-model"
    BertModel(BertConfig.from_pretrained(tiny_model_dir, hidden_size=48)).save_pretrained(wider)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(wider)
    with _client(data_dir, admin_token="secret") as client:
        narrow = client.post("/v1/jobs/reembed", json={"index_type": "PQ12"}, headers=AUTH)
        wide = client.post("/v1/jobs/reembed", json={"index_type": "PQ12", "model": str(wider)}, headers=AUTH)
    assert narrow.status_code == 422 and "not a valid FAISS factory string" in narrow.json()["error"]
    assert wide.status_code == 202, "PQ12 splits the wider model's 48 dimensions evenly"


def test_an_unreachable_queue_is_a_503_and_the_job_says_so(data_dir, built):
    with _client(data_dir, admin_token="secret", broker_url="redis://127.0.0.1:1/0") as client:
        response = client.post("/v1/jobs/reembed", json={}, headers=AUTH)
        assert response.status_code == 503 and "could not be queued" in response.json()["error"]
        jobs = client.get("/v1/jobs", headers=AUTH).json()["jobs"]
    assert [job["status"] for job in jobs] == ["failed"]
    assert "could not reach the job queue" in jobs[0]["message"]
    with _client(data_dir, admin_token="secret", broker_url="redis://127.0.0.1:1/0") as client:
        retried = client.post(f"/v1/jobs/{jobs[0]['id']}/retry", headers=AUTH)
    assert retried.status_code == 503 and "could not be queued" in retried.json()["error"]


def test_a_queued_job_is_recorded_cancellable_and_retryable(data_dir, built):
    with _client(data_dir, admin_token="secret") as client:
        job = client.post("/v1/jobs/reembed", json={}, headers=AUTH).json()
        assert job["status"] == "queued" and job["step"] == "reembed"
        assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH).json()["status"] == "cancelled"
        again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
        assert again.status_code == 409 and "already ended" in again.json()["error"]
        assert client.post(f"/v1/jobs/{job['id']}/retry", headers=AUTH).json()["status"] == "queued"
        listing = client.get("/v1/admin/releases", headers=AUTH).json()
    assert listing["active"] == built.release_id == listing["serving"]
    assert listing["releases"][0]["manifest"]["doc_count"] == len(SAMPLE_DOCS)
    assert JobStore(data_dir / "jobs.sqlite3").get(job["id"]).status == "queued"


def test_job_paths_must_stay_inside_the_data_dir_or_a_training_root(data_dir, built, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "pairs.jsonl").write_text('{"query": "q", "positive": "p"}\n')
    (data_dir / "escape.jsonl").symlink_to(outside / "pairs.jsonl")
    with _client(data_dir, admin_token="secret") as client:
        missing = client.post("/v1/jobs/retrain", json={"pairs": str(data_dir / "no.jsonl")}, headers=AUTH)
        escaped = client.post("/v1/jobs/retrain", json={"pairs": str(data_dir / "escape.jsonl")}, headers=AUTH)
        climbing = client.post("/v1/jobs/retrain", json={"pairs": f"{data_dir}/../elsewhere/pairs.jsonl"}, headers=AUTH)
    assert missing.status_code == 422 and "does not exist" in missing.json()["error"]
    for refused in (escaped, climbing):
        assert refused.status_code == 422 and "LOCKSTEP_TRAINING_ROOTS" in refused.json()["error"]
    with _client(data_dir, admin_token="secret", training_roots=[outside]) as client:
        accepted = client.post("/v1/jobs/retrain", json={"pairs": str(outside / "pairs.jsonl")}, headers=AUTH)
    assert accepted.status_code == 202 and accepted.json()["params"]["pairs"] == str(outside / "pairs.jsonl")
