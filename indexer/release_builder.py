"""Building a release: embed the whole corpus with one model into a new index, publish it.

The corpus is read as one consistent snapshot whose change sequence goes into the
manifest; writes that land during the build are caught up by whoever serves the
release. The release is assembled in a staging folder and only renamed into place
once complete, so an interrupted build leaves nothing listed and the active release
untouched. An approximate index (HNSW, IVF, PQ, SQ: all but Flat) gets the configured
search parameters and its recall@10 against exact search is measured on sampled
documents and recorded (the vectors are kept in memory for that, once); one that must
be trained (IVF, PQ, SQ) is trained on a seeded sample of all the vectors before any
is added. As it goes, a build touches its staging and model folders so that
`releases gc` leaves them alone however long the encoding takes. An int8 build
quantises the model into the staging folder first and goes on only if int8 document
vectors agree with fp32 on a seeded sample of the corpus; the corpus encode then reuses
the sample's int8 vectors instead of encoding those documents again. `build_release` encodes in
this process; its pieces (the stored model, the release spec, chunked encoding,
publishing from embedded parts) also serve the rebuild sharded across workers
(`embedding_shards.py`), so both publish alike.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from indexer.corpus_store import CorpusStore, Document
from indexer.durable_files import sha256_file
from indexer.manifest import Int8Agreement, Manifest, ModelRef, NormStats, RerankerRef, int8_model_files
from indexer.model_store import ModelStore
from indexer.recall_check import measure_recall
from indexer.release_runtime import BuildRuntime, Int8Activations, choose_runtime, int8_activations, quantise_int8
from indexer.release_store import ReleaseStore, new_release_id, touch
from indexer.vector_index import VectorIndex
from training.bi_encoder import BiEncoder, Encoded
from training.errors import IntegrityError, InvalidInput
from training.openvino_int8 import store_hint, stored_hint
from training.pooling import Pooling
from training.precision import ConcretePrecision, Precision, resolve

log = logging.getLogger(__name__)

BuildProgress = Callable[[str, int, int], None]
LOW_RECALL = 0.9
ENCODE_CHUNK = 4096
# The least cosine to fp32 any one sampled document's int8 vector may have: a good mean can hide a few documents
# (long ones, say) that quantisation wrecks. int8 on MiniLM keeps every SciFact document above 0.98.
INT8_WORST_COSINE = 0.9
INT8_SAMPLE_SEED = 13
INT8_CALIBRATION = 128


@dataclass(frozen=True)
class BuildOptions:
    """What to build a release with."""

    model_path: Path
    model_name: str | None = None
    index_type: str = "Flat"
    batch_size: int = 64
    pooling: Pooling | None = None
    query_max_length: int | None = None
    document_max_length: int | None = None
    reranker_path: Path | None = None
    reranker_name: str | None = None  # what the release records the reranker as; default the folder's name
    precision: Precision = "auto"
    runtime: BuildRuntime = "torch"
    int8_activations: Int8Activations = "auto"
    int8_min_cosine: float = 0.98
    int8_sample: int = 256
    ef_search: int | None = None
    nprobe: int | None = None
    ef_construction: int | None = None
    device: str = "cpu"


@dataclass(frozen=True)
class BuildModel:
    """The stored model a build encodes with, its manifest reference, the reranker it carries, its precision and, for
    int8, how its activations are quantised (`int8_activations`)."""

    encoder: BiEncoder
    ref: ModelRef
    reranker: RerankerRef | None
    precision: ConcretePrecision
    int8_activations: str | None = None


@dataclass(frozen=True)
class ReleaseSpec:
    """A release as fixed before any document is encoded: its manifest less the index, the norms and the files."""

    release_id: str
    model: ModelRef
    reranker: RerankerRef | None
    precision: str
    corpus_seq: int
    doc_count: int
    index_type: str
    dim: int
    ef_search: int | None = None
    nprobe: int | None = None
    ef_construction: int | None = None
    int8_agreement: Int8Agreement | None = None
    runtime: str = "torch"
    int8_activations: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> ReleaseSpec:
        """The spec from `dataclasses.asdict` output (as read back from JSON)."""
        nested = {"model": ModelRef, "reranker": RerankerRef, "int8_agreement": Int8Agreement}
        return cls(**{key: nested[key](**value) if key in nested and value is not None else value
                      for key, value in data.items()})


@dataclass(frozen=True)
class EncodedRows:
    """Documents already encoded by the build's encoder: their rows in the snapshot, sorted, and their encoding."""

    rows: np.ndarray
    encoded: Encoded

    def shifted(self, start: int, stop: int) -> EncodedRows:
        """The rows in `[start, stop)`, numbered from `start` (as a chunk or shard starting there numbers its own)."""
        first, last = np.searchsorted(self.rows, [start, stop])
        return EncodedRows(self.rows[first:last] - start, self.encoded.rows(first, last))


