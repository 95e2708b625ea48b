"""Sharded re-embedding: shard files against the single-process build, idempotent shards, the join, lost workers.

The first tests call the shard functions and the job steps in-process (no broker);
the integration tests run a re-embed job over two real Celery workers on Redis and
SIGKILL one of them in the middle of a shard.
"""

import os
import random
import secrets
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from indexer.corpus_store import CorpusStore, Document
from indexer.embedding_shards import (
    INT8_SAMPLE_FILE, assemble_release, encode_shard, plan_shards, read_plan, vectors_path,
)
from indexer.job_steps import Dispatch, recover_lost_work, run_step, worker_identity
from indexer.job_store import FAILED, QUEUED, RUNNING, SHARD_DONE, SUCCEEDED, JobStore
from indexer.job_submission import submit_job
from indexer.live_release import LiveRelease
from indexer.manifest import INT8_MODEL_FILE
from indexer.reembed_shards import run_shard
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import STAGING_PREFIX, STALE_SECONDS, ReleaseStore
from indexer.settings import Settings
from indexer.vector_index import VectorIndex
from training.bi_encoder import BiEncoder
from service.job_queue import JobQueue
from tests.conftest import WORDS
from tests.processes import REDIS_URL, start_worker, stop
from tests.test_job_steps import drive
from training.errors import IntegrityError

SHARD_SIZE = 16


def varied_documents(count: int, seed: int = 0) -> list[Document]:
    """Documents of 2 to 30 words, so length-sorted batches differ between a shard and the whole corpus."""
    rng = random.Random(seed)
    return [Document(id=f"d{i:04d}", title=rng.choice(WORDS), text=" ".join(rng.choices(WORDS, k=rng.randint(2, 30))))
            for i in range(count)]


@pytest.fixture
def filled(corpus, releases):
    corpus.upsert(varied_documents(70))
    return corpus, releases


def dead_worker() -> str:
    """The identity of a worker process on this host that has exited."""
    exited = subprocess.Popen(["true"])
    exited.wait()
    host, _, started = worker_identity().split(":")
    return f"{host}:{exited.pid}:{started}"


def _encode_all(data_dir, folder, count):
    return {shard: encode_shard(data_dir, folder, shard, batch_size=8).checksum for shard in range(count)}


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32"])
def test_a_sharded_build_equals_the_single_process_build(filled, tiny_model_dir, tmp_path, index_type):
    corpus, releases = filled
    options = BuildOptions(model_path=tiny_model_dir, precision="fp32", batch_size=8, index_type=index_type)
    single = build_release(corpus, releases, options)
    folder = tmp_path / "shards"
    plan = plan_shards(corpus, releases, options, "r-20260101T000000Z-5a4d00", folder, SHARD_SIZE)
    assert plan.sizes == (16, 16, 16, 16, 6) and read_plan(folder) == plan
    sharded = assemble_release(releases, folder, _encode_all(releases.data_dir, folder, plan.count))

    assert releases.exists(sharded.release_id) and sharded.release_id != single.release_id
    for field in ("corpus_seq", "doc_count", "model", "precision", "index_type", "dim", "search_params", "reranker"):
        assert getattr(sharded, field) == getattr(single, field), field
    assert set(sharded.files) == set(single.files) == {"index.faiss", "ids.json"}
    assert (sharded.recall is None) == (index_type == "Flat")
    assert sharded.document_norms.mean == pytest.approx(single.document_norms.mean, rel=1e-5)
    one, many = VectorIndex.load(releases.path(single.release_id)), VectorIndex.load(releases.path(sharded.release_id))
    assert many.doc_ids() == one.doc_ids() == [doc.id for doc in corpus.snapshot()[1]]
    assert np.allclose(np.stack([many.reconstruct(i) for i in one.doc_ids()]),
                       np.stack([one.reconstruct(i) for i in one.doc_ids()]), atol=1e-5)
    live = LiveRelease.load(releases, sharded.release_id)
    document = corpus.get("d0042")
    assert live.search(corpus, document.embedding_text(), 1).hits[0].document.id == "d0042"


def test_encoding_shards_keeps_the_planned_model_from_gc(filled, tiny_model_dir, tmp_path):
    """Guards against gc deleting the model of a re-embed whose shards are being encoded: no release uses it yet."""
    corpus, releases = filled
    folder = tmp_path / "shards"
    plan = plan_shards(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32", batch_size=8),
                       "r-20260101T000000Z-5a4d0c", folder, SHARD_SIZE)
    model = releases.data_dir / plan.spec.model.path
    long_ago = time.time() - STALE_SECONDS - 3600
    os.utime(model, (long_ago, long_ago))
    checksums = _encode_all(releases.data_dir, folder, plan.count)
    releases.gc(keep=1)
    assert model.is_dir()
    assert assemble_release(releases, folder, checksums).doc_count == 70


