"""Failure-mode signals and alerts: thresholds at +/- epsilon, rank correlation and false-negative rates against references."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from training.bi_encoder import BiEncoder
from training.dev_eval import DevSet, _dev_negatives_above_positive, evaluate_encoder
from training.diagnostics import (
    Thresholds,
    alerts_for,
    collapse_bounds,
    negatives_above_positive,
    spearman,
)

EPS = 1e-6
T = Thresholds()
# A base model's evaluation; an evaluation equal to it fires nothing.
BASE = {
    "ndcg@10": 0.50, "ndcg@10_train": 0.55, "ndcg@10_high_overlap": 0.60, "ndcg@10_low_overlap": 0.50,
    "sts_spearman": 0.80, "query_norm_mean": 4.0, "doc_norm_mean": 2.0, "mean_dim_std": 0.10,
    "mean_pairwise_cosine": 0.20, "negatives_above_positive": 0.01,
}
BASE_OVERFIT_GAP = BASE["ndcg@10_train"] - BASE["ndcg@10"]
BASE_OVERLAP_GAP = BASE["ndcg@10_high_overlap"] - BASE["ndcg@10_low_overlap"]
BASE_RATIO = BASE["query_norm_mean"] / BASE["doc_norm_mean"]

CASES = [
    ("shortcut gap just over", {"ndcg@10_high_overlap": 0.50 + BASE_OVERLAP_GAP + T.shortcut_max_overlap_gap + EPS}, {"shortcut"}),
    ("shortcut gap just under", {"ndcg@10_high_overlap": 0.50 + BASE_OVERLAP_GAP + T.shortcut_max_overlap_gap - EPS}, set()),
    ("overfit gap just over", {"ndcg@10_train": 0.50 + BASE_OVERFIT_GAP + T.overfit_max_gap + EPS}, {"overfitting"}),
    ("overfit gap just under", {"ndcg@10_train": 0.50 + BASE_OVERFIT_GAP + T.overfit_max_gap - EPS}, set()),
    ("overfit: dev falls as train holds", {"ndcg@10": 0.55 - BASE_OVERFIT_GAP - T.overfit_max_gap - EPS, "ndcg@10_train": 0.55}, {"overfitting"}),
    ("drift ratio just over (up)", {"query_norm_mean": 2.0 * BASE_RATIO * (1 + T.drift_max_norm_ratio_change + EPS)}, {"drift"}),
    ("drift ratio just under (up)", {"query_norm_mean": 2.0 * BASE_RATIO * (1 + T.drift_max_norm_ratio_change - EPS)}, set()),
    ("drift ratio just over (down)", {"query_norm_mean": 2.0 * BASE_RATIO / (1 + T.drift_max_norm_ratio_change + EPS)}, {"drift"}),
    ("drift ratio just under (down)", {"query_norm_mean": 2.0 * BASE_RATIO / (1 + T.drift_max_norm_ratio_change - EPS)}, set()),
    ("STS drop just over", {"sts_spearman": 0.80 - T.sts_max_drop - EPS}, {"shortcut"}),
    ("STS drop just under", {"sts_spearman": 0.80 - T.sts_max_drop + EPS}, set()),
    ("false negatives just over", {"negatives_above_positive": 0.01 + T.saturation_max_negatives_above_positive + EPS}, {"false_negatives"}),
    ("false negatives just under", {"negatives_above_positive": 0.01 + T.saturation_max_negatives_above_positive - EPS}, set()),
    ("dim std just under", {"mean_dim_std": T.collapse_min_dim_std - EPS}, {"collapse"}),
    ("dim std just over", {"mean_dim_std": T.collapse_min_dim_std + EPS}, set()),
    ("mean cosine just over", {"mean_pairwise_cosine": T.collapse_max_mean_cosine + EPS}, {"collapse"}),
    ("mean cosine just under", {"mean_pairwise_cosine": T.collapse_max_mean_cosine - EPS}, set()),
]


@pytest.mark.parametrize(("signal", "changes", "expected"), CASES, ids=[case[0] for case in CASES])
def test_each_alert_fires_just_past_its_threshold_and_not_before(signal, changes, expected):
    """Guards against an alert whose comparison is off (absolute instead of against the base model, the wrong
    sign, >= for >) and so fires on healthy runs or stays silent on failing ones."""
    modes = {alert.mode for alert in alerts_for({**BASE, **changes}, BASE, T)}
    assert modes == expected


def test_a_drift_that_shrinks_the_norm_ratio_fires_as_readily_as_one_that_grows_it():
    """Guards against a lopsided drift check: |after - before| / before fired at 1.51 times the ratio but not at
    half of it, so shrinking drift had to be twice as large to be seen."""
    for factor in (1.6, 1 / 1.6):
        assert [a.mode for a in alerts_for({**BASE, "query_norm_mean": 4.0 * factor}, BASE, T)] == ["drift"]
    for factor in (1.4, 1 / 1.4):
        assert alerts_for({**BASE, "query_norm_mean": 4.0 * factor}, BASE, T) == []


def test_a_high_dimensional_or_anisotropic_base_model_is_not_collapsed_until_it_moves_toward_collapse():
    """Guards against aborting healthy runs: a 4096-dimensional model's per-dimension std (about 0.009) and an
    E5-style model's mean cosine (0.85) sit past the absolute bounds before any training."""
    wide = {**BASE, "mean_dim_std": 0.0088, "mean_pairwise_cosine": 0.30}
    assert collapse_bounds(T, wide) == pytest.approx((0.0044, 0.9))
    assert alerts_for(wide, wide, T) == []
    assert [a.mode for a in alerts_for({**wide, "mean_dim_std": 0.0040}, wide, T)] == ["collapse"]
    anisotropic = {**BASE, "mean_pairwise_cosine": 0.85}
    assert alerts_for({**anisotropic, "mean_pairwise_cosine": 0.92}, anisotropic, T) == []
    assert [a.mode for a in alerts_for({**anisotropic, "mean_pairwise_cosine": 0.93}, anisotropic, T)] == ["collapse"]
    assert collapse_bounds(T, {}) == (T.collapse_min_dim_std, T.collapse_max_mean_cosine)


