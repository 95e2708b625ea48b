"""Contrastive and distillation losses, one per module; each separates its maths from embedding."""

from training.losses.cached_infonce import CachedInfoNCELoss
from training.losses.false_negatives import (
    Candidate,
    false_negative_mask,
    relative_teacher_scores,
)
from training.losses.infonce import MAX_HARD_NEGATIVES, InfoNCELoss
from training.losses.kl_distill import KLDistillationLoss
from training.losses.margin_mse import MarginMSELoss
from training.losses.output import LossOutput
from training.losses.token_batch import TokenBatch
from training.losses.triplet import TripletLoss

__all__ = [
    "MAX_HARD_NEGATIVES",
    "CachedInfoNCELoss",
    "Candidate",
    "InfoNCELoss",
    "KLDistillationLoss",
    "LossOutput",
    "MarginMSELoss",
    "TokenBatch",
    "TripletLoss",
    "false_negative_mask",
    "relative_teacher_scores",
]
