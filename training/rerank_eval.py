"""Quality of bi-encoder retrieval followed by cross-encoder reranking of the top candidates.

The bi-encoder retrieves the top `candidates` documents per query (exact search); the
cross-encoder rescores them, its scores are fused with the bi-encoder's
(`training.score_fusion`, weight 1 for the cross-encoder alone), and the reranked list
is scored with the same trec_eval metrics as retrieval alone, so they compare directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.dev_eval import DevSet
from training.evaluation import Run, evaluate_run
from training.precision import autocast
from training.score_fusion import DEFAULT_RERANK_CANDIDATES, DEFAULT_RERANK_WEIGHT, fuse


def reranked_run(
    encoder: BiEncoder,
    reranker: CrossEncoder,
    dev: DevSet,
    *,
    candidates: int = DEFAULT_RERANK_CANDIDATES,
    weight: float = DEFAULT_RERANK_WEIGHT,
    batch_size: int = 64,
    precision: str = "fp32",
) -> Run:
    """Each dev query's top `candidates` documents by the bi-encoder, mapped to their fused scores."""
    doc_ids = list(dev.documents)
    query_ids = list(dev.queries)
    with autocast(precision, encoder.device):
        docs = encoder.encode([dev.documents[d] for d in doc_ids], "document", batch_size=batch_size, show_progress=False)
        queries = encoder.encode([dev.queries[q] for q in query_ids], "query", batch_size=batch_size, show_progress=False)
    scores = queries @ docs.T
    depth = min(candidates, len(doc_ids))
    top = np.argsort(-scores, axis=1)[:, :depth]
    pairs = [(dev.queries[q], dev.documents[doc_ids[j]]) for q, row in zip(query_ids, top) for j in row]
    with autocast(precision, reranker.device):
        reranked = reranker.score(pairs, batch_size=batch_size).reshape(len(query_ids), depth)
    fused = fuse(np.take_along_axis(scores, top, axis=1), reranked, weight)
    return {
        q: {doc_ids[j]: float(fused[i, r]) for r, j in enumerate(row)}
        for i, (q, row) in enumerate(zip(query_ids, top))
    }


def evaluate_reranked(encoder: BiEncoder, reranker: CrossEncoder, dev: DevSet, **options: Any) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 of `reranked_run` (same keyword options: candidates, weight, batch_size, precision)."""
    return evaluate_run(reranked_run(encoder, reranker, dev, **options), dev.qrels)
