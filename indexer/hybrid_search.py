"""Hybrid search: one ranking from the dense index's candidates and BM25's.

Each list's scores are standardised over its own candidates, as reranking fuses
scores (`training.score_fusion`), and mixed with the lexical weight; a document only
one list found is placed one standard deviation below the other list's lowest, so
being missed by a retriever counts against it without ruling it out, and a list of a
single match (whose standardised score is 0) still lifts that match. Interpolating BM25 with a dense
retriever's scores is what Wang, Zhuang and Zuccon (ICTIR 2021, "BERT-based Dense
Retrievers Require Interpolation with BM25 for Effective Passage Retrieval") found
to help; on SciFact the equal blend lifts the base MiniLM's nDCG@10 from 0.660 to 0.738
(docs/benchmarks.md), where reciprocal-rank fusion reached 0.710.
"""

from __future__ import annotations

import numpy as np

from indexer.vector_index import Hit
from training.errors import InvalidInput
from training.score_fusion import standardise

LEXICAL_CANDIDATES = 100  # candidates each retriever contributes per query at least
MISSED = 1.0  # how far below a list's lowest standardised score a document it did not find is placed


def check_lexical_weight(weight: float) -> None:
    """Refuse a lexical weight outside [0, 1]."""
    if not 0.0 <= weight <= 1.0:
        raise InvalidInput(f"lexical weight must be between 0 (dense only) and 1 (BM25 only), got {weight}")


def fuse_runs(dense: list[Hit], lexical: list[tuple[str, float]], weight: float) -> list[Hit]:
    """The union of both candidate lists ordered by `weight * z(bm25) + (1 - weight) * z(cosine)`, best first, ties
    in dense order then lexical order (a document missing from a list scores `MISSED` below its lowest). Weight 1
    keeps BM25's own order and scores."""
    check_lexical_weight(weight)
    if weight == 1.0:
        return [Hit(doc_id, score) for doc_id, score in lexical]
    dense_z = dict(zip((hit.doc_id for hit in dense), standardise([hit.score for hit in dense]))) if dense else {}
    lexical_z = dict(zip((doc_id for doc_id, _ in lexical), standardise([score for _, score in lexical]))) if lexical else {}
    dense_floor = min(dense_z.values(), default=0.0) - MISSED
    lexical_floor = min(lexical_z.values(), default=0.0) - MISSED
    order = list(dict.fromkeys([*dense_z, *lexical_z]))
    fused = np.array([(1.0 - weight) * dense_z.get(doc_id, dense_floor) + weight * lexical_z.get(doc_id, lexical_floor)
                      for doc_id in order])
    ranking = np.argsort(-fused, kind="stable")
    return [Hit(order[i], float(fused[i])) for i in ranking]
