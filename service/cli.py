"""The `lockstep` command line: ingest, build, releases, serve, worker, search, eval, train, up.

Each command parses its options, calls one domain function and prints the result;
errors print `error: ...` (with file and line for bad input files) and exit 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sqlite3
import sys
import unicodedata
from pathlib import Path
from typing import Annotated, Optional

import typer

from indexer.corpus_store import CorpusStore
from indexer.durable_files import STORAGE_FULL_HINT, is_storage_full
from indexer.job_store import JobStore
from indexer.metadata_filter import parse_filter_text
from indexer.release_events import announce
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import STALE_SECONDS, ReleaseStore
from indexer.serving_device import resolve_device
from indexer.settings import Settings
from indexer.thread_budget import apply_thread_budget
from indexer.vector_index import MAX_EF_SEARCH, MAX_NPROBE, SearchParams
from training.errors import InvalidInput, LockstepError
from training.fingerprint import short_fingerprint

app = typer.Typer(help="Lockstep: search whose model and index move in lockstep.", no_args_is_help=True)
releases_app = typer.Typer(help="List, activate, roll back and clean up releases.", no_args_is_help=True)
app.add_typer(releases_app, name="releases")
fields_app = typer.Typer(help="Index metadata fields, so filters on them read only the documents they match.",
                         no_args_is_help=True)
app.add_typer(fields_app, name="field-index")


def _fail_cleanly(command):
    """Turn domain errors, file system errors (a full disk among them) and an unusable database into a one-line
    message and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LockstepError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except (OSError, sqlite3.DatabaseError) as exc:
            if is_storage_full(exc):
                message = f"no space left on the device ({exc}); nothing was published; {STORAGE_FULL_HINT}"
            elif isinstance(exc, OSError):  # a data dir that is a file, or unreadable, say
                message = f"{exc.filename or 'file'}: {exc.strerror or exc}; check the path and its permissions"
            elif getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
                message = f"a database in the data dir is damaged ({exc}); restore it from a backup (docs/deploy.md)"
            elif isinstance(exc, sqlite3.OperationalError):  # read-only, or a folder it cannot open files in
                message = f"a database in the data dir cannot be opened or written ({exc}); check the data dir's " \
                          "permissions and that it is the user the service runs as"
            else:
                raise
            typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None

    return wrapper


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj


@app.callback()
@_fail_cleanly
def main(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Option(help="Data directory (default: $LOCKSTEP_DATA_DIR or ./lockstep-data)")] = None,
) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    settings = Settings.load(data_dir=data_dir) if data_dir else Settings.load()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    apply_thread_budget()
    ctx.obj = settings


def _build(
    settings: Settings,
    model: Path | None,
    index_type: str | None,
    activate: bool,
    reranker: Path | None = None,
) -> None:
    corpus = CorpusStore(settings.corpus_path)
    options = BuildOptions(
        model_path=model or settings.model_path(),
        model_name=None if model else settings.model_name(),
        index_type=index_type or settings.index_type,
        batch_size=settings.batch_size,
        reranker_path=reranker or settings.reranker,
        precision=settings.precision,
        runtime=settings.runtime,
        int8_activations=settings.int8_activations,
        ef_search=settings.ef_search,
        nprobe=settings.nprobe,
        ef_construction=settings.ef_construction,
        device=resolve_device(settings.device),
    )
    try:
        manifest = build_release(corpus, ReleaseStore(settings.data_dir), options, activate=activate, show_progress=True)
    finally:
        corpus.close()
    if activate:
        announce(settings, manifest.release_id)
    state = "active" if activate else "not active; `lockstep releases activate " + manifest.release_id + "`"
    precision = f"{manifest.precision} on {manifest.runtime}"
    if manifest.int8_agreement is not None:
        precision += f" with {manifest.int8_activations} activations (mean cosine {manifest.int8_agreement.mean_cosine:.4f} with fp32)"
    index = manifest.index_type
    if manifest.recall is not None:
        params = " ".join(f"{name}={value}" for name, value in manifest.recall.search_params.items())
        index += f" (recall@{manifest.recall.k} {manifest.recall.recall:.3f} vs exact at {params})"
    typer.echo(
        f"built release {manifest.release_id}: {manifest.doc_count} documents, {index} index, {precision}, "
        f"model {manifest.model.name} ({short_fingerprint(manifest.model.fingerprint)}), {state}"
    )


