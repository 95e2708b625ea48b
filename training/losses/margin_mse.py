"""MarginMSE: regress the student's score margin onto a teacher's (cross-architecture distillation).

A teacher (usually a cross-encoder) scores each (query, positive) and (query, negative)
pair; its margin, teacher(q, p) - teacher(q, n), says how much better the positive is.
The student bi-encoder's margin is `scale * (cos(q, p) - cos(q, n))`, and the loss is the
mean squared error between the two over every (query, negative):

    loss = mean_{i, h} (scale * (cos(q_i, p_i) - cos(q_i, n_ih)) - teacher_margin_ih) ** 2

Only margins are matched, never absolute scores, so teacher and student may live on
different scales; `scale` maps cosine differences (within [-2, 2]) to the teacher's units.

Args:
    scale: multiplies the student's cosine margin, a positive finite number (1.0 when the
        teacher's margins are already cosine-like; larger for cross-encoder logits).

References:
    - Hofstätter et al., 2020, "Improving Efficient Neural Ranking Models with
      Cross-Architecture Knowledge Distillation" (arXiv:2010.02666).

Inputs:
    queries `(B, d)`, positives `(B, d)`, negatives `(B, H, d)` with H >= 1, teacher_margins
    `(B, H)` = teacher score of the positive minus that of each negative (not back-propagated).

Relations:
    - Equals sentence-transformers' MarginMSELoss with similarity
      `scale * pairwise_cos_sim` (theirs defaults to the dot product).
    - `KLDistillationLoss` matches the teacher's whole softmax over the candidates instead
      of pairwise margins; `InfoNCELoss` when there is no teacher.

Left out: dot-product similarity, and teacher scores given as (positive, negatives...)
columns (subtract them before calling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.losses.fp32 import at_least_fp32
from training.losses.output import LossOutput


class MarginMSELoss(torch.nn.Module):
    """Mean squared error between student and teacher score margins."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        self.scale = scale

    def compute_loss_from_embeddings(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        teacher_margins: torch.Tensor,
    ) -> LossOutput:
        """The mean squared margin error; `scores` are `(B, 1 + H)` cosines, positive first."""
        if queries.dim() != 2 or positives.shape != queries.shape:
            raise ValueError(
                "queries and positives must both be (B, d) with the same shape, got "
                f"{tuple(queries.shape)} and {tuple(positives.shape)}"
            )
        batch_size, dim = queries.shape
        if negatives.dim() != 3 or negatives.shape[::2] != (batch_size, dim) or not negatives.shape[1]:
            raise ValueError(
                f"negatives must have shape (B, H, d) with B = {batch_size}, d = {dim}, H >= 1, "
                f"got {tuple(negatives.shape)}"
            )
        if tuple(teacher_margins.shape) != tuple(negatives.shape[:2]):
            raise ValueError(
                f"teacher_margins must have shape (B, H) = {tuple(negatives.shape[:2])}, one margin per negative, "
                f"got {tuple(teacher_margins.shape)}"
            )
        queries = F.normalize(at_least_fp32(queries), dim=-1)
        positive_scores = (queries * F.normalize(at_least_fp32(positives), dim=-1)).sum(dim=-1)
        negative_scores = torch.einsum("bd,bhd->bh", queries, F.normalize(at_least_fp32(negatives), dim=-1))
        student_margins = self.scale * (positive_scores.unsqueeze(1) - negative_scores)
        loss = F.mse_loss(student_margins, teacher_margins.detach().to(student_margins.dtype))
        scores = torch.cat([positive_scores.unsqueeze(1), negative_scores], dim=1).detach()
        return LossOutput(loss=loss, scores=scores)

    def forward(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        teacher_margins: torch.Tensor,
    ) -> LossOutput:
        return self.compute_loss_from_embeddings(queries, positives, negatives, teacher_margins)
