"""Evaluate a served release on labelled queries: retrieve the top 100, score with trec_eval's metrics."""

from __future__ import annotations

from indexer.live_release import LiveRelease
from training.errors import InvalidInput
from training.evaluation import evaluate_run

EVAL_DEPTH = 100
Run = dict[str, dict[str, float]]


def rank_queries(live: LiveRelease, queries: dict[str, str], depth: int = EVAL_DEPTH) -> Run:
    """Each query's top `depth` documents and scores from `live` (query id -> doc id -> score)."""
    query_ids = list(queries)
    if not query_ids:
        return {}
    vectors = live.encode_queries([queries[query_id] for query_id in query_ids])
    results = live.search_vectors(vectors, depth)
    return {query_id: {hit.doc_id: hit.score for hit in hits} for query_id, hits in zip(query_ids, results)}


def judged_queries(queries: dict[str, str], qrels: dict[str, dict[str, int]]) -> dict[str, str]:
    """The queries that have judgements, or an error saying the ids do not match."""
    judged = {query_id: queries[query_id] for query_id in qrels if query_id in queries}
    if not judged:
        raise InvalidInput("none of the judged queries appear in the queries file; check that the ids match")
    return judged


def evaluate_ranking(run: Run, qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 of a ranking over the judged queries it covers."""
    metrics = evaluate_run(run, {query_id: qrels[query_id] for query_id in run})
    metrics["queries"] = len(run)
    return metrics


def evaluate_release(
    live: LiveRelease, queries: dict[str, str], qrels: dict[str, dict[str, int]]
) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 of `live` over the queries that have judgements."""
    return evaluate_ranking(rank_queries(live, judged_queries(queries, qrels)), qrels)
