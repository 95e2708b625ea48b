"""The job steps run in-process, without a broker: retrain -> reembed -> evaluate -> promote and its exits."""

import dataclasses
import shutil
import subprocess
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer import job_steps
from indexer.corpus_store import CorpusStore
from indexer.job_steps import Dispatch, JobContext, cancel_job, is_lost, retrain, run_step, worker_identity
from indexer.job_store import CANCELLED, REJECTED, SUCCEEDED, ClaimLost, JobStore
from indexer.job_submission import retry_job, submit_job
from indexer.quality_gate import _kendall_tau, shadow_agreement
from indexer.reembed_shards import run_shard
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import STAGING_PREFIX, ActiveChanged, ReleaseStore
from indexer.settings import Settings
from training.bi_encoder import BiEncoder
from training.errors import InvalidInput
from training.eval_data import load_qrels, load_queries
from tests.job_data import TINY_RECIPE, write_task


@pytest.fixture
def setup(data_dir, tiny_model_dir, tmp_path):
    settings = Settings(data_dir=data_dir, model=tiny_model_dir, precision="fp32", batch_size=16)
    corpus = CorpusStore(settings.corpus_path)
    files = write_task(tmp_path / "task", corpus)
    releases = ReleaseStore(data_dir)
    live = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    store = JobStore(settings.jobs_path)
    yield settings, corpus, releases, store, files, live.release_id
    store.close()
    corpus.close()


def drive(settings, store, corpus, job_id, step):
    """Run a job from `step` as the workers would, its re-embed shards included, until nothing is left to send."""
    pending = deque([Dispatch(step=step)])
    while pending:
        dispatch = pending.popleft()
        if dispatch.step is not None:
            pending.append(run_step(settings, store, corpus, job_id, dispatch.step))
        pending.extend(run_shard(settings, store, job_id, shard) for shard in dispatch.shards)
    return store.get(job_id)


def run_reembed(settings, store, corpus, job_id):
    """The reembed step as the workers run it: plan, every shard, then the step again; returns what comes after it."""
    planned = run_step(settings, store, corpus, job_id, "reembed")
    assert planned.step is None and planned.shards
    after = [run_shard(settings, store, job_id, shard) for shard in planned.shards]
    assert after == [Dispatch()] * (len(after) - 1) + [Dispatch(step="reembed")], "only the last shard sends the step"
    return run_step(settings, store, corpus, job_id, "reembed")


def run_job(settings, store, corpus, kind, params):
    """Submit a job and run its steps in order, as the workers would; returns the final record."""
    queued = []
    job = submit_job(store, lambda job_id, step: queued.append(step), settings.data_dir, kind, params)
    return drive(settings, store, corpus, job.id, queued[0])


def collapsed_model(source, folder):
    """A model whose every token embeds the same: all documents look alike, so retrieval regresses."""
    encoder = BiEncoder.load(source)
    with torch.no_grad():
        weights = encoder.model.embeddings.word_embeddings.weight
        weights[:] = weights[0]
    encoder.save(folder)
    return folder


def test_a_retrain_job_trains_reembeds_passes_the_gate_and_goes_live(setup):
    settings, corpus, releases, store, files, live_id = setup
    job = run_job(settings, store, corpus, "retrain", {**files, "recipe_toml": TINY_RECIPE})
    assert job.status == SUCCEEDED, job.message
    new_id = job.outputs["release_id"]
    assert releases.active() == new_id and job.outputs["previous_release"] == live_id
    training, gate = job.metrics["training"], job.metrics["gate"]
    assert training["final"]["ndcg@10"] > training["base"]["ndcg@10"]
    assert gate["passed"] and not gate["skipped"] and gate["live_release"] == live_id
    assert gate["candidate"]["ndcg@10"] >= gate["live"]["ndcg@10"] - settings.gate_tolerance
    assert "held-out" in gate["dev_source"] and gate["candidate"]["queries"] == 20
    assert 0 <= gate["shadow"]["top10_overlap"] <= 1 and gate["shadow"]["queries"] == 20
    manifest = releases.manifest(new_id)
    assert job.id in manifest.model.name and manifest.doc_count == 80
    assert manifest.model.fingerprint != releases.manifest(live_id).model.fingerprint
    assert job.progress["step"] == "promote" and job.attempts == 1


