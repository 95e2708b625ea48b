"""Optimiser and learning-rate schedule shared by every trainer: AdamW, linear warmup, cosine decay.

Bias and LayerNorm weights get no weight decay, as in BERT's original recipe
(Devlin et al., 2019) and sentence-transformers' trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm", "norm.weight")


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float = 0.01, rate_factor: Callable[[str], float] | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter except biases and normalisation weights; `rate_factor`
    maps a parameter's name to a multiple of `lr` for it (1 for all when not given)."""
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"learning rate must be a positive finite number, got {lr}")
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (rate_factor(name) if rate_factor else 1.0, not any(part in name for part in NO_DECAY))
            groups.setdefault(key, []).append(param)
    return torch.optim.AdamW(
        [
            {"params": params, "lr": lr * factor, "weight_decay": weight_decay if decay else 0.0}
            for (factor, decay), params in sorted(groups.items())
        ],
        lr=lr,
    )


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup from 0 to the base rate over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}) and total_steps >= 1")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
