"""int8 on the openvino runtime: calibrated on a corpus sample or with dynamic activations, gated, stored in the
release and served."""

import json
import re
import sys
from dataclasses import astuple, replace

import numpy as np
import pytest
from typer.testing import CliRunner

from indexer import release_builder
from indexer.corpus_store import Document
from indexer.embedding_shards import assemble_release, encode_shard, plan_shards
from indexer.live_release import LiveRelease
from indexer.manifest import MANIFEST_FILE, OPENVINO_INT8_FILES, Manifest, NormStats
from indexer.release_builder import BuildOptions, build_release
from indexer.release_runtime import choose_runtime, int8_activations, quantise_int8
from indexer.release_store import new_release_id
from service.cli import app as cli
from training.bi_encoder import BiEncoder, TorchForward
from training.cross_encoder import CrossEncoder
from training.errors import IntegrityError, InvalidInput
from training.precision import cpu_supports_bf16
from training.openvino_int8 import ACTIVATION_GROUP, store_hint, stored_hint
from training.openvino_runtime import (
    ACTIVATION_GROUP_KEY, FLOAT_HINT_KEY, CompiledGraph, OpenVinoForward, stored_float_hint,
)
from tests.conftest import SAMPLE_DOCS, require_shared
from tests.test_int8 import GATE, TEXTS, _cosines, _fragile_model

openvino = pytest.importorskip("openvino", reason="int8 on openvino needs `pip install 'lockstep[openvino]'`")
pytest.importorskip("nncf", reason="int8 on openvino needs `pip install 'lockstep[openvino]'`")

XML, BIN = OPENVINO_INT8_FILES
INT8_OPENVINO = {"precision": "int8", "runtime": "openvino"}
DYNAMIC = {**INT8_OPENVINO, "int8_activations": "dynamic"}


def _refuse(*args, **kwargs):
    raise AssertionError("the torch transformer ran on the int8 path")


def _corpus_documents(count: int) -> list[Document]:
    words = ["apple", "banana", "protein", "cancer", "fox", "dog", "river", "stone", "cell", "gene", "light", "green"]
    return [Document(id=f"n{i}", title=f"note {i}", text=" ".join(words[(i * j) % 12] for j in range(3 + i % 9)))
            for i in range(count)]


def test_quantised_encoding_agrees_with_fp32_in_every_batch_shape(tiny_model_dir, tmp_path, monkeypatch):
    """Guards against a quantised graph that bakes in the traced batch or length, or drops the padding mask."""
    encoder = BiEncoder.load(tiny_model_dir)
    reference = {kind: encoder.encode(TEXTS, kind) for kind in ("query", "document")}
    path = encoder.quantise_openvino_int8(tmp_path / XML, TEXTS * 3)
    assert path == tmp_path / XML and (tmp_path / BIN).stat().st_size > 0
    operations = [op.get_type_name() for op in openvino.Core().read_model(str(path)).get_ops()]
    assert operations.count("FakeQuantize") >= 6, "the stored graph should hold quantised matrix products"
    encoder.use_int8(path)
    assert (encoder.precision, encoder.runtime) == ("int8", "openvino")
    monkeypatch.setattr(TorchForward, "__call__", _refuse)
    for kind, expected in reference.items():
        for batch_size in (1, 3, 32):
            vectors = encoder.encode(TEXTS, kind, batch_size=batch_size)
            assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
            assert _cosines(vectors, expected).min() >= GATE and np.abs(vectors - expected).max() > 0


