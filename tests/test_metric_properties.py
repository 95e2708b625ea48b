"""Properties of the retrieval metrics on random runs and qrels, and agreement with pytrec_eval.

Runs draw scores from a few repeated values as well as arbitrary floats, so ties (broken by
document id, as trec_eval does) are frequent; document ids include non-ASCII characters,
labels include 0 and negative grades, and rankings run past the cut-offs of 10 and 100.
"""

from __future__ import annotations

import pytest
import pytrec_eval
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.retrieval_eval import evaluate_ranking
from training.evaluation import METRICS, evaluate_run, mrr_at, ndcg_at, per_query_metrics, ranked, recall_at

FAST = settings(max_examples=60, deadline=None)
TREC_MEASURES = {"ndcg@10": "ndcg_cut_10", "recall@100": "recall_100", "mrr@10": "recip_rank"}

scores = st.one_of(st.sampled_from([0.0, 0.5, 1.0, -1.0]), st.floats(-10, 10, allow_subnormal=False))
labels = st.integers(-2, 4)


@st.composite
def doc_pools(draw) -> list[str]:
    """Up to 130 distinct document ids sharing a drawn prefix (ASCII or not)."""
    prefix = draw(st.sampled_from(["d", "é", "日", "z-", "A"]))
    return [f"{prefix}{i}" for i in range(draw(st.one_of(st.integers(1, 20), st.integers(95, 130))))]


@st.composite
def cases(draw) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """A run and qrels over one document pool; some judged queries have no results, some results no judgements."""
    pool = draw(doc_pools())
    query_ids = [f"q{i}" for i in range(draw(st.integers(1, 4)))]
    qrels = {q: draw(st.dictionaries(st.sampled_from(pool), labels, min_size=1, max_size=8)) for q in query_ids}
    run = {}
    for query_id in draw(st.lists(st.sampled_from([*query_ids, "unjudged"]), unique=True)):
        size = draw(st.integers(0, len(pool)))
        values = draw(st.lists(scores, min_size=size, max_size=size))
        run[query_id] = dict(zip(draw(st.permutations(pool)), values))
    return run, qrels


def _trec_eval(run, qrels) -> dict[str, dict[str, float]]:
    """pytrec_eval per query; MRR@10 is trec_eval's recip_rank over each ranking's top 10.

    Queries the run does not answer score 0 (trec_eval's -c). So do queries without a relevant
    document, which are left out: pytrec_eval-terrier 0.5.11 corrupts its memory (and later
    crashes) on such queries when their labels include negative grades.
    """
    answerable = {q: judged for q, judged in qrels.items() if any(label > 0 for label in judged.values())}
    judged_run = {q: results for q, results in run.items() if q in answerable and results}
    zeros = dict.fromkeys(TREC_MEASURES.values(), 0.0)
    if not judged_run:
        return {q: zeros for q in qrels}
    full = pytrec_eval.RelevanceEvaluator(answerable, {"ndcg_cut.10", "recall.100"}).evaluate(judged_run)
    top10 = {q: {d: results[d] for d in ranked(results)[:10]} for q, results in judged_run.items()}
    rr = pytrec_eval.RelevanceEvaluator(answerable, {"recip_rank"}).evaluate(top10)
    return {q: {**zeros, **full.get(q, {}), **rr.get(q, {})} for q in qrels}


@FAST
@given(case=cases())
def test_every_query_agrees_with_pytrec_eval(case):
    """Guards against drift from trec_eval on ties, graded and negative labels, cut-offs and unanswered queries."""
    run, qrels = case
    ours, reference = per_query_metrics(run, qrels), _trec_eval(run, qrels)
    assert ours.keys() == qrels.keys()
    for query_id in qrels:
        for metric, measure in TREC_MEASURES.items():
            assert ours[query_id][metric] == pytest.approx(reference[query_id][measure], abs=1e-12), (query_id, metric)
    means = evaluate_run(run, qrels)
    for metric in METRICS:
        assert means[metric] == pytest.approx(sum(q[metric] for q in ours.values()) / len(qrels), abs=1e-12)


@FAST
@given(case=cases())
def test_metrics_lie_in_zero_one_and_are_zero_without_relevant_documents(case):
    """Guards against gains of negative labels or an ideal DCG computed over the wrong set (ratios above 1)."""
    run, qrels = case
    for query_id, metrics in per_query_metrics(run, qrels).items():
        assert all(0.0 <= value <= 1.0 for value in metrics.values()), metrics
        if not any(label > 0 for label in qrels[query_id].values()):
            assert metrics == dict.fromkeys(METRICS, 0.0)


