"""The web console in Debian's Chromium against a real `lockstep serve` and job worker (embedded SQLite broker).

Search, rollback, a retrain job from the form to its end, its training report, the
drift probe, and the narrow (390 px) layout with the keyboard. Screenshots go to
`test-artifacts/` at the repository root.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from indexer.corpus_store import CorpusStore
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore
from tests.job_data import TINY_RECIPE, write_task
from tests.processes import finished, start_server, start_worker, stop, wait_for_job
from training.diagnostics import REMEDIES

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TOKEN = "console-test-admin-token"
# The tiny recipe's whole job can finish in about a second, between two of the page's
# 1 s polls; twenty times its epochs keep the retrain step running for several polls
# on any machine, so the page is seen showing progress.
PROGRESS_RECIPE = TINY_RECIPE.replace("epochs = 6", "epochs = 120")
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: install Debian's chromium package"),
]


@dataclass
class Stack:
    base: str
    data_dir: Path
    files: dict[str, str]
    api: httpx.Client


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir, other_model_dir):
    """A server and a worker over the synthetic task's corpus, with two releases (the second active)."""
    root = tmp_path_factory.mktemp("console")
    data_dir = root / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    files = write_task(root / "task", corpus)
    releases = ReleaseStore(data_dir)
    for model in (tiny_model_dir, other_model_dir):
        build_release(corpus, releases, BuildOptions(model_path=model, precision="fp32"), activate=True)
    settings = {"admin_token": TOKEN, "precision": "fp32", "model": str(tiny_model_dir)}
    worker = start_worker(data_dir, root / "worker.log", **settings)
    server, base = start_server(data_dir, **settings)
    with httpx.Client(base_url=base, timeout=60, headers=AUTH) as api:
        yield Stack(base, data_dir, files, api)
    stop(worker, signal.SIGTERM)
    stop(server)
    corpus.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def _page(browser, stack, width: int, height: int):
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(stack.base)
    return context, page, errors


@pytest.fixture
def page(browser, stack):
    context, page, errors = _page(browser, stack, 1280, 900)
    yield page
    context.close()
    assert not errors, errors


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"console-{name}.png"), full_page=True)


def _sign_in(page) -> None:
    page.get_by_label("Admin token").fill(TOKEN)
    page.get_by_role("button", name="Use token").click()
    _expect(page.locator("#token-state")).to_contain_text("Admin token set")


def _expect(locator):
    from playwright.sync_api import expect

    return expect(locator)


def _no_horizontal_scroll(page) -> None:
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the page scrolls sideways"


def test_a_search_shows_results_with_the_release_and_timings(page, stack):
    expected = stack.api.post("/v1/search", json={"query": "protein cells", "k": 5}).json()
    page.get_by_label("Query").fill("protein cells")
    page.get_by_label("Results (k)").fill("5")
    page.get_by_role("button", name="Search", exact=True).click()
    _expect(page.locator("#results > li")).to_have_count(5)
    _expect(page.locator("#search-status")).to_contain_text(f"5 results from release {expected['release']} in ")
    _expect(page.locator("#search-status")).to_contain_text("encode")
    ids = page.locator("#results .meta code").all_inner_texts()
    assert ids == [hit["id"] for hit in expected["results"]]
    first = page.locator("#results > li").first
    _expect(first).to_contain_text(f"score {expected['results'][0]['score']:.4f}")
    _expect(page.locator("#serving")).to_have_text(f"Serving release {expected['release']}")
    page.get_by_label("Rerank with the cross-encoder").check()
    page.get_by_role("button", name="Search", exact=True).click()
    _expect(page.locator("#search-status")).to_contain_text("no cross-encoder to rerank with")
    _screenshot(page, "search")


def test_a_metadata_filter_reaches_the_search_and_a_bad_one_says_what_to_fix(page, stack):
    expected = stack.api.post("/v1/search", json={"query": "protein cells", "k": 5}).json()
    page.get_by_label("Query").fill("protein cells")
    page.get_by_label("Results (k)").fill("5")
    search = page.get_by_role("button", name="Search", exact=True)
    box = page.get_by_label("Metadata filter (JSON, optional)")
    box.fill('{"lang": {"$exists": false}}')
    search.click()
    _expect(page.locator("#results > li")).to_have_count(5)
    assert page.locator("#results .meta code").all_inner_texts() == [hit["id"] for hit in expected["results"]]
    box.fill('{"lang": "none-such"}')
    search.click()
    _expect(page.locator("#search-status")).to_contain_text("0 results from release")
    _expect(page.locator("#results > li")).to_have_count(0)
    box.fill('{"lang": {"$regex": "p"}}')
    search.click()
    _expect(page.locator("#search-status")).to_contain_text("filter.lang.$regex: unknown operator")
    box.fill('{"lang": ')
    search.click()
    _expect(page.locator("#search-status")).to_contain_text("The metadata filter is not JSON")