def test_an_int8_openvino_release_stores_its_graph_and_serves_through_it(corpus, releases, tiny_model_dir, monkeypatch):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, reranker_path=tiny_model_dir, **INT8_OPENVINO)
    manifest = build_release(corpus, releases, options, activate=True)
    folder = releases.path(manifest.release_id)
    assert (manifest.precision, manifest.runtime) == ("int8", "openvino") and Manifest.read(folder) == manifest
    assert set(manifest.files) == {"index.faiss", "ids.json", XML, BIN}
    agreement = manifest.int8_agreement
    assert agreement.sample == len(SAMPLE_DOCS) and GATE <= agreement.min_cosine <= agreement.mean_cosine <= 1.0 + 1e-6

    live = LiveRelease.load(releases, manifest.release_id)
    assert isinstance(live.encoder.forward, OpenVinoForward) and live.encoder.forward.precision == "int8"
    assert (live.reranker.runtime, live.reranker._graph.precision) == ("openvino", "fp32")
    monkeypatch.setattr(TorchForward, "__call__", _refuse)
    monkeypatch.setattr(CrossEncoder, "logits", _refuse)
    assert live.search(corpus, "apple banana cherry", k=1).hits[0].document.id == "d3"
    assert [hit.document.id for hit in live.search(corpus, "apple banana cherry", k=3, rerank=True).hits][0] == "d3"

    built = np.stack([live.index.reconstruct(doc.id) for doc in SAMPLE_DOCS])
    assert np.allclose(built, live.encoder.encode([doc.embedding_text() for doc in SAMPLE_DOCS]), atol=1e-5)
    new = Document(id="d6", title="Pie", text="green apple cherry pie")
    corpus.upsert([new])
    assert live.catch_up(corpus) == 1
    assert np.allclose(live.index.reconstruct("d6"), live.encoder.encode([new.embedding_text()])[0], atol=1e-5)


@pytest.mark.parametrize("activations", ["calibrated", "dynamic"])
def test_an_int8_openvino_build_never_runs_the_torch_transformer(corpus, releases, tiny_model_dir, monkeypatch, activations):
    """The gate's fp32 reference runs on OpenVINO's fp32 graph too, and agrees with torch's."""
    corpus.upsert(SAMPLE_DOCS)
    references: list[tuple[list[str], np.ndarray]] = []
    encode = BiEncoder.encode

    def recording(encoder, texts, *args, **kwargs):
        vectors = encode(encoder, texts, *args, **kwargs)
        if encoder.precision == "fp32":
            references.append((list(texts), vectors))
        return vectors

    monkeypatch.setattr(BiEncoder, "encode", recording)
    monkeypatch.setattr(TorchForward, "__call__", _refuse)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, int8_activations=activations,
                                                            **INT8_OPENVINO))
    monkeypatch.undo()
    assert manifest.int8_activations == activations and len(references) == 1
    texts, vectors = references[0]
    assert len(texts) == len(SAMPLE_DOCS)
    assert _cosines(vectors, BiEncoder.load(tiny_model_dir).encode(texts)).min() >= 0.99999


def test_calibration_and_agreement_samples_share_no_document(corpus, releases, tiny_model_dir, monkeypatch):
    """The agreement figure would flatter a graph calibrated on the very documents it is measured on. Also guards
    against the corpus encode spending time on the measured documents again: their int8 vectors are reused."""
    documents = _corpus_documents(40)
    corpus.upsert(documents)
    monkeypatch.setattr(release_builder, "INT8_CALIBRATION", 20)
    calibrated: list[list[str]] = []
    quantise = BiEncoder.quantise_openvino_int8

    def recording(encoder, path, texts):
        calibrated.append(list(texts))
        return quantise(encoder, path, texts)

    measured: list[list[str]] = []
    encode = BiEncoder.encode_with_norms

    def measuring(encoder, texts, *args, **kwargs):
        measured.append(list(texts))
        return encode(encoder, texts, *args, **kwargs)

    monkeypatch.setattr(BiEncoder, "quantise_openvino_int8", recording)
    monkeypatch.setattr(BiEncoder, "encode_with_norms", measuring)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, int8_sample=16, **INT8_OPENVINO))
    assert manifest.int8_agreement.sample == 16 and len(calibrated) == 1 and len(calibrated[0]) == 20
    corpus_texts = {doc.embedding_text() for doc in documents}
    assert len(corpus_texts) == len(documents) and set(calibrated[0]) <= corpus_texts
    reference, quantised, rest = measured
    assert reference == quantised and len(set(reference)) == 16 and set(reference) <= corpus_texts
    assert set(reference).isdisjoint(calibrated[0])
    assert len(rest) == len(documents) - 16 and set(rest) == corpus_texts - set(reference)

    live = LiveRelease.load(releases, manifest.release_id)
    by_text = {doc.embedding_text(): doc.id for doc in documents}
    built = np.stack([live.index.reconstruct(by_text[text]) for text in corpus_texts])
    assert np.allclose(built, live.encoder.encode(list(corpus_texts)), atol=1e-5)
    expected = NormStats.of(live.encoder.encode_with_norms(list(corpus_texts)).norms)
    assert np.allclose(astuple(manifest.document_norms), astuple(expected), rtol=1e-4)


