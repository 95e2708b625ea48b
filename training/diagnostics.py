"""Signals of the five contrastive failure modes, each with a threshold and the remedy to show.

- collapse: per-dimension std of unit embeddings falls toward 0, mean pairwise cosine rises toward 1;
- false-negative saturation: many masked candidates, many negatives scored at or above the positive
  (per training batch, and on the dev pairs at each evaluation, which is what the alert reads);
- shortcut learning: the gap between dev nDCG on high- and low-overlap queries widens, or the STS-B probe falls;
- overfitting: the gap between train-subset and dev nDCG widens against the base model's gap;
- drift: query and document norms before normalisation move apart (the ratio grows or shrinks by the
  same factor).
See Wang & Isola (2020), "Understanding Contrastive Representation Learning through
Alignment and Uniformity", for why collapse shows as lost uniformity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Thresholds:
    """When a signal counts as firing. The shortcut, STS, overfitting and drift signals compare with the
    base model's evaluation (a gap that only widens counts, per the contrastive notes). The collapse bounds
    and the saturation share are absolute, loosened for a base model already near them (`collapse_bounds`,
    `saturation_bound`). The collapse bounds are checked at each evaluation (`collapse_patience` in a row abort)
    and on each training batch's documents (`collapse_step_patience` in a row abort)."""

    collapse_min_dim_std: float = 0.01
    collapse_max_mean_cosine: float = 0.9
    collapse_base_fraction: float = 0.5
    collapse_patience: int = 2
    collapse_step_patience: int = 20
    saturation_max_negatives_above_positive: float = 0.05
    shortcut_max_overlap_gap: float = 0.15
    sts_max_drop: float = 0.02
    overfit_max_gap: float = 0.15
    drift_max_norm_ratio_change: float = 0.5


REMEDIES = {
    "collapse": "raise the temperature, lower the learning rate, check that embeddings are normalised",
    "false_negatives": "de-duplicate batches, filter mined negatives that score close to the positive, add qrels as known positives",
    "shortcut": "distil from a cross-encoder teacher, drop exact-match pairs, add paraphrased queries",
    "overfitting": "use fewer epochs, more weight decay, warmup and early stopping, or more training pairs",
    "drift": "re-embed the whole corpus with the new model before serving (Lockstep releases do this)",
}


@dataclass(frozen=True)
class CollapseStats:
    mean_dim_std: float
    mean_pairwise_cosine: float


def collapse_stats(unit_vectors: np.ndarray) -> CollapseStats:
    """Per-dimension std (averaged over dimensions) and mean off-diagonal cosine of unit vectors."""
    if len(unit_vectors) < 2:
        raise ValueError("collapse statistics need at least two vectors")
    sims = unit_vectors @ unit_vectors.T
    n = len(unit_vectors)
    off_diagonal = (sims.sum() - np.trace(sims)) / (n * (n - 1))
    return CollapseStats(float(unit_vectors.std(axis=0).mean()), float(off_diagonal))


def collapse_bounds(thresholds: Thresholds, baseline: Mapping[str, float]) -> tuple[float, float]:
    """The (least dim std, greatest mean cosine) before embeddings count as collapsing, for this base model.

    The per-dimension std of unit vectors shrinks with their dimension (it is at most about
    sqrt((1 - mean cosine) / dim)), and anisotropic models (E5, GTE) start at a mean cosine
    of 0.7-0.85, so a healthy 1024- or 4096-dimensional base model can sit past the absolute
    bounds. Each bound is therefore also moved `collapse_base_fraction` of the way from the
    base model's value toward collapse (std toward 0, cosine toward 1), whichever is further.
    """
    fraction = thresholds.collapse_base_fraction
    min_std, max_cosine = thresholds.collapse_min_dim_std, thresholds.collapse_max_mean_cosine
    if "mean_dim_std" in baseline:
        min_std = min(min_std, baseline["mean_dim_std"] * (1 - fraction))
    if "mean_pairwise_cosine" in baseline:
        base = baseline["mean_pairwise_cosine"]
        max_cosine = max(max_cosine, base + (1 - base) * fraction)
    return min_std, max_cosine


def saturation_bound(thresholds: Thresholds, baseline: Mapping[str, float]) -> float:
    """The share of negatives scored at or above the positive past which false negatives count as saturating: the
    base model's own share plus the threshold, since a weak base model ranks many true negatives above the
    positive before any training."""
    return thresholds.saturation_max_negatives_above_positive + baseline.get("negatives_above_positive", 0.0)


def is_collapsed(stats: CollapseStats, thresholds: Thresholds, baseline: Mapping[str, float]) -> bool:
    min_std, max_cosine = collapse_bounds(thresholds, baseline)
    return stats.mean_dim_std < min_std or stats.mean_pairwise_cosine > max_cosine


