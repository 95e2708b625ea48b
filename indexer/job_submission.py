"""Accepting a job: validate what it asks for, store uploaded training data, record it, enqueue its first step.

Training data may be paths the workers can read, or sent inline (pairs, queries,
qrels); inline data is written to `<data_dir>/uploads/<id>/` in the same formats the
file readers take (JSON escapes any character UTF-8 cannot hold, so the reader
refuses it with the line), so a job's parameters are always paths and a rerun reads
the same bytes. A job is only recorded once everything it names has been checked, and
if the queue cannot be reached the record says so instead of sitting queued forever.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from indexer.job_steps import validate_params
from indexer.job_store import FAILED, STEPS, Job, JobStore
from indexer.training_roots import confine_paths
from training.errors import InvalidInput, NotReady
from training.utf8 import require_utf8

Enqueue = Callable[[str, str], None]


def _write_pairs(folder: Path, pairs: list) -> Path:
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in pairs), encoding="utf-8")
    return path


def _write_queries(folder: Path, queries: dict) -> Path:
    path = folder / "queries.jsonl"
    lines = (json.dumps({"_id": query_id, "text": text}) + "\n" for query_id, text in queries.items())
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _write_qrels(folder: Path, qrels: dict) -> Path:
    path = folder / "qrels.tsv"
    rows = ["query-id\tcorpus-id\tscore\n"]
    for query_id, judged in qrels.items():
        if not isinstance(judged, dict):
            raise InvalidInput(f"qrels[{query_id!r}] must map document ids to relevance grades")
        for name in (query_id, *judged):
            if any(separator in name for separator in "\t\r\n"):
                raise InvalidInput(f"qrels id {name!r} holds a tab or a line break, which the qrels file cannot "
                                   "hold; use ids without them")
            require_utf8(name, f"qrels id {name!r}")
        rows.extend(f"{query_id}\t{doc_id}\t{grade}\n" for doc_id, grade in judged.items())
    path.write_text("".join(rows), encoding="utf-8")
    return path


_WRITERS = {"pairs": _write_pairs, "queries": _write_queries, "qrels": _write_qrels}


def store_uploads(folder: Path, params: dict) -> dict:
    """Replace inline pairs/queries/qrels in `params` with files in `folder`; paths pass through."""
    inline = {key: value for key, value in params.items() if key in _WRITERS and not isinstance(value, (str, type(None)))}
    if not inline:
        return params
    folder.mkdir(parents=True)
    return params | {key: str(_WRITERS[key](folder, value)) for key, value in inline.items()}


def _enqueue_or_fail(store: JobStore, enqueue: Enqueue, job: Job) -> Job:
    try:
        enqueue(job.id, job.step)
    except Exception as exc:
        store.finish(job.id, FAILED, f"could not reach the job queue: {exc}", error=repr(exc))
        raise NotReady(
            f"job {job.id} could not be queued ({type(exc).__name__}: {exc}); check LOCKSTEP_BROKER_URL "
            f"and that the broker is running, then POST /v1/jobs/{job.id}/retry"
        ) from exc
    return job


def submit_job(
    store: JobStore, enqueue: Enqueue, data_dir: Path, kind: str, params: dict, dim: int | None = None,
    roots: Sequence[Path] | None = None, default_model: Path | None = None,
) -> Job:
    """Validate, record and enqueue a job; raises InvalidInput naming what to fix, NotReady if the queue is down.

    `dim` is the live model's dimension and `default_model` the model a first build would
    use, which check a requested index type (`validate_params`). With
    `roots` (the HTTP API passes the data dir and LOCKSTEP_TRAINING_ROOTS), every
    path the job names must lie inside one of them.
    """
    if kind not in STEPS:
        raise InvalidInput(f"unknown job kind {kind!r}")
    if roots is not None:
        confine_paths(params, roots)
    uploads = data_dir / "uploads" / secrets.token_hex(8)
    try:
        params = store_uploads(uploads, {key: value for key, value in params.items() if value is not None})
        validate_params(kind, params, dim, default_model)
        job = store.create(kind, params)
    except BaseException:
        shutil.rmtree(uploads, ignore_errors=True)
        raise
    return _enqueue_or_fail(store, enqueue, job)


def retry_job(store: JobStore, enqueue: Enqueue, job_id: str) -> Job:
    """Queue a failed or cancelled job again from the step it stopped at."""
    return _enqueue_or_fail(store, enqueue, store.requeue(job_id))
