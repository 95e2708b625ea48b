"""The steps of a job: retrain the bi-encoder, re-embed the corpus, evaluate the candidate, promote it.

`run_step` is what a worker calls for one step of one job: it claims the step,
runs it with progress, heartbeats and cooperative cancellation, records its output
in the job, and says what to send next (`Dispatch`). Steps are idempotent: a step
whose output is already recorded (a model folder, a published release) is not redone,
so a redelivered message or a rerun after a lost worker finishes the job instead
of duplicating it. The reembed step is sharded: its first run snapshots the corpus
into shards (`embedding_shards.py`) and hands the job to them, any number of workers
encode them (`reembed_shards.py`), and the run that finds every shard done assembles
and publishes the release. A failed or cancelled step leaves nothing half-done: a
partial model folder, shard files or a staging release are removed, and an
unpromoted candidate release is deleted. Nothing here knows about Celery.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from indexer.corpus_store import CorpusStore
from indexer.durable_files import fsync_dir, fsync_tree
from indexer.embedding_shards import assemble_release, plan_shards
from indexer.job_store import (
    CANCELLED, FAILED, QUEUED, REJECTED, SHARD_DONE, SUCCEEDED, ClaimLost, Job, JobStore, Shard,
)
from indexer.live_release import LiveRelease
from indexer.manifest import Manifest
from indexer.quality_gate import DevSet, judge
from indexer.retrieval_eval import judged_queries
from indexer.release_builder import BuildOptions
from indexer.release_events import announce
from indexer.release_store import ActiveChanged, ReleaseStore, new_release_id
from indexer.serving_device import resolve_device
from indexer.settings import Settings
from indexer.vector_index import VectorIndex
from indexer.training_inputs import load_training_data
from training.bi_encoder import model_dimension
from training.errors import InvalidInput, LockstepError
from training.eval_data import load_qrels, load_queries, split_judged
from training.examples import load_pairs
from training.recipe import Recipe, named_recipe, parse_recipe_text
from training.trainer import TrainingCancelled

log = logging.getLogger(__name__)

REPORT_EVERY_S = 0.5
HEARTBEAT_EVERY_S = 5.0
MODEL_DIR, PARTIAL_MODEL_DIR, RUN_DIR, SHARDS_DIR = "model", "model.partial", "run", "shards"


class JobCancelled(LockstepError):
    """The job was cancelled while a step ran."""


def _process_started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_identity() -> str:
    """`host:pid:start` of this process, recorded on the jobs it runs; the start time tells a reused pid apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_started(os.getpid())}"


def job_folder(data_dir: Path, job_id: str) -> Path:
    """Where a job keeps what it makes before publishing: its model, training run and re-embed shards."""
    return data_dir / "jobs" / job_id


def is_lost(held: Job | Shard, stale_after_s: float, now: float | None = None) -> bool:
    """A running job (or shard) is lost when its worker process on this host is gone, or it was silent too long.

    Where process start times cannot be read (no /proc, as on macOS), only silence counts.
    """
    now = now or time.time()
    if held.worker:
        host, pid, started = (held.worker.split(":") + ["", ""])[:3]
        known = started not in ("", "None")
        if known and host == socket.gethostname() and pid.isdigit() and _process_started(int(pid)) != started:
            return True
    return now - max(held.heartbeat or 0.0, held.updated) > stale_after_s


@dataclass(frozen=True)
class Dispatch:
    """What a worker sends once its work is recorded: the job's next step, and shards of its re-embed to encode."""

    step: str | None = None
    shards: tuple[int, ...] = ()


@dataclass
class StepOutcome:
    """What a step produced; `end` is (status, message) when the job stops here.

    `shards` set means the step waits for its shards: the job is handed to them (no
    worker holds it) and these are sent; the last shard to finish sends the step again.
    """

    outputs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    end: tuple[str, str] | None = None
    next_step: str | None = None
    shards: tuple[int, ...] | None = None


@dataclass
class JobContext:
    """One claimed step: the job, the stores it works on, and its progress and cancellation checks."""

    settings: Settings
    store: JobStore
    job: Job
    corpus: CorpusStore
    releases: ReleaseStore
    owner: str | None = None
    _phase: str = ""
    _phase_started: float = 0.0
    _last_report: float = 0.0
    _cancel_requested: bool = False

    @property
    def job_dir(self) -> Path:
        return job_folder(self.settings.data_dir, self.job.id)

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


