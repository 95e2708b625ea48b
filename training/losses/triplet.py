"""Triplet loss on cosine similarity: the positive must beat each negative by a margin.

For an anchor a, its positive p and a negative n:

    loss(a, p, n) = max(0, margin - (cos(a, p) - cos(a, n)))

averaged over every (anchor, negative) triplet in the batch. Triplets already
separated by the margin contribute nothing, so the loss only trains on violations.

Args:
    margin: how much higher the positive's cosine must be, a non-negative finite number
        (cosines lie in [-1, 1], so margins above 2 can never be met).

References:
    - Schroff, Kalenichenko and Philbin, 2015, "FaceNet: A Unified Embedding for Face
      Recognition and Clustering" (arXiv:1503.03832).

Inputs:
    anchors `(B, d)`, positives `(B, d)`, negatives `(B, d)` or `(B, H, d)`; embeddings need
    not be normalised.

Relations:
    - Equals sentence-transformers' TripletLoss with TripletDistanceMetric.COSINE
      (distance 1 - cos) and triplet_margin = margin; H negatives count as H triplets.
    - `InfoNCELoss` uses every other row as a negative too and is usually more
      sample-efficient; use this loss for explicit triplets with a margin to enforce.

Left out: Euclidean and Manhattan distances and batch-hard/semi-hard mining.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.losses.fp32 import at_least_fp32
from training.losses.output import LossOutput


class TripletLoss(torch.nn.Module):
    """Mean hinge on margin - (cos(anchor, positive) - cos(anchor, negative))."""

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a non-negative finite number (0.1 to 0.5 is usual), got {margin}")
        self.margin = margin

    def compute_loss_from_embeddings(
        self, anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor
    ) -> LossOutput:
        """The mean loss; `scores` are `(B, 1 + H)` cosines: the positive first, then the negatives."""
        if anchors.dim() != 2 or positives.shape != anchors.shape:
            raise ValueError(
                "anchors and positives must both be (B, d) with the same shape, got "
                f"{tuple(anchors.shape)} and {tuple(positives.shape)}"
            )
        if negatives.dim() == 2:
            negatives = negatives.unsqueeze(1)
        batch_size, dim = anchors.shape
        if negatives.dim() != 3 or negatives.shape[::2] != (batch_size, dim) or not negatives.shape[1]:
            raise ValueError(
                f"negatives must have shape (B, d) or (B, H, d) with B = {batch_size}, d = {dim}, H >= 1, "
                f"got {tuple(negatives.shape)}"
            )
        anchors = F.normalize(at_least_fp32(anchors), dim=-1)
        positive_scores = (anchors * F.normalize(at_least_fp32(positives), dim=-1)).sum(dim=-1)
        negative_scores = torch.einsum("bd,bhd->bh", anchors, F.normalize(at_least_fp32(negatives), dim=-1))
        loss = F.relu(self.margin - (positive_scores.unsqueeze(1) - negative_scores)).mean()
        scores = torch.cat([positive_scores.unsqueeze(1), negative_scores], dim=1).detach()
        return LossOutput(loss=loss, scores=scores)

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        return self.compute_loss_from_embeddings(anchors, positives, negatives)
