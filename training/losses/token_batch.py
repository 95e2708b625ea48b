"""A padded batch of token ids with its attention mask: what an encoder's `embed` reads.

Losses that embed for themselves (gradient caching) take these instead of untyped dicts.
A batch of hard negatives holds B*H rows, row-major: query i's H negatives are rows
i*H .. i*H+H-1, the order `false_negative_mask` uses for candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenBatch:
    """`input_ids` and `attention_mask`, both `(rows, tokens)`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                "input_ids and attention_mask must both be (rows, tokens) with the same shape, got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> TokenBatch:
        """Rows `start:stop`, keeping the batch's padding width."""
        return TokenBatch(self.input_ids[start:stop], self.attention_mask[start:stop])
