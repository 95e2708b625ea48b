"""The promotion gate: a candidate release goes live only if it is not worse than the live one on dev queries.

Both releases rank the dev queries against their own index with their own model (fused
with BM25 when the service serves hybrid search, `LOCKSTEP_LEXICAL_WEIGHT`);
the candidate passes when its nDCG@10 is at least the live release's minus a
tolerance. The gate also records a shadow comparison (how much the two top-10
lists overlap and how similarly they order the documents they share), because a
large change in what users see is worth an admin's look even when quality holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations

from indexer.corpus_store import CorpusStore
from indexer.live_release import LiveRelease
from indexer.retrieval_eval import (
    EVAL_DEPTH,
    Run,
    evaluate_ranking,
    judged_queries,
    rank_queries,
)

SHADOW_DEPTH = 10


@dataclass(frozen=True)
class DevSet:
    """Labelled queries the gate evaluates on, and where they came from (for the job record)."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    source: str


@dataclass
class GateReport:
    """The gate's decision with both releases' metrics and the shadow comparison."""

    passed: bool
    reason: str
    candidate: dict
    live: dict | None
    tolerance: float
    dev_source: str
    live_release: str | None
    shadow: dict = field(default_factory=dict)
    lexical_weight: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _kendall_tau(first: list[str], second: list[str]) -> float | None:
    """Kendall's tau between two rankings over the documents both contain; None if fewer than two."""
    in_second = set(second)
    shared = [doc for doc in first if doc in in_second]
    if len(shared) < 2:
        return None
    position = {doc: rank for rank, doc in enumerate(second)}
    concordant = sum(1 if position[a] < position[b] else -1 for a, b in combinations(shared, 2))
    return concordant / (len(shared) * (len(shared) - 1) / 2)


def _top(run_of_query: dict[str, float], depth: int) -> list[str]:
    return sorted(run_of_query, key=lambda doc: -run_of_query[doc])[:depth]


def shadow_agreement(live: Run, candidate: Run, depth: int = SHADOW_DEPTH) -> dict:
    """Mean top-`depth` overlap (share of the live list the candidate also returns) and mean Kendall tau."""
    overlaps, taus = [], []
    for query_id in live.keys() & candidate.keys():
        live_top, candidate_top = _top(live[query_id], depth), _top(candidate[query_id], depth)
        if not live_top:
            continue
        overlaps.append(len(set(live_top) & set(candidate_top)) / len(live_top))
        tau = _kendall_tau(live_top, candidate_top)
        if tau is not None:
            taus.append(tau)
    return {
        "queries": len(overlaps),
        f"top{depth}_overlap": round(sum(overlaps) / len(overlaps), 4) if overlaps else None,
        "kendall_tau": round(sum(taus) / len(taus), 4) if taus else None,
        "tau_queries": len(taus),
    }


def _headline(metrics: dict) -> dict:
    return {key: round(float(metrics[key]), 4) for key in ("ndcg@10", "recall@100", "mrr@10")} | {
        "queries": int(metrics["queries"])
    }


def judge(
    candidate: LiveRelease,
    live: LiveRelease | None,
    dev: DevSet,
    tolerance: float,
    corpus: CorpusStore | None = None,
    lexical_weight: float = 0.0,
) -> GateReport:
    """Evaluate `candidate` (and `live`, if any) on `dev` and decide whether the candidate may go live. With a
    `lexical_weight` above 0 both rank as the service's hybrid searches do (BM25 over `corpus`), so a deployment
    serving hybrid search is gated on what it serves."""
    queries = judged_queries(dev.queries, dev.qrels)
    candidate_run = rank_queries(candidate, queries, EVAL_DEPTH, corpus, lexical_weight)
    candidate_metrics = _headline(evaluate_ranking(candidate_run, dev.qrels))
    if live is None or live.release_id == candidate.release_id:
        return GateReport(True, "no other release is live to compare with", candidate_metrics, None, tolerance,
                          dev.source, None, lexical_weight=lexical_weight)
    live_run = rank_queries(live, queries, EVAL_DEPTH, corpus, lexical_weight)
    live_metrics = _headline(evaluate_ranking(live_run, dev.qrels))
    floor = live_metrics["ndcg@10"] - tolerance
    passed = candidate_metrics["ndcg@10"] >= floor
    comparison = ">=" if passed else "<"
    ranking = f", both hybrid with BM25 at weight {lexical_weight:g}" if lexical_weight else ""
    reason = (
        f"candidate nDCG@10 {candidate_metrics['ndcg@10']:.4f} {comparison} live {live_metrics['ndcg@10']:.4f} "
        f"minus tolerance {tolerance:g} on {candidate_metrics['queries']} dev queries ({dev.source}){ranking}"
    )
    return GateReport(passed, reason, candidate_metrics, live_metrics, tolerance, dev.source, live.release_id,
                      shadow_agreement(live_run, candidate_run), lexical_weight)
