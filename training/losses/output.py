"""What every loss in this package returns: the loss and the numbers a trainer logs beside it.

`masked` counts the (query, candidate) pairs removed from softmax denominators as false
negatives; `scores` holds the detached similarities before any temperature, so a trainer
can watch for negatives scored above their positive without recomputing anything;
`documents` holds the batch's detached positive-document embeddings where a trainer
asked for them, for its per-batch collapse check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossOutput:
    """A scalar loss, the number of masked candidates, detached similarity scores and document embeddings (or None)."""

    loss: torch.Tensor
    masked: int = 0
    scores: torch.Tensor | None = None
    documents: torch.Tensor | None = None
