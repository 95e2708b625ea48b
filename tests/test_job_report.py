"""`GET /v1/jobs/{id}/report` and `GET /v1/jobs/recipes`: a real training run's curves, thresholds and remedies."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from indexer.corpus_store import CorpusStore
from indexer.job_report import job_run_dir
from indexer.job_store import JobStore
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore
from indexer.settings import Settings
from service.app import create_app
from tests.conftest import SAMPLE_DOCS
from tests.job_data import TINY_RECIPE
from tests.training_data import synthetic_task
from training.diagnostics import REMEDIES
from training.fine_tune import fine_tune
from training.metrics_log import read_log
from training.recipe import parse_recipe_text
from training.report import run_report

AUTH = {"Authorization": "Bearer secret"}


@dataclass
class Run:
    data_dir: Path
    job_id: str
    run_dir: Path
    waiting_id: str
    reembed_id: str


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Run:
    """A data dir with a live release and a retrain job record whose run directory a real (tiny) fine-tune wrote."""
    data_dir = tmp_path_factory.mktemp("report") / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, ReleaseStore(data_dir), BuildOptions(model_path=tiny_model_dir), activate=True)
    corpus.close()
    store = JobStore(data_dir / "jobs.sqlite3")
    job = store.create("retrain", {"recipe_toml": TINY_RECIPE, "pairs": "/unused.jsonl"})
    run_dir = job_run_dir(data_dir, job)
    fine_tune(tiny_model_dir, synthetic_task(40), parse_recipe_text(TINY_RECIPE, "test"), run_dir.parent / "model", run_dir)
    waiting = store.create("retrain", {"recipe": "quick", "pairs": "/unused.jsonl"})
    reembed = store.create("reembed", {})
    store.close()
    return Run(data_dir, job.id, run_dir, waiting.id, reembed.id)


@pytest.fixture
def client(run):
    with TestClient(create_app(Settings(data_dir=run.data_dir, poll_interval_s=0.1, admin_token="secret"))) as client:
        yield client


def test_the_report_carries_every_curve_the_run_logged(client, run):
    records = read_log(run.run_dir)
    report = client.get(f"/v1/jobs/{run.job_id}/report", headers=AUTH).json()
    assert report["job"] == run.job_id and report["status"] == "queued" and report["records"] == len(records)
    panels = {panel["key"]: panel for panel in report["panels"]}
    assert set(panels) >= {"loss", "overfitting", "collapse_std", "collapse_cosine", "masked",
                           "negatives_above_positive", "shortcut", "drift", "drift_ratio"}
    steps = [r for r in records if r["type"] == "step"]
    assert [point[1] for point in panels["loss"]["series"][0]["points"]] == [r["loss"] for r in steps]
    evals = [r for r in records if r["type"] == "eval"]
    batches, probe = panels["collapse_cosine"]["series"]
    assert [p[1] for p in batches["points"]] == [r["batch_mean_cosine"] for r in steps]
    assert [p[1] for p in probe["points"]] == [r["mean_pairwise_cosine"] for r in evals]
    dev, train, gap = panels["overfitting"]["series"]
    assert [p[1] for p in dev["points"]] == [r["ndcg@10"] for r in evals]
    assert [p[1] for p in train["points"]] == [r["ndcg@10_train"] for r in evals]
    assert [p[1] for p in gap["points"]] == pytest.approx([r["ndcg@10_train"] - r["ndcg@10"] for r in evals])
    assert [stage["name"] for stage in report["stages"]] == ["mnr"] and report["summary"]["dev_queries"] == 10
    assert report["events"][-1]["text"].startswith("run finished: dev nDCG@10")


def test_thresholds_are_the_recipes_and_fired_panels_show_the_remedy(client, run):
    report = client.get(f"/v1/jobs/{run.job_id}/report", headers=AUTH).json()
    panels = {panel["key"]: panel for panel in report["panels"]}
    assert report["thresholds"]["collapse_max_mean_cosine"] == 0.99
    assert panels["collapse_cosine"]["thresholds"] == [{"value": 0.99, "label": "collapse threshold"}]
    assert panels["collapse_std"]["thresholds"][0]["value"] == 0.001
    fired_modes = {alert["mode"] for alert in report["alerts"]}
    assert "drift" in fired_modes
    for panel in report["panels"]:
        assert panel["fired"] == (panel["mode"] in fired_modes)
        if panel["fired"]:
            assert panel["remedy"] == REMEDIES[panel["mode"]] and panel["alerts"]
    base = next(r for r in read_log(run.run_dir) if r["type"] == "eval")
    ratio = base["query_norm_mean"] / base["doc_norm_mean"]
    assert [t["value"] for t in panels["drift_ratio"]["thresholds"]] == pytest.approx([ratio * 1.001, ratio / 1.001])


def test_a_job_that_has_not_trained_yet_has_an_empty_report_and_a_reembed_job_none(client, run):
    empty = client.get(f"/v1/jobs/{run.waiting_id}/report", headers=AUTH)
    assert empty.status_code == 200 and empty.json()["records"] == 0
    assert all(not series["points"] for panel in empty.json()["panels"] for series in panel["series"])
    assert empty.json()["thresholds"]["collapse_max_mean_cosine"] == 0.9
    missing = client.get(f"/v1/jobs/{run.reembed_id}/report", headers=AUTH)
    assert missing.status_code == 404 and "trains no model, so it has no training report" in missing.json()["error"]
    assert client.get("/v1/jobs/j-nope/report", headers=AUTH).status_code == 404
    assert client.get(f"/v1/jobs/{run.waiting_id}/report").status_code == 401


def test_long_curves_are_thinned_but_keep_their_first_and_last_points(run):
    full = run_report(run.run_dir).panels[0].series[0].points
    thin = run_report(run.run_dir, max_points=4).panels[0].series[0].points
    assert len(full) > 4 and len(thin) <= 5 and thin[0] == full[0] and thin[-1] == full[-1]
    assert set(thin) <= set(full)


def test_the_shipped_recipes_are_listed_with_their_stages(client):
    recipes = {r["name"]: r["stages"] for r in client.get("/v1/jobs/recipes", headers=AUTH).json()["recipes"]}
    assert recipes["default"] == ["in-batch", "hard-negatives", "distill"] and recipes["quick"] == ["in-batch"]
    assert recipes["triplets"] == ["in-batch", "given-negatives"]


def test_a_log_cut_short_by_a_killed_run_still_reads_and_a_damaged_one_names_its_line(tmp_path):
    """Guards against a run killed mid-write (a partial last line) breaking `lockstep report` and the job's report
    route for good with a JSONDecodeError (a 500)."""
    from training.errors import InvalidInput
    from training.metrics_log import METRICS_FILE, MetricsLog

    log = MetricsLog(tmp_path)
    log.write("step", loss=0.5)
    log.write("step", loss=0.4)
    with (tmp_path / METRICS_FILE).open("a") as handle:
        handle.write('{"type": "step", "lo')
    assert [record["loss"] for record in read_log(tmp_path)] == [0.5, 0.4]
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    (tmp_path / METRICS_FILE).write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(InvalidInput, match=r"metrics\.jsonl:2: not a JSON record"):
        read_log(tmp_path)