@dataclass(frozen=True)
class Int8Gate:
    """What an int8 build's gate found: the agreement with fp32, and the int8 encoding of the documents it was
    measured on."""

    agreement: Int8Agreement
    sample: EncodedRows


@dataclass(frozen=True)
class EmbeddedDocuments:
    """Document ids with their unit vectors and their norms before normalisation, rows aligned."""

    ids: list[str]
    vectors: np.ndarray
    norms: np.ndarray


def load_build_model(releases: ReleaseStore, options: BuildOptions) -> BuildModel:
    """Store the options' model (and reranker) by fingerprint and load the stored copy at the build's precision.

    For int8 the encoder stays fp32 until `quantise_if_int8` quantises it against the corpus.
    """
    encoder, ref = ModelStore(releases.data_dir).put(
        options.model_path,
        name=options.model_name,
        pooling=options.pooling,
        query_max_length=options.query_max_length,
        document_max_length=options.document_max_length,
        device=options.device,
    )
    precision = resolve(options.precision, encoder.device)
    choose_runtime(encoder, precision, options.runtime)
    activations = int8_activations(options.runtime, options.int8_activations) if precision == "int8" else None
    reranker = None
    if options.reranker_path is not None:
        _, reranker = ModelStore(releases.data_dir).put_reranker(options.reranker_path, name=options.reranker_name)
    return BuildModel(encoder, ref, reranker, precision, activations)


