"""The steps of a job: retrain the bi-encoder, re-embed the corpus, evaluate the candidate, promote it.

`run_step` is what a worker calls for one step of one job: it claims the step,
runs it with progress, heartbeats and cooperative cancellation, records its output
in the job, and says which step comes next. Steps are idempotent: a step whose
output is already recorded (a model folder, a published release) is not redone,
so a redelivered message or a rerun after a lost worker finishes the job instead
of duplicating it. A failed or cancelled step leaves nothing half-done: a partial
model folder or staging release is removed, and an unpromoted candidate release of
a cancelled job is deleted. Nothing here knows about Celery.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from indexer.corpus_store import CorpusStore
from indexer.job_store import CANCELLED, FAILED, REJECTED, SUCCEEDED, Job, JobStore
from indexer.live_release import LiveRelease
from indexer.model_store import ModelStore
from indexer.quality_gate import DevSet, judge
from indexer.retrieval_eval import judged_queries
from indexer.release_builder import BuildOptions, build_release
from indexer.release_events import announce
from indexer.release_store import ReleaseStore, new_release_id
from indexer.settings import Settings
from indexer.training_inputs import load_training_data
from training.bi_encoder import BiEncoder
from training.errors import InvalidInput, LockstepError
from training.eval_data import load_qrels, load_queries, split_queries
from training.examples import load_pairs
from training.recipe import Recipe, named_recipe, parse_recipe_text
from training.trainer import TrainingCancelled

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5
HEARTBEAT_EVERY_S = 5.0
MODEL_DIR, PARTIAL_MODEL_DIR, RUN_DIR = "model", "model.partial", "run"


class JobCancelled(LockstepError):
    """The job was cancelled while a step ran."""


def worker_identity() -> str:
    """`host:pid` of this process, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def is_lost(job: Job, stale_after_s: float, now: float | None = None) -> bool:
    """A running job is lost when its worker process on this host is gone or its heartbeat is stale."""
    now = now or time.time()
    if job.worker:
        host, _, pid = job.worker.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
            return True
    return now - (job.heartbeat or job.updated) > stale_after_s


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StepOutcome:
    """What a step produced; `end` is (status, message) when the job stops here."""

    outputs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    end: tuple[str, str] | None = None


@dataclass
class JobContext:
    """One claimed step: the job, the stores it works on, and its progress and cancellation checks."""

    settings: Settings
    store: JobStore
    job: Job
    corpus: CorpusStore
    releases: ReleaseStore
    _phase: str = ""
    _phase_started: float = 0.0
    _last_report: float = 0.0
    _cancel_requested: bool = False

    @property
    def job_dir(self) -> Path:
        return self.settings.data_dir / "jobs" / self.job.id

    def progress(self, phase: str, done: int, total: int, metrics: dict | None = None) -> None:
        """Record progress (throttled) with an ETA; raises JobCancelled once cancellation is requested."""
        now = time.monotonic()
        if phase != self._phase:
            self._phase, self._phase_started = phase, now
        if now - self._last_report >= REPORT_EVERY_S or done >= total:
            self._last_report = now
            elapsed = now - self._phase_started
            eta = elapsed / done * (total - done) if done and total >= done else None
            report = {"step": self.job.step, "phase": phase, "done": done, "total": total,
                      "eta_s": round(eta, 1) if eta is not None else None}
            if metrics:
                report["metrics"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}
            self._cancel_requested = self.store.report(self.job.id, report)
        if self._cancel_requested:
            raise JobCancelled(f"job {self.job.id} was cancelled during {phase}")

    def should_stop(self) -> bool:
        """For loops that stop themselves (training): True once cancellation is requested."""
        if not self._cancel_requested:
            self._cancel_requested = self.store.report(self.job.id)
        return self._cancel_requested

    def check_cancelled(self) -> None:
        if self.should_stop():
            raise JobCancelled(f"job {self.job.id} was cancelled during {self.job.step}")


