"""Recall of an approximate index against exact search, measured when a release is built.

HNSW and IVF(-PQ) trade recall for speed, and how much depends on the corpus and the
search parameters. The builder samples documents as queries, finds their true top-k
by brute force over all vectors (FAISS's exact kNN) and records the share the
approximate index also returns, with the parameters used, in the manifest. Each
query's own document is left out of both lists: any index finds a stored vector
itself, and counting it would lift recall@10 by up to 0.1 for nothing.
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
    """Recall@k of `index` against exact inner-product search over `vectors` (rows aligned with `doc_ids`), each
    sampled document's own row left out of both."""
    rng = np.random.default_rng(RECALL_SEED)
    rows = np.sort(rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False))
    queries = np.ascontiguousarray(vectors[rows])
    k = min(k, len(vectors) - 1)
    if k < 1:
        return RecallCheck(1.0, 0, 0, index.search_params())
    _, exact = faiss.knn(queries, vectors, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    found = index.search(queries, k + 1)
    shares = []
    for row, hits, truth in zip(rows, found, exact):
        expected = [doc_ids[j] for j in truth if j >= 0 and j != row][:k]
        returned = [hit.doc_id for hit in hits if hit.doc_id != doc_ids[row]][:k]
        shares.append(len(set(returned) & set(expected)) / len(expected))
    return RecallCheck(float(np.mean(shares)), k, len(rows), index.search_params())
