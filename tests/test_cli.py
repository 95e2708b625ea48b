"""The `lockstep` command line: ingest, build, releases, search, eval, with clean errors."""

import json
import time

import pytest
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()


def _corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [
        {"_id": "d1", "title": "Fox", "text": "the quick brown fox jumps"},
        {"_id": "d2", "title": "Cells", "text": "protein study of cancer cells"},
        {"_id": "d3", "title": "Fruit", "text": "apple banana cherry"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run(data_dir, *args):
    return runner.invoke(app, ["--data-dir", str(data_dir), *args])


def test_ingest_build_search_releases_eval(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    result = run(data, "ingest", str(_corpus_file(tmp_path)))
    assert result.exit_code == 0 and "3 inserted" in result.output
    result = run(data, "build", "--model", str(tiny_model_dir), "--activate")
    assert result.exit_code == 0, result.output
    assert "built release r-" in result.output and "active" in result.output
    first = result.output.split("built release ")[1].split(":")[0]
    second = run(data, "build", "--model", str(tiny_model_dir)).output.split("built release ")[1].split(":")[0]

    listing = run(data, "releases", "list").output
    assert f"* {first}" in listing and f"  {second}" in listing
    assert run(data, "releases", "activate", second).exit_code == 0
    assert json.loads(run(data, "releases", "list", "--json").output)[1]["active"] is True
    assert f"active release: {first}" in run(data, "releases", "rollback").output

    hits = run(data, "search", "Fruit apple banana cherry", "-k", "2")
    assert hits.exit_code == 0 and f"release {first}" in hits.output
    assert hits.output.splitlines()[1].split()[2] == "d3"
    undecodable = run(data, "search", "pear \udcff")
    assert undecodable.exit_code == 1 and "query holds '\\udcff', a lone surrogate" in undecodable.output

    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "Fruit apple banana cherry"}\n{"_id": "q2", "text": "Fox the quick brown fox jumps"}\n')
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td3\t1\nq2\td1\t1\n")
    metrics = run(data, "eval", "--queries", str(queries), "--qrels", str(qrels), "--json")
    assert metrics.exit_code == 0, metrics.output
    assert json.loads(metrics.output) == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    table = run(data, "eval", "--queries", str(queries), "--qrels", str(qrels), "--split-fraction", "0.5")
    assert "1 queries" in table.output and "ndcg@10" in table.output

    assert "removed 0 release(s)" in run(data, "releases", "gc", "--keep", "1").output, "the active one stays"
    refused = run(data, "releases", "gc", "--unused-for", "-1")
    assert refused.exit_code != 0 and "unused_for must be 0 or more seconds" in refused.output
    assert run(data, "releases", "delete", second).exit_code == 0
    assert second not in run(data, "releases", "list").output


def test_malformed_ingest_prints_file_and_line_and_commits_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "ok"}\n{"_id": "b", "text": }\n')
    result = run(tmp_path / "data", "ingest", str(bad))
    assert result.exit_code == 1
    assert f"error: {bad}:2: invalid JSON" in result.output
    assert "Traceback" not in result.output
    from indexer.corpus_store import CorpusStore

    assert CorpusStore(tmp_path / "data" / "corpus.sqlite3").count() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build"], "corpus is empty"),
        (["search", "x"], "no release is active"),
        (["releases", "rollback"], "no earlier release"),
        (["releases", "activate", "../x"], "not a release id"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, args, message):
    result = run(tmp_path / "data", *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({"LOCKSTEP_LOG_LEVEL": "verbose"}, ["releases", "list"], "log_level (LOCKSTEP_LOG_LEVEL): Input should be 'debug'"),
        ({"LOCKSTEP_BATCH_SIZE": "0"}, ["releases", "list"], "batch_size (LOCKSTEP_BATCH_SIZE): Input should be greater than"),
        ({"LOCKSTEP_TRAINING_ROOTS": "/srv/data"}, ["releases", "list"],
         'error parsing value for field "training_roots" from source "EnvSettingsSource"; list settings such as'),
        ({}, ["serve", "--port", "70000"], "port (LOCKSTEP_PORT): Input should be less than or equal to 65535, got 70000"),
        ({}, ["build", "--ef-search", "100000"], "ef_search (LOCKSTEP_EF_SEARCH): Input should be less than or equal to"),
    ],
)
def test_bad_settings_and_options_are_one_clear_line(tmp_path, env, args, message):
    """Guards against a bad setting crashing the CLI with a traceback before any command runs, and against an
    option that skips the checks its setting has."""
    result = runner.invoke(app, ["--data-dir", str(tmp_path / "data"), *args], env=env)
    assert result.exit_code == 1 and f"error: invalid settings: {message}" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_an_upper_case_log_level_is_accepted(tmp_path):
    result = runner.invoke(app, ["--data-dir", str(tmp_path / "data"), "releases", "list"], env={"LOCKSTEP_LOG_LEVEL": "WARNING"})
    assert result.exit_code == 0, result.output