def test_the_bm25_weight_makes_a_hybrid_search(page, stack):
    query = {"query": "protein cells", "k": 5, "lexical_weight": 1}
    expected = [hit["id"] for hit in stack.api.post("/v1/search", json=query).json()["results"]]
    dense = [hit["id"] for hit in stack.api.post("/v1/search", json={**query, "lexical_weight": 0}).json()["results"]]
    assert expected and expected != dense, "BM25 alone orders these documents differently, or the test shows nothing"
    page.get_by_label("Query").fill("protein cells")
    page.get_by_label("Results (k)").fill("5")
    page.get_by_label("BM25 weight").fill("1")
    page.get_by_role("button", name="Search", exact=True).click()
    _expect(page.locator("#results > li")).to_have_count(len(expected))
    assert page.locator("#results .meta code").all_inner_texts() == expected


def test_a_rollback_through_the_ui_changes_the_active_release(page, stack):
    releases = ReleaseStore(stack.data_dir)
    live, previous = releases.active(), releases.pointer().history[-1]
    _sign_in(page)
    page.get_by_role("tab", name="Releases").click()
    _expect(page.locator(".card.active")).to_have_attribute("data-release", live)
    _expect(page.locator(f'.card[data-release="{live}"]')).to_contain_text("Fingerprint")
    _expect(page.locator(f'.card[data-release="{live}"] dt:text("Precision") + dd')).to_have_text("fp32 on torch")
    page.get_by_role("button", name="Roll back to the previous release").click()
    _expect(page.locator(".card.active")).to_have_attribute("data-release", previous)
    _expect(page.locator("#releases-status")).to_contain_text(f"this server serves {previous}")
    assert releases.active() == previous
    assert stack.api.post("/v1/search", json={"query": "protein", "k": 1}).json()["release"] == previous
    _screenshot(page, "releases-rolled-back")
    page.get_by_role("button", name=f"Activate release {live}").click()
    _expect(page.locator(".card.active")).to_have_attribute("data-release", live)
    assert releases.active() == live


def test_the_drift_probe_shows_stored_and_re_encoded_vectors_agree(page, stack):
    _sign_in(page)
    page.get_by_role("tab", name="Drift").click()
    page.get_by_label("Documents to sample").fill("40")
    page.get_by_role("button", name="Run the probe").click()
    _expect(page.locator("#drift-verdict")).to_contain_text("All 40 sampled documents re-encode to their stored vectors")
    _expect(page.locator("#drift-worst tr")).to_have_count(10)
    mean = float(page.locator("#drift-facts dt:text('Mean cosine') + dd").inner_text())
    assert mean == pytest.approx(1.0, abs=1e-4)
    _screenshot(page, "drift")


def test_a_retrain_started_in_the_ui_shows_progress_and_completes(page, stack):
    _sign_in(page)
    page.get_by_role("tab", name="Jobs").click()
    page.get_by_text("Start a retrain").click()
    _expect(page.locator("#recipe option")).to_contain_text(["default", "quick", "custom (TOML)"])
    page.get_by_label("Recipe", exact=True).select_option("custom")
    page.get_by_label("Recipe (TOML)").fill(PROGRESS_RECIPE)
    page.get_by_label("Queries (queries.jsonl)").fill(stack.files["queries"])
    page.get_by_label("Judgements (qrels TSV)").fill(stack.files["qrels"])
    page.get_by_role("button", name="Start retrain").click()
    _expect(page.locator("#jobs-status")).to_contain_text("Started retrain job")
    job_id = re.search(r"job (j-\S+)\.", page.locator("#jobs-status").inner_text()).group(1)
    _expect(page.locator("#job-title")).to_contain_text(job_id)
    _expect(page.locator("#job-progress-text")).to_have_text(re.compile(r"step \w+ · \w+.* · \d+/\d+"), timeout=90_000)
    _screenshot(page, "job-running")
    _expect(page.locator("#job-title [data-status]")).to_have_text("succeeded", timeout=180_000)
    assert page.locator("#job-progress").evaluate("bar => bar.value === bar.max")
    _expect(page.locator("#job-metrics")).to_contain_text("Dev nDCG@10")
    _expect(page.locator("#job-metrics")).to_contain_text("passed: candidate nDCG@10")
    _expect(page.locator("#job-message")).to_contain_text("is live")
    _expect(page.locator(f'.job-item[data-job="{job_id}"] [data-status]')).to_have_text("succeeded")
    assert stack.api.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    _screenshot(page, "job-succeeded")


