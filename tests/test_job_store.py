"""Job records: claims that make redelivery harmless, cancellation, retry and recovery of lost workers."""

import time

import pytest

from indexer.job_store import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobStore
from training.errors import Conflict, InvalidInput, NotFound


@pytest.fixture
def store(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    yield jobs
    jobs.close()


def test_a_step_is_claimed_once_and_records_survive_reopening(store, tmp_path):
    job = store.create("retrain", {"recipe": "quick"})
    assert (job.status, job.step) == (QUEUED, "retrain")
    first = store.claim(job.id, "retrain", "host:1", stale_after_s=60)
    assert first.status == RUNNING and first.worker == "host:1" and first.attempts == 1
    assert store.claim(job.id, "retrain", "host:2", stale_after_s=60) is None, "a live worker holds it"
    assert store.claim(job.id, "reembed", "host:1", stale_after_s=60) is None, "not at that step yet"
    store.record(job.id, outputs={"model_path": "/m"}, metrics={"training": {"ndcg@10": 0.5}})
    store.advance(job.id, "reembed")
    second = store.claim(job.id, "reembed", "host:2", stale_after_s=60)
    assert second.worker == "host:2" and second.attempts == 1, "a hand-over is not a new attempt"
    store.finish(job.id, SUCCEEDED, "done")
    assert store.claim(job.id, "reembed", "host:2", stale_after_s=60) is None, "finished jobs never rerun"
    reopened = JobStore(tmp_path / "jobs.sqlite3").get(job.id)
    assert reopened.status == SUCCEEDED and reopened.outputs == {"model_path": "/m"}
    assert reopened.metrics["training"] == {"ndcg@10": 0.5} and reopened.finished >= reopened.started


def test_counts_cover_every_status(store):
    assert set(store.counts().values()) == {0}
    for _ in range(3):
        store.create("reembed", {})
    running = store.create("retrain", {})
    store.claim(running.id, "retrain", "host:1", 60)
    counts = store.counts()
    assert counts[QUEUED] == 3 and counts[RUNNING] == 1 and counts[CANCELLED] == 0 and sum(counts.values()) == 4


def test_a_stale_worker_loses_its_claim(store):
    job = store.create("reembed", {})
    store.claim(job.id, "reembed", "host:1", stale_after_s=60)
    assert store.claim(job.id, "reembed", "host:2", stale_after_s=0.0) is not None


def test_cancelling_a_queued_job_ends_it_and_a_running_one_is_asked(store):
    queued = store.create("reembed", {})
    assert store.request_cancel(queued.id).status == CANCELLED
    assert store.claim(queued.id, "reembed", "host:1", 60) is None
    running = store.create("reembed", {})
    store.claim(running.id, "reembed", "host:1", 60)
    assert store.request_cancel(running.id).cancel_requested
    assert store.report(running.id, {"phase": "encode"}) is True
    store.finish(running.id, CANCELLED, "stopped")
    with pytest.raises(Conflict, match="already ended"):
        store.request_cancel(running.id)


def test_retry_resumes_a_failed_job_at_its_step(store):
    job = store.create("retrain", {})
    store.claim(job.id, "retrain", "host:1", 60)
    store.advance(job.id, "reembed")
    store.claim(job.id, "reembed", "host:1", 60)
    store.finish(job.id, FAILED, "disk full", error="OSError")
    again = store.requeue(job.id)
    assert (again.status, again.step, again.error) == (QUEUED, "reembed", None)
    with pytest.raises(Conflict, match="only failed or cancelled"):
        store.requeue(job.id)


def test_lost_jobs_are_requeued_until_their_attempts_run_out(store):
    job = store.create("reembed", {})
    store.claim(job.id, "reembed", "host:1", 60)
    requeued, failed = store.recover_lost(lambda j: j.worker == "host:1", max_attempts=2)
    assert [j.id for j in requeued] == [job.id] and not failed and requeued[0].status == QUEUED
    store.claim(job.id, "reembed", "host:1", 60)
    requeued, failed = store.recover_lost(lambda j: True, max_attempts=2)
    assert not requeued and [j.status for j in failed] == [FAILED]
    assert "lost 2 times" in failed[0].message


def test_a_handed_over_job_whose_message_is_lost_is_sent_again_without_a_new_attempt(store):
    job = store.create("retrain", {})
    store.claim(job.id, "retrain", "host:1", 60)
    store.advance(job.id, "reembed", owner="host:1")
    before = store.get(job.id)
    resend, failed = store.recover_lost(lambda j: True, max_attempts=1)
    assert [j.id for j in resend] == [job.id] and not failed
    after = store.get(job.id)
    assert (after.status, after.step, after.attempts) == (RUNNING, "reembed", 1) and after.updated > before.updated


def test_a_queued_job_whose_message_is_lost_is_sent_again_and_a_fresh_one_is_left_alone(store):
    """Guards against a job that was queued (or put back by recovery) but whose message never reached the broker
    waiting forever: only running jobs used to be looked at."""
    waiting, fresh = store.create("reembed", {}), store.create("retrain", {})
    resend, failed = store.recover_lost(lambda j: j.id == waiting.id, max_attempts=1)
    assert [j.id for j in resend] == [waiting.id] and not failed
    after = store.get(waiting.id)
    assert (after.status, after.step, after.attempts) == (QUEUED, "reembed", 0) and after.updated > waiting.updated
    assert store.get(fresh.id).updated == fresh.updated
    claimed = store.claim(waiting.id, "reembed", "host:1", 60)
    assert claimed.status == RUNNING


def test_listing_filters_and_errors_name_the_fix(store):
    older = store.create("reembed", {})
    time.sleep(0.01)
    newer = store.create("retrain", {})
    store.request_cancel(older.id)
    assert [j.id for j in store.list()] == [newer.id, older.id]
    assert [j.id for j in store.list(status=CANCELLED)] == [older.id]
    with pytest.raises(InvalidInput, match="unknown status"):
        store.list(status="done")
    with pytest.raises(NotFound, match="GET /v1/jobs"):
        store.get("j-nope")
    with pytest.raises(InvalidInput, match="unknown job kind"):
        store.create("train", {})
