"""InfoNCE with in-batch negatives (multiple-negatives ranking), optionally symmetric and masked.

For a batch of B (query, positive) pairs with H hard negatives each, query i is scored
against every candidate in the batch: all B positives, then all B*H hard negatives
(row-major). Scores are cosine similarities divided by the temperature tau; the loss is
the cross-entropy with positive i as the target, averaged over queries:

    loss_i = -log( exp(s(q_i, p_i) / tau) / sum_j exp(s(q_i, c_j) / tau) )

A batch of B gives B-1 negatives per query for free. Candidates marked in
`candidate_mask` (false negatives, see `false_negative_mask`) get -inf before the
softmax, so they neither help nor hurt. The symmetric form adds the document-to-query
term: positive i must pick query i out of the B queries (the transposed B x B block of
the same scores and mask), and the loss is the mean of the two directions.

Args:
    temperature: tau, a positive finite number; scale = 1 / tau in sentence-transformers'
        terms. 0.05 is the usual default; 0.02 sharpens (strong signal, collapse risk),
        0.1 softens.
    symmetric: add the document-to-query term and average the two directions.

References:
    - van den Oord et al., 2018, "Representation Learning with Contrastive Predictive Coding"
      (arXiv:1807.03748): the InfoNCE objective.
    - Henderson et al., 2017, "Efficient Natural Language Response Suggestion for Smart Reply"
      (arXiv:1705.00652), section 4.4: in-batch negatives (multiple-negatives ranking).
    - Karpukhin et al., 2020, "Dense Passage Retrieval for Open-Domain Question Answering"
      (arXiv:2004.04906): in-batch plus hard negatives shared across the batch.
    - Günther et al., 2024, "Jina Embeddings 2" (arXiv:2310.19923): the symmetric form.

Inputs:
    queries `(B, d)`, positives `(B, d)`, optional negatives `(B, H, d)` with 0 <= H <= 20,
    optional candidate_mask `(B, B + B*H)` bool. Embeddings need not be normalised.

Relations:
    - Equals sentence-transformers' MultipleNegativesRankingLoss (cosine, scale = 1/tau);
      symmetric equals it with directions ("query_to_doc", "doc_to_query") and
      partition_mode "per_direction" (formerly MultipleNegativesSymmetricRankingLoss).
    - `CachedInfoNCELoss` computes this loss with gradient caching, for batches that do
      not fit in memory at once.
    - `TripletLoss` for explicit triplets with a margin; `MarginMSELoss` or
      `KLDistillationLoss` when a teacher's scores are available.

Left out: dot-product similarity (every vector Lockstep indexes is unit length, so
training on cosine matches serving), query-to-query terms, and hardness weighting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.losses.fp32 import at_least_fp32
from training.losses.output import LossOutput

MAX_HARD_NEGATIVES = 20


def _candidates(queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
    """The `(B + B*H, d)` candidate matrix, checking every shape on the way."""
    if queries.dim() != 2 or queries.shape[0] == 0:
        raise ValueError(f"queries must be a non-empty (B, d) tensor, got shape {tuple(queries.shape)}")
    if positives.shape != queries.shape:
        raise ValueError(f"positives must have the queries' shape {tuple(queries.shape)}, got {tuple(positives.shape)}")
    if negatives is None:
        return positives
    batch_size, dim = queries.shape
    if negatives.dim() != 3 or negatives.shape[0] != batch_size or negatives.shape[2] != dim:
        raise ValueError(
            f"negatives must have shape (B, H, d) = ({batch_size}, H, {dim}), got {tuple(negatives.shape)}"
        )
    if negatives.shape[1] > MAX_HARD_NEGATIVES:
        raise ValueError(
            f"at most {MAX_HARD_NEGATIVES} hard negatives per pair are supported, got {negatives.shape[1]}"
        )
    return torch.cat([positives, negatives.reshape(-1, dim)])


def _check_mask(candidate_mask: torch.Tensor, shape: tuple[int, int]) -> None:
    if candidate_mask.dtype != torch.bool or tuple(candidate_mask.shape) != shape:
        raise ValueError(
            f"candidate_mask must be a bool tensor of shape (B, B + B*H) = {shape}, "
            f"got {candidate_mask.dtype} {tuple(candidate_mask.shape)}"
        )
    if candidate_mask.diagonal().any():
        raise ValueError("candidate_mask must never mask a query's own positive (entry (i, i))")


class InfoNCELoss(torch.nn.Module):
    """Cross-entropy over cosine similarities / temperature, positive i the target of query i."""

    def __init__(self, temperature: float = 0.05, symmetric: bool = False) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number (0.02 to 0.1 is usual), got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric

    def compute_loss_from_embeddings(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        candidate_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """The mean loss over queries; `scores` are the `(B, C)` cosine similarities, detached."""
        candidates = _candidates(queries, positives, negatives)
        batch_size = queries.shape[0]
        similarities = F.normalize(at_least_fp32(queries), dim=-1) @ F.normalize(at_least_fp32(candidates), dim=-1).T
        logits = similarities / self.temperature
        masked = 0
        if candidate_mask is not None:
            _check_mask(candidate_mask, tuple(logits.shape))
            candidate_mask = candidate_mask.to(logits.device)
            logits = logits.masked_fill(candidate_mask, -math.inf)
            masked = int(candidate_mask.sum())
        targets = torch.arange(batch_size, device=logits.device)
        loss = F.cross_entropy(logits, targets)
        if self.symmetric:
            loss = (loss + F.cross_entropy(logits[:, :batch_size].T, targets)) / 2
        return LossOutput(loss=loss, masked=masked, scores=similarities.detach())

    def forward(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor | None = None,
        candidate_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        return self.compute_loss_from_embeddings(queries, positives, negatives, candidate_mask)