def _check_recipe_choice(params: dict) -> None:
    """At submission: a recipe given but blank is refused rather than read as absent, which would run the default
    recipe unasked, and so is giving both a name and TOML. (Stored jobs from before this check keep reading as
    `job_recipe` reads them.)"""
    for key in ("recipe", "recipe_toml"):
        if params.get(key) is not None and not params[key].strip():
            raise InvalidInput(f"{key} is blank; name a shipped recipe, give the recipe's TOML, or leave both out "
                               "for the default recipe")
    if params.get("recipe") and params.get("recipe_toml"):
        raise InvalidInput("give recipe (a shipped recipe's name) or recipe_toml (a whole recipe), not both")


def job_recipe(params: dict) -> Recipe:
    """The recipe a retrain job asked for: inline TOML, or a shipped recipe by name (default: `default`)."""
    if params.get("recipe_toml"):
        return parse_recipe_text(params["recipe_toml"], "inline recipe")
    return named_recipe(params.get("recipe") or "default")


def _path(params: dict, key: str) -> Path | None:
    return Path(params[key]) if params.get(key) else None


def _training_metrics(summary: dict, run_dir: Path) -> dict:
    keys = ("base", "final", "stages", "alerts", "dev_queries", "train_examples")
    return {key: summary[key] for key in keys} | {"run_dir": str(run_dir)}


def retrain(ctx: JobContext) -> StepOutcome:
    """Fine-tune the live model on the job's data with its recipe; the model goes to `<job>/model`.

    The model is written to `<job>/model.partial`, fsynced, and renamed into place, so a crash never
    leaves a `<job>/model` that a rerun would take as finished but whose files are not on disk.
    """
    from training.fine_tune import fine_tune

    out, run_dir = ctx.job_dir / MODEL_DIR, ctx.job_dir / RUN_DIR
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else None
    if (out / "lockstep.json").is_file():
        return StepOutcome(outputs={"model_path": str(out)},
                           metrics={"training": _training_metrics(summary, run_dir)} if summary else {})
    if summary is not None and all(stage["gated"] for stage in summary["stages"]):
        return _rejected(summary, run_dir)
    params = ctx.job.params
    recipe = job_recipe(params)
    data = load_training_data(
        queries=_path(params, "queries"), qrels=_path(params, "qrels"), corpus_file=_path(params, "corpus"),
        pairs=_path(params, "pairs"), corpus=ctx.corpus,
    )
    partial = ctx.job_dir / PARTIAL_MODEL_DIR
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    base = _base_model(ctx)
    try:
        summary = fine_tune(
            base, data, recipe, partial, run_dir,
            progress=lambda stage, step, total, metrics: ctx.progress(f"retrain: {stage}", step, total, metrics),
            should_stop=ctx.should_stop,
            device=resolve_device(ctx.settings.device),
        )
    except TrainingCancelled as exc:
        raise JobCancelled(str(exc)) from exc
    finally:
        if not (partial / "lockstep.json").is_file():
            shutil.rmtree(partial, ignore_errors=True)
    if all(stage["gated"] for stage in summary.stages):
        shutil.rmtree(partial, ignore_errors=True)
        return _rejected(asdict(summary), run_dir)
    fsync_tree(partial)
    os.replace(partial, out)
    fsync_dir(out.parent)
    return StepOutcome(outputs={"model_path": str(out)}, metrics={"training": _training_metrics(asdict(summary), run_dir)})


def _rejected(summary: dict, run_dir: Path) -> StepOutcome:
    """The end of a retrain none of whose stages improved dev nDCG@10; also what a rerun of it finds, from the
    run's summary, instead of training again (the model was not kept)."""
    return StepOutcome(metrics={"training": _training_metrics(summary, run_dir)}, end=(
        REJECTED,
        f"training did not improve dev nDCG@10 ({summary['base'].get('ndcg@10', 0):.4f}) in any stage, so no "
        "release was built; see the alerts in metrics.training and try more data or another recipe",
    ))


def _model_name(ctx: JobContext, live) -> str | None:
    """How the release names its model: the base name plus the job for a fine-tuned one; None reads the folder."""
    base = live.model.name if live else ctx.settings.model_name()
    if ctx.job.outputs.get("model_path"):
        return f"{base or 'model'} fine-tuned by {ctx.job.id}"
    return None if ctx.job.params.get("model") else base


def _reranker_path(ctx: JobContext, live: Manifest | None) -> Path | None:
    """The live release's stored reranker (none if it has none); the `RERANKER` setting only while none is live."""
    if live is None:
        return ctx.settings.reranker
    return ctx.settings.data_dir / live.reranker.path if live.reranker else None