def _active_manifest(releases: ReleaseStore):
    active = releases.active()
    return releases.manifest(active) if active else None


def _base_model(ctx: JobContext) -> Path:
    """The model a job starts from: the live release's, else the configured default."""
    manifest = _active_manifest(ctx.releases)
    return ctx.settings.data_dir / manifest.model.path if manifest else ctx.settings.model_path()


def job_recipe(params: dict) -> Recipe:
    """The recipe a retrain job asked for: inline TOML, or a shipped recipe by name (default: `default`)."""
    if params.get("recipe_toml"):
        return parse_recipe_text(params["recipe_toml"], "inline recipe")
    return named_recipe(params.get("recipe") or "default")


def _path(params: dict, key: str) -> Path | None:
    return Path(params[key]) if params.get(key) else None


def retrain(ctx: JobContext) -> StepOutcome:
    """Fine-tune the live model on the job's data with its recipe; the model goes to `<job>/model`."""
    from training.fine_tune import fine_tune

    out = ctx.job_dir / MODEL_DIR
    if (out / "lockstep.json").is_file():
        return StepOutcome(outputs={"model_path": str(out)})
    params = ctx.job.params
    recipe = job_recipe(params)
    data = load_training_data(
        queries=_path(params, "queries"), qrels=_path(params, "qrels"), corpus_file=_path(params, "corpus"),
        pairs=_path(params, "pairs"), corpus=ctx.corpus,
    )
    partial, run_dir = ctx.job_dir / PARTIAL_MODEL_DIR, ctx.job_dir / RUN_DIR
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    base = _base_model(ctx)
    try:
        summary = fine_tune(
            base, data, recipe, partial, run_dir,
            progress=lambda stage, step, total, metrics: ctx.progress(f"retrain: {stage}", step, total, metrics),
            should_stop=ctx.should_stop,
        )
    except TrainingCancelled as exc:
        raise JobCancelled(str(exc)) from exc
    finally:
        if not (partial / "lockstep.json").is_file():
            shutil.rmtree(partial, ignore_errors=True)
    training = {"base": summary.base, "final": summary.final, "stages": summary.stages, "alerts": summary.alerts,
                "dev_queries": summary.dev_queries, "train_examples": summary.train_examples, "run_dir": str(run_dir)}
    if all(stage["gated"] for stage in summary.stages):
        shutil.rmtree(partial, ignore_errors=True)
        return StepOutcome(metrics={"training": training}, end=(
            REJECTED,
            f"training did not improve dev nDCG@10 ({summary.base.get('ndcg@10', 0):.4f}) in any stage, so no "
            "release was built; see the alerts in metrics.training and try more data or another recipe",
        ))
    os.replace(partial, out)
    return StepOutcome(outputs={"model_path": str(out)}, metrics={"training": training})


def _model_name(ctx: JobContext, live) -> str | None:
    """How the release names its model: the base name plus the job for a fine-tuned one; None reads the folder."""
    base = live.model.name if live else ctx.settings.model_name()
    if ctx.job.outputs.get("model_path"):
        return f"{base or 'model'} fine-tuned by {ctx.job.id}"
    return None if ctx.job.params.get("model") else base