def test_gc_keeps_at_least_one_release(tmp_path):
    result = run(tmp_path / "data", "releases", "gc", "--keep", "0")
    assert result.exit_code == 2 and "greater than or equal to 1" in result.output


def test_gc_spares_the_candidate_of_an_unfinished_job(tmp_path, tiny_model_dir):
    """Guards against `releases gc` deleting a job's candidate while it waits for the gate or promotion (a newer
    build made it look old), so the job then failed."""
    from indexer.corpus_store import CorpusStore
    from indexer.job_store import JobStore
    from indexer.release_builder import BuildOptions, build_release
    from indexer.release_store import ReleaseStore
    from tests.conftest import SAMPLE_DOCS

    data = tmp_path / "data"
    corpus, releases, jobs = CorpusStore(data / "corpus.sqlite3"), ReleaseStore(data), JobStore(data / "jobs.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir)
    live, candidate, finished, newest = (build_release(corpus, releases, options, activate=not i).release_id
                                         for i in range(4))
    running, done = jobs.create("reembed", {}), jobs.create("reembed", {})
    jobs.record(running.id, outputs={"release_id": candidate})
    jobs.record(done.id, outputs={"release_id": finished})
    jobs.finish(done.id, "succeeded", "promoted")
    result = run(data, "releases", "gc", "--keep", "1")
    assert result.exit_code == 0, result.output
    assert [m.release_id for m in releases.list()] == [live, candidate, newest]
    for store in (corpus, jobs):
        store.close()


def test_train_and_report_commands(tmp_path, tiny_model_dir):
    """Guards against the CLI training path drifting from the library (files in, model and report out)."""
    from tests.training_data import synthetic_task

    task = synthetic_task(48)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"_id": d, "title": "", "text": t}) for d, t in task.documents.items()) + "\n")
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps({"_id": q, "text": t}) for q, t in task.queries.items()) + "\n")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, ds in task.qrels.items() for d in ds))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[run]\nprecision = "fp32"\n[diagnostics]\ncollapse_max_mean_cosine = 0.99\n[[stage]]\nname = "mnr"\nepochs = 2\nlearning_rate = 1e-4\nbatch_size = 8\n')
    out = tmp_path / "trained"
    result = run(tmp_path / "data", "train", "--out", str(out), "--queries", str(queries), "--qrels", str(qrels),
                 "--corpus", str(corpus), "--recipe", str(recipe), "--model", str(tiny_model_dir))
    assert result.exit_code == 0, result.output
    assert "dev nDCG@10" in result.output and "stage mnr" in result.output
    assert (out / "model.safetensors").exists() and (tmp_path / "trained.run" / "report.html").exists()
    again = run(tmp_path / "data", "report", str(tmp_path / "trained.run"))
    assert again.exit_code == 0 and "report.html" in again.output
    bad = run(tmp_path / "data", "train", "--out", str(out), "--queries", str(queries))
    assert bad.exit_code == 1 and "--qrels" in bad.output


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "without an admin token"), ("changeme", "weak or placeholder admin token"), ("short-token", "weak or placeholder admin token")],
)
def test_serving_beyond_loopback_needs_a_strong_admin_token(tmp_path, monkeypatch, token, message):
    if token:
        monkeypatch.setenv("LOCKSTEP_ADMIN_TOKEN", token)
    else:
        monkeypatch.delenv("LOCKSTEP_ADMIN_TOKEN", raising=False)
    result = runner.invoke(app, ["--data-dir", str(tmp_path), "serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1 and message in result.output
    up = runner.invoke(app, ["--data-dir", str(tmp_path / "up"), "up", "--host", "0.0.0.0"])
    assert up.exit_code == 1 and message in up.output
    assert not (tmp_path / "up" / "corpus.sqlite3").exists(), "up ingested and built before refusing to serve"


def _switches_within_10_s(base: str, release_id: str) -> None:
    import httpx

    deadline = time.monotonic() + 10  # loose for a loaded CI machine; the server itself polls only every 600 s
    while httpx.get(f"{base}/readyz").json()["release"] != release_id:
        assert time.monotonic() < deadline, f"the server did not switch to {release_id} within 10 s of the CLI's change"
        time.sleep(0.05)


@pytest.mark.integration
def test_a_cli_activation_is_announced_so_a_slow_polling_server_switches_at_once(tmp_path, tiny_model_dir, other_model_dir):
    """Guards against a server polling slowly missing an activation made from the CLI, `build --activate` too."""
    import httpx

    from indexer.corpus_store import CorpusStore
    from indexer.release_builder import BuildOptions, build_release
    from indexer.release_store import ReleaseStore
    from tests.conftest import SAMPLE_DOCS
    from tests.processes import REDIS_URL, start_server, stop

    data = tmp_path / "data"
    corpus, releases = CorpusStore(data / "corpus.sqlite3"), ReleaseStore(data)
    corpus.upsert(SAMPLE_DOCS)
    first = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True).release_id
    second = build_release(corpus, releases, BuildOptions(model_path=other_model_dir)).release_id
    server, base = start_server(data, broker_url=REDIS_URL, poll_interval_s="600")
    try:
        assert httpx.get(f"{base}/readyz").json()["release"] == first
        result = runner.invoke(app, ["--data-dir", str(data), "releases", "activate", second],
                               env={"LOCKSTEP_BROKER_URL": REDIS_URL})
        assert result.exit_code == 0, result.output
        _switches_within_10_s(base, second)
        built = runner.invoke(app, ["--data-dir", str(data), "build", "--activate", "--model", str(tiny_model_dir)],
                              env={"LOCKSTEP_BROKER_URL": REDIS_URL})
        assert built.exit_code == 0, built.output
        _switches_within_10_s(base, releases.active())
    finally:
        stop(server)
        corpus.close()


def test_file_system_and_database_errors_are_one_clear_line(tmp_path):
    """Guards against a data dir that is a file, or a damaged database, ending in a traceback."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.sqlite3").write_text("not a database " * 100)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "t"}\n')
    for result, message in ((run(not_a_dir, "releases", "list"), "Not a directory; check the path and its permissions"),
                            (run(data, "ingest", str(corpus)), "a database in the data dir is damaged (file is not a database)")):
        assert result.exit_code == 1 and "error: " in result.output and message in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_search_prints_untrusted_text_without_control_characters(tmp_path, tiny_model_dir):
    """Guards against a document's escape sequences reaching the operator's terminal (title changes, hidden text,
    clipboard writes) and its line breaks splitting a hit over several lines."""
    from indexer.corpus_store import CorpusStore, Document
    from indexer.release_builder import BuildOptions, build_release
    from indexer.release_store import ReleaseStore

    data = tmp_path / "data"
    corpus = CorpusStore(data / "corpus.sqlite3")
    corpus.upsert([Document(id="evil", title="\x1b]0;owned\x07Title", text="line one\nline two \x1b[2J \u202eolleh")])
    build_release(corpus, ReleaseStore(data), BuildOptions(model_path=tiny_model_dir), activate=True)
    corpus.close()
    result = run(data, "search", "line one", "-k", "1")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "?]0;owned?Title  line one line two ?[2J ?olleh" in result.output


def test_search_filters_by_metadata_and_names_a_bad_filter(tmp_path, tiny_model_dir):
    from indexer.corpus_store import CorpusStore
    from indexer.release_builder import BuildOptions, build_release
    from indexer.release_store import ReleaseStore
    from tests.conftest import SAMPLE_DOCS

    data = tmp_path / "data"
    corpus = CorpusStore(data / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, ReleaseStore(data), BuildOptions(model_path=tiny_model_dir), activate=True)
    corpus.close()
    result = run(data, "search", "apple banana cherry", "-k", "5", "--filter", '{"lang": "py"}')
    assert result.exit_code == 0, result.output
    assert [line.split()[2] for line in result.output.splitlines()[1:]] == ["d5"]
    broken = run(data, "search", "apple", "--filter", '{"lang": ')
    assert broken.exit_code == 1 and "--filter is not JSON: Expecting value at column 10; write it as" in broken.output
    unknown = run(data, "search", "apple", "--filter", '{"lang": {"$regex": "p"}}')
    assert unknown.exit_code == 1 and "filter.lang.$regex: unknown operator" in unknown.output


def test_build_flags_for_approximate_indexes_reach_the_release(tmp_path, tiny_model_dir):
    """Guards against `lockstep build --ef-search / --nprobe / --ef-construction` being accepted and then ignored."""
    import faiss

    from indexer.release_store import ReleaseStore
    from indexer.vector_index import VectorIndex

    data = tmp_path / "data"
    rows = [{"_id": f"d{i}", "text": f"document {i} about topic {i % 7}"} for i in range(64)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run(data, "ingest", str(tmp_path / "docs.jsonl")).exit_code == 0
    hnsw = run(data, "build", "--model", str(tiny_model_dir), "--index-type", "HNSW8", "--ef-search", "77",
               "--ef-construction", "50")
    ivf = run(data, "build", "--model", str(tiny_model_dir), "--index-type", "IVF4,Flat", "--nprobe", "3")
    assert hnsw.exit_code == 0 and ivf.exit_code == 0, hnsw.output + ivf.output
    manifests = {m["index_type"]: m for m in json.loads(run(data, "releases", "list", "--json").output)}
    assert manifests["HNSW8"]["search_params"] == {"ef_search": 77} == manifests["HNSW8"]["recall"]["search_params"]
    stored = VectorIndex.load(ReleaseStore(data).path(manifests["HNSW8"]["release_id"]))
    assert faiss.downcast_index(stored._index.index).hnsw.efConstruction == 50
    assert manifests["IVF4,Flat"]["search_params"] == {"nprobe": 3} == manifests["IVF4,Flat"]["recall"]["search_params"]
    assert run(data, "releases", "activate", manifests["HNSW8"]["release_id"]).exit_code == 0
    assert "ms, ef_search 77)" in run(data, "search", "document 3").output.splitlines()[0]
    tuned = run(data, "search", "document 3", "--ef-search", "9", "--nprobe", "2")
    assert tuned.exit_code == 0 and "ms, ef_search 9)" in tuned.output.splitlines()[0], tuned.output


def test_field_indexes_are_added_listed_and_dropped_from_the_cli(tmp_path):
    data = tmp_path / "data"
    rows = [{"_id": f"d{i}", "text": "x", "metadata": {"lang": ["en", "de"][i % 2]}} for i in range(5)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run(data, "ingest", str(tmp_path / "docs.jsonl")).exit_code == 0
    assert "no metadata field is indexed" in run(data, "field-index", "list").output
    added = run(data, "field-index", "add", "lang")
    assert added.exit_code == 0 and "indexed lang: 5 values" in added.output
    assert run(data, "field-index", "list").output.split() == ["lang", "5", "values"]
    bad = run(data, "field-index", "add", "lang.")
    assert bad.exit_code == 1 and "field 'lang.' must be a dotted path" in bad.output and "Traceback" not in bad.output
    assert "dropped the index on lang" in run(data, "field-index", "drop", "lang").output
    missing = run(data, "field-index", "drop", "lang")
    assert missing.exit_code == 1 and "metadata field 'lang' is not indexed" in missing.output


def test_eval_scores_hybrid_search_with_bm25(tmp_path, tiny_model_dir):
    """Guards against `lockstep eval --lexical-weight` scoring the dense ranking alone: the tiny random model
    ranks these queries' documents anywhere, BM25 ranks each first."""
    data = tmp_path / "data"
    assert run(data, "ingest", str(_corpus_file(tmp_path))).exit_code == 0
    assert run(data, "build", "--model", str(tiny_model_dir), "--activate").exit_code == 0
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "cherry bananas"}\n{"_id": "q2", "text": "foxes jumping"}\n')
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td3\t1\nq2\td1\t1\n")
    dense = run(data, "eval", "--queries", str(queries), "--qrels", str(qrels), "--json")
    assert json.loads(dense.output)["mrr@10"] < 1.0, "the dense ranking alone misses one"
    hybrid = run(data, "eval", "--queries", str(queries), "--qrels", str(qrels), "--lexical-weight", "1", "--json")
    assert hybrid.exit_code == 0, hybrid.output
    assert json.loads(hybrid.output) == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    table = run(data, "eval", "--queries", str(queries), "--qrels", str(qrels), "--lexical-weight", "0.5")
    assert "hybrid with BM25 at weight 0.5" in table.output