def test_an_int8_sharded_build_encodes_every_shard_with_the_planned_onnx_model(filled, tiny_model_dir, tmp_path):
    corpus, releases = filled
    options = BuildOptions(model_path=tiny_model_dir, precision="int8", batch_size=8)
    single = build_release(corpus, releases, options)
    folder = tmp_path / "shards"
    plan = plan_shards(corpus, releases, options, "r-20260101T000000Z-5a4d04", folder, 32)
    assert plan.spec.precision == "int8" and (folder / INT8_MODEL_FILE).is_file()
    sharded = assemble_release(releases, folder, _encode_all(releases.data_dir, folder, plan.count))
    assert sharded.precision == "int8" and set(sharded.files) == {"index.faiss", "ids.json", INT8_MODEL_FILE}
    assert sharded.int8_agreement == single.int8_agreement
    one, many = VectorIndex.load(releases.path(single.release_id)), VectorIndex.load(releases.path(sharded.release_id))
    cosines = [float(many.reconstruct(i) @ one.reconstruct(i)) for i in one.doc_ids()]
    assert many.doc_ids() == one.doc_ids() and min(cosines) > 0.9999, "int8 activations are quantised per batch"
    assert LiveRelease.load(releases, sharded.release_id).encoder.precision == "int8"


def test_int8_shards_take_the_gate_sample_vectors_instead_of_encoding_them_again(filled, tiny_model_dir, tmp_path, monkeypatch):
    corpus, releases = filled
    options = BuildOptions(model_path=tiny_model_dir, precision="int8", batch_size=8, int8_sample=20)
    folder = tmp_path / "shards"
    plan = plan_shards(corpus, releases, options, "r-20260101T000000Z-5a4d04", folder, SHARD_SIZE)
    with np.load(folder / INT8_SAMPLE_FILE) as data:
        rows, sample_vectors = data["rows"], data["vectors"]
    _, documents = corpus.snapshot()
    sampled = {documents[row].embedding_text() for row in rows}
    assert len(rows) == len(sampled) == 20

    encoded: list[str] = []
    encode = BiEncoder.encode_with_norms

    def recording(encoder, texts, *args, **kwargs):
        encoded.extend(texts)
        return encode(encoder, texts, *args, **kwargs)

    monkeypatch.setattr(BiEncoder, "encode_with_norms", recording)
    manifest = assemble_release(releases, folder, _encode_all(releases.data_dir, folder, plan.count))
    monkeypatch.undo()
    everything = {doc.embedding_text() for doc in documents}
    assert len(encoded) == len(documents) - 20 and set(encoded) == everything - sampled

    index = VectorIndex.load(releases.path(manifest.release_id))
    assert np.array_equal(np.stack([index.reconstruct(documents[row].id) for row in rows]), sample_vectors)
    live = LiveRelease.load(releases, manifest.release_id)
    fresh = live.encoder.encode([doc.embedding_text() for doc in documents], batch_size=8)
    stored = np.stack([index.reconstruct(doc.id) for doc in documents])
    assert np.sum(fresh * stored, axis=1).min() > 0.9999, "int8 activations are quantised per batch"


@pytest.mark.parametrize("damage", ["remove", "truncate", "shift"])
def test_an_int8_shard_refuses_a_damaged_gate_sample(filled, tiny_model_dir, tmp_path, damage):
    corpus, releases = filled
    options = BuildOptions(model_path=tiny_model_dir, precision="int8", batch_size=8, int8_sample=20)
    folder = tmp_path / "shards"
    plan_shards(corpus, releases, options, "r-20260101T000000Z-5a4d04", folder, SHARD_SIZE)
    path = folder / INT8_SAMPLE_FILE
    if damage == "remove":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        with np.load(path) as data:
            arrays = dict(data)
        np.savez(path, **{**arrays, "rows": arrays["rows"] + 1000})
    with pytest.raises(IntegrityError, match=f"the int8 sample {path} .*; plan the re-embed again"):
        encode_shard(releases.data_dir, folder, 0, batch_size=8)
    assert not vectors_path(folder, 0).exists()