def test_a_job_keeps_the_live_releases_reranker_under_its_name_and_adds_none(setup, tiny_model_dir, tmp_path):
    """Guards against a job's release recording its reranker under the store's hash folder name, and against a
    job adding the RERANKER setting's cross-encoder to a deployment whose live release has none."""
    settings, corpus, releases, store, _, _ = setup
    with_reranker = settings.model_copy(update={"reranker": tiny_model_dir})
    assert run_job(with_reranker, store, corpus, "reembed", {}).status == SUCCEEDED
    assert releases.manifest(releases.active()).reranker is None
    named = Path(shutil.copytree(tiny_model_dir, tmp_path / "my-reranker"))
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32", reranker_path=named),
                  activate=True)
    live = releases.manifest(releases.active()).reranker
    job = run_job(settings, store, corpus, "reembed", {})
    assert job.status == SUCCEEDED, job.message
    assert releases.manifest(job.outputs["release_id"]).reranker == live and live.name == "my-reranker"


def test_a_regressing_candidate_is_rejected_and_the_live_release_stays(setup, tmp_path):
    settings, corpus, releases, store, files, live_id = setup
    bad = collapsed_model(settings.model, tmp_path / "collapsed")
    job = run_job(settings, store, corpus, "reembed",
                  {"model": str(bad), "dev_queries": files["queries"], "dev_qrels": files["qrels"]})
    assert job.status == REJECTED
    gate = job.metrics["gate"]
    assert not gate["passed"] and gate["candidate"]["ndcg@10"] < gate["live"]["ndcg@10"] - settings.gate_tolerance
    assert releases.active() == live_id
    rejected = job.outputs["release_id"]
    assert releases.exists(rejected) and f"/v1/admin/releases/{rejected}/activate" in job.message


def test_without_a_dev_set_the_gate_is_skipped_and_says_so(setup):
    settings, corpus, releases, store, _, live_id = setup
    job = run_job(settings, store, corpus, "reembed", {})
    assert job.status == SUCCEEDED
    assert job.metrics["gate"]["skipped"] and "LOCKSTEP_DEV_QUERIES" in job.metrics["gate"]["reason"]
    manifest = releases.manifest(job.outputs["release_id"])
    assert manifest.model.fingerprint == releases.manifest(live_id).model.fingerprint


def _refuse_training(*args, **kwargs):
    raise AssertionError("the rerun trained again")


def test_training_that_does_not_help_builds_no_release(setup, monkeypatch):
    settings, corpus, releases, store, files, live_id = setup
    useless = TINY_RECIPE.replace("learning_rate = 5e-4", "learning_rate = 1e-12").replace("epochs = 6", "epochs = 1")
    job = run_job(settings, store, corpus, "retrain", {**files, "recipe_toml": useless})
    assert job.status == REJECTED and "did not improve" in job.message
    assert [m.release_id for m in releases.list()] == [live_id]
    assert not (settings.data_dir / "jobs" / job.id / "model.partial").exists()
    rerun = JobContext(settings, store, store.get(job.id), corpus, releases)
    monkeypatch.setattr("training.fine_tune.fine_tune", _refuse_training)
    again = retrain(rerun)
    assert again.end == (REJECTED, job.message), "a rerun (the worker died before recording) does not train again"
    assert again.metrics["training"]["stages"] == job.metrics["training"]["stages"]


def test_a_retrained_model_is_fsynced_before_it_is_renamed_into_place(setup, monkeypatch):
    """Guards against a crash leaving `<job>/model` in place with its files not yet on disk: a rerun takes it as done."""
    settings, corpus, _, store, files, _ = setup
    calls = []
    monkeypatch.setattr(job_steps, "fsync_tree", lambda path: calls.append(("tree", path, path.is_dir())))
    monkeypatch.setattr(job_steps, "fsync_dir", lambda path: calls.append(("dir", path, (path / "model").is_dir())))
    job = submit_job(store, lambda *_: None, settings.data_dir, "retrain", {**files, "recipe_toml": TINY_RECIPE})
    assert run_step(settings, store, corpus, job.id, "retrain") == Dispatch(step="reembed")
    folder = settings.data_dir / "jobs" / job.id
    assert calls == [("tree", folder / "model.partial", True), ("dir", folder, True)]


def test_cancelling_mid_encode_publishes_nothing_and_leaves_no_staging_or_shards(setup, monkeypatch):
    settings, corpus, releases, store, _, live_id = setup
    settings = settings.model_copy(update={"batch_size": 1, "shard_size": 30})
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    planned = run_step(settings, store, corpus, job.id, "reembed")
    assert planned == Dispatch(shards=(0, 1, 2))
    report = JobStore.report_shard

    def cancel_once_encoding(self, job_id, shard, owner, done=None, phase=""):
        if done:
            self.request_cancel(job_id)
        return report(self, job_id, shard, owner, done, phase)

    monkeypatch.setattr(JobStore, "report_shard", cancel_once_encoding)
    assert run_shard(settings, store, job.id, 1) == Dispatch()
    cancelled = store.get(job.id)
    assert cancelled.status == CANCELLED and cancelled.message == "cancelled during reembed (shard 1); nothing was published"
    assert run_shard(settings, store, job.id, 0) == Dispatch(), "the other shards are not encoded any more"
    assert [m.release_id for m in releases.list()] == [live_id]
    assert not list(releases.releases_dir.glob(f"{STAGING_PREFIX}*"))
    assert store.shards(job.id) == [] and not (settings.data_dir / "jobs" / job.id / "shards").exists()