def test_a_failed_gate_names_the_figure_and_leaves_nothing(corpus, releases, tmp_path):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=_fragile_model(tmp_path / "fragile"), **INT8_OPENVINO)
    with pytest.raises(InvalidInput, match=r"mean cosine 0\.\d{4} \(min 0\.\d{4}\) with fp32 on 5 .*bf16 or fp32 instead"):
        build_release(corpus, releases, options, activate=True)
    assert releases.list() == [] and releases.active() is None
    assert list(releases.releases_dir.glob(".staging-*")) == []


@pytest.mark.parametrize("name", OPENVINO_INT8_FILES)
def test_a_modified_graph_file_is_refused(corpus, releases, tiny_model_dir, name):
    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, **INT8_OPENVINO))
    path = releases.path(manifest.release_id) / name
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match=f"{re.escape(name)} does not match its manifest checksum"):
        LiveRelease.load(releases, manifest.release_id)


def _int8_release_with_manifest(corpus, releases, model_dir, change) -> str:
    """Build an int8 openvino release, then rewrite its manifest with `change(data) -> data`; returns its id."""
    corpus.upsert(SAMPLE_DOCS)
    release_id = build_release(corpus, releases, BuildOptions(model_path=model_dir, **INT8_OPENVINO)).release_id
    path = releases.path(release_id) / MANIFEST_FILE
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return release_id


def test_a_manifest_missing_the_weights_file_is_refused(corpus, releases, tiny_model_dir):
    def drop_bin(data):
        del data["files"][BIN]
        return data

    release_id = _int8_release_with_manifest(corpus, releases, tiny_model_dir, drop_bin)
    with pytest.raises(IntegrityError, match=f"is int8 but its manifest lists no {re.escape(BIN)}; rebuild it"):
        LiveRelease.load(releases, release_id)


def test_an_int8_release_on_an_unknown_runtime_asks_for_an_upgrade(corpus, releases, tiny_model_dir):
    release_id = _int8_release_with_manifest(corpus, releases, tiny_model_dir, lambda data: {**data, "runtime": "tensorrt"})
    with pytest.raises(InvalidInput, match="int8 release on runtime 'tensorrt' is one this version cannot run; upgrade"):
        LiveRelease.load(releases, release_id)


def test_the_stored_graph_runs_its_float_operations_as_recorded_at_build_time(tiny_model_dir, tmp_path):
    """Every process serving a release must compute alike, whatever precision its own CPU would pick."""
    encoder = BiEncoder.load(tiny_model_dir)
    path = encoder.quantise_openvino_int8(tmp_path / XML, TEXTS)
    graph = openvino.Core().read_model(str(path))
    assert graph.get_rt_info(FLOAT_HINT_KEY).astype(str) == stored_float_hint()
    served = CompiledGraph.of_file(path, "int8")
    assert served.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == stored_float_hint()
    assert served.source is None, "a served int8 graph keeps no uncompiled copy: nothing quantises it again"


@pytest.mark.skipif(" avx512_fp16" in open("/proc/cpuinfo").read(), reason="this CPU runs f16, the hint the test relies on it lacking")
def test_a_graph_recording_a_float_precision_this_cpu_lacks_is_refused(tiny_model_dir, tmp_path):
    encoder = BiEncoder.load(tiny_model_dir)
    graph = openvino.Core().read_model(str(encoder.quantise_openvino_int8(tmp_path / XML, TEXTS)))
    graph.set_rt_info("f16", FLOAT_HINT_KEY)
    openvino.save_model(graph, str(tmp_path / "f16.xml"), compress_to_fp16=False)
    with pytest.raises(InvalidInput, match=r"int8 model's float arithmetic for (f32|bf16), not f16: the CPU lacks the instructions; "
                                           "build the release again on a CPU like this one"):
        encoder.use_int8(tmp_path / "f16.xml")


