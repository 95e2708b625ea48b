"""Dropout with its random mask drawn fast, for training on the CPU.

PyTorch draws a CPU dropout mask one element at a time (`bernoulli_`, about 9 ns each), and
BERT-style models drop out every attention probability, so training MiniLM on 256-token
documents spent a third of each step drawing masks. Here a mask comes from numpy's PCG64
as raw 64-bit words, each split into four 16-bit draws; an element is dropped where its
draw is below round(p * 65536), so the rate is p to within 1/65536. Kept elements are
scaled by 1 / (1 - p), as `torch.nn.Dropout` does. Each mask's seed is drawn from torch's
generator, so `torch.manual_seed` and GradCache's replay of the random state reproduce it.
Tensors under `NUMPY_MASK_MIN` elements keep torch's dropout: seeding a generator costs
more than torch spends drawing a small mask (a tiny model trained 40% slower).

`cpu_dropout(model)` swaps a model's `nn.Dropout` modules and, for models that take their
attention function from transformers' AttentionInterface, the attention dropout, for the
duration of a training loop; outside training, and off the CPU, nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_NAME = "lockstep_cpu_dropout"
_DRAWS = 1 << 16
NUMPY_MASK_MIN = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean tensor of `shape`, each element True (kept) with probability 1 - p, seeded from torch's RNG."""
    count = int(np.prod(shape))
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    words = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw(-(-count // 4))
    draws = words.view(np.uint16)[:count]
    return torch.from_numpy(draws >= np.uint16(round(p * _DRAWS))).view(shape)


def masked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`torch.nn.functional.dropout` with `keep_mask`'s mask (on the CPU, from `NUMPY_MASK_MIN` elements; otherwise
    torch's own)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or x.numel() < NUMPY_MASK_MIN:
        return torch.nn.functional.dropout(x, p, True)
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    # The scale multiplies the product, not the 0/1 mask, so a bf16 tensor is scaled in fp32 arithmetic as torch's
    # dropout scales it, not by 1 / (1 - p) rounded to bf16 first.
    return (x * keep_mask(x.shape, p).to(x.dtype)).mul_(1.0 / (1.0 - p))


class CpuDropout(torch.nn.Module):
    """`torch.nn.Dropout` (same `p`, same scaling) whose mask `keep_mask` draws."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_dropout(x, self.p, self.training)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention; with dropout in training on the CPU, the eager computation with `keep_mask`'s
    mask on the attention probabilities, otherwise transformers' SDPA attention (with the same boolean mask)."""
    if not (module.training and dropout > 0.0 and query.device.type == "cpu"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    probabilities = masked_dropout(torch.softmax(scores, dim=-1), dropout, True)
    return torch.matmul(probabilities.to(value.dtype), value).transpose(1, 2).contiguous(), None


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def cpu_dropout(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, `model` (on the CPU) draws its dropout masks with `keep_mask`; restored afterwards."""
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout:
                setattr(parent, name, CpuDropout(child.p).train(child.training))
                swapped.append((parent, name, child))
    original = model.config._attn_implementation
    attention_swapped = original in ("sdpa", "eager") and model._can_set_attn_implementation()
    if attention_swapped:
        _register()
        model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        if attention_swapped:
            model.set_attn_implementation(original)
        for parent, name, child in swapped:
            setattr(parent, name, child.train(getattr(parent, name).training))