def test_a_cancel_between_steps_removes_the_unpromoted_candidate(setup):
    settings, corpus, releases, store, _, live_id = setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    assert run_reembed(settings, store, corpus, job.id) == Dispatch(step="evaluate")
    built = store.get(job.id).outputs["release_id"]
    assert releases.exists(built)
    store.request_cancel(job.id)
    assert run_step(settings, store, corpus, job.id, "evaluate") == Dispatch()
    final = store.get(job.id)
    assert final.status == CANCELLED and "nothing was published" in final.message
    assert not releases.exists(built) and releases.active() == live_id


def test_a_rerun_of_a_built_step_does_not_build_again(setup):
    settings, corpus, releases, store, _, _ = setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    run_reembed(settings, store, corpus, job.id)
    count = len(releases.list())
    store.advance(job.id, "reembed")
    assert run_step(settings, store, corpus, job.id, "reembed") == Dispatch(step="evaluate")
    assert len(releases.list()) == count


@pytest.mark.parametrize(
    "kind, params, message",
    [
        ("retrain", {"recipe": "default"}, "needs training data"),
        ("retrain", {"pairs": "/nope/pairs.jsonl"}, "pairs: /nope/pairs.jsonl does not exist"),
        ("retrain", {"pairs": [{"query": "q", "positive": "p"}], "recipe": "fastest"}, "no shipped recipe named 'fastest'"),
        ("retrain", {"pairs": [{"query": "q", "positive": "p"}, {"query": "q2"}]}, r"pairs.jsonl:2: .*positive"),
        ("retrain", {"pairs": [{"query": "q", "positive": "p"}], "recipe_toml": "[[stage]]\nname = \"s\"\nloss = \"magic\""}, "inline recipe"),
        ("reembed", {"dev_queries": "/etc/hostname"}, "both dev_queries and dev_qrels"),
    ],
)
def test_bad_jobs_are_refused_before_they_are_queued(setup, kind, params, message):
    settings, _, _, store, _, _ = setup
    with pytest.raises(InvalidInput, match=message):
        submit_job(store, lambda *_: pytest.fail("must not be queued"), settings.data_dir, kind, params)
    assert store.list() == []


def test_lost_means_a_gone_or_reused_process_on_this_host_or_long_silence(setup):
    _, _, _, store, _, _ = setup
    job = store.create("reembed", {})
    exited = subprocess.Popen(["true"])
    exited.wait()
    alive = store.claim(job.id, "reembed", worker_identity(), 60)
    assert not is_lost(alive, stale_after_s=60)
    assert is_lost(alive, stale_after_s=60, now=time.time() + 61)
    host, pid, started = worker_identity().split(":")
    dead = dataclasses.replace(alive, worker=f"{host}:{exited.pid}:{started}")
    reused = dataclasses.replace(alive, worker=f"{host}:{pid}:{int(started) + 1}")
    assert is_lost(dead, stale_after_s=60) and is_lost(reused, stale_after_s=60)
    handed_over = dataclasses.replace(alive, worker=None, heartbeat=time.time() - 100, updated=time.time() - 100)
    assert is_lost(handed_over, stale_after_s=60) and not is_lost(handed_over, stale_after_s=600)
    no_proc = dataclasses.replace(alive, worker=f"{host}:{pid}:None")
    assert not is_lost(no_proc, stale_after_s=60), "without start times, a live worker is not lost"
    assert is_lost(no_proc, stale_after_s=60, now=time.time() + 61)


def test_retrying_a_job_cancelled_after_its_build_rebuilds_and_goes_live(setup):
    settings, corpus, releases, store, _, live_id = setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    assert run_reembed(settings, store, corpus, job.id) == Dispatch(step="evaluate")
    store.request_cancel(job.id)
    run_step(settings, store, corpus, job.id, "evaluate")
    stopped = store.get(job.id)
    assert stopped.status == CANCELLED and stopped.step == "reembed" and "release_id" not in stopped.outputs
    retry_job(store, lambda *_: None, job.id)
    done = drive(settings, store, corpus, job.id, "reembed")
    assert done.status == SUCCEEDED and releases.active() == done.outputs["release_id"] != live_id