def test_a_stored_graph_without_its_weights_file_is_refused(tiny_model_dir, tmp_path):
    encoder = BiEncoder.load(tiny_model_dir)
    path = encoder.quantise_openvino_int8(tmp_path / XML, TEXTS)
    (tmp_path / BIN).unlink()
    with pytest.raises(IntegrityError, match=f"the OpenVINO model {XML} lacks .*{BIN}; build the release again"):
        encoder.use_int8(path)


def test_shards_of_an_int8_openvino_plan_encode_through_its_graph(corpus, releases, tiny_model_dir, data_dir, tmp_path, monkeypatch):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, **INT8_OPENVINO)
    plan = plan_shards(corpus, releases, options, new_release_id(), tmp_path / "plan", shard_size=2)
    assert (plan.spec.precision, plan.spec.runtime) == ("int8", "openvino")
    assert (tmp_path / "plan" / XML).is_file() and (tmp_path / "plan" / BIN).is_file()
    monkeypatch.setattr(TorchForward, "__call__", _refuse)
    for shard in range(plan.count):
        encode_shard(data_dir, tmp_path / "plan", shard, batch_size=4)
    manifest = assemble_release(releases, tmp_path / "plan")
    assert set(manifest.files) == {"index.faiss", "ids.json", XML, BIN}
    live = LiveRelease.load(releases, manifest.release_id)
    assert live.search(corpus, "apple banana cherry", k=1).hits[0].document.id == "d3"


def test_a_build_without_nncf_says_how_to_install_it_and_leaves_nothing(corpus, releases, tiny_model_dir, monkeypatch):
    corpus.upsert(SAMPLE_DOCS)
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(InvalidInput, match=r"quantised with nncf, which is not installed; install it with "
                                           r"`pip install 'lockstep\[openvino\]'`"):
        build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, **INT8_OPENVINO))
    assert releases.list() == [] and list(releases.releases_dir.glob(".staging-*")) == []