def test_a_large_train_dev_gap_that_the_base_model_already_had_is_not_overfitting():
    """Guards against the overfitting alert firing on the absolute gap: a base model that already scores its
    training queries much better than dev (easier queries) is not overfitting until the gap widens."""
    base = {**BASE, "ndcg@10": 0.40, "ndcg@10_train": 0.80}
    assert not alerts_for({**base, "ndcg@10": 0.45, "ndcg@10_train": 0.90}, base, T)
    assert [a.mode for a in alerts_for({**base, "ndcg@10": 0.40, "ndcg@10_train": 0.96}, base, T)] == ["overfitting"]


def test_alerts_need_only_the_signals_an_evaluation_has():
    """Guards against an alert check that raises on an evaluation missing one collapse statistic or the
    train probe, which would crash training at its first evaluation."""
    assert [a.mode for a in alerts_for({"mean_pairwise_cosine": 0.95}, {}, T)] == ["collapse"]
    assert alerts_for({"ndcg@10": 0.5}, {}, T) == []


@pytest.mark.parametrize("seed", range(6))
def test_spearman_matches_scipy_on_tied_data(seed):
    """Guards against tied values ranked by position instead of by their average rank, which biases the STS probe."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 4, size=30).astype(float)
    y = x + rng.integers(-2, 3, size=30)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def _naive_rate(scores: np.ndarray, mask: np.ndarray | None) -> float:
    above = total = 0
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            if j == i or (mask is not None and mask[i, j]):
                continue
            total += 1
            above += scores[i, j] >= scores[i, i]
    return above / total if total else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_negatives_above_positive_matches_a_plain_loop(seed):
    """Guards against masked candidates (or the target) counted as negatives, or ties not counted as 'above'."""
    rng = np.random.default_rng(seed)
    batch, hard = 6, 2
    scores = np.round(rng.uniform(-1, 1, size=(batch, batch * (1 + hard))), 1)
    mask = rng.random(scores.shape) < 0.3
    for candidate_mask in (None, mask):
        assert negatives_above_positive(scores, candidate_mask) == pytest.approx(_naive_rate(scores, candidate_mask))
    assert negatives_above_positive(scores[:1, :1]) == 0.0


def test_dev_false_negative_rate_masks_judged_documents_and_counts_the_rest():
    """Guards against the dev false-negative figure counting a query's other relevant documents as negatives,
    or reading a training batch instead of the dev pairs."""
    dev = DevSet(
        queries={"q0": "a", "q1": "b", "q2": "c"},
        qrels={"q0": {"d0": 1, "d1": 1}, "q1": {"d1": 2, "d0": 1}, "q2": {"d2": 1}},
        documents={"d0": "x", "d1": "y", "d2": "z"},
    )
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    docs = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    # positives: q0 -> d0, q1 -> d1 (rel 2), q2 -> d2. q0 and q1 each mask the other's positive (judged);
    # q2 scores d0 0.6, d1 0.8, its own d2 0.96: nothing above. Only q0 and q1 vs d2 remain: 0.8 >= 1 no, 0.6 >= 1 no.
    assert _dev_negatives_above_positive(dev, queries, ["d0", "d1", "d2"], docs) == 0.0
    flipped = queries.copy()
    flipped[2] = [0.0, 1.0]  # q2 now scores d1 (1.0) above d2 (0.6)
    assert _dev_negatives_above_positive(dev, flipped, ["d0", "d1", "d2"], docs) == pytest.approx(1 / 4)


def test_a_dev_set_too_small_to_split_by_overlap_reports_no_gap_and_fires_no_shortcut(tiny_model_dir):
    """Guards against a one-query dev split, whose low-overlap half is empty, reporting that half's nDCG as 0 so
    that any gain of the one query reads as a growing shortcut gap."""
    dev = DevSet(queries={"q": "apple pie"}, qrels={"q": {"d0": 1}},
                 documents={"d0": "apple pie recipe", "d1": "quick brown fox", "d2": "river stone"})
    evaluation = evaluate_encoder(BiEncoder.load(tiny_model_dir), dev)
    assert "ndcg@10" in evaluation and "ndcg@10_low_overlap" not in evaluation and "ndcg@10_high_overlap" not in evaluation
    unsplit = {key: value for key, value in BASE.items() if "overlap" not in key}
    assert alerts_for({**unsplit, "ndcg@10": 0.95}, unsplit, T) == []
    assert alerts_for({**BASE, "ndcg@10_high_overlap": 0.95}, unsplit, T) == [], "no baseline gap, nothing to compare"