def int8_samples(document_count: int, agreement: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the int8 gate's samples, each sorted: up to `agreement` to measure on and up to `INT8_CALIBRATION` to
    calibrate on. Both come from one seeded permutation, the first from its front and the second from its back, so
    they share no row unless the corpus is too small for both."""
    order = np.random.default_rng(INT8_SAMPLE_SEED).permutation(document_count)
    return np.sort(order[:agreement]), np.sort(order[::-1][:INT8_CALIBRATION])


def _gate_int8(
    encoder: BiEncoder, activations: str, documents: Sequence[Document], folder: Path, options: BuildOptions
) -> Int8Gate:
    """Quantise `encoder` into `folder` for the build's runtime, switch it to int8, and return its agreement with fp32
    together with the int8 encoding of the sample it was measured on.

    On torch the model is quantised dynamically for ONNX Runtime; on openvino with
    `activations` calibrated, on documents apart from those the agreement is measured
    on (`int8_samples`), or dynamic.
    The agreement is the cosine between fp32 and int8 vectors of up to
    `options.int8_sample` documents; below `options.int8_min_cosine` (mean), with any one
    document below `INT8_WORST_COSINE` (or the mean's bound, if lower), or with a vector
    that is not finite, the build fails with the figures, and the caller's staging
    folder, model files included, is removed.
    The fp32 vectors come from the build's runtime: OpenVINO's fp32 graph matches torch's
    to a cosine of 0.9999999 and encodes the sample in three quarters of the time.
    """
    measured, calibrated = int8_samples(len(documents), options.int8_sample)
    texts = [documents[row].embedding_text() for row in measured]
    choose_runtime(encoder, "fp32", options.runtime)
    reference = encoder.encode(texts, "document", batch_size=options.batch_size, show_progress=False)
    calibration = [documents[row].embedding_text() for row in calibrated]
    path = quantise_int8(encoder, folder, options.runtime, activations, calibration)
    encoder.use_int8(path)

    def measure() -> tuple[Encoded, Int8Agreement, str | None]:
        quantised = encoder.encode_with_norms(texts, "document", batch_size=options.batch_size, show_progress=False)
        agreement = Int8Agreement.of(np.sum(reference * quantised.vectors, axis=1))
        return quantised, agreement, _int8_problem(quantised.vectors, agreement, options.int8_min_cosine)

    quantised, agreement, problem = measure()
    if problem is not None and options.runtime == "openvino" and stored_hint(path) == "bf16":
        # OpenVINO's bf16 kernels for int8-weight layers have given wrong vectors on some CPUs and shapes (a 32-wide
        # model on AMX: mean cosine 0.19) where f32 ones agree; an int8 release that agrees in f32 is kept.
        encoder.use_int8(store_hint(path, "f32"))
        failed_in_bf16 = agreement
        quantised, agreement, problem = measure()
        if problem is None:
            log.warning("OpenVINO's int8 graph in bf16 gave mean cosine %.4f with fp32 on this CPU; its unquantised "
                        "operations run in f32 instead (mean cosine %.4f)", failed_in_bf16.mean_cosine,
                        agreement.mean_cosine)
    if problem is not None:
        raise InvalidInput(problem)
    return Int8Gate(agreement, EncodedRows(measured, quantised))


def _int8_problem(vectors: np.ndarray, agreement: Int8Agreement, min_cosine: float) -> str | None:
    """Why the int8 gate refuses vectors with this agreement with fp32, or None if it accepts them."""
    fix = "build with precision bf16 or fp32 instead"
    if not np.isfinite(vectors).all():
        bad = int(np.count_nonzero(~np.isfinite(vectors).all(axis=1)))
        return (f"the int8 model gave {bad} of {len(vectors)} sampled documents vectors that are not finite "
                f"numbers (NaN or infinite); {fix}")
    if agreement.mean_cosine < min_cosine:
        return (f"int8 quantisation changes this model's document vectors too much: mean cosine "
                f"{agreement.mean_cosine:.4f} (min {agreement.min_cosine:.4f}) with fp32 on {agreement.sample} sampled "
                f"documents, below the {min_cosine} required; {fix}")
    worst_allowed = min(INT8_WORST_COSINE, min_cosine)
    if agreement.min_cosine < worst_allowed:
        return (f"int8 quantisation damages some of this model's document vectors: min cosine "
                f"{agreement.min_cosine:.4f} (mean {agreement.mean_cosine:.4f}) with fp32 on {agreement.sample} "
                f"sampled documents, below the {worst_allowed} any one document must keep; {fix}")
    return None


def snapshot_for_build(
    corpus: CorpusStore, releases: ReleaseStore, options: BuildOptions, report: BuildProgress
) -> tuple[BuildModel, int, list[Document]]:
    """Store and load the build's model, then read the corpus snapshot to embed: (model, sequence, documents).

    Refuses an empty corpus.
    """
    report("model", 0, 1)
    model = load_build_model(releases, options)
    seq, documents = corpus.snapshot()
    if not documents:
        raise InvalidInput("the corpus is empty; add documents with `lockstep ingest PATH` first")
    return model, seq, documents


def quantise_if_int8(
    model: BuildModel, documents: Sequence[Document], folder: Path, options: BuildOptions, report: BuildProgress
) -> Int8Gate | None:
    """For an int8 build, quantise the encoder into `folder` and gate it on agreement with fp32; None otherwise."""
    if model.precision != "int8":
        return None
    report("int8", 0, 1)
    gate = _gate_int8(model.encoder, model.int8_activations, documents, folder, options)
    report("int8", 1, 1)
    return gate


def release_spec(
    release_id: str, model: BuildModel, options: BuildOptions, corpus_seq: int, doc_count: int,
    int8_agreement: Int8Agreement | None,
) -> ReleaseSpec:
    """The spec of a release built from a corpus snapshot with `model` and `options`."""
    return ReleaseSpec(
        release_id=release_id,
        model=model.ref,
        reranker=model.reranker,
        precision=model.encoder.precision,
        corpus_seq=corpus_seq,
        doc_count=doc_count,
        index_type=options.index_type,
        dim=model.encoder.dim,
        ef_search=options.ef_search,
        nprobe=options.nprobe,
        ef_construction=options.ef_construction,
        int8_agreement=int8_agreement,
        runtime=model.encoder.runtime,
        int8_activations=model.int8_activations,
    )


def keep_in_use(data_dir: Path, spec: ReleaseSpec, *folders: Path) -> None:
    """Touch the spec's model (and reranker) folders and `folders`, since gc spares what was touched within a day;
    IntegrityError if one is gone, as the release would reference or lose it."""
    models = [data_dir / ref.path for ref in (spec.model, spec.reranker) if ref is not None]
    for folder in [*models, *folders]:
        try:
            touch(folder)
        except FileNotFoundError as exc:
            raise IntegrityError(
                f"release {spec.release_id}: {folder} was removed while the release was being built; build it again"
            ) from exc


def embed_documents(
    encoder: BiEncoder,
    ids: Sequence[str],
    texts: Sequence[str],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    encoded_before: EncodedRows | None = None,
) -> Iterator[EmbeddedDocuments]:
    """Encode documents in chunks of `ENCODE_CHUNK`, yielding each chunk's vectors in input order.

    Rows in `encoded_before` (the int8 gate's sample) take the vectors and norms given
    there instead of being encoded again. `progress(done, total)` counts documents over
    all chunks.
    """
    for start in range(0, len(texts), ENCODE_CHUNK):
        stop = min(start + ENCODE_CHUNK, len(texts))
        before = encoded_before.shifted(start, stop) if encoded_before is not None else None
        known = before.rows if before is not None else np.arange(0)
        todo = np.setdiff1d(np.arange(stop - start), known)

        def advance(done: int, _total: int, offset: int = start + len(known)) -> None:
            if progress is not None:
                progress(offset + done, len(texts))

        encoded = encoder.encode_with_norms(
            [texts[start + row] for row in todo], "document", batch_size=batch_size, show_progress=False, progress=advance
        )
        vectors = np.empty((stop - start, encoder.dim), dtype=np.float32)
        norms = np.empty(stop - start, dtype=np.float32)
        vectors[todo], norms[todo] = encoded.vectors, encoded.norms
        if before is not None:
            vectors[known], norms[known] = before.encoded.vectors, before.encoded.norms
        if progress is not None and len(todo) == 0:
            progress(stop, len(texts))
        yield EmbeddedDocuments(list(ids[start:stop]), vectors, norms)


def publish_release(
    releases: ReleaseStore, staging: Path, spec: ReleaseSpec, parts: Iterable[EmbeddedDocuments], report: BuildProgress
) -> Manifest:
    """Index the embedded parts in order, check recall, write the manifest and publish the staging folder.

    Parts are added as they come, except to an index that must be trained: it is trained on
    a seeded sample of all the parts' vectors first (so IVF centroids see the whole corpus,
    not its first chunk), then given them all. Each part touches the staging and model folders.
    An int8 spec expects its quantised encoder's files in `staging` already; they are checksummed with the index.
    """
    index = VectorIndex(spec.dim, spec.index_type, spec.ef_construction)
    deferred = index.needs_training
    ids, norm_chunks, vector_chunks = [], [], []
    for part in parts:
        keep_in_use(releases.data_dir, spec, staging)
        ids.extend(part.ids)
        norm_chunks.append(part.norms)
        if not index.exact:
            vector_chunks.append(part.vectors)
        if not deferred:
            index.add(part.ids, part.vectors)
    if len(ids) != spec.doc_count:
        raise IntegrityError(
            f"release {spec.release_id}: {len(ids)} documents were embedded, expected {spec.doc_count}; build it again"
        )
    vectors = np.concatenate(vector_chunks) if vector_chunks else None
    vector_chunks.clear()
    if deferred:
        report("train", 0, 1)
        index.train(vectors)
        index.add(ids, vectors)
    report("index", 0, 1)
    index.set_search_params(ef_search=spec.ef_search, nprobe=spec.nprobe)
    recall = None
    if vectors is not None:
        report("recall", 0, 1)
        recall = measure_recall(index, ids, vectors)
        del vectors
        if recall.recall < LOW_RECALL:
            log.warning("release %s: %s recall@%d is %.3f at %s; raise ef_search or nprobe for better results",
                        spec.release_id, spec.index_type, recall.k, recall.recall, recall.search_params)
    int8_files = int8_model_files(spec.runtime) if spec.int8_agreement is not None else ()
    files = index.save(staging) + [staging / name for name in int8_files]
    manifest = Manifest(
        release_id=spec.release_id,
        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        model=spec.model,
        corpus_seq=spec.corpus_seq,
        doc_count=spec.doc_count,
        index_type=spec.index_type,
        dim=spec.dim,
        metric="inner_product",
        document_norms=NormStats.of(np.concatenate(norm_chunks)),
        files={path.name: sha256_file(path) for path in files},
        reranker=spec.reranker,
        precision=spec.precision,
        int8_agreement=spec.int8_agreement,
        runtime=spec.runtime,
        int8_activations=spec.int8_activations,
        search_params=index.search_params(),
        recall=recall,
    )
    releases.publish(staging, manifest)
    report("index", 1, 1)
    return manifest


def build_release(
    corpus: CorpusStore,
    releases: ReleaseStore,
    options: BuildOptions,
    *,
    activate: bool = False,
    show_progress: bool = False,
    progress: BuildProgress | None = None,
) -> Manifest:
    """Re-embed the whole corpus in this process into a new published release; optionally make it active."""
    report = progress or (lambda stage, done, total: None)
    model, seq, documents = snapshot_for_build(corpus, releases, options, report)
    release_id = new_release_id()
    with releases.staging(release_id) as staging:
        quantising = show_progress and model.precision == "int8"
        with tqdm(total=1, desc="int8 quantisation and check", disable=not quantising) as step:
            gate = quantise_if_int8(model, documents, staging, options, report)
            step.update(1)
        bar = tqdm(total=len(documents), desc="embedding corpus", unit="doc", disable=not show_progress)

        def advance(done: int, total: int) -> None:
            bar.update(done - bar.n)
            report("encode", done, total)

        sample, agreement = (gate.sample, gate.agreement) if gate is not None else (None, None)
        parts = embed_documents(model.encoder, [doc.id for doc in documents],
                                [doc.embedding_text() for doc in documents], options.batch_size, advance, sample)
        spec = release_spec(release_id, model, options, seq, len(documents), agreement)
        with bar:
            manifest = publish_release(releases, staging, spec, parts, report)
    if activate:
        releases.activate(release_id)
    return manifest