def test_a_shard_already_on_disk_is_kept_and_a_torn_one_is_encoded_again(filled, tiny_model_dir, tmp_path):
    corpus, releases = filled
    folder = tmp_path / "shards"
    options = BuildOptions(model_path=tiny_model_dir, precision="fp32")
    plan_shards(corpus, releases, options, "r-20260101T000000Z-5a4d01", folder, SHARD_SIZE)
    first = encode_shard(releases.data_dir, folder, 2, batch_size=8)
    written = vectors_path(folder, 2).stat().st_mtime_ns
    again = encode_shard(releases.data_dir, folder, 2, batch_size=8)
    assert not first.reused and again.reused and again.checksum == first.checksum
    assert vectors_path(folder, 2).stat().st_mtime_ns == written
    vectors_path(folder, 2).write_bytes(vectors_path(folder, 2).read_bytes()[:100])
    redone = encode_shard(releases.data_dir, folder, 2, batch_size=8)
    assert not redone.reused and redone.checksum == first.checksum
    assert not list(folder.glob(".*.tmp")), "no temporary file is left behind"


def test_assembling_refuses_a_missing_or_changed_shard_and_publishes_nothing(filled, tiny_model_dir, tmp_path):
    corpus, releases = filled
    folder = tmp_path / "shards"
    plan = plan_shards(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"),
                       "r-20260101T000000Z-5a4d02", folder, SHARD_SIZE)
    checksums = _encode_all(releases.data_dir, folder, plan.count)
    shard_one = vectors_path(folder, 1).read_bytes()
    vectors_path(folder, 2).unlink()
    with pytest.raises(IntegrityError, match=r"shard\(s\) 2 of 5 are missing"):
        assemble_release(releases, folder, checksums)
    encode_shard(releases.data_dir, folder, 2, batch_size=8)
    vectors_path(folder, 1).write_bytes(vectors_path(folder, 3).read_bytes())
    with pytest.raises(IntegrityError, match=r"shard\(s\) 1 of 5"):
        assemble_release(releases, folder, checksums)
    with pytest.raises(IntegrityError, match="shard 1 .* does not match its input"):
        assemble_release(releases, folder)
    assert releases.list() == [] and not list(releases.releases_dir.glob(f"{STAGING_PREFIX}*"))
    vectors_path(folder, 1).write_bytes(shard_one)
    assert assemble_release(releases, folder, checksums).doc_count == 70


def test_writes_made_while_shards_run_are_caught_up_from_the_snapshot_sequence(filled, tiny_model_dir, tmp_path):
    corpus, releases = filled
    folder = tmp_path / "shards"
    plan = plan_shards(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"),
                       "r-20260101T000000Z-5a4d03", folder, SHARD_SIZE)
    corpus.upsert([Document(id="late", text="zebra giraffe written while the shards were encoded"),
                   Document(id="d0005", text="banana cherry changed while the shards were encoded")])
    corpus.delete("d0007")
    manifest = assemble_release(releases, folder, _encode_all(releases.data_dir, folder, plan.count))
    assert manifest.corpus_seq == plan.spec.corpus_seq == 70 and manifest.doc_count == 70
    live = LiveRelease.load(releases, manifest.release_id)
    assert "late" not in live.index and "d0007" in live.index
    assert live.catch_up(corpus) == 3
    assert "late" in live.index and "d0007" not in live.index
    changed = live.search(corpus, "banana cherry changed while the shards were encoded", 1).hits[0]
    assert changed.document.id == "d0005" and changed.score == pytest.approx(1.0, abs=1e-4)


@pytest.fixture
def job_setup(data_dir, tiny_model_dir):
    settings = Settings(data_dir=data_dir, model=tiny_model_dir, precision="fp32", batch_size=8, shard_size=SHARD_SIZE)
    corpus = CorpusStore(settings.corpus_path)
    corpus.upsert(varied_documents(70))
    releases = ReleaseStore(data_dir)
    live = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    store = JobStore(settings.jobs_path)
    yield settings, corpus, releases, store, live.release_id
    store.close()
    corpus.close()