def test_cancelling_a_requeued_job_deletes_its_candidate(setup):
    settings, corpus, releases, store, _, live_id = setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    run_reembed(settings, store, corpus, job.id)
    built = store.get(job.id).outputs["release_id"]
    store.recover_lost(lambda j: False, 3)
    store.claim(job.id, "evaluate", "gone:1:1", 60)
    store.recover_lost(lambda j: True, 3)
    assert store.get(job.id).status == "queued"
    assert cancel_job(store, releases, job.id).status == CANCELLED
    assert not releases.exists(built) and releases.active() == live_id


def test_promotion_is_gated_again_when_the_live_release_changed(setup, other_model_dir):
    settings, corpus, releases, store, files, live_id = setup
    params = {"dev_queries": files["queries"], "dev_qrels": files["qrels"]}
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", params)
    assert run_reembed(settings, store, corpus, job.id) == Dispatch(step="evaluate")
    assert run_step(settings, store, corpus, job.id, "evaluate") == Dispatch(step="promote")
    other = build_release(corpus, releases, BuildOptions(model_path=other_model_dir, precision="fp32"), activate=True)
    assert run_step(settings, store, corpus, job.id, "promote") == Dispatch(step="evaluate")
    assert run_step(settings, store, corpus, job.id, "evaluate") in (Dispatch(step="promote"), Dispatch())
    assert store.get(job.id).metrics["gate"]["live_release"] == other.release_id


def test_a_release_going_live_while_promote_runs_sends_the_candidate_back_to_the_gate(setup, other_model_dir, monkeypatch):
    """Guards against a promotion that checks the live release, then activates after another release went live
    in between (an admin, another job), replacing a release it was never judged against."""
    settings, corpus, releases, store, files, live_id = setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed",
                     {"dev_queries": files["queries"], "dev_qrels": files["qrels"]})
    run_reembed(settings, store, corpus, job.id)
    assert run_step(settings, store, corpus, job.id, "evaluate") == Dispatch(step="promote")
    other = build_release(corpus, releases, BuildOptions(model_path=other_model_dir, precision="fp32"))
    read_active = ReleaseStore.active

    def then_another_goes_live(self):
        seen = read_active(self)
        if ReleaseStore(settings.data_dir).pointer().active == seen == live_id:
            ReleaseStore(settings.data_dir).activate(other.release_id)
        return seen

    monkeypatch.setattr(ReleaseStore, "active", then_another_goes_live)
    assert run_step(settings, store, corpus, job.id, "promote") == Dispatch(step="evaluate")
    assert releases.pointer().active == other.release_id
    with pytest.raises(ActiveChanged, match=f"release {other.release_id} went live"):
        releases.activate(store.get(job.id).outputs["release_id"], only_if_active=(live_id,))


def test_a_worker_that_lost_its_claim_cannot_write_the_job(setup):
    _, _, _, store, _, _ = setup
    job = store.create("reembed", {})
    store.claim(job.id, "reembed", "a:1:1", 60)
    store.claim(job.id, "reembed", "b:2:2", stale_after_s=0.0)
    with pytest.raises(ClaimLost, match="another worker took it over"):
        store.record(job.id, outputs={"release_id": "x"}, owner="a:1:1")
    with pytest.raises(ClaimLost):
        store.finish(job.id, SUCCEEDED, "done", owner="a:1:1")
    store.finish(job.id, SUCCEEDED, "done", owner="b:2:2")


def test_recovery_leaves_a_job_alone_if_a_worker_claims_it_meanwhile(setup):
    _, _, _, store, _, _ = setup
    job = store.create("reembed", {})
    store.claim(job.id, "reembed", "dead:1:1", 60)

    def claimed_meanwhile(found):
        store.claim(found.id, "reembed", "alive:2:2", stale_after_s=0.0)
        return True

    resend, failed = store.recover_lost(claimed_meanwhile, 3)
    assert resend == [] and failed == []
    assert store.get(job.id).worker == "alive:2:2"