def test_cli_builds_int8_on_openvino_and_says_so(tmp_path, tiny_model_dir):
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("".join(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n" for d in SAMPLE_DOCS))
    data = ["--data-dir", str(tmp_path / "data")]
    assert CliRunner().invoke(cli, [*data, "ingest", str(corpus_file)]).exit_code == 0
    result = CliRunner().invoke(
        cli, [*data, "build", "--model", str(tiny_model_dir), "--precision", "int8", "--runtime", "openvino"]
    )
    assert result.exit_code == 0, result.output
    assert re.search(r", int8 on openvino with calibrated activations \(mean cosine [01]\.\d{4} with fp32\), model tiny-bert-0",
                     result.output), result.output
    result = CliRunner().invoke(cli, [*data, "build", "--model", str(tiny_model_dir), "--precision", "int8",
                                      "--runtime", "openvino", "--int8-activations", "dynamic"])
    assert result.exit_code == 0, result.output
    assert re.search(r", int8 on openvino with dynamic activations \(mean cosine [01]\.\d{4} with fp32\)", result.output), result.output
    result = CliRunner().invoke(cli, [*data, "build", "--model", str(tiny_model_dir), "--precision", "int8",
                                      "--int8-activations", "calibrated"])
    assert result.exit_code != 0 and "calibrated int8 activations need the openvino runtime" in result.output, result.output


def test_dynamic_activations_store_int8_weights_and_agree_with_fp32_in_every_batch_shape(tiny_model_dir, tmp_path, monkeypatch):
    """Guards against a graph that lost its int8 weights, its recorded group size, or the padding mask."""
    encoder = BiEncoder.load(tiny_model_dir)
    reference = {kind: encoder.encode(TEXTS, kind) for kind in ("query", "document")}
    path = encoder.compress_openvino_int8(tmp_path / XML)
    graph = openvino.Core().read_model(str(path))
    weights = [op for op in graph.get_ops() if op.get_type_name() == "Constant" and op.get_output_element_type(0).get_type_name() == "u8"]
    assert len(weights) >= 12, "every linear layer's weights should be stored in int8"
    assert "FakeQuantize" not in [op.get_type_name() for op in graph.get_ops()], "nothing should be calibrated"
    assert graph.get_rt_info(ACTIVATION_GROUP_KEY).astype(int) == ACTIVATION_GROUP
    # OpenVINO's bf16 kernels for int8-weight layers give this 32-wide model wrong vectors on AMX CPUs (mean cosine
    # 0.19); a build's gate then stores the graph in f32 (`store_hint`), as here, where the graph itself is tested.
    encoder.use_int8(store_hint(path, "f32"))
    assert stored_hint(path) == "f32"
    assert (encoder.precision, encoder.runtime) == ("int8", "openvino")
    assert encoder.forward.graph.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == ACTIVATION_GROUP
    monkeypatch.setattr(TorchForward, "__call__", _refuse)
    for kind, expected in reference.items():
        for batch_size in (1, 3, 32):
            vectors = encoder.encode(TEXTS, kind, batch_size=batch_size)
            assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
            assert _cosines(vectors, expected).min() >= 0.99 and np.abs(vectors - expected).max() > 0


@pytest.mark.parametrize("scheme", ["calibrated", "dynamic"])
def test_quantising_reuses_the_running_fp32_graph_without_changing_it(tiny_model_dir, tmp_path, monkeypatch, scheme):
    """Guards against converting the model twice in an int8 build (a second or more), and against quantising the
    graph the fp32 reference runs on in place."""
    def quantised(encoder: BiEncoder, folder: str) -> bytes:
        path = tmp_path / folder / XML
        path.parent.mkdir()
        if scheme == "dynamic":
            encoder.compress_openvino_int8(path)
        else:
            encoder.quantise_openvino_int8(path, TEXTS)
        return path.with_suffix(".bin").read_bytes()

    converted = quantised(BiEncoder.load(tiny_model_dir), "converted")
    encoder = BiEncoder.load(tiny_model_dir)
    encoder.use_openvino()
    reference = encoder.encode(TEXTS, "document")
    running = encoder.forward.graph.source
    operations = [op.get_type_name() for op in running.get_ordered_ops()]
    monkeypatch.setattr(sys.modules["training.bi_encoder"], "convert_transformer", _refuse)
    assert quantised(encoder, "reused") == converted
    assert [op.get_type_name() for op in running.get_ordered_ops()] == operations
    assert np.array_equal(encoder.encode(TEXTS, "document"), reference)


def test_graphs_without_int8_weights_compile_without_dynamic_activations(tiny_model_dir, tmp_path):
    encoder = BiEncoder.load(tiny_model_dir)
    calibrated = CompiledGraph.of_file(encoder.quantise_openvino_int8(tmp_path / XML, TEXTS), "int8")
    assert calibrated.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0
    assert CompiledGraph.of_model(encoder.model, "fp32").compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0


def test_a_release_with_dynamic_activations_calibrates_nothing_and_serves_through_its_graph(corpus, releases, tiny_model_dir, monkeypatch):
    corpus.upsert(SAMPLE_DOCS)
    monkeypatch.setattr(BiEncoder, "quantise_openvino_int8", _refuse)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, **DYNAMIC), activate=True)
    folder = releases.path(manifest.release_id)
    assert (manifest.precision, manifest.runtime, manifest.int8_activations) == ("int8", "openvino", "dynamic")
    assert Manifest.read(folder) == manifest and set(manifest.files) == {"index.faiss", "ids.json", XML, BIN}
    assert GATE <= manifest.int8_agreement.min_cosine <= manifest.int8_agreement.mean_cosine <= 1.0 + 1e-6

    live = LiveRelease.load(releases, manifest.release_id)
    assert live.encoder.forward.graph.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == ACTIVATION_GROUP
    monkeypatch.setattr(TorchForward, "__call__", _refuse)
    assert live.search(corpus, "apple banana cherry", k=1).hits[0].document.id == "d3"
    built = np.stack([live.index.reconstruct(doc.id) for doc in SAMPLE_DOCS])
    assert np.allclose(built, live.encoder.encode([doc.embedding_text() for doc in SAMPLE_DOCS]), atol=1e-5)


