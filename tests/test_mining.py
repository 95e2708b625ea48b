"""Hard-negative mining against a numpy brute-force oracle on a small hand-built corpus."""

from dataclasses import dataclass

import numpy as np
import pytest

from tests.conftest import WORDS
from training.bi_encoder import BiEncoder
from training.examples import TrainingExample
from training.losses import Candidate
from training.mining import MiningConfig, mine_hard_negatives

SEPARATION = 1e-5


def _corpus() -> tuple[dict[str, str], list[TrainingExample], dict[str, set[str]]]:
    """30 documents of 6 words; `copy0` repeats d0's text; q1's known positives include d5."""
    documents = {f"d{i}": " ".join(WORDS[(7 * i + k * 5) % len(WORDS)] for k in range(6)) for i in range(30)}
    documents["copy0"] = documents["d0"]
    examples = [
        TrainingExample(f"q{i}", " ".join(documents[f"d{i}"].split()[::2]), Candidate(f"d{i}", documents[f"d{i}"]))
        for i in range(4)
    ]
    return documents, examples, {"q1": {"d1", "d5"}}


@dataclass
class Expected:
    window: list[set[str]]
    kept: list[set[str]]
    known: int
    close: int


def _oracle(encoder: BiEncoder, documents, examples, known, config: MiningConfig) -> Expected:
    """Exact search with numpy: each query's rank window, then the same drop rules written as plain loops."""
    ids = list(documents)
    docs = encoder.encode([documents[d] for d in ids], "document", batch_size=64)
    queries = encoder.encode([e.query for e in examples], "query", batch_size=64)
    positives = encoder.encode([e.positive.text for e in examples], "document", batch_size=64)
    expected = Expected([], [], 0, 0)
    for i, example in enumerate(examples):
        scores = docs @ queries[i]
        order = np.argsort(-scores, kind="stable")
        ranked = scores[order]
        end = min(config.window_end, len(ids))
        for boundary in (config.window_start, end):
            if 0 < boundary < len(ids):
                assert ranked[boundary - 1] - ranked[boundary] > SEPARATION or documents[ids[order[boundary - 1]]] == documents[ids[order[boundary]]], \
                    "a near tie at a window edge makes the oracle ambiguous; pick another window"
        positive = float(queries[i] @ positives[i])
        limit = positive - config.margin if config.margin is not None else np.inf
        if config.relative_margin is not None:
            limit = min(limit, positive * (1 - config.relative_margin))
        window, kept = set(), set()
        for rank in range(config.window_start, end):
            doc_id = ids[order[rank]]
            window.add(doc_id)
            if doc_id == example.positive.doc_id or doc_id in known.get(example.query_id, set()) or documents[doc_id] == example.positive.text:
                expected.known += 1
                continue
            assert abs(ranked[rank] - limit) > SEPARATION, "a score at the margin makes the oracle ambiguous"
            if ranked[rank] > limit:
                expected.close += 1
            else:
                kept.add(doc_id)
        expected.window.append(window)
        expected.kept.append(kept)
    return expected


CONFIGS = [
    MiningConfig(count=100, window_start=0, window_end=31, margin=0.0),
    MiningConfig(count=100, window_start=2, window_end=20, margin=0.02),
    MiningConfig(count=100, window_start=1, window_end=25, margin=-0.001, relative_margin=0.02),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_mining_keeps_exactly_what_brute_force_search_and_the_margins_predict(tiny_encoder, config):
    """Guards against negatives from outside the rank window, known positives or copies of the positive mined
    as negatives, margins that drop the wrong candidates, and a report whose counts do not add up."""
    documents, examples, known = _corpus()
    mined, report = mine_hard_negatives(tiny_encoder, examples, documents, known, config)
    expected = _oracle(tiny_encoder, documents, examples, known, config)
    for example, window, kept in zip(mined, expected.window, expected.kept):
        ids = {n.doc_id for n in example.negatives}
        assert ids == kept and ids <= window
        assert not ids & ({example.positive.doc_id, "copy0" if example.query_id == "q0" else ""} | known.get(example.query_id, set()))
    assert (report.dropped_known_positive, report.dropped_too_close, report.kept) == (expected.known, expected.close, sum(map(len, expected.kept)))
    assert report.candidates == sum(map(len, expected.window))
    assert report.candidates == report.dropped_known_positive + report.dropped_too_close + report.kept
    assert report.not_needed == report.dropped_by_teacher == 0
    assert min(report.dropped_known_positive, report.dropped_too_close, report.kept) > 0, "every rule was exercised"


def test_mining_with_fewer_slots_than_survivors_is_seeded_and_counts_the_rest(tiny_encoder):
    """Guards against unseeded sampling (runs that cannot be reproduced) and survivors that vanish from the report."""
    documents, examples, known = _corpus()
    config = MiningConfig(count=2, window_start=1, window_end=25, margin=0.0, seed=5)
    first, report = mine_hard_negatives(tiny_encoder, examples, documents, known, config)
    second, _ = mine_hard_negatives(tiny_encoder, examples, documents, known, config)
    assert [e.negatives for e in first] == [e.negatives for e in second]
    expected = _oracle(tiny_encoder, documents, examples, known, config)
    assert all({n.doc_id for n in e.negatives} <= kept and len(e.negatives) == min(2, len(kept)) for e, kept in zip(first, expected.kept))
    assert report.candidates == (
        report.dropped_known_positive + report.dropped_too_close + report.dropped_by_teacher + report.kept + report.not_needed
    )
    assert report.not_needed == sum(len(kept) for kept in expected.kept) - report.kept > 0


def test_mining_without_margins_drops_only_known_positives(tiny_encoder):
    """Guards against a student filter that still applies when no margin is set (stages with a teacher set none, so
    the teacher sees the candidates closest to the positive)."""
    documents, examples, known = _corpus()
    unfiltered = MiningConfig(count=100, window_start=1, window_end=25, margin=None)
    mined, report = mine_hard_negatives(tiny_encoder, examples, documents, known, unfiltered)
    expected = _oracle(tiny_encoder, documents, examples, known, unfiltered)
    assert [{n.doc_id for n in e.negatives} for e in mined] == expected.kept
    assert report.dropped_too_close == 0
    assert report.kept == report.candidates - report.dropped_known_positive
    _, filtered = mine_hard_negatives(tiny_encoder, examples, documents, known, MiningConfig(count=100, window_start=1, window_end=25, margin=0.0))
    assert filtered.dropped_too_close > 0, "the same window has candidates a zero margin drops"