def test_a_reembed_job_runs_as_shards_goes_live_and_leaves_no_shard_behind(job_setup):
    settings, corpus, releases, store, live_id = job_setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    planned = run_step(settings, store, corpus, job.id, "reembed")
    assert planned == Dispatch(shards=(0, 1, 2, 3, 4))
    running = store.get(job.id)
    assert running.status == RUNNING and running.worker is None, "the job is handed to its shards"
    assert [shard.status for shard in store.shards(job.id)] == [QUEUED] * 5
    done = drive(settings, store, corpus, job.id, "reembed")
    assert done.status == SUCCEEDED and releases.active() == done.outputs["release_id"] != live_id
    assert done.metrics["reembed"] == {"shards": 5, "shard_documents": [16, 16, 16, 16, 6],
                                       "shard_attempts": [1, 1, 1, 1, 1], "workers": 1}
    assert done.metrics["release"]["documents"] == 70 and done.attempts == 1
    assert store.shards(job.id) == [] and not (settings.data_dir / "jobs" / job.id / "shards").exists()


def test_a_redelivered_shard_is_not_encoded_again_and_does_not_send_the_step_twice(job_setup):
    settings, corpus, _, store, _ = job_setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    planned = run_step(settings, store, corpus, job.id, "reembed")
    sent = [run_shard(settings, store, job.id, shard) for shard in planned.shards]
    assert sent[-1] == Dispatch(step="reembed")
    assert run_shard(settings, store, job.id, 4) == Dispatch() and run_shard(settings, store, job.id, 0) == Dispatch()
    assert [shard.attempts for shard in store.shards(job.id)] == [1, 1, 1, 1, 1]
    assert run_step(settings, store, corpus, job.id, "reembed") == Dispatch(step="evaluate")