def test_shards_of_a_plan_with_dynamic_activations_record_them(corpus, releases, tiny_model_dir, data_dir, tmp_path):
    corpus.upsert(SAMPLE_DOCS)
    plan = plan_shards(corpus, releases, BuildOptions(model_path=tiny_model_dir, **DYNAMIC), new_release_id(),
                       tmp_path / "plan", shard_size=3)
    for shard in range(plan.count):
        encode_shard(data_dir, tmp_path / "plan", shard, batch_size=4)
    manifest = assemble_release(releases, tmp_path / "plan")
    assert manifest.int8_activations == "dynamic"
    assert LiveRelease.load(releases, manifest.release_id).search(corpus, "apple banana cherry", k=1).hits[0].document.id == "d3"


@pytest.mark.parametrize(("runtime", "requested", "expected"), [
    ("openvino", "auto", "calibrated"), ("torch", "auto", "dynamic"), ("openvino", "dynamic", "dynamic"),
    ("torch", "dynamic", "dynamic"), ("openvino", "calibrated", "calibrated"),
])
def test_auto_activations_are_calibrated_on_openvino_and_dynamic_on_torch(runtime, requested, expected):
    assert int8_activations(runtime, requested) == expected


@pytest.mark.parametrize(("options", "message"), [
    ({"precision": "int8", "int8_activations": "calibrated"}, "calibrated int8 activations need the openvino runtime"),
    ({**INT8_OPENVINO, "int8_activations": "static"}, "int8 activations must be 'auto', 'calibrated' or 'dynamic', got 'static'"),
])
def test_an_impossible_activation_scheme_is_refused_before_any_work(corpus, releases, tiny_model_dir, monkeypatch, options, message):
    corpus.upsert(SAMPLE_DOCS)
    monkeypatch.setattr(corpus, "snapshot", _refuse)
    with pytest.raises(InvalidInput, match=re.escape(message)):
        build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, **options))
    assert releases.list() == [] and list(releases.releases_dir.glob(".staging-*")) == []


@pytest.mark.parametrize(("runtime", "expected"), [("openvino", "calibrated"), ("onnxruntime", "dynamic")])
def test_an_int8_manifest_written_before_the_activation_scheme_was_recorded_names_the_one_it_used(
        corpus, releases, tiny_model_dir, runtime, expected):
    def older(data):
        del data["int8_activations"]
        return {**data, "runtime": runtime}

    release_id = _int8_release_with_manifest(corpus, releases, tiny_model_dir, older)
    assert Manifest.read(releases.path(release_id)).int8_activations == expected


@pytest.mark.integration
def test_minilm_with_dynamic_int8_activations_stays_near_fp32_on_scifact(corpus, releases):
    """The packaged MiniLM with int8 weights and dynamic activations keeps document vectors within about 0.001 of fp32."""
    from training.default_model import default_model_path

    lines = require_shared("scifact", "corpus.jsonl").read_text().splitlines()[:300]
    corpus.upsert([Document(id=r["_id"], title=r["title"], text=r["text"]) for r in map(json.loads, lines)])
    manifest = build_release(corpus, releases, BuildOptions(model_path=default_model_path(), **DYNAMIC))
    assert manifest.int8_agreement.sample == 256 and manifest.int8_agreement.mean_cosine >= 0.998
    assert manifest.int8_agreement.min_cosine >= 0.99


