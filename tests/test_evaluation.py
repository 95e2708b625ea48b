"""Metrics with trec_eval's definitions, checked by hand and against pytrec_eval."""

import math
import random

import pytest
import pytrec_eval
from hypothesis import given, settings
from hypothesis import strategies as st

from training.errors import InvalidInput
from training.eval_data import load_qrels, load_queries, split_judged, split_queries
from training.evaluation import evaluate_run, ranked


def test_hand_computed_example():
    qrels = {"q1": {"a": 1, "c": 2}, "q2": {"x": 1}}
    run = {"q1": {"a": 0.9, "b": 0.8, "c": 0.7}, "q2": {"y": 0.5}}
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    metrics = evaluate_run(run, qrels)
    assert metrics["ndcg@10"] == pytest.approx((dcg / idcg + 0.0) / 2)
    assert metrics["recall@100"] == pytest.approx((1.0 + 0.0) / 2)
    assert metrics["mrr@10"] == pytest.approx((1.0 + 0.0) / 2)


def test_ties_break_by_reverse_document_id_like_trec_eval():
    assert ranked({"a": 1.0, "b": 1.0, "c": 2.0}) == ["c", "b", "a"]


def test_mrr_cuts_at_ten():
    run = {"q": {f"d{i:02d}": 1.0 - i / 100 for i in range(20)}}
    assert evaluate_run(run, {"q": {"d10": 1}})["mrr@10"] == 0.0
    assert evaluate_run(run, {"q": {"d09": 1}})["mrr@10"] == pytest.approx(0.1)


def _reference(run, qrels):
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    scores = evaluator.evaluate(run)
    top10 = {q: {doc: d[doc] for doc in sorted(sorted(d, reverse=True), key=d.get, reverse=True)[:10]} for q, d in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    n = len(scores)
    return {
        "ndcg@10": sum(s["ndcg_cut_10"] for s in scores.values()) / n,
        "recall@100": sum(s["recall_100"] for s in scores.values()) / n,
        "mrr@10": sum(s["recip_rank"] for s in rr.values()) / n,
    }


def _random_case(rng: random.Random):
    docs = [f"d{i}" for i in range(rng.randint(5, 150))]
    qrels, run = {}, {}
    for q in range(rng.randint(1, 8)):
        judged = rng.sample(docs, rng.randint(1, min(6, len(docs))))
        qrels[f"q{q}"] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        retrieved = rng.sample(docs, rng.randint(1, len(docs)))
        run[f"q{q}"] = {d: float(round(rng.random(), 2)) for d in retrieved}
    return run, qrels


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=10**9))
def test_agrees_with_pytrec_eval(seed):
    """Guards against subtle metric drift (ties, graded gains, cut-offs) that would mislead gates."""
    run, qrels = _random_case(random.Random(seed))
    ours, reference = evaluate_run(run, qrels), _reference(run, qrels)
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        assert ours[metric] == pytest.approx(reference[metric], abs=1e-9), metric


def test_query_without_results_scores_zero():
    assert evaluate_run({}, {"q": {"a": 1}})["ndcg@10"] == 0.0


def test_split_is_seeded_disjoint_and_order_independent():
    ids = [f"q{i}" for i in range(100)]
    train, dev = split_queries(ids, 0.2, seed=7)
    assert len(dev) == 20 and not set(train) & set(dev) and set(train) | set(dev) == set(ids)
    assert split_queries(list(reversed(ids)), 0.2, seed=7) == (train, dev)
    assert split_queries(ids, 0.2, seed=8)[1] != dev
    with pytest.raises(InvalidInput, match="between 0 and 1"):
        split_queries(ids, 1.5, seed=7)


def test_a_dev_split_leaves_out_queries_judged_only_non_relevant():
    """Guards against diluting a dev split (and so the gate and early stopping) with queries no model can score on:
    a query whose judgements are all 0 gets nDCG 0 whatever is retrieved."""
    qrels = {f"q{i}": {"d": 1} for i in range(40)} | {f"z{i}": {"d": 0, "e": 0} for i in range(40)}
    train, dev = split_judged(qrels, 0.25, seed=7)
    assert len(dev) == 10 and not any(q.startswith("z") for q in train + dev)
    assert (train, dev) == split_queries([f"q{i}" for i in range(40)], 0.25, seed=7)


def test_beir_qrels_with_crlf_and_trec_format(tmp_path):
    beir = tmp_path / "q.tsv"
    beir.write_bytes(b"query-id\tcorpus-id\tscore\r\n1\tA\t1\r\n1\tB\t2\r\n2\tC\t1\r\n")
    assert load_qrels(beir) == {"1": {"A": 1, "B": 2}, "2": {"C": 1}}
    trec = tmp_path / "q.trec"
    trec.write_text("1 0 A 1\n2 0 C 0\n")
    assert load_qrels(trec) == {"1": {"A": 1}, "2": {"C": 0}}


def test_bad_eval_files_name_the_line(tmp_path):
    qrels = tmp_path / "q.tsv"
    qrels.write_text("1\tA\t1\n1\tB\n")
    with pytest.raises(InvalidInput, match=r"q\.tsv:2: expected"):
        load_qrels(qrels)
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "1", "text": "fine"}\n{"_id": "2"}\n')
    with pytest.raises(InvalidInput, match=r"queries\.jsonl:2: "):
        load_queries(queries)


@pytest.mark.parametrize("score", ["inf", "1e999", "nan", "-inf"])
def test_qrels_relevance_that_is_not_a_finite_number_names_the_line(tmp_path, score):
    """Guards against int(float('inf')) raising OverflowError past the file:line handling."""
    qrels = tmp_path / "q.tsv"
    qrels.write_text(f"1\tA\t1\n1\tB\t{score}\n")
    with pytest.raises(InvalidInput, match=rf"q\.tsv:2: relevance '{score}' is not a finite number"):
        load_qrels(qrels)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"_id": "1", "text": "caf\xe9"}\n', r"queries\.jsonl:1: not valid UTF-8"),
        (b'{"_id": "1", "text": "a \\ud800"}\n', r"queries\.jsonl:1: the query's text holds '\\ud800'"),
        (b'{"_id": ' + b"7" * 5000 + b', "text": "a"}\n', r"queries\.jsonl:1: a number has more than"),
    ],
)
def test_bad_queries_lines_name_the_file_and_line(tmp_path, content, message):
    queries = tmp_path / "queries.jsonl"
    queries.write_bytes(content)
    with pytest.raises(InvalidInput, match=message):
        load_queries(queries)
    qrels = tmp_path / "q.tsv"
    qrels.write_bytes(b"1\tA\t1\n1\tB\xff\t1\n")
    with pytest.raises(InvalidInput, match=r"q\.tsv:2: not valid UTF-8"):
        load_qrels(qrels)
