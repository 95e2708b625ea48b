"""Evaluate a served release on labelled queries: retrieve the top 100, score with trec_eval's metrics."""

from __future__ import annotations

from indexer.corpus_store import CorpusStore
from indexer.live_release import LiveRelease
from training.errors import InvalidInput
from training.evaluation import evaluate_run

EVAL_DEPTH = 100
Run = dict[str, dict[str, float]]


def rank_queries(
    live: LiveRelease,
    queries: dict[str, str],
    depth: int = EVAL_DEPTH,
    corpus: CorpusStore | None = None,
    lexical_weight: float = 0.0,
) -> Run:
    """Each query's top `depth` documents and scores from `live` (query id -> doc id -> score); with a
    `lexical_weight` above 0, fused with BM25 over `corpus` as hybrid searches are (`LiveRelease.hybrid_hits`)."""
    query_ids = list(queries)
    if not query_ids:
        return {}
    vectors = live.encode_queries([queries[query_id] for query_id in query_ids])
    if lexical_weight > 0:
        if corpus is None:
            raise InvalidInput("a hybrid ranking needs the corpus its BM25 index is in")
        results = [live.hybrid_hits(corpus, queries[query_id], vectors[i : i + 1], depth, lexical_weight)
                   for i, query_id in enumerate(query_ids)]
    else:
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
    live: LiveRelease,
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    corpus: CorpusStore | None = None,
    lexical_weight: float = 0.0,
) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 of `live` over the queries that have judgements (hybrid with BM25 over
    `corpus` for a `lexical_weight` above 0)."""
    run = rank_queries(live, judged_queries(queries, qrels), EVAL_DEPTH, corpus, lexical_weight)
    return evaluate_ranking(run, qrels)
