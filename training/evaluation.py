"""Retrieval metrics with trec_eval's definitions: nDCG@10, Recall@100, MRR@10.

A run maps each query id to `{doc_id: score}`. As in trec_eval, documents are ranked
by score (higher first, compared at float32 precision) with ties broken by document id
in reverse string order, a document is relevant when its graded label is >= 1, nDCG
uses the label as linear gain with a log2(rank + 1) discount, and MRR@10 is the
reciprocal rank of the first relevant document within the top 10 (0 if none). Every
query in the qrels counts; a query the run has no results for scores 0 (trec_eval's `-c`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def ranked(results: Mapping[str, float]) -> list[str]:
    """Document ids in trec_eval order: score descending, then document id descending.

    trec_eval holds scores as C floats, so they are compared after rounding to float32:
    scores that round to the same float32 tie and fall back to the document id.
    """
    by_id = sorted(results, reverse=True)
    with np.errstate(over="ignore"):
        as_float32 = np.asarray([results[doc_id] for doc_id in by_id], dtype=np.float32).tolist()
    trec_scores = dict(zip(by_id, as_float32))
    return sorted(by_id, key=trec_scores.__getitem__, reverse=True)


def ndcg_at(ranking: list[str], labels: Mapping[str, int], k: int) -> float:
    gains = sorted((rel for rel in labels.values() if rel > 0), reverse=True)
    ideal = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains[:k]))
    if ideal == 0:
        return 0.0
    dcg = sum(labels.get(doc_id, 0) / math.log2(rank + 2) for rank, doc_id in enumerate(ranking[:k]) if labels.get(doc_id, 0) > 0)
    return dcg / ideal


def recall_at(ranking: list[str], labels: Mapping[str, int], k: int) -> float:
    relevant = {doc_id for doc_id, rel in labels.items() if rel > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def mrr_at(ranking: list[str], labels: Mapping[str, int], k: int) -> float:
    for rank, doc_id in enumerate(ranking[:k], start=1):
        if labels.get(doc_id, 0) > 0:
            return 1.0 / rank
    return 0.0


def per_query_metrics(run: Run, qrels: Qrels) -> dict[str, dict[str, float]]:
    """Each metric for each query in `qrels`."""
    scores = {}
    for query_id, labels in qrels.items():
        ranking = ranked(run.get(query_id, {}))
        scores[query_id] = {
            "ndcg@10": ndcg_at(ranking, labels, 10),
            "recall@100": recall_at(ranking, labels, 100),
            "mrr@10": mrr_at(ranking, labels, 10),
        }
    return scores


def evaluate_run(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean of each metric over the queries in `qrels`."""
    if not qrels:
        raise ValueError("qrels hold no queries; nothing to evaluate")
    per_query = per_query_metrics(run, qrels)
    return {metric: sum(q[metric] for q in per_query.values()) / len(per_query) for metric in METRICS}
