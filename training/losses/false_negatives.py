"""False-negative masks: which in-batch candidates are not really negatives for a query.

With in-batch negatives, every other row's positive (and every row's hard negatives) is
treated as irrelevant to query i. When the same document, the same text, or another
document known to answer the query lands in the batch, the loss pushes the query away
from a correct answer; in dense domains this "false-negative saturation" is common and
gets worse as batches grow. `false_negative_mask` marks those candidates so the loss
can drop them from query i's softmax denominator (the target itself is never dropped).

Candidates are ordered as `InfoNCELoss` scores them: all B positives first, then the
hard negatives flattened row-major (row 0's H negatives, row 1's, ...), C = B + B*H.

Candidate (i, j) is masked, for j != i, when candidate j
- is the same document as positive i (same `doc_id`), or has the same text (stripped);
- is the positive of another row with the same query id (a query repeated in the batch);
- is in `known_positives[query_ids[i]]` (e.g. every relevant document in the qrels);
- scores at least `teacher_threshold` under a teacher (e.g. a cross-encoder), as in
  RocketQA's denoised hard negatives. `relative_teacher_scores` turns each query's teacher
  scores of its own candidates into margins against its positive, so the threshold can be
  one relative to the positive (`-margin`: within `margin` of it, or above).

References:
    - Qu et al., 2021, "RocketQA: An Optimized Training Approach to Dense Passage Retrieval
      for Open-Domain Question Answering" (arXiv:2010.08191): drop mined negatives a
      cross-encoder scores as relevant.
    - Moreira et al., 2024, "NV-Retriever: Improving text Embedding models with effective
      Hard-negative mining" (arXiv:2407.15831): positive-aware thresholds on mined negatives.

Relations:
    - `InfoNCELoss` and `CachedInfoNCELoss` take the mask as `candidate_mask`.
    - A batch sampler that never puts a duplicate in one batch prevents the first cases at
      the source; this mask still catches known positives and teacher-flagged negatives.

Left out: near-duplicate text detection (only exact stripped text is compared) and
teacher scores of other rows' candidates (a batch carries teacher scores only for each
query's own positive and hard negatives).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Candidate:
    """A document as a loss sees it: its id (for duplicate and qrels checks) and its text."""

    doc_id: str
    text: str


def _codes(keys: Sequence[Hashable]) -> torch.Tensor:
    """One integer per key, equal exactly when the keys are equal."""
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(key, len(index)) for key in keys], dtype=torch.long)


def _flatten_negatives(negatives: Sequence[Sequence[Candidate]] | None, batch_size: int) -> list[Candidate]:
    if negatives is None:
        return []
    if len(negatives) != batch_size:
        raise ValueError(f"negatives must hold one row per query ({batch_size}), got {len(negatives)} rows")
    widths = sorted({len(row) for row in negatives})
    if len(widths) > 1:
        raise ValueError(f"every query must have the same number of hard negatives, got row lengths {widths}")
    return [candidate for row in negatives for candidate in row]


def relative_teacher_scores(own_scores: torch.Tensor) -> torch.Tensor:
    """`(B, B + B*H)` teacher scores against the positive: each query's own hard negatives minus its positive, -inf elsewhere.

    `own_scores` is `(B, 1 + H)`: the teacher's score of query i's positive, then of its H hard
    negatives (as `TrainingExample.teacher_scores`). Other rows' candidates have no teacher score
    for query i, so they get -inf and no teacher threshold masks them; the positive gets 0.
    """
    if own_scores.dim() != 2 or own_scores.shape[1] < 2:
        raise ValueError(f"own teacher scores must be (B, 1 + H) with H >= 1, got shape {tuple(own_scores.shape)}")
    if not torch.isfinite(own_scores).all():
        raise ValueError("own teacher scores must be finite; a NaN or inf would mask (or spare) candidates arbitrarily")
    batch_size, hard = own_scores.shape[0], own_scores.shape[1] - 1
    scores = own_scores.detach().new_full((batch_size, batch_size + batch_size * hard), -math.inf)
    rows = torch.arange(batch_size)
    scores[rows, rows] = 0.0
    columns = batch_size + rows[:, None] * hard + torch.arange(hard)[None, :]
    scores[rows[:, None], columns] = own_scores[:, 1:] - own_scores[:, :1]
    return scores


def false_negative_mask(
    query_ids: Sequence[str],
    positives: Sequence[Candidate],
    negatives: Sequence[Sequence[Candidate]] | None,
    known_positives: Mapping[str, Collection[str]] | None = None,
    teacher_scores: torch.Tensor | None = None,
    teacher_threshold: float | None = None,
) -> torch.Tensor:
    """A bool `(B, B + B*H)` mask, True where candidate j must leave query i's softmax denominator.

    Args:
        query_ids: One id per query; rows with the same id are the same query.
        positives: Query i's positive document, for each of the B queries.
        negatives: B rows of H hard negatives each (the same H for every row), or None.
        known_positives: Query id to the ids of every document known to be relevant to it.
        teacher_scores: `(B, C)` teacher scores of every query against every candidate.
        teacher_threshold: Candidates a teacher scores at or above this are masked; give it
            together with `teacher_scores`.
    """
    batch_size = len(query_ids)
    if len(positives) != batch_size:
        raise ValueError(f"need one positive per query: {batch_size} query ids, {len(positives)} positives")
    candidates = list(positives) + _flatten_negatives(negatives, batch_size)
    if (teacher_scores is None) != (teacher_threshold is None):
        raise ValueError("teacher_scores and teacher_threshold must be given together (or neither)")

    doc_codes = _codes([candidate.doc_id for candidate in candidates])
    text_codes = _codes([candidate.text.strip() for candidate in candidates])
    query_codes = _codes(query_ids)
    mask = (doc_codes[:batch_size, None] == doc_codes[None, :]) | (text_codes[:batch_size, None] == text_codes[None, :])
    mask[:, :batch_size] |= query_codes[:, None] == query_codes[None, :]

    if known_positives:
        columns: dict[str, list[int]] = defaultdict(list)
        for column, candidate in enumerate(candidates):
            columns[candidate.doc_id].append(column)
        for row, query_id in enumerate(query_ids):
            hits = [column for doc_id in known_positives.get(query_id, ()) for column in columns.get(doc_id, ())]
            mask[row, hits] = True

    if teacher_scores is not None:
        expected = (batch_size, len(candidates))
        if tuple(teacher_scores.shape) != expected:
            raise ValueError(f"teacher_scores must have shape (B, C) = {expected}, got {tuple(teacher_scores.shape)}")
        if not math.isfinite(teacher_threshold):
            raise ValueError(f"teacher_threshold must be a finite number, got {teacher_threshold}")
        mask |= teacher_scores.detach().cpu() >= teacher_threshold

    targets = torch.arange(batch_size)
    mask[targets, targets] = False
    return mask
