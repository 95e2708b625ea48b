"""Loss arithmetic in fp32 at least, whatever precision the embeddings come in.

A bf16 cosine moves in steps of 2^-8, which a temperature of 0.05 turns into steps of
0.08 in a logit; the trainer already hands the losses fp32 embeddings, and this keeps a
caller who passes bf16 ones from getting a bf16 loss and coarse gradients. float64
inputs stay float64.
"""

from __future__ import annotations

import torch


def at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in fp32, or as it is when already fp32 or wider."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