def test_unreadable_inputs_and_bad_index_types_are_refused_and_uploads_removed(setup, tmp_path):
    settings, _, _, store, files, _ = setup
    packed = tmp_path / "qrels.tsv.gz"
    packed.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(InvalidInput, match=r"qrels: .*qrels\.tsv\.gz:1: not valid UTF-8 .*; re-encode the file as UTF-8, or decompress"):
        submit_job(store, lambda *_: None, settings.data_dir, "retrain", {"queries": files["queries"], "qrels": str(packed)})
    with pytest.raises(InvalidInput, match="not a valid FAISS factory string"):
        submit_job(store, lambda *_: None, settings.data_dir, "reembed", {"index_type": "HNSW-fast"}, dim=32)
    with pytest.raises(InvalidInput, match="dev_qrels"):
        submit_job(store, lambda *_: None, settings.data_dir, "reembed",
                   {"dev_queries": files["queries"], "dev_qrels": str(packed)})
    with pytest.raises(InvalidInput, match="positive"):
        submit_job(store, lambda *_: None, settings.data_dir, "retrain", {"pairs": [{"query": "q"}]})
    bad_uploads = [
        ({"pairs": [{"query": "q", "positive": "p", "negatives": ["n"], "negative_ids": 5}]}, r"pairs\.jsonl:1: .*one id per negative"),
        ({"pairs": [{"query": "q", "positive": "p \ud800"}]}, r"pairs\.jsonl:1: positive holds '\\ud800'"),
        ({"queries": {"q1": "text"}, "qrels": {"q1": {"d\t1": 1}}}, r"qrels id 'd\\t1' holds a tab"),
        ({"queries": {"q1": "text"}, "qrels": {"q\udc00": {"d1": 1}}}, r"qrels id '\\udc00'|lone surrogate"),
    ]
    for params, message in bad_uploads:
        with pytest.raises(InvalidInput, match=message):
            submit_job(store, lambda *_: None, settings.data_dir, "retrain", params)
    assert not any((settings.data_dir / "uploads").glob("*")) and store.list() == []


def test_shadow_agreement_counts_overlap_and_order():
    live = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"x": 2.0, "y": 1.0}}
    same = shadow_agreement(live, live)
    assert same["top10_overlap"] == 1.0 and same["kendall_tau"] == 1.0 and same["queries"] == 2
    flipped = shadow_agreement(live, {"q1": {"c": 3.0, "b": 2.0, "a": 1.0}, "q2": {"z": 1.0, "w": 0.5}})
    assert flipped["top10_overlap"] == 0.5 and flipped["kendall_tau"] == -1.0 and flipped["tau_queries"] == 1
    assert _kendall_tau(["a", "b", "c"], ["a", "c", "b"]) == pytest.approx(1 / 3)
    assert np.isclose(_kendall_tau(["a", "b"], ["b", "a"]), -1.0)


def test_a_retrain_job_on_uploaded_judgements_goes_live(setup):
    settings, corpus, releases, store, files, live_id = setup
    uploaded = {"queries": load_queries(files["queries"]), "qrels": load_qrels(files["qrels"])}
    job = run_job(settings, store, corpus, "retrain", {**uploaded, "recipe_toml": TINY_RECIPE})
    assert job.status == SUCCEEDED, job.message
    assert job.params["queries"].startswith(str(settings.data_dir / "uploads"))
    assert load_qrels(job.params["qrels"]) == uploaded["qrels"]
    assert releases.active() == job.outputs["release_id"] != live_id


def test_the_gate_ranks_as_the_service_serves_when_it_serves_hybrid_search(setup, other_model_dir):
    """Guards against a deployment serving hybrid search being gated on the dense ranking alone: with BM25 alone
    (weight 1) two different models rank the dev queries identically, and the report says how it ranked."""
    from indexer.live_release import LiveRelease
    from indexer.quality_gate import DevSet, judge

    settings, corpus, releases, store, files, live_id = setup
    other = build_release(corpus, releases, BuildOptions(model_path=other_model_dir, precision="fp32"))
    dev = DevSet(load_queries(files["queries"]), load_qrels(files["qrels"]), "test")
    live, candidate = LiveRelease.load(releases, live_id), LiveRelease.load(releases, other.release_id)
    dense = judge(candidate, live, dev, 0.0)
    assert dense.shadow["top10_overlap"] < 1.0 and dense.lexical_weight == 0.0
    lexical = judge(candidate, live, dev, 0.0, corpus, 1.0)
    assert lexical.candidate == lexical.live and lexical.shadow["top10_overlap"] == 1.0 and lexical.passed
    assert lexical.lexical_weight == 1.0 and lexical.reason.endswith("both hybrid with BM25 at weight 1")
    hybrid = settings.model_copy(update={"lexical_weight": 1.0})
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {"dev_queries": files["queries"], "dev_qrels": files["qrels"]})
    assert run_reembed(hybrid, store, corpus, job.id) == Dispatch(step="evaluate")
    run_step(hybrid, store, corpus, job.id, "evaluate")
    assert store.get(job.id).metrics["gate"]["lexical_weight"] == 1.0, "the job's gate follows LOCKSTEP_LEXICAL_WEIGHT"