@app.command()
@_fail_cleanly
def ingest(ctx: typer.Context, path: Annotated[Path, typer.Argument(help="BEIR corpus.jsonl or JSONL with id/title/text/metadata")]) -> None:
    """Add or update documents from a JSONL file, all or nothing."""
    from indexer.ingest import ingest_file

    store = CorpusStore(_settings(ctx).corpus_path)
    try:
        result = ingest_file(store, path)
    finally:
        store.close()
    typer.echo(f"{path}: {result.inserted} inserted, {result.updated} updated, {result.unchanged} unchanged (seq {result.seq})")


@fields_app.command("add")
@_fail_cleanly
def field_index_add(ctx: typer.Context, field: Annotated[str, typer.Argument(help="A metadata field: lang, author.name")]) -> None:
    """Index a metadata field, filling the index from the corpus (filters on it get fast at once)."""
    with contextlib.closing(CorpusStore(_settings(ctx).corpus_path)) as store:
        values = store.index_field(field)
    typer.echo(f"indexed {field}: {values} values")


@fields_app.command("drop")
@_fail_cleanly
def field_index_drop(ctx: typer.Context, field: str) -> None:
    """Stop indexing a metadata field (filters on it still work, reading every document's metadata)."""
    with contextlib.closing(CorpusStore(_settings(ctx).corpus_path)) as store:
        store.drop_field_index(field)
    typer.echo(f"dropped the index on {field}")


@fields_app.command("list")
@_fail_cleanly
def field_index_list(ctx: typer.Context) -> None:
    """The indexed metadata fields and how many values each holds."""
    with contextlib.closing(CorpusStore(_settings(ctx).corpus_path)) as store:
        indexed = store.indexed_fields()
    if not indexed:
        typer.echo("no metadata field is indexed; `lockstep field-index add FIELD` indexes one")
    for field, values in indexed.items():
        typer.echo(f"{field}  {values} values")


@app.command()
@_fail_cleanly
def build(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Option(help="Model folder (default: the packaged all-MiniLM-L6-v2)")] = None,
    index_type: Annotated[Optional[str], typer.Option(help="FAISS factory string: Flat, HNSW32, IVF256,Flat ...")] = None,
    activate: Annotated[bool, typer.Option(help="Make the new release active when it is built")] = False,
    reranker: Annotated[Optional[Path], typer.Option(help="Cross-encoder the release reranks with (`rerank: true`)")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 where supported, fp16 on a GPU without bf16), fp32, bf16, fp16 (GPUs) or int8 (gated on agreement with fp32)")] = None,
    runtime: Annotated[Optional[str], typer.Option(help="What runs the encoder: torch (int8 on ONNX Runtime) or openvino (default $LOCKSTEP_RUNTIME or torch)")] = None,
    int8_activations: Annotated[Optional[str], typer.Option(help="int8 only: calibrated (openvino, fastest), dynamic (closest to fp32) or auto (default $LOCKSTEP_INT8_ACTIVATIONS or auto)")] = None,
    ef_search: Annotated[Optional[int], typer.Option(min=1, help="HNSW search breadth (default $LOCKSTEP_EF_SEARCH or 64)")] = None,
    nprobe: Annotated[Optional[int], typer.Option(min=1, help="IVF lists searched per query (default $LOCKSTEP_NPROBE or 16)")] = None,
    ef_construction: Annotated[Optional[int], typer.Option(min=4, help="HNSW build breadth (default $LOCKSTEP_EF_CONSTRUCTION or 40)")] = None,
) -> None:
    """Re-embed the whole corpus into a new release."""
    requested = {"ef_search": ef_search, "nprobe": nprobe, "ef_construction": ef_construction, "precision": precision,
                 "runtime": runtime, "int8_activations": int8_activations}  # checked as their settings, before work
    _build(_settings(ctx).with_values(**requested), model, index_type, activate, reranker)


