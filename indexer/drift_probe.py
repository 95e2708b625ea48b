"""The drift probe: re-encode a sample of the live release's documents and compare with the vectors it stores.

A release's vectors and the model serving its queries must agree; if they do not
(an encoder library or hardware change altered the numbers, a model file was swapped
without a rebuild, a precision mismatch), queries are scored against vectors the
model would no longer produce. The probe samples stored documents, encodes them again
with the release's own encoder and reports the cosine between old and new vectors.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np

from indexer.corpus_store import CorpusStore
from indexer.live_release import LiveRelease
from training.errors import Conflict

WORST_SHOWN = 10


@dataclass(frozen=True)
class DriftedDocument:
    """A sampled document and how closely its re-encoded vector matches the stored one."""

    id: str
    title: str
    cosine: float


@dataclass(frozen=True)
class DriftReport:
    """Cosine between stored and re-encoded vectors over a seeded sample of the live index."""

    release: str
    model_fingerprint: str
    precision: str
    index_type: str
    sample: int
    threshold: float
    mean_cosine: float
    min_cosine: float
    below_threshold: int
    share_below: float
    worst: list[DriftedDocument]
    elapsed_ms: float


def _stored_vectors(live: LiveRelease, doc_ids: list[str]) -> tuple[list[str], np.ndarray]:
    try:
        return live.index.stored_vectors(doc_ids)
    except RuntimeError as exc:
        raise Conflict(
            f"release {live.release_id} uses a {live.manifest.index_type} index, which cannot return a stored vector "
            "by document id; the drift probe works on Flat and HNSW releases"
        ) from exc


def probe_drift(live: LiveRelease, corpus: CorpusStore, sample: int = 256, threshold: float = 0.99,
                seed: int = 0) -> DriftReport:
    """Re-encode up to `sample` of the live index's documents (seeded choice) and compare with the stored vectors."""
    started = time.perf_counter()
    live.catch_up(corpus)
    indexed = live.index.doc_ids()
    chosen = random.Random(seed).sample(indexed, min(sample, len(indexed)))
    documents = corpus.get_many(chosen)
    doc_ids, stored = _stored_vectors(live, [doc_id for doc_id in chosen if doc_id in documents])
    if not doc_ids:
        raise Conflict(f"release {live.release_id} holds no documents to probe; add documents or build a release")
    texts = [documents[doc_id].embedding_text() for doc_id in doc_ids]
    fresh = np.concatenate(list(live.encode_documents(texts)))
    cosines = np.einsum("ij,ij->i", stored, fresh) / (np.linalg.norm(stored, axis=1) * np.linalg.norm(fresh, axis=1))
    order = np.argsort(cosines, kind="stable")[:WORST_SHOWN]
    below = int((cosines < threshold).sum())
    return DriftReport(
        release=live.release_id,
        model_fingerprint=live.manifest.model.fingerprint,
        precision=live.manifest.precision,
        index_type=live.manifest.index_type,
        sample=len(doc_ids),
        threshold=threshold,
        mean_cosine=float(cosines.mean()),
        min_cosine=float(cosines.min()),
        below_threshold=below,
        share_below=below / len(doc_ids),
        worst=[DriftedDocument(doc_ids[i], documents[doc_ids[i]].title, float(cosines[i])) for i in order],
        elapsed_ms=round((time.perf_counter() - started) * 1e3, 1),
    )