def test_the_recipe_box_shows_only_for_a_custom_recipe_and_the_token_stays_out_of_storage(page, stack):
    """Guards against the TOML box showing for a named recipe (a CSS rule overrode `hidden`), where whatever was
    typed in it was silently dropped and the named recipe ran, and against the admin token sitting in
    sessionStorage, where any script of this origin (the API docs pages load theirs from a CDN) could read it."""
    _sign_in(page)
    assert page.evaluate("() => Object.keys(sessionStorage).length") == 0
    page.get_by_role("tab", name="Jobs").click()
    page.get_by_text("Start a retrain").click()
    _expect(page.locator("#recipe option")).to_contain_text(["default", "custom (TOML)"])
    _expect(page.get_by_label("Recipe (TOML)")).to_be_hidden()
    page.get_by_label("Recipe", exact=True).select_option("custom")
    _expect(page.get_by_label("Recipe (TOML)")).to_be_visible()
    jobs_before = len(stack.api.get("/v1/jobs").json()["jobs"])
    page.get_by_role("button", name="Start retrain").click()
    _expect(page.locator("#jobs-status")).to_contain_text("Paste the recipe's TOML")
    assert len(stack.api.get("/v1/jobs").json()["jobs"]) == jobs_before


def _succeeded_retrain(stack) -> str:
    """A retrain job that succeeded on this stack (started through the API when no earlier test left one)."""
    done = [job for job in stack.api.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"]
            if job["kind"] == "retrain"]
    if done:
        return done[0]["id"]
    job_id = stack.api.post("/v1/jobs/retrain", json={**stack.files, "recipe_toml": TINY_RECIPE}).json()["id"]
    assert wait_for_job(stack.api, job_id, finished)["status"] == "succeeded"
    return job_id


def test_the_training_report_renders_its_plots_thresholds_and_remedies(page, stack):
    job_id = _succeeded_retrain(stack)
    report = stack.api.get(f"/v1/jobs/{job_id}/report").json()
    _sign_in(page)
    page.get_by_role("tab", name="Jobs").click()
    page.locator(f'.job-item[data-job="{job_id}"]').click()
    _expect(page.locator('#report-panels [data-panel="loss"] svg polyline')).to_have_count(1)
    drawn = [p for p in report["panels"] if any(s["points"] for s in p["series"])]
    _expect(page.locator("#report-panels figure")).to_have_count(len(drawn))
    assert len(drawn) >= 9
    for panel in drawn:
        figure = page.locator(f'#report-panels [data-panel="{panel["key"]}"]')
        _expect(figure.locator("svg polyline")).to_have_count(sum(1 for s in panel["series"] if s["points"]))
        _expect(figure.locator("svg line.threshold")).to_have_count(len(panel["thresholds"]))
    for key in ("collapse_std", "collapse_cosine", "negatives_above_positive", "overfitting"):
        _expect(page.locator(f'[data-panel="{key}"] svg line.threshold')).to_have_count(1)
    fired = [p for p in drawn if p["fired"]]
    assert fired, "the tiny run is expected to fire at least one failure-mode alert"
    _expect(page.locator("#report-panels figure.fired")).to_have_count(len(fired))
    for panel in fired:
        _expect(page.locator(f'[data-panel="{panel["key"]}"] .remedy')).to_contain_text(REMEDIES[panel["mode"]])
    _expect(page.locator("#report-log")).to_contain_text("run finished: dev nDCG@10")
    _screenshot(page, "training-report")


def test_at_390_px_the_console_fits_and_works_from_the_keyboard(browser, stack):
    _succeeded_retrain(stack)
    context, page, errors = _page(browser, stack, 390, 844)
    try:
        _no_horizontal_scroll(page)
        page.get_by_label("Query").fill("quick brown fox")
        page.keyboard.press("Enter")
        _expect(page.locator("#results > li")).to_have_count(10)
        _no_horizontal_scroll(page)
        _screenshot(page, "narrow-search")
        _sign_in(page)
        page.get_by_role("tab", name="Search").focus()
        page.keyboard.press("ArrowRight")
        _expect(page.get_by_role("tab", name="Releases")).to_be_focused()
        _expect(page.get_by_role("tab", name="Releases")).to_have_attribute("aria-selected", "true")
        _expect(page.locator(".card.active")).to_have_count(1)
        _no_horizontal_scroll(page)
        _screenshot(page, "narrow-releases")
        page.keyboard.press("ArrowRight")
        _expect(page.locator("#panel-jobs")).to_be_visible()
        page.locator(".job-item").first.focus()
        page.keyboard.press("Enter")
        _expect(page.locator('#report-panels [data-panel="loss"] svg polyline')).to_have_count(1)
        _no_horizontal_scroll(page)
        _screenshot(page, "narrow-job")
    finally:
        context.close()
    assert not errors, errors