@releases_app.command("list")
@_fail_cleanly
def releases_list(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print manifests as JSON")] = False) -> None:
    """Every release, oldest first; the active one is marked with *."""
    store = ReleaseStore(_settings(ctx).data_dir)
    manifests, active = store.list(), store.active()
    if as_json:
        typer.echo(json.dumps([json.loads(m.to_json()) | {"active": m.release_id == active} for m in manifests], indent=2))
        return
    if not manifests:
        typer.echo("no releases yet; run `lockstep build --activate`")
    for m in manifests:
        mark = "*" if m.release_id == active else " "
        typer.echo(f"{mark} {m.release_id}  {m.created}  {m.doc_count:>8} docs  {m.index_type:<12} {m.model.name}  {short_fingerprint(m.model.fingerprint)}")


@releases_app.command("activate")
@_fail_cleanly
def releases_activate(ctx: typer.Context, release_id: str) -> None:
    """Make a release active; with a Redis broker running services switch at once, else within their poll interval."""
    settings = _settings(ctx)
    pointer = ReleaseStore(settings.data_dir).activate(release_id)
    announce(settings, pointer.active)
    typer.echo(f"active release: {pointer.active}")


@releases_app.command("rollback")
@_fail_cleanly
def releases_rollback(ctx: typer.Context) -> None:
    """Re-activate the release that was active before the current one (announced like `activate`)."""
    settings = _settings(ctx)
    pointer = ReleaseStore(settings.data_dir).rollback()
    announce(settings, pointer.active)
    typer.echo(f"rolled back; active release: {pointer.active}")


@releases_app.command("delete")
@_fail_cleanly
def releases_delete(ctx: typer.Context, release_id: str) -> None:
    """Delete a release that is not active."""
    ReleaseStore(_settings(ctx).data_dir).delete(release_id)
    typer.echo(f"deleted release {release_id}")


@releases_app.command("gc")
@_fail_cleanly
def releases_gc(
    ctx: typer.Context,
    keep: Annotated[Optional[int], typer.Option(min=1, help="Releases to keep (default $LOCKSTEP_KEEP_RELEASES or 5)")] = None,
    unused_for: Annotated[float, typer.Option(
        help="Seconds a model no release uses (or a build's leftovers) must have gone untouched before removal; "
             "builds in progress touch theirs, so 0 (free the space now) is safe only while no build runs")] = STALE_SECONDS,
) -> None:
    """Delete old releases (never the active one, or a candidate an unfinished job built), and models no release
    uses once untouched for a day."""
    settings = _settings(ctx)
    jobs = JobStore(settings.jobs_path)
    try:
        removed = ReleaseStore(settings.data_dir).gc(keep if keep is not None else settings.keep_releases, unused_for,
                                                     spare=jobs.releases_in_flight)
    finally:
        jobs.close()
    typer.echo(f"removed {len(removed)} release(s): {' '.join(removed) or '-'}")


@contextlib.contextmanager
def _active_release(settings: Settings):
    """The active release, caught up with the corpus, and the corpus (closed afterwards)."""
    from indexer.live_release import LiveRelease
    from training.errors import NotReady

    releases = ReleaseStore(settings.data_dir)
    active = releases.active()
    if active is None:
        raise NotReady("no release is active; run `lockstep build --activate` first")
    corpus = CorpusStore(settings.corpus_path)
    try:
        live = LiveRelease.load(releases, active, batch_size=settings.batch_size, rerank_policy=settings.rerank_policy(),
                                device=resolve_device(settings.device))
        pending = corpus.seq - live.applied_seq
        if pending > 0:
            typer.echo(f"encoding up to {pending} corpus writes made since release {active} was built "
                       "(`lockstep build --activate` folds them into a new release)", err=True)
        live.catch_up(corpus)
        yield live, corpus
    finally:
        corpus.close()


# Bidirectional overrides and isolates: printed raw, they reorder what follows them on the line.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _printable(text: str) -> str:
    """`text` on one line with control characters and bidirectional overrides shown as `?`: document text is
    untrusted, and an escape sequence printed raw would reach the operator's terminal."""
    return "".join("?" if unicodedata.category(char) == "Cc" or char in _BIDI_CONTROLS else char
                   for char in " ".join(text.split()))


@app.command()
@_fail_cleanly
def search(
    ctx: typer.Context,
    text: str,
    k: Annotated[int, typer.Option("-k", min=1, max=1000, help="How many results")] = 10,
    rerank: Annotated[bool, typer.Option(help="Rerank with the release's cross-encoder")] = False,
    rerank_weight: Annotated[
        Optional[float], typer.Option(min=0.0, max=1.0, help="Cross-encoder's weight in the fused score (1: it alone)")
    ] = None,
    lexical_weight: Annotated[
        Optional[float], typer.Option(min=0.0, max=1.0, help="Hybrid search: BM25's weight in the fused score (0: dense only; default $LOCKSTEP_LEXICAL_WEIGHT or 0)")
    ] = None,
    metadata_filter: Annotated[
        Optional[str], typer.Option("--filter", help='Only documents whose metadata matches, as JSON: \'{"lang": "en"}\'')
    ] = None,
    ef_search: Annotated[Optional[int], typer.Option(min=1, max=MAX_EF_SEARCH, help="HNSW search breadth for this search (default: the release's)")] = None,
    nprobe: Annotated[Optional[int], typer.Option(min=1, max=MAX_NPROBE, help="IVF lists to search for this search (default: the release's)")] = None,
) -> None:
    """Search the active release from the command line (no server needed)."""
    where = parse_filter_text(metadata_filter, "--filter") if metadata_filter is not None else None
    settings = _settings(ctx)
    lexical = settings.lexical_weight_for(lexical_weight)
    with _active_release(settings) as (live, corpus):
        outcome = live.search(corpus, text, k, rerank, rerank_weight, where, lexical, SearchParams(ef_search, nprobe))
    params = "".join(f", {name} {value}" for name, value in outcome.search_params.items())
    typer.echo(f"release {outcome.release_id} ({outcome.timings_ms['total']:.1f} ms{params})")
    for rank, hit in enumerate(outcome.hits, start=1):
        document = hit.document
        typer.echo(f"{rank:>3}. {hit.score:.4f}  {_printable(document.id)}  {_printable(document.title)[:60]}  "
                   f"{_printable(document.text)[:100]}")


@app.command("eval")
@_fail_cleanly
def evaluate(
    ctx: typer.Context,
    queries: Annotated[Path, typer.Option(help="Queries JSONL (BEIR queries.jsonl)")],
    qrels: Annotated[Path, typer.Option(help="Relevance judgements (BEIR qrels TSV or TREC)")],
    split_fraction: Annotated[Optional[float], typer.Option(help="Evaluate only this seeded fraction of the judged queries (a dev split)")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the dev split")] = 13,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON")] = False,
    lexical_weight: Annotated[
        Optional[float], typer.Option(min=0.0, max=1.0, help="Score hybrid search: BM25's weight in the fused score (0: dense only; default $LOCKSTEP_LEXICAL_WEIGHT or 0)")
    ] = None,
) -> None:
    """nDCG@10, Recall@100 and MRR@10 of the active release (trec_eval definitions)."""
    from indexer.retrieval_eval import evaluate_release
    from training.eval_data import load_qrels, load_queries, split_judged

    query_texts, judgements = load_queries(queries), load_qrels(qrels)
    if split_fraction is not None:
        _, dev = split_judged(judgements, split_fraction, seed)
        judgements = {query_id: judgements[query_id] for query_id in dev}
    settings = _settings(ctx)
    lexical = settings.lexical_weight_for(lexical_weight)
    with _active_release(settings) as (live, corpus):
        metrics = evaluate_release(live, query_texts, judgements, corpus, lexical)
    if as_json:
        typer.echo(json.dumps({key: metrics[key] for key in ("ndcg@10", "recall@100", "mrr@10")}))
        return
    hybrid = f", hybrid with BM25 at weight {lexical}" if lexical else ""
    typer.echo(f"release {live.release_id}, {metrics['queries']} queries{hybrid}")
    for key in ("ndcg@10", "recall@100", "mrr@10"):
        typer.echo(f"  {key:<11} {metrics[key]:.4f}")