def _build_options(ctx: JobContext) -> BuildOptions:
    """The job's model with the live release's index type and reranker (else the settings') and the build settings."""
    outputs, params = ctx.job.outputs, ctx.job.params
    live = _active_manifest(ctx.releases)
    return BuildOptions(
        model_path=Path(outputs.get("model_path") or params.get("model") or _base_model(ctx)),
        model_name=_model_name(ctx, live),
        index_type=params.get("index_type") or (live.index_type if live else ctx.settings.index_type),
        batch_size=ctx.settings.batch_size,
        reranker_path=_reranker_path(ctx, live),
        reranker_name=live.reranker.name if live and live.reranker else None,
        precision=ctx.settings.precision,
        runtime=ctx.settings.runtime,
        int8_activations=ctx.settings.int8_activations,
        ef_search=ctx.settings.ef_search,
        nprobe=ctx.settings.nprobe,
        ef_construction=ctx.settings.ef_construction,
        device=resolve_device(ctx.settings.device),
    )


def _shard_summary(shards: list[Shard]) -> dict:
    """What the job record keeps of its shards: how many, their size, each one's attempts, how many workers encoded."""
    return {"shards": len(shards), "shard_documents": [shard.documents for shard in shards],
            "shard_attempts": [shard.attempts for shard in shards],
            "workers": len({shard.worker for shard in shards if shard.worker})}


def reembed(ctx: JobContext) -> StepOutcome:
    """Embed the whole corpus with the job's model into a new (inactive) release, as shards any worker may encode.

    Run first, it plans the shards and hands the job to them; run again (by the worker
    that finished the last shard, or by recovery), it sends the shards still queued, or
    assembles and publishes the release once all are done.
    """
    release_id = ctx.job.outputs.get("release_id")
    if not release_id:
        release_id = new_release_id()
        ctx.store.record(ctx.job.id, outputs={"release_id": release_id})
    folder = ctx.job_dir / SHARDS_DIR
    shards = ctx.store.shards(ctx.job.id)

    def report(phase: str, done: int, total: int) -> None:
        ctx.progress(f"reembed: {phase}", done, total)

    if not ctx.releases.exists(release_id):
        if not shards:
            plan = plan_shards(ctx.corpus, ctx.releases, _build_options(ctx), release_id, folder,
                               ctx.settings.shard_size, report)
            ctx.store.add_shards(ctx.job.id, plan.sizes, owner=ctx.owner)
            return StepOutcome(shards=tuple(range(plan.count)))
        if any(shard.status != SHARD_DONE for shard in shards):
            return StepOutcome(shards=tuple(shard.shard for shard in shards if shard.status == QUEUED))
        assemble_release(ctx.releases, folder, {shard.shard: shard.checksum for shard in shards}, report)
    manifest = ctx.releases.manifest(release_id)
    _discard_shards(ctx.store, ctx.settings.data_dir, ctx.job.id)
    metrics = {"release": {"id": manifest.release_id, "documents": manifest.doc_count,
                           "corpus_seq": manifest.corpus_seq, "model": manifest.model.name,
                           "fingerprint": manifest.model.fingerprint}}
    return StepOutcome(metrics=metrics | ({"reembed": _shard_summary(shards)} if shards else {}))


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
        _, dev_ids = split_judged(qrels, recipe.run.dev_fraction, recipe.run.seed)
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
    device = resolve_device(ctx.settings.device)
    candidate = LiveRelease.load(ctx.releases, release_id, batch_size=ctx.settings.batch_size, device=device)
    candidate.catch_up(ctx.corpus)
    ctx.progress("evaluate", 1, 2)
    active = ctx.releases.active()
    live = None
    if active and active != release_id:
        live = LiveRelease.load(ctx.releases, active, batch_size=ctx.settings.batch_size, device=device)
        live.catch_up(ctx.corpus)
    report = judge(candidate, live, dev, ctx.settings.gate_tolerance, ctx.corpus, ctx.settings.lexical_weight)
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
    gate = ctx.job.metrics.get("gate") or {}
    expected = None if gate.get("skipped") else (gate.get("live_release"), release_id)
    try:
        ctx.releases.activate(release_id, only_if_active=expected)
    except ActiveChanged as changed:
        log.info("job %s: %s; evaluating again", ctx.job.id, changed)
        return StepOutcome(next_step="evaluate")
    if previous == release_id:
        previous = ctx.job.outputs.get("previous_release")
    announce(ctx.settings, release_id)
    was = f" (was {previous})" if previous and previous != release_id else ""
    return StepOutcome(outputs={"previous_release": previous}, end=(SUCCEEDED, f"release {release_id} is live{was}"))


