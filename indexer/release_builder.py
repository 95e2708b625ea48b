"""Building a release: embed the whole corpus with one model into a new index, publish it.

The corpus is read as one consistent snapshot whose change sequence goes into the
manifest; writes that land during the build are caught up by whoever serves the
release. The release is assembled in a staging folder and only renamed into place
once complete, so an interrupted build leaves nothing listed and the active release
untouched. An approximate index (HNSW, IVF) gets the configured search parameters and
its recall@10 against exact search is measured on sampled documents and recorded
(the vectors are kept in memory for that, once). An int8 build quantises the model into the staging folder first and goes
on only if int8 document vectors agree with fp32 on a seeded sample of the corpus.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from indexer.corpus_store import CorpusStore, Document
from indexer.durable_files import sha256_file
from indexer.manifest import INT8_MODEL_FILE, Int8Agreement, Manifest, NormStats
from indexer.model_store import ModelStore
from indexer.recall_check import measure_recall
from indexer.release_store import ReleaseStore, new_release_id
from indexer.vector_index import VectorIndex
from training.bi_encoder import BiEncoder
from training.errors import InvalidInput
from training.pooling import Pooling
from training.precision import Precision, resolve

log = logging.getLogger(__name__)

BuildProgress = Callable[[str, int, int], None]
LOW_RECALL = 0.9
ENCODE_CHUNK = 4096
INT8_SAMPLE_SEED = 13


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
    precision: Precision = "auto"
    int8_min_cosine: float = 0.98
    int8_sample: int = 256
    ef_search: int | None = None
    nprobe: int | None = None
    ef_construction: int | None = None


def _gate_int8(encoder: BiEncoder, documents: list[Document], folder: Path, options: BuildOptions) -> Int8Agreement:
    """Quantise `encoder` into `folder`, switch it to int8, and return its agreement with fp32.

    The agreement is the cosine between fp32 and int8 vectors of up to `options.int8_sample`
    seeded documents; below `options.int8_min_cosine` (mean) the build fails with the figures,
    and the caller's staging folder, ONNX file included, is removed.
    """
    rng = np.random.default_rng(INT8_SAMPLE_SEED)
    rows = np.sort(rng.choice(len(documents), size=min(options.int8_sample, len(documents)), replace=False))
    texts = [documents[row].embedding_text() for row in rows]
    encoder.precision = "fp32"
    reference = encoder.encode(texts, "document", batch_size=options.batch_size, show_progress=False)
    encoder.use_int8(encoder.export_int8(folder / INT8_MODEL_FILE))
    quantised = encoder.encode(texts, "document", batch_size=options.batch_size, show_progress=False)
    agreement = Int8Agreement.of(np.sum(reference * quantised, axis=1))
    if agreement.mean_cosine < options.int8_min_cosine:
        raise InvalidInput(
            f"int8 quantisation changes this model's document vectors too much: mean cosine "
            f"{agreement.mean_cosine:.4f} (min {agreement.min_cosine:.4f}) with fp32 on {agreement.sample} sampled "
            f"documents, below the {options.int8_min_cosine} required; build with precision bf16 or fp32 instead"
        )
    return agreement


def build_release(
    corpus: CorpusStore,
    releases: ReleaseStore,
    options: BuildOptions,
    *,
    activate: bool = False,
    show_progress: bool = False,
    progress: BuildProgress | None = None,
    release_id: str | None = None,
) -> Manifest:
    """Re-embed the whole corpus into a new published release; optionally make it active.

    `release_id` lets a job fix the id up front, so a rerun after a crash rebuilds
    the same release instead of leaving two behind.
    """
    report = progress or (lambda stage, done, total: None)
    report("model", 0, 1)
    encoder, ref = ModelStore(releases.data_dir).put(
        options.model_path,
        name=options.model_name,
        pooling=options.pooling,
        query_max_length=options.query_max_length,
        document_max_length=options.document_max_length,
    )
    precision = resolve(options.precision, encoder.device)
    if precision != "int8":
        encoder.precision = precision
    reranker_ref = None
    if options.reranker_path is not None:
        _, reranker_ref = ModelStore(releases.data_dir).put_reranker(options.reranker_path)
    seq, documents = corpus.snapshot()
    if not documents:
        raise InvalidInput("the corpus is empty; add documents with `lockstep ingest PATH` first")
    index = VectorIndex(encoder.dim, options.index_type, options.ef_construction)
    release_id = release_id or new_release_id()
    norm_chunks, vector_chunks = [], []
    bar = tqdm(total=len(documents), desc="embedding corpus", unit="doc", disable=not show_progress)
    with releases.staging(release_id) as staging, bar:
        agreement = None
        if precision == "int8":
            report("int8", 0, 1)
            agreement = _gate_int8(encoder, documents, staging, options)
            report("int8", 1, 1)
        for start in range(0, len(documents), ENCODE_CHUNK):
            chunk = documents[start : start + ENCODE_CHUNK]

            def advance(done: int, _total: int, offset: int = start) -> None:
                bar.update(offset + done - bar.n)
                report("encode", offset + done, len(documents))

            encoded = encoder.encode_with_norms(
                [doc.embedding_text() for doc in chunk],
                "document",
                batch_size=options.batch_size,
                show_progress=False,
                progress=advance,
            )
            norm_chunks.append(encoded.norms)
            if not index.exact:
                vector_chunks.append(encoded.vectors)
            index.add([doc.id for doc in chunk], encoded.vectors)
        report("index", 0, 1)
        index.set_search_params(ef_search=options.ef_search, nprobe=options.nprobe)
        recall = None
        if vector_chunks:
            report("recall", 0, 1)
            recall = measure_recall(index, [doc.id for doc in documents], np.concatenate(vector_chunks))
            vector_chunks.clear()
            if recall.recall < LOW_RECALL:
                log.warning("release %s: %s recall@%d is %.3f at %s; raise ef_search or nprobe for better results",
                            release_id, options.index_type, recall.k, recall.recall, recall.search_params)
        files = index.save(staging) + ([staging / INT8_MODEL_FILE] if agreement is not None else [])
        manifest = Manifest(
            release_id=release_id,
            created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            model=ref,
            corpus_seq=seq,
            doc_count=len(documents),
            index_type=options.index_type,
            dim=encoder.dim,
            metric="inner_product",
            document_norms=NormStats.of(np.concatenate(norm_chunks)),
            files={path.name: sha256_file(path) for path in files},
            reranker=reranker_ref,
            precision=encoder.precision,
            int8_agreement=agreement,
            search_params=index.search_params(),
            recall=recall,
        )
        releases.publish(staging, manifest)
    report("index", 1, 1)
    if activate:
        releases.activate(release_id)
    return manifest