def negatives_above_positive(scores: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Share of (unmasked) negatives a query scores at or above its own positive; scores are (B, C), target i at column i."""
    batch = scores.shape[0]
    positive = scores[np.arange(batch), np.arange(batch)][:, None]
    is_negative = np.ones_like(scores, dtype=bool)
    is_negative[np.arange(batch), np.arange(batch)] = False
    if mask is not None:
        is_negative &= ~mask
    total = is_negative.sum()
    return float(((scores >= positive) & is_negative).sum() / total) if total else 0.0


_WORD = re.compile(r"\w+")


def lexical_overlap(query: str, document: str) -> float:
    """Share of the query's distinct words that also occur in the document."""
    words = set(_WORD.findall(query.lower()))
    if not words:
        return 0.0
    return len(words & set(_WORD.findall(document.lower()))) / len(words)


def overlap_split(
    queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]], documents: Mapping[str, str]
) -> tuple[list[str], list[str]]:
    """Split judged queries at the median lexical overlap with their relevant documents: (low, high)."""
    overlaps = {}
    for query_id, labels in qrels.items():
        relevant = [documents[d] for d, rel in labels.items() if rel > 0 and d in documents]
        if query_id in queries and relevant:
            overlaps[query_id] = max(lexical_overlap(queries[query_id], doc) for doc in relevant)
    ordered = sorted(overlaps, key=lambda q: (overlaps[q], q))
    half = len(ordered) // 2
    return ordered[:half], ordered[half:]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation with average ranks for ties."""

    def ranks(values: Sequence[float]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        order = values.argsort(kind="stable")
        result = np.empty(len(values))
        sorted_values = values[order]
        start = 0
        while start < len(values):
            end = start
            while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
                end += 1
            result[order[start : end + 1]] = (start + end) / 2.0
            start = end + 1
        return result

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


@dataclass(frozen=True)
class Alert:
    """A failure mode whose signal crossed its threshold, with what to do."""

    mode: str
    message: str
    remedy: str


def _overlap_gap(evaluation: Mapping[str, float]) -> float | None:
    """nDCG@10 of the high lexical-overlap half of the dev queries minus the low half's; None when the dev set was
    too small to split (a single query), where the gap would just be that query's nDCG."""
    if "ndcg@10_high_overlap" not in evaluation or "ndcg@10_low_overlap" not in evaluation:
        return None
    return evaluation["ndcg@10_high_overlap"] - evaluation["ndcg@10_low_overlap"]


def alerts_for(evaluation: Mapping[str, float], baseline: Mapping[str, float], thresholds: Thresholds) -> list[Alert]:
    """Check one evaluation's signals (see `DevEvaluation.as_dict`) against thresholds and the base model's values."""
    found = []

    def fire(mode: str, message: str) -> None:
        found.append(Alert(mode, message, REMEDIES[mode]))

    stats = CollapseStats(evaluation.get("mean_dim_std", 1.0), evaluation.get("mean_pairwise_cosine", 0.0))
    if is_collapsed(stats, thresholds, baseline):
        fire("collapse", f"embeddings are collapsing (dim std {stats.mean_dim_std:.4f}, mean cosine {stats.mean_pairwise_cosine:.3f})")
    rate = evaluation.get("negatives_above_positive")
    if rate is not None and rate > saturation_bound(thresholds, baseline):
        fire("false_negatives", f"{rate:.1%} of negatives score at or above the positive "
                                f"(the base model: {baseline.get('negatives_above_positive', 0.0):.1%})")
    gap, base_gap = _overlap_gap(evaluation), _overlap_gap(baseline)
    if gap is not None and base_gap is not None and gap - base_gap > thresholds.shortcut_max_overlap_gap:
        fire("shortcut", f"the high/low lexical overlap nDCG gap grew from {base_gap:.3f} to {gap:.3f}")
    if "sts_spearman" in evaluation and "sts_spearman" in baseline:
        drop = baseline["sts_spearman"] - evaluation["sts_spearman"]
        if drop > thresholds.sts_max_drop:
            fire("shortcut", f"the STS-B probe fell by {drop:.3f} Spearman (out-of-domain quality is dropping)")
    if "ndcg@10_train" in evaluation:
        overfit = evaluation["ndcg@10_train"] - evaluation["ndcg@10"]
        base_overfit = baseline["ndcg@10_train"] - baseline["ndcg@10"] if "ndcg@10_train" in baseline else 0.0
        if overfit - base_overfit > thresholds.overfit_max_gap:
            fire("overfitting", f"the train-subset minus dev nDCG@10 gap grew from {base_overfit:.3f} to {overfit:.3f}")
    if baseline.get("query_norm_mean") and baseline.get("doc_norm_mean") and evaluation.get("doc_norm_mean"):
        before = baseline["query_norm_mean"] / baseline["doc_norm_mean"]
        after = evaluation["query_norm_mean"] / evaluation["doc_norm_mean"]
        if abs(np.log(after / before)) > np.log1p(thresholds.drift_max_norm_ratio_change):  # either way alike
            fire("drift", f"query/document norm ratio moved from {before:.3f} to {after:.3f}")
    return found


def alert_dicts(alerts: Sequence[Alert]) -> list[dict]:
    return [asdict(alert) for alert in alerts]
