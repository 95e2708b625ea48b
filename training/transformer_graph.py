"""The transformer as a graph other runtimes take: positional tensor inputs in, one named output out.

Both runtimes that run models outside torch (ONNX Runtime for dynamic int8, OpenVINO
for fp32, bf16 and static int8) trace the same wrapper with the same inputs, so
tokenisation, length bucketing, pooling and normalisation stay in `BiEncoder` for
every runtime.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from transformers import PreTrainedModel

OUTPUT_NAME = "last_hidden_state"


class NamedOutput(torch.nn.Module):
    """The transformer with positional tensor inputs and one named output (the last hidden state, or a head's logits)."""

    def __init__(self, model: PreTrainedModel, input_names: tuple[str, ...], output: str = OUTPUT_NAME) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output = output

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**dict(zip(self.input_names, inputs))), self.output)


def input_names(model: PreTrainedModel) -> tuple[str, ...]:
    """The inputs the graph takes: ids and mask, plus token type ids if the model accepts them."""
    names = ("input_ids", "attention_mask")
    return names + ("token_type_ids",) if "token_type_ids" in inspect.signature(model.forward).parameters else names


def example_inputs(model: PreTrainedModel, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """A two-row batch whose second row is padded, so the trace follows the masked attention path."""
    device = next(model.parameters()).device
    input_ids = torch.ones((2, 8), dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}
    return tuple(tensors[name] for name in names)


def feeds(
    names: tuple[str, ...], input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """The numpy arrays a runtime is fed for `names`; token type ids default to all zero, as in single-segment encoding."""
    ids = input_ids.cpu().numpy()
    arrays = {"input_ids": ids, "attention_mask": attention_mask.cpu().numpy()}
    if "token_type_ids" in names:
        arrays["token_type_ids"] = np.zeros_like(ids) if token_type_ids is None else token_type_ids.cpu().numpy()
    return {name: arrays[name] for name in names}
