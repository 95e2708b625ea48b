"""Evaluating a bi-encoder during training: dev nDCG plus every failure-mode signal.

The dev corpus is encoded once per evaluation and searched exactly (inner product over
unit vectors); the same vectors score a subset of training queries (for the
overfitting gap) and the low/high lexical overlap halves of the dev queries (for
shortcut learning). A fixed probe of document vectors gives the collapse statistics;
raw norms give the drift signal; STS-B pairs, when given, an out-of-domain probe. The
false-negative signal scores the first dev queries against each other's positives, as
one in-batch batch would, with every judged-relevant document masked.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from training.bi_encoder import BiEncoder
from training.diagnostics import collapse_stats, negatives_above_positive, overlap_split
from training.evaluation import evaluate_run, per_query_metrics
from training.precision import autocast
from training.sts import StsPair, sts_spearman

EVAL_DEPTH = 100
COLLAPSE_PROBE = 256
FALSE_NEGATIVE_PROBE = 512


@dataclass(frozen=True)
class DevSet:
    """Held-out queries with judgements, the documents to search, and optional probes."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    documents: dict[str, str]
    train_queries: dict[str, str] = field(default_factory=dict)
    train_qrels: dict[str, dict[str, int]] = field(default_factory=dict)
    sts: list[StsPair] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        queries: Mapping[str, str],
        dev_qrels: Mapping[str, Mapping[str, int]],
        train_qrels: Mapping[str, Mapping[str, int]],
        documents: Mapping[str, str],
        *,
        seed: int,
        corpus_limit: int = 0,
        train_probe: int = 100,
        sts: list[StsPair] | None = None,
    ) -> DevSet:
        """Keep every judged document; with `corpus_limit`, fill up to it with a seeded sample of the rest."""
        judged = {d for labels in (*dev_qrels.values(), *train_qrels.values()) for d in labels if d in documents}
        chosen = set(documents)
        if corpus_limit and len(documents) > corpus_limit:
            others = sorted(set(documents) - judged)
            random.Random(seed).shuffle(others)
            chosen = judged | set(others[: max(0, corpus_limit - len(judged))])
        probe_ids = sorted(train_qrels)
        random.Random(seed + 1).shuffle(probe_ids)
        probe_ids = sorted(q for q in probe_ids[:train_probe] if q in queries)
        return cls(
            queries={q: queries[q] for q in dev_qrels if q in queries},
            qrels={q: dict(dev_qrels[q]) for q in dev_qrels if q in queries},
            documents={d: documents[d] for d in sorted(chosen)},
            train_queries={q: queries[q] for q in probe_ids},
            train_qrels={q: dict(train_qrels[q]) for q in probe_ids},
            sts=list(sts or []),
        )


def _run(query_ids: list[str], query_vectors: np.ndarray, doc_ids: list[str], doc_vectors: np.ndarray) -> dict:
    scores = query_vectors @ doc_vectors.T
    depth = min(EVAL_DEPTH, len(doc_ids))
    top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    return {q: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(query_ids)}


def _dev_negatives_above_positive(
    dev: DevSet, query_vectors: np.ndarray, doc_ids: list[str], doc_vectors: np.ndarray
) -> float | None:
    """Share of dev negatives scored at or above the positive, over up to FALSE_NEGATIVE_PROBE (query, positive) pairs.

    The first dev queries (the first rows of `query_vectors`) are paired with their most relevant
    document and scored against every pair's positive, as in one training batch; documents judged
    relevant to the query, or with its positive's text, are masked, as `false_negative_mask` does.
    """
    rows = {doc_id: row for row, doc_id in enumerate(doc_ids)}
    pairs = []
    for index, query_id in enumerate(dev.queries):
        relevant = sorted((-rel, d) for d, rel in dev.qrels[query_id].items() if rel > 0 and d in rows)
        if relevant:
            pairs.append((index, query_id, relevant[0][1]))
        if len(pairs) == FALSE_NEGATIVE_PROBE:
            break
    if len(pairs) < 2:
        return None
    positives = [doc_id for _, _, doc_id in pairs]
    scores = query_vectors[[index for index, _, _ in pairs]] @ doc_vectors[[rows[d] for d in positives]].T
    texts = [dev.documents[d].strip() for d in positives]
    mask = np.array([
        [dev.qrels[query_id].get(doc_id, 0) > 0 or text == texts[i] for doc_id, text in zip(positives, texts)]
        for i, (_, query_id, _) in enumerate(pairs)
    ])
    return negatives_above_positive(scores, mask)


def _mean_ndcg(per_query: Mapping[str, Mapping[str, float]], query_ids: list[str]) -> float:
    return float(np.mean([per_query[q]["ndcg@10"] for q in query_ids]))


def evaluate_encoder(
    encoder: BiEncoder,
    dev: DevSet,
    *,
    batch_size: int = 64,
    precision: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Every dev metric and diagnostic signal of `encoder` as a flat dict; `progress(done, total)` follows the corpus."""
    was_training = encoder.model.training
    encoder.model.eval()
    device = encoder.device
    try:
        with autocast(precision, device):
            doc_ids = list(dev.documents)
            docs = encoder.encode_with_norms(
                [dev.documents[d] for d in doc_ids], "document", batch_size=batch_size, show_progress=False,
                progress=progress,
            )
            query_ids = list(dev.queries) + [q for q in dev.train_queries if q not in dev.queries]
            texts = {**dev.queries, **dev.train_queries}
            queries = encoder.encode_with_norms([texts[q] for q in query_ids], "query", batch_size=batch_size, show_progress=False)
            sts = sts_spearman(encoder, dev.sts, batch_size) if dev.sts else None
    finally:
        encoder.model.train(was_training)
    run = _run(query_ids, queries.vectors, doc_ids, docs.vectors)
    result = dict(evaluate_run(run, dev.qrels))
    per_query = per_query_metrics(run, dev.qrels)
    low, high = overlap_split(dev.queries, dev.qrels, dev.documents)
    if low and high:
        result["ndcg@10_low_overlap"] = _mean_ndcg(per_query, low)
        result["ndcg@10_high_overlap"] = _mean_ndcg(per_query, high)
    if dev.train_qrels:
        result["ndcg@10_train"] = evaluate_run(run, dev.train_qrels)["ndcg@10"]
    # A seeded sample, not the first documents by id: ids often group by source, and one source can look collapsed.
    rows = np.random.default_rng(COLLAPSE_PROBE).permutation(len(docs.vectors))[:COLLAPSE_PROBE]
    probe = docs.vectors[np.sort(rows)]
    if len(probe) >= 2:
        stats = collapse_stats(probe)
        result["mean_dim_std"] = stats.mean_dim_std
        result["mean_pairwise_cosine"] = stats.mean_pairwise_cosine
    rate = _dev_negatives_above_positive(dev, queries.vectors, doc_ids, docs.vectors)
    if rate is not None:
        result["negatives_above_positive"] = rate
    result["query_norm_mean"] = float(queries.norms.mean())
    result["query_norm_std"] = float(queries.norms.std())
    result["doc_norm_mean"] = float(docs.norms.mean())
    result["doc_norm_std"] = float(docs.norms.std())
    if sts is not None:
        result["sts_spearman"] = sts
    return result