@pytest.mark.integration
def test_minilm_int8_on_openvino_agrees_with_fp32_on_scifact(corpus, releases):
    """The packaged MiniLM, statically quantised on real documents, passes the gate, and queries agree with fp32 too."""
    from training.default_model import default_model_path

    lines = require_shared("scifact", "corpus.jsonl").read_text().splitlines()[:300]
    documents = [Document(id=r["_id"], title=r["title"], text=r["text"]) for r in map(json.loads, lines)]
    corpus.upsert(documents)
    manifest = build_release(corpus, releases, BuildOptions(model_path=default_model_path(), **INT8_OPENVINO))
    assert manifest.int8_agreement.sample == 256 and manifest.int8_agreement.mean_cosine >= GATE
    live = LiveRelease.load(releases, manifest.release_id)
    fp32 = BiEncoder.load(default_model_path())
    built = np.stack([live.index.reconstruct(doc.id) for doc in documents])
    assert _cosines(built, fp32.encode([doc.embedding_text() for doc in documents], batch_size=32)).mean() >= GATE
    queries = [json.loads(line)["text"] for line in require_shared("scifact", "queries.jsonl").read_text().splitlines()[:50]]
    assert _cosines(live.encoder.encode(queries, "query"), fp32.encode(queries, "query")).mean() >= GATE


def _agreement_per_hint(corpus, model_dir, folder, activations: str) -> dict[str, float]:
    """Mean cosine with fp32 of the int8 graph (`activations` calibrated or dynamic) run in bf16 and in f32, built
    and measured on the documents the build's gate uses."""
    _, documents = corpus.snapshot()
    options = BuildOptions(model_path=model_dir)
    measured, calibrated = release_builder.int8_samples(len(documents), options.int8_sample)
    texts = [documents[row].embedding_text() for row in measured]
    encoder = BiEncoder.load(model_dir)
    choose_runtime(encoder, "fp32", "openvino")
    reference = encoder.encode(texts, "document", batch_size=options.batch_size, show_progress=False)
    path = quantise_int8(encoder, folder, "openvino", activations, [documents[row].embedding_text() for row in calibrated])
    means = {}
    for hint in ("bf16", "f32"):
        encoder.use_int8(store_hint(path, hint))
        vectors = encoder.encode(texts, "document", batch_size=options.batch_size, show_progress=False)
        means[hint] = float(np.mean(np.sum(reference * vectors, axis=1)))
    return means


@pytest.mark.skipif(not cpu_supports_bf16(), reason="graphs are stored for bf16 only on CPUs with bf16, so there is no retry to make")
@pytest.mark.parametrize("activations", ["calibrated", "dynamic"])
def test_a_graph_that_fails_the_gate_in_bf16_but_passes_in_f32_is_kept_in_f32(
    corpus, releases, tiny_model_dir, tmp_path, caplog, activations
):
    """Guards the gate's f32 retry on every bf16 CPU, not only where OpenVINO's bf16 int8 kernels go wrong (AMX):
    the gate's bound is set between this CPU's bf16 and f32 agreements, so the bf16 graph fails it and the f32 one
    passes."""
    corpus.upsert(_corpus_documents(300))
    means = _agreement_per_hint(corpus, tiny_model_dir, tmp_path, activations)
    if not means["f32"] > means["bf16"]:
        pytest.skip(f"on this CPU the bf16 graph agrees as well as the f32 one ({means}); no bound separates them")
    bound = (means["f32"] + means["bf16"]) / 2
    with caplog.at_level("WARNING"):
        options = BuildOptions(model_path=tiny_model_dir, int8_min_cosine=bound, **INT8_OPENVINO, int8_activations=activations)
        manifest = build_release(corpus, releases, options)
    assert manifest.int8_agreement.mean_cosine == pytest.approx(means["f32"], abs=1e-6) and manifest.int8_agreement.mean_cosine >= bound
    assert stored_hint(releases.path(manifest.release_id) / XML) == "f32"
    assert f"gave mean cosine {means['bf16']:.4f} with fp32 on this CPU" in caplog.text
    with pytest.raises(InvalidInput, match="int8 quantisation changes this model's document vectors too much"):
        build_release(corpus, releases, replace(options, int8_min_cosine=means["f32"] + 1e-4))
