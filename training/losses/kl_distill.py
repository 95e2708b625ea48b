"""KL distillation: match the student's softmax over a candidate list to a teacher's.

For each query, a teacher (a cross-encoder, or a larger bi-encoder) scores N candidates.
The student's scores are its cosines times `scale`; both score lists become
distributions with the same temperature T, and the loss is KL(teacher || student),
averaged over queries and multiplied by T**2 so that gradient magnitudes stay
comparable across temperatures (Hinton et al.'s correction):

    p = softmax(teacher_scores / T),  log q = log_softmax(scale * cos(query, candidates) / T)
    loss = T**2 * mean_i sum_n p_in * (log p_in - log q_in)

Cosines span only [-1, 1], while a cross-encoder's logits for one query's candidates
often span 10 or more: at scale 1 the student's softmax over a few candidates is nearly
uniform however well it ranks them, and matching a peaked teacher drives it to extreme
cosines. `scale` (the student's own inverse temperature, as in InfoNCE's scale = 1/tau)
lets the student's logits reach the teacher's range at ordinary cosines.

Unlike a margin, this transfers the teacher's whole ranking of the list, including how
close the runners-up are. A teacher score of -inf excludes a candidate from the target.

Args:
    temperature: T, a positive finite number, applied to teacher and (scaled) student alike;
        1 keeps a cross-encoder's logits as they are.
    scale: multiplies the student's cosines, a positive finite number. The default 20
        (1 / 0.05, InfoNCE's usual temperature and sentence-transformers' MNR scale) gives
        logits in [-20, 20], the span of a cross-encoder's; use 1 when the teacher's scores are
        cosines themselves (a bi-encoder teacher).

References:
    - Hinton, Vinyals and Dean, 2015, "Distilling the Knowledge in a Neural Network"
      (arXiv:1503.02531).
    - Lin, Yang and Lin, 2021, "In-Batch Negatives for Knowledge Distillation with
      Tightly-Coupled Teachers for Dense Retrieval" (RepL4NLP; TCT-ColBERT): KL from a
      teacher's softmax to a bi-encoder student's over the same candidates.

Inputs:
    queries `(B, d)`, candidates `(B, N, d)` with N >= 2 (usually the positive then the
    hard negatives), teacher_scores `(B, N)` (not back-propagated). NaN, +inf, a score
    that overflows when divided by T, and a query whose scores are all -inf are refused:
    each would turn the teacher's softmax, and so the loss, into NaN.

Relations:
    - Equals sentence-transformers' DistillKLDivLoss with similarity `scale * pairwise_cos_sim`
      (theirs defaults to the dot product) and the same temperature for student and teacher,
      including the T**2 factor.
    - `MarginMSELoss` matches pairwise margins instead; `InfoNCELoss` when there is no teacher.

Warns once per loss when the teacher's softmax underflows to exactly zero for some
candidate (a collapsed teacher distribution: those candidates carry no gradient), with
the temperature that would avoid it. Left out: a separate student temperature (`scale`
is its inverse, so a second knob would only alias it).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from training.losses.fp32 import at_least_fp32
from training.losses.output import LossOutput

log = logging.getLogger(__name__)


class KLDistillationLoss(torch.nn.Module):
    """T**2 * KL(softmax(teacher / T) || softmax(scale * cos / T)), averaged over queries."""

    def __init__(self, temperature: float = 1.0, scale: float = 20.0) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number (20 for cosine students of a cross-encoder), got {scale}")
        self.temperature = temperature
        self.scale = scale
        self._warned_collapse = False

    def _warn_if_collapsed(self, teacher_scores: torch.Tensor, teacher_probs: torch.Tensor) -> None:
        if self._warned_collapse or teacher_scores.isinf().any():
            return
        collapsed = int((teacher_probs == 0).sum())
        if collapsed:
            self._warned_collapse = True
            spread = float((teacher_scores.max(dim=1).values - teacher_scores.min(dim=1).values).max())
            log.warning(
                "KLDistillationLoss: temperature %s underflows %d of %d teacher probabilities to zero, so those "
                "candidates carry no gradient (the widest row of teacher scores spans %.1f); raise the "
                "temperature above %.3g",
                self.temperature,
                collapsed,
                teacher_probs.numel(),
                spread,
                spread / 100,
            )

    def compute_loss_from_embeddings(
        self, queries: torch.Tensor, candidates: torch.Tensor, teacher_scores: torch.Tensor
    ) -> LossOutput:
        """The scaled KL divergence; `scores` are the student's `(B, N)` cosines, detached."""
        if queries.dim() != 2:
            raise ValueError(f"queries must be (B, d), got shape {tuple(queries.shape)}")
        batch_size, dim = queries.shape
        if candidates.dim() != 3 or candidates.shape[0] != batch_size or candidates.shape[2] != dim:
            raise ValueError(
                f"candidates must have shape (B, N, d) = ({batch_size}, N, {dim}), got {tuple(candidates.shape)}"
            )
        if candidates.shape[1] < 2:
            raise ValueError(
                f"need at least 2 candidates per query, got {candidates.shape[1]}: a softmax over one candidate "
                "is constant, so the loss and its gradient would be zero"
            )
        if tuple(teacher_scores.shape) != tuple(candidates.shape[:2]):
            raise ValueError(
                f"teacher_scores must have shape (B, N) = {tuple(candidates.shape[:2])}, "
                f"got {tuple(teacher_scores.shape)}"
            )
        if teacher_scores.isnan().any():
            raise ValueError("teacher_scores contain NaN, which would make the loss and every gradient NaN")
        similarities = torch.einsum("bd,bnd->bn", F.normalize(at_least_fp32(queries), dim=-1),
                                    F.normalize(at_least_fp32(candidates), dim=-1))
        dtype = similarities.dtype
        teacher_scores = teacher_scores.detach().to(dtype)
        teacher_logits = teacher_scores / self.temperature
        if teacher_logits.isposinf().any() or teacher_logits.isneginf().all(dim=1).any():
            raise ValueError(
                "teacher_scores must be finite or -inf, with at least one finite score per query, and stay finite "
                f"when divided by the temperature {self.temperature} in {dtype}; +inf or a query with no finite "
                "score makes the teacher's softmax, the loss and every gradient NaN"
            )
        student_log_probs = F.log_softmax(self.scale * similarities.to(dtype) / self.temperature, dim=1)
        teacher_probs = F.softmax(teacher_logits, dim=1)
        self._warn_if_collapsed(teacher_scores, teacher_probs)
        kl = F.kl_div(student_log_probs, teacher_probs, reduction="batchmean")
        return LossOutput(loss=kl * self.temperature**2, scores=similarities.detach())

    def forward(self, queries: torch.Tensor, candidates: torch.Tensor, teacher_scores: torch.Tensor) -> LossOutput:
        return self.compute_loss_from_embeddings(queries, candidates, teacher_scores)