def test_exactly_one_of_two_workers_finishing_the_last_shards_at_once_assembles(data_dir):
    stores = [JobStore(data_dir / "jobs.sqlite3") for _ in range(2)]
    for _ in range(15):
        job = stores[0].create("reembed", {})
        stores[0].claim(job.id, "reembed", "planner:1:1", 60)
        stores[0].add_shards(job.id, [10, 10])
        stores[0].advance(job.id, "reembed")
        for shard, store in enumerate(stores):
            store.claim_shard(job.id, shard, f"worker{shard}:1:1", 60)
        barrier, results = threading.Barrier(2), [None, None]

        def complete(shard):
            barrier.wait()
            results[shard] = stores[shard].complete_shard(job.id, shard, f"worker{shard}:1:1", "sum")

        threads = [threading.Thread(target=complete, args=(shard,)) for shard in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [False, True]
    for store in stores:
        store.close()


def test_a_lost_shard_worker_costs_only_that_shard(job_setup):
    settings, corpus, releases, store, _ = job_setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    run_step(settings, store, corpus, job.id, "reembed")
    assert run_shard(settings, store, job.id, 0) == Dispatch()
    store.claim_shard(job.id, 2, dead_worker(), settings.job_stale_after_s)
    assert run_shard(settings, store, job.id, 2) == Dispatch(), "until recovery, its fresh heartbeat keeps it held"
    recovery = recover_lost_work(settings, store)
    assert recovery.resend == [(job.id, Dispatch(shards=(2,)))] and recovery.failed == []
    assert [(s.status, s.attempts) for s in store.shards(job.id)] == [(SHARD_DONE, 1), (QUEUED, 0), (QUEUED, 1),
                                                                       (QUEUED, 0), (QUEUED, 0)]
    done = drive(settings, store, corpus, job.id, "reembed")
    assert done.status == SUCCEEDED and done.metrics["reembed"]["shard_attempts"] == [1, 1, 2, 1, 1]


def test_a_shard_lost_too_often_fails_the_job_and_removes_its_shards(job_setup):
    settings, corpus, releases, store, live_id = job_setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    run_step(settings, store, corpus, job.id, "reembed")
    store.claim_shard(job.id, 1, dead_worker(), 60)
    recovery = recover_lost_work(settings.model_copy(update={"job_max_attempts": 1}), store)
    assert [failed.id for failed in recovery.failed] == [job.id] and recovery.resend == []
    failed = store.get(job.id)
    assert failed.status == FAILED and "shard 1 of step reembed was lost 1 times" in failed.message
    assert store.shards(job.id) == [] and not (settings.data_dir / "jobs" / job.id / "shards").exists()
    assert [m.release_id for m in releases.list()] == [live_id]


def test_a_reembed_rerun_after_its_shards_were_planned_sends_only_the_queued_ones(job_setup):
    settings, corpus, _, store, _ = job_setup
    job = submit_job(store, lambda *_: None, settings.data_dir, "reembed", {})
    run_step(settings, store, corpus, job.id, "reembed")
    store.claim_shard(job.id, 0, "busy:1:1", 60)
    assert run_step(settings, store, corpus, job.id, "reembed") == Dispatch(shards=(1, 2, 3, 4))


# Real workers ----------------------------------------------------------------------------------------------------

WORKER_SHARD_SIZE = 48
WORKER_SHARDS = 6


def _wait_until_ready(log_path, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and b" ready." in log_path.read_bytes():
            return
        time.sleep(0.1)
    pytest.fail(f"the worker did not become ready in {timeout:.0f} s: {log_path.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    """A data dir with a live release and two Celery workers on Redis, encoding two documents per batch."""
    root = tmp_path_factory.mktemp("sharded")
    data_dir = root / "data"
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    corpus.upsert(varied_documents(WORKER_SHARD_SIZE * WORKER_SHARDS))
    releases = ReleaseStore(data_dir)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    env = {"broker_url": REDIS_URL, "queue": f"lockstep-shards-{secrets.token_hex(4)}", "precision": "fp32",
           "model": tiny_model_dir, "batch_size": "2", "shard_size": str(WORKER_SHARD_SIZE), "job_stale_after_s": "8",
           "log_level": "info"}
    settings = Settings(data_dir=data_dir, **{k: v for k, v in env.items() if k != "log_level"})
    workers, logs = {}, {}

    def start(name):
        logs[name] = root / f"{name}-{secrets.token_hex(2)}.log"
        workers[name] = start_worker(data_dir, logs[name], **env)

    def ready():
        for log in logs.values():
            _wait_until_ready(log)

    for name in ("worker-1", "worker-2"):
        start(name)
    ready()
    store, queue = JobStore(settings.jobs_path), JobQueue(settings)
    yield settings, corpus, releases, store, queue, workers, start, ready
    for worker in workers.values():
        stop(worker, signal.SIGKILL)
    queue.close()
    store.close()
    corpus.close()


def _wait_for(store, job_id, until, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if until(job):
            return job
        time.sleep(0.05)
    pytest.fail(f"job {job_id} did not get there in {timeout:.0f} s: {store.get(job_id)}")


def _ended(job):
    return job.terminal


@pytest.mark.integration
def test_two_workers_share_the_shards_and_the_release_goes_live(cluster):
    settings, corpus, releases, store, queue, _, _, ready = cluster
    ready()
    job = submit_job(store, queue.enqueue, settings.data_dir, "reembed", {})
    seen = _wait_for(store, job.id, lambda j: j.progress.get("shards", {}).get("running") == 2 or j.terminal)
    assert seen.progress.get("phase") == "reembed: encode", seen.progress
    done = _wait_for(store, job.id, _ended)
    assert done.status == SUCCEEDED, done
    assert done.metrics["reembed"]["shard_attempts"] == [1] * WORKER_SHARDS and done.metrics["reembed"]["workers"] == 2
    assert releases.active() == done.outputs["release_id"]
    assert releases.manifest(releases.active()).doc_count == WORKER_SHARD_SIZE * WORKER_SHARDS


@pytest.mark.integration
def test_a_worker_killed_mid_shard_costs_that_shard_alone(cluster):
    settings, corpus, releases, store, queue, workers, start, ready = cluster
    ready()
    job = submit_job(store, queue.enqueue, settings.data_dir, "reembed", {})
    by_pid = {worker.pid: name for name, worker in workers.items()}

    def encoding(j):
        if j.terminal:
            pytest.fail(f"the job ended before a worker was caught encoding a shard: {j}")
        return any(s.status == RUNNING and s.done > 0 for s in store.shards(j.id))

    victim = None
    while victim is None:
        _wait_for(store, job.id, encoding)
        running = next((s for s in store.shards(job.id) if s.status == RUNNING and s.done > 0), None)
        if running is None:
            continue
        process = workers[by_pid[int(running.worker.split(":")[1])]]
        os.kill(process.pid, signal.SIGSTOP)
        now = next(s for s in store.shards(job.id) if s.shard == running.shard)
        if now.status == RUNNING and now.worker == running.worker:
            victim = (running.shard, process)
        else:
            os.kill(process.pid, signal.SIGCONT)
    killed_shard, process = victim
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = _wait_for(store, job.id, _ended)
    assert done.status == SUCCEEDED, done
    attempts = done.metrics["reembed"]["shard_attempts"]
    assert attempts[killed_shard] == 2 and attempts.count(1) == WORKER_SHARDS - 1, attempts
    assert done.attempts == 1, "the job itself was never rerun"
    assert releases.active() == done.outputs["release_id"]
    assert releases.manifest(releases.active()).doc_count == WORKER_SHARD_SIZE * WORKER_SHARDS
    start(by_pid[process.pid])