def reembed(ctx: JobContext) -> StepOutcome:
    """Embed the whole corpus with the job's model into a new (inactive) release."""
    outputs, params = ctx.job.outputs, ctx.job.params
    release_id = outputs.get("release_id")
    if release_id and ctx.releases.exists(release_id):
        return StepOutcome()
    if not release_id:
        release_id = new_release_id()
        ctx.store.record(ctx.job.id, outputs={"release_id": release_id})
    live = _active_manifest(ctx.releases)
    model_path = Path(outputs.get("model_path") or params.get("model") or _base_model(ctx))
    options = BuildOptions(
        model_path=model_path,
        model_name=_model_name(ctx, live),
        index_type=params.get("index_type") or (live.index_type if live else ctx.settings.index_type),
        batch_size=ctx.settings.batch_size,
        reranker_path=ctx.settings.data_dir / live.reranker.path if live and live.reranker else ctx.settings.reranker,
        precision=ctx.settings.precision,
        ef_search=ctx.settings.ef_search,
        nprobe=ctx.settings.nprobe,
    )
    manifest = build_release(
        ctx.corpus, ctx.releases, options, release_id=release_id,
        progress=lambda phase, done, total: ctx.progress(f"reembed: {phase}", done, total),
    )
    return StepOutcome(metrics={"release": {"id": manifest.release_id, "documents": manifest.doc_count,
                                            "corpus_seq": manifest.corpus_seq, "model": manifest.model.name,
                                            "fingerprint": manifest.model.fingerprint}})


def dev_set_for(ctx: JobContext) -> DevSet | None:
    """The gate's dev set: the job's, else the configured one, else the recipe's held-out split of the job's qrels."""
    params, settings = ctx.job.params, ctx.settings
    if params.get("dev_queries") and params.get("dev_qrels"):
        return DevSet(load_queries(params["dev_queries"]), load_qrels(params["dev_qrels"]), "the job's dev set")
    if settings.dev_queries and settings.dev_qrels:
        return DevSet(load_queries(settings.dev_queries), load_qrels(settings.dev_qrels),
                      f"LOCKSTEP_DEV_QRELS={settings.dev_qrels}")
    if ctx.job.kind == "retrain" and params.get("queries") and params.get("qrels"):
        recipe = job_recipe(params)
        qrels = load_qrels(params["qrels"])
        _, dev_ids = split_queries(list(qrels), recipe.run.dev_fraction, recipe.run.seed)
        return DevSet(load_queries(params["queries"]), {q: qrels[q] for q in dev_ids},
                      f"the recipe's held-out {recipe.run.dev_fraction:g} of the training qrels (seed {recipe.run.seed})")
    return None


def evaluate(ctx: JobContext) -> StepOutcome:
    """Gate the candidate against the live release on the dev set, with a shadow comparison."""
    release_id = ctx.job.outputs["release_id"]
    dev = dev_set_for(ctx)
    if dev is None:
        return StepOutcome(metrics={"gate": {
            "skipped": True, "passed": True,
            "reason": "no dev set: set LOCKSTEP_DEV_QUERIES and LOCKSTEP_DEV_QRELS, or send dev_queries/dev_qrels",
        }})
    ctx.progress("evaluate", 0, 2)
    candidate = LiveRelease.load(ctx.releases, release_id, batch_size=ctx.settings.batch_size)
    candidate.catch_up(ctx.corpus)
    ctx.progress("evaluate", 1, 2)
    active = ctx.releases.active()
    live = None
    if active and active != release_id:
        live = LiveRelease.load(ctx.releases, active, batch_size=ctx.settings.batch_size)
        live.catch_up(ctx.corpus)
    report = judge(candidate, live, dev, ctx.settings.gate_tolerance)
    ctx.progress("evaluate", 2, 2)
    metrics = {"gate": report.as_dict() | {"skipped": False}}
    if not report.passed:
        return StepOutcome(metrics=metrics, end=(
            REJECTED,
            f"{report.reason}; release {release_id} was kept but not activated. "
            f"POST /v1/admin/releases/{release_id}/activate puts it live anyway",
        ))
    return StepOutcome(metrics=metrics)


def promote(ctx: JobContext) -> StepOutcome:
    """Make the candidate the active release and tell every API process."""
    release_id = ctx.job.outputs["release_id"]
    previous = ctx.releases.active()
    ctx.releases.activate(release_id)
    announce(ctx.settings, release_id)
    was = f" (was {previous})" if previous and previous != release_id else ""
    return StepOutcome(outputs={"previous_release": previous}, end=(SUCCEEDED, f"release {release_id} is live{was}"))