STEPS: dict[str, Callable[[JobContext], StepOutcome]] = {
    "retrain": retrain, "reembed": reembed, "evaluate": evaluate, "promote": promote,
}


def _discard_shards(store: JobStore, data_dir: Path, job_id: str) -> None:
    """Forget a job's shards, then delete their files (a crash in between leaves files the next plan clears)."""
    store.remove_shards(job_id)
    shutil.rmtree(job_folder(data_dir, job_id) / SHARDS_DIR, ignore_errors=True)


def discard_job_work(store: JobStore, releases: ReleaseStore, job: Job) -> None:
    """Remove what a stopped job made: its partial model, its re-embed shards and its unpromoted candidate release.

    A job whose candidate is deleted after its build is rewound to reembed, so a rerun builds it again.
    """
    shutil.rmtree(job_folder(releases.data_dir, job.id) / PARTIAL_MODEL_DIR, ignore_errors=True)
    _discard_shards(store, releases.data_dir, job.id)
    release_id = job.outputs.get("release_id")
    if not release_id:
        return
    if releases.exists(release_id) and releases.active() != release_id:
        releases.delete(release_id)
    if releases.active() != release_id and job.step in ("evaluate", "promote"):
        store.rewind(job.id, "reembed", ("release_id",))


@contextmanager
def heartbeating(beat: Callable[[], object], what: str) -> Iterator[None]:
    """Call `beat` every `HEARTBEAT_EVERY_S` from a thread while the body runs, so recovery sees the work alive."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(HEARTBEAT_EVERY_S):
            try:
                beat()
            except Exception:
                log.exception("heartbeat of %s failed", what)

    thread = threading.Thread(target=loop, name=f"heartbeat {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _traceback_summary(exc: BaseException, lines: int = 12) -> str:
    return "".join(traceback.format_exception(exc)[-lines:])


def end_job(
    store: JobStore, releases: ReleaseStore, job_id: str, what: str, exc: Exception,
    still_holds: Callable[[], bool], owner: str | None = None,
) -> None:
    """End a job whose `what` (a step, or a shard of one) raised `exc`: cancelled or failed, its work removed.

    Nothing happens when `still_holds()` says another worker took the work over or the job already ended.
    """
    if isinstance(exc, JobCancelled):
        status, message, error = CANCELLED, f"cancelled during {what}; nothing was published", None
    elif isinstance(exc, LockstepError):
        status, message, error = FAILED, f"{what} failed: {exc}", _traceback_summary(exc)
    else:
        unexpected = f"{what} failed unexpectedly ({type(exc).__name__}: {exc}); see the worker log"
        status, message, error = FAILED, unexpected, _traceback_summary(exc)
    if not still_holds():
        log.warning("job %s: %s was taken over by another worker or the job ended; leaving it", job_id, what)
        return
    discard_job_work(store, releases, store.get(job_id))
    store.finish(job_id, status, message, error, owner=owner)
    if status == CANCELLED:
        log.info("job %s cancelled during %s", job_id, what)
    elif isinstance(exc, LockstepError):
        log.error("job %s failed in %s: %s", job_id, what, exc)
    else:
        log.error("job %s failed in %s", job_id, what, exc_info=exc)


def run_step(settings: Settings, store: JobStore, corpus: CorpusStore, job_id: str, step: str) -> Dispatch:
    """Run one step of a job if this worker can claim it; returns what to send next (nothing when the job ends)."""
    owner = worker_identity()
    job = store.claim(job_id, step, owner, settings.job_stale_after_s)
    if job is None:
        log.info("job %s step %s: nothing to do (finished, cancelled, or held by another worker)", job_id, step)
        return Dispatch()
    releases = ReleaseStore(settings.data_dir)
    ctx = JobContext(settings, store, job, corpus, releases, owner)
    log.info("job %s (%s): step %s started (attempt %d)", job_id, job.kind, step, job.attempts)
    try:
        with heartbeating(lambda: store.report(job_id), f"job {job_id}"):
            ctx.check_cancelled()
            outcome = STEPS[step](ctx)
    except Exception as exc:
        end_job(store, releases, job_id, step, exc, lambda: store.holds(job_id, owner), owner)
        return Dispatch()
    try:
        store.record(job_id, outputs=outcome.outputs, metrics=outcome.metrics, owner=owner)
        if outcome.end is not None:
            store.finish(job_id, *outcome.end, owner=owner)
            log.info("job %s %s: %s", job_id, outcome.end[0], outcome.end[1])
            return Dispatch()
        if outcome.shards is not None:
            store.advance(job_id, step, owner=owner)
            log.info("job %s: step %s waits for its shards; sending %d", job_id, step, len(outcome.shards))
            return Dispatch(shards=outcome.shards)
        next_step = outcome.next_step or job.next_step()
        if next_step is None:
            store.finish(job_id, SUCCEEDED, f"{step} done", owner=owner)
            return Dispatch()
        store.advance(job_id, next_step, owner=owner)
    except ClaimLost as exc:
        log.warning("%s; dropping this worker's result of step %s", exc, step)
        return Dispatch()
    return Dispatch(step=next_step)


@dataclass
class Recovery:
    """What recovery found: messages to send again (job id, what to send) and jobs it failed for good."""

    resend: list[tuple[str, Dispatch]] = field(default_factory=list)
    failed: list[Job] = field(default_factory=list)


def recover_lost_work(settings: Settings, store: JobStore) -> Recovery:
    """Queue again the steps and shards whose worker died (or whose message was lost); fail jobs out of attempts.

    A failed job's work is removed like any failed job's.
    """
    stale, attempts = settings.job_stale_after_s, settings.job_max_attempts
    steps, failed = store.recover_lost(lambda job: is_lost(job, stale), attempts)
    shards, failed_at_shards = store.recover_lost_shards(lambda shard: is_lost(shard, stale), attempts)
    recovery = Recovery([(job.id, Dispatch(step=job.step)) for job in steps], failed + failed_at_shards)
    by_job: dict[str, list[int]] = {}
    for shard in shards:
        by_job.setdefault(shard.job_id, []).append(shard.shard)
    recovery.resend += [(job_id, Dispatch(shards=tuple(numbers))) for job_id, numbers in by_job.items()]
    releases = ReleaseStore(settings.data_dir)
    for job in recovery.failed:
        discard_job_work(store, releases, job)
    return recovery


def cancel_job(store: JobStore, releases: ReleaseStore, job_id: str) -> Job:
    """Cancel a job: a queued one ends now (what it built, if anything, is removed); a running one is asked to stop."""
    job = store.request_cancel(job_id)
    if job.status == CANCELLED:
        discard_job_work(store, releases, job)
        return store.get(job_id)
    return job


def _readable(key: str, path: str) -> None:
    if not Path(path).exists():
        raise InvalidInput(f"{key}: {path} does not exist (paths are read by the workers; use absolute paths)")


def _parse(key: str, path: str, parse: Callable) -> object:
    """Parse an input file; its errors, which name the file and line, are prefixed with the parameter."""
    try:
        return parse(path)
    except InvalidInput as exc:
        raise InvalidInput(f"{key}: {exc}") from exc


def validate_params(kind: str, params: dict, dim: int | None = None, default_model: Path | None = None) -> None:
    """Refuse a job whose recipe, files or index type are wrong before it is queued, naming what to fix.

    An index type is checked for the size of the model the job will build with: a
    re-embed's own `model`, else the live release's (`dim`), else `default_model`'s
    (what a first build would use), read only when an index type is asked for.
    """
    for key in ("queries", "qrels", "corpus", "pairs", "model", "dev_queries", "dev_qrels"):
        if params.get(key):
            _readable(key, params[key])
    if bool(params.get("dev_queries")) != bool(params.get("dev_qrels")):
        raise InvalidInput("give both dev_queries and dev_qrels, or neither")
    if params.get("dev_queries"):
        judged_queries(_parse("dev_queries", params["dev_queries"], load_queries),
                       _parse("dev_qrels", params["dev_qrels"], load_qrels))
    if kind == "reembed" and params.get("model"):
        model = Path(params["model"])
        if not (model / "config.json").is_file() or not any(model.glob("*.safetensors")):
            raise InvalidInput(f"model: {model} is not a model folder (needs config.json and safetensors weights)")
        dim = model_dimension(model)
    elif dim is None and params.get("index_type") and default_model is not None:
        dim = model_dimension(default_model)
    if params.get("index_type") and dim is not None:
        VectorIndex(dim, params["index_type"])
    if kind == "retrain":
        _check_recipe_choice(params)
        job_recipe(params)
        if not params.get("pairs") and not (params.get("queries") and params.get("qrels")):
            raise InvalidInput("a retrain job needs training data: pairs, or queries and qrels")
        if params.get("pairs"):
            _parse("pairs", params["pairs"], load_pairs)
        else:
            judged_queries(_parse("queries", params["queries"], load_queries), _parse("qrels", params["qrels"], load_qrels))
