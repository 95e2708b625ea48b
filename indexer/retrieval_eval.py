"""Evaluate a served release on labelled queries: retrieve the top 100, score with trec_eval's metrics."""

from __future__ import annotations

from indexer.live_release import LiveRelease
from training.errors import InvalidInput
from training.evaluation import evaluate_run

EVAL_DEPTH = 100


def evaluate_release(
    live: LiveRelease, queries: dict[str, str], qrels: dict[str, dict[str, int]]
) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 of `live` over the queries that have judgements."""
    judged = [query_id for query_id in qrels if query_id in queries]
    if not judged:
        raise InvalidInput("none of the judged queries appear in the queries file; check that the ids match")
    vectors = live.encode_queries([queries[query_id] for query_id in judged])
    results = live.search_vectors(vectors, EVAL_DEPTH)
    run = {query_id: {hit.doc_id: hit.score for hit in hits} for query_id, hits in zip(judged, results)}
    metrics = evaluate_run(run, {query_id: qrels[query_id] for query_id in judged})
    metrics["queries"] = len(judged)
    return metrics