STEPS: dict[str, Callable[[JobContext], StepOutcome]] = {
    "retrain": retrain, "reembed": reembed, "evaluate": evaluate, "promote": promote,
}


def _undo(ctx: JobContext) -> None:
    """Remove what a stopped job made: its partial model and its unpromoted candidate release."""
    shutil.rmtree(ctx.job_dir / PARTIAL_MODEL_DIR, ignore_errors=True)
    release_id = ctx.store.get(ctx.job.id).outputs.get("release_id")
    if release_id and ctx.releases.exists(release_id) and ctx.releases.active() != release_id:
        ctx.releases.delete(release_id)


def _heartbeat(store: JobStore, job_id: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_EVERY_S):
        try:
            store.report(job_id)
        except Exception:
            log.exception("heartbeat of job %s failed", job_id)


def _traceback_summary(exc: BaseException, lines: int = 12) -> str:
    return "".join(traceback.format_exception(exc)[-lines:])


def run_step(settings: Settings, store: JobStore, corpus: CorpusStore, job_id: str, step: str) -> str | None:
    """Run one step of a job if this worker can claim it; returns the next step to enqueue, or None."""
    job = store.claim(job_id, step, worker_identity(), settings.job_stale_after_s)
    if job is None:
        log.info("job %s step %s: nothing to do (finished, cancelled, or held by another worker)", job_id, step)
        return None
    ctx = JobContext(settings, store, job, corpus, ReleaseStore(settings.data_dir))
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(store, job_id, stop), daemon=True)
    beat.start()
    log.info("job %s (%s): step %s started (attempt %d)", job_id, job.kind, step, job.attempts)
    try:
        ctx.check_cancelled()
        outcome = STEPS[step](ctx)
    except JobCancelled:
        _undo(ctx)
        store.finish(job_id, CANCELLED, f"cancelled during {step}; nothing was published")
        log.info("job %s cancelled during %s", job_id, step)
        return None
    except LockstepError as exc:
        _undo(ctx)
        store.finish(job_id, FAILED, f"{step} failed: {exc}", _traceback_summary(exc))
        log.error("job %s failed in %s: %s", job_id, step, exc)
        return None
    except Exception as exc:
        _undo(ctx)
        store.finish(job_id, FAILED, f"{step} failed unexpectedly ({type(exc).__name__}: {exc}); see the worker log",
                     _traceback_summary(exc))
        log.exception("job %s failed in %s", job_id, step)
        return None
    finally:
        stop.set()
        beat.join()
    store.record(job_id, outputs=outcome.outputs, metrics=outcome.metrics)
    if outcome.end is not None:
        store.finish(job_id, *outcome.end)
        log.info("job %s %s: %s", job_id, outcome.end[0], outcome.end[1])
        return None
    next_step = job.next_step()
    if next_step is None:
        store.finish(job_id, SUCCEEDED, f"{step} done")
        return None
    store.advance(job_id, next_step)
    return next_step


def validate_params(kind: str, params: dict) -> None:
    """Refuse a job whose recipe or files are wrong before it is queued, naming what to fix."""
    for key in ("queries", "qrels", "corpus", "pairs", "model", "dev_queries", "dev_qrels"):
        if params.get(key) and not Path(params[key]).exists():
            raise InvalidInput(f"{key}: {params[key]} does not exist (paths are read by the workers; use absolute paths)")
    if bool(params.get("dev_queries")) != bool(params.get("dev_qrels")):
        raise InvalidInput("give both dev_queries and dev_qrels, or neither")
    if kind == "retrain":
        job_recipe(params)
        if not params.get("pairs") and not (params.get("queries") and params.get("qrels")):
            raise InvalidInput("a retrain job needs training data: pairs, or queries and qrels")
        if params.get("pairs"):
            load_pairs(params["pairs"])
        else:
            judged_queries(load_queries(params["queries"]), load_qrels(params["qrels"]))
    if kind == "reembed" and params.get("model"):
        BiEncoder.load(params["model"])