def _training_data(queries: Path | None, qrels: Path | None, corpus: Path | None, pairs: Path | None):
    from indexer.training_inputs import load_training_data

    if pairs is None and not corpus:
        raise InvalidInput("pass --queries, --qrels and --corpus (BEIR files), or --pairs with a pairs/triplets JSONL file")
    return load_training_data(queries=queries, qrels=qrels, corpus_file=corpus, pairs=pairs)


@app.command()
@_fail_cleanly
def train(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for the trained model (sentence-transformers layout)")],
    queries: Annotated[Optional[Path], typer.Option(help="Queries JSONL (BEIR queries.jsonl)")] = None,
    qrels: Annotated[Optional[Path], typer.Option(help="Training judgements (BEIR qrels TSV)")] = None,
    corpus: Annotated[Optional[Path], typer.Option(help="Corpus JSONL the judgements refer to")] = None,
    pairs: Annotated[Optional[Path], typer.Option(help="Pairs/triplets JSONL instead of qrels")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe TOML (default: the shipped three-stage recipe)")] = None,
    model: Annotated[Optional[Path], typer.Option(help="Model to start from (default: the packaged all-MiniLM-L6-v2)")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Where the metrics log and report go (default: OUT.run)")] = None,
    sts_probe: Annotated[Optional[Path], typer.Option(help="STS-B file for the out-of-domain probe (overrides the recipe)")] = None,
) -> None:
    """Fine-tune the bi-encoder with a recipe; prints dev quality before and after, and any alerts.

    Under `torchrun --nproc_per_node N` the N processes train together; the first alone writes and prints.
    """
    import dataclasses

    from training import distributed
    from training.fine_tune import fine_tune
    from training.recipe import load_recipe
    from training.report import render_report

    settings = _settings(ctx)
    loaded = load_recipe(recipe)  # a bad recipe is refused before the corpus is read
    data = _training_data(queries, qrels, corpus, pairs)
    run_dir = run_dir or out.with_name(out.name + ".run")
    if sts_probe is not None:
        loaded = dataclasses.replace(loaded, run=dataclasses.replace(loaded.run, sts_probe=str(sts_probe)))
    with distributed.process_group():
        main = distributed.is_main()
        summary = fine_tune(model or settings.model_path(), data, loaded, out, run_dir, show_progress=True,
                            device=resolve_device(settings.device))
    if not main:
        return
    report = render_report(run_dir)
    typer.echo(f"dev nDCG@10 {summary.base['ndcg@10']:.4f} -> {summary.final['ndcg@10']:.4f} ({summary.dev_queries} dev queries)")
    for stage in summary.stages:
        outcome = "rolled back: no dev gain" if stage["gated"] else f"best at step {stage['best_step']}"
        typer.echo(f"  stage {stage['name']}: {stage['steps']} steps, {outcome}")
    for alert in summary.alerts:
        typer.secho(f"  alert {alert['mode']}: {alert['message']}; remedy: {alert['remedy']}", fg=typer.colors.YELLOW)
    typer.echo(f"model: {out}\nreport: {report}")


@app.command("train-reranker")
@_fail_cleanly
def train_reranker(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for the trained cross-encoder")],
    queries: Annotated[Optional[Path], typer.Option(help="Queries JSONL")] = None,
    qrels: Annotated[Optional[Path], typer.Option(help="Training judgements (BEIR qrels TSV)")] = None,
    corpus: Annotated[Optional[Path], typer.Option(help="Corpus JSONL")] = None,
    pairs: Annotated[Optional[Path], typer.Option(help="Pairs/triplets JSONL instead of qrels")] = None,
    init: Annotated[Optional[Path], typer.Option(help="BERT-like folder to start from (default: the packaged MiniLM)")] = None,
    loss: Annotated[str, typer.Option(help="listwise or bce")] = "listwise",
    epochs: Annotated[int, typer.Option(min=1)] = 2,
    negatives: Annotated[int, typer.Option(min=1, max=20, help="Mined negatives per query")] = 7,
) -> None:
    """Train a cross-encoder reranker on negatives mined by the bi-encoder."""
    from training.bi_encoder import BiEncoder
    from training.examples import examples_from_qrels, known_positives
    from training.precision import resolve_training
    from training.recipe import TeacherConfig
    from training.teacher import train_teacher

    if loss not in ("listwise", "bce"):  # before the corpus is read and negatives mined
        raise InvalidInput(f"--loss must be listwise or bce, got {loss!r}")
    settings = _settings(ctx)
    data = _training_data(queries, qrels, corpus, pairs)
    encoder = BiEncoder.load(settings.model_path(), device=resolve_device(settings.device))
    examples = examples_from_qrels(data.queries, data.qrels, data.documents)
    config = TeacherConfig(init=str(init or ""), loss=loss, epochs=epochs, negatives=negatives)
    train_teacher(config, encoder, examples, data.documents, known_positives(examples, data.qrels), out,
                  resolve_training("auto", encoder.device), show_progress=True)
    typer.echo(f"reranker: {out}")


@app.command()
@_fail_cleanly
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory written by `lockstep train`")]) -> None:
    """Render a training run's curves and diagnostics to RUN_DIR/report.html."""
    from training.report import render_report

    typer.echo(f"report: {render_report(run_dir)}")


def _serve(settings: Settings) -> None:
    from service.admin_auth import check_exposure
    from service.app import create_app
    from service.request_logging import run_with_json_logs

    check_exposure(settings.host, settings.admin_token)
    typer.echo(f"Lockstep is serving at http://{settings.host}:{settings.port} (API docs at /docs)")
    run_with_json_logs(create_app(settings), settings.host, settings.port, settings.log_level)


def _settings_env(settings: Settings) -> dict[str, str]:
    """The environment a child process needs to read the same settings."""
    import os

    env = dict(os.environ)
    env["LOCKSTEP_DATA_DIR"] = str(settings.data_dir.resolve())
    return env


def _worker_command(extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "workers", *extra]


@app.command()
@_fail_cleanly
def serve(
    ctx: typer.Context,
    host: Annotated[Optional[str], typer.Option(help="Address to bind")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to bind")] = None,
) -> None:
    """Serve the HTTP API over the active release."""
    settings = _settings(ctx)
    _serve(settings.with_values(host=host, port=port))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Run a job worker (retrain, re-embed, evaluate, promote); extra options go to the Celery worker."""
    import os

    settings = _settings(ctx)
    command = _worker_command(list(ctx.args))
    os.execve(command[0], command, _settings_env(settings))


def _admin_token(settings: Settings) -> Settings:
    """On loopback with no admin token set, generate one for this run and print it."""
    import secrets

    from pydantic import SecretStr

    from service.admin_auth import is_loopback

    if settings.admin_token is not None or not is_loopback(settings.host):
        return settings
    token = secrets.token_urlsafe(24)
    typer.echo(f"admin token for this run (set LOCKSTEP_ADMIN_TOKEN to choose your own): {token}")
    return settings.model_copy(update={"admin_token": SecretStr(token)})


@app.command()
@_fail_cleanly
def up(
    ctx: typer.Context,
    host: Annotated[Optional[str], typer.Option(help="Address to bind")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port to bind")] = None,
    corpus: Annotated[Optional[Path], typer.Option(help="Ingest this JSONL corpus (default: a demo corpus when empty)")] = None,
) -> None:
    """Everything on embedded defaults: ingest, build and activate if needed, then serve with a job worker."""
    import signal
    import subprocess

    from indexer.demo_corpus import stdlib_documents
    from indexer.ingest import ingest_file
    from service.admin_auth import check_exposure

    settings = _admin_token(_settings(ctx).with_values(host=host, port=port))
    check_exposure(settings.host, settings.admin_token)  # before minutes of ingest and build, not after
    store = CorpusStore(settings.corpus_path)
    changed = False
    try:
        if corpus is not None:
            result = ingest_file(store, corpus)
            changed = bool(result.inserted or result.updated)
            typer.echo(f"{corpus}: {result.inserted} inserted, {result.updated} updated, {result.unchanged} unchanged")
        elif store.count() == 0:
            result = store.upsert(stdlib_documents())
            typer.echo(f"empty corpus: ingested {result.inserted} Python standard library docstrings as a demo")
    finally:
        store.close()
    if ReleaseStore(settings.data_dir).active() is None or changed:
        _build(settings, None, None, activate=True)
    if settings.admin_token is not None and _settings(ctx).admin_token is None:
        typer.echo(f"admin token for this run: {settings.admin_token.get_secret_value()}")  # again, after the build
    worker_process = subprocess.Popen(_worker_command([]), env=_settings_env(settings))
    typer.echo(f"job worker started (pid {worker_process.pid}); Ctrl-C stops the API and the worker")
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again; exiting through
    # Python instead of dying on it lets `finally` stop the worker rather than orphan it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        _serve(settings)
    finally:
        worker_process.terminate()
        try:
            worker_process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker_process.kill()
            worker_process.wait()


if __name__ == "__main__":
    sys.exit(app())
