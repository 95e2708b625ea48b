"""Recall of an approximate index against exact search, measured when a release is built.

HNSW and IVF(-PQ) trade recall for speed, and how much depends on the corpus and the
search parameters. The builder samples documents as queries, finds their true top-k
by brute force over all vectors (FAISS's exact kNN) and records the share the
approximate index also returns, with the parameters used, in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from indexer.vector_index import VectorIndex

RECALL_K = 10
RECALL_SAMPLE = 1000
RECALL_SEED = 13


@dataclass(frozen=True)
class RecallCheck:
    """Mean recall@k of the index over `sample` documents used as queries, at `search_params`."""

    recall: float
    k: int
    sample: int
    search_params: dict[str, int]


def measure_recall(
    index: VectorIndex, doc_ids: list[str], vectors: np.ndarray, k: int = RECALL_K, sample: int = RECALL_SAMPLE
) -> RecallCheck:
    """Recall@k of `index` against exact inner-product search over `vectors` (rows aligned with `doc_ids`)."""
    rng = np.random.default_rng(RECALL_SEED)
    rows = np.sort(rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False))
    queries = np.ascontiguousarray(vectors[rows])
    k = min(k, len(vectors))
    _, exact = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    found = index.search(queries, k)
    shares = [
        len({hit.doc_id for hit in hits} & {doc_ids[j] for j in truth if j >= 0}) / k
        for hits, truth in zip(found, exact)
    ]
    return RecallCheck(float(np.mean(shares)), k, len(rows), index.search_params())