@FAST
@given(judged=st.dictionaries(st.text(min_size=1, max_size=4), labels, min_size=1, max_size=30), data=st.data())
def test_an_ideal_ranking_scores_one(judged, data):
    """Guards against an ideal DCG that a perfect ranking cannot reach (e.g. gains and discounts misaligned)."""
    relevant = [doc_id for doc_id, label in judged.items() if label > 0]
    noise = data.draw(st.dictionaries(st.text(min_size=1, max_size=4).filter(lambda d: d not in judged), st.just(0.0)))
    run = {"q": {**{doc_id: float(label) for doc_id, label in judged.items()}, **noise}}
    expected = 1.0 if relevant else 0.0
    assert per_query_metrics(run, {"q": judged})["q"] == pytest.approx(dict.fromkeys(METRICS, expected), abs=1e-15)


def _rescored(results: dict[str, float]) -> dict[str, float]:
    """The same ranking with distinct integer scores (no ties left for document ids to break)."""
    order = ranked(results)
    return {doc_id: float(len(order) - rank) for rank, doc_id in enumerate(order)}


@FAST
@given(case=cases(), data=st.data())
def test_metrics_depend_on_the_ranking_not_on_the_ids(case, data):
    """Guards against metrics that read ids beyond tie-breaking, or that mix up queries.

    With ties removed, any bijective renaming of documents and queries keeps every metric;
    with ties kept, a renaming that preserves the order of document ids does.
    """
    run, qrels = case
    original = per_query_metrics(run, qrels)
    docs = sorted({d for results in [*run.values(), *qrels.values()] for d in results})
    shuffled = dict(zip(docs, data.draw(st.permutations(docs))))
    query_names = {q: f"renamed-{q}" for q in {*run, *qrels}}
    distinct = {query_names[q]: {shuffled[d]: s for d, s in _rescored(results).items()} for q, results in run.items()}
    renamed_qrels = {query_names[q]: {shuffled[d]: label for d, label in judged.items()} for q, judged in qrels.items()}
    renamed = per_query_metrics(distinct, renamed_qrels)
    assert {q: renamed[query_names[q]] for q in qrels} == original

    prefixed = {q: {f"~{d}": s for d, s in results.items()} for q, results in run.items()}
    prefixed_qrels = {q: {f"~{d}": label for d, label in judged.items()} for q, judged in qrels.items()}
    assert per_query_metrics(prefixed, prefixed_qrels) == original


@FAST
@given(results=st.dictionaries(st.text(max_size=3), scores, max_size=40), judged=st.dictionaries(st.text(max_size=3), labels, max_size=10))
def test_recall_and_mrr_never_fall_as_the_cut_off_grows(results, judged):
    """Guards against a cut-off that is off by one or applied to the judgements instead of the ranking."""
    ranking = ranked(results)
    relevant = {d for d, label in judged.items() if label > 0}
    recalls = [recall_at(ranking, judged, k) for k in range(len(ranking) + 2)]
    reciprocal_ranks = [mrr_at(ranking, judged, k) for k in range(len(ranking) + 2)]
    assert recalls == sorted(recalls) and reciprocal_ranks == sorted(reciprocal_ranks)
    assert recalls[0] == reciprocal_ranks[0] == ndcg_at(ranking, judged, 0) == 0.0
    if relevant:
        assert recalls[-1] == pytest.approx(len(relevant & set(ranking)) / len(relevant))
        hits = [rank for rank, d in enumerate(ranking, start=1) if d in relevant]
        assert reciprocal_ranks[-1] == (1 / hits[0] if hits else 0.0)


@FAST
@given(case=cases())
def test_evaluate_ranking_averages_over_the_ranked_queries(case):
    """Guards against a release evaluation that averages over judged queries it never ranked, or miscounts them."""
    run, qrels = case
    judged_run = {q: results for q, results in run.items() if q in qrels}
    if not judged_run:
        with pytest.raises(ValueError, match="no queries"):
            evaluate_ranking(judged_run, qrels)
        return
    metrics = evaluate_ranking(judged_run, qrels)
    per_query = per_query_metrics(judged_run, {q: qrels[q] for q in judged_run})
    assert metrics["queries"] == len(judged_run)
    for metric in METRICS:
        assert metrics[metric] == pytest.approx(sum(q[metric] for q in per_query.values()) / len(judged_run))


def test_scores_closer_than_float32_can_tell_apart_tie_as_in_trec_eval():
    """Guards against ranking by float64 when trec_eval compares C floats (found by the pytrec_eval property)."""
    results = {"a": 1.0 + 1e-12, "b": 1.0, "c": 1e300, "d": 1e301}
    assert ranked(results) == ["d", "c", "b", "a"]
    reference = pytrec_eval.RelevanceEvaluator({"q": {"a": 1}}, {"recip_rank"}).evaluate({"q": results})
    assert per_query_metrics({"q": results}, {"q": {"a": 1}})["q"]["mrr@10"] == reference["q"]["recip_rank"] == 0.25
