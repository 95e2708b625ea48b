"""Pooling: turn a transformer's token outputs into one vector per text.

Mean over non-padding tokens is the default (usually best for retrieval); CLS and
max are offered because a model's own `1_Pooling/config.json` may ask for them.
The folder format is sentence-transformers' so their loader reads what we write.
Left out: weighted-mean and last-token pooling (no model we ship needs them).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import torch

from training.errors import InvalidInput

POOLING_DIR = "1_Pooling"


class Pooling(str, Enum):
    """The pooling modes Lockstep supports."""

    MEAN = "mean"
    CLS = "cls"
    MAX = "max"


_ST_KEYS = {
    Pooling.MEAN: "pooling_mode_mean_tokens",
    Pooling.CLS: "pooling_mode_cls_token",
    Pooling.MAX: "pooling_mode_max_tokens",
}


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """Pool `(batch, tokens, dim)` outputs into `(batch, dim)`, ignoring padding."""
    if mode is Pooling.CLS:
        return token_embeddings[:, 0]
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    if mode is Pooling.MEAN:
        summed = (token_embeddings * mask).sum(dim=1)
        return summed / mask.sum(dim=1).clamp(min=1e-9)
    masked = token_embeddings.masked_fill(mask == 0, torch.finfo(token_embeddings.dtype).min)
    return masked.max(dim=1).values


def read_pooling(model_dir: Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares (either format: v6's `pooling_mode`, or the
    older `pooling_mode_*_tokens` flags), or None if it declares none."""
    config_path = Path(model_dir) / POOLING_DIR / "config.json"
    if not config_path.exists():
        return None
    config = json.loads(config_path.read_text())
    if "pooling_mode" in config:
        try:
            return Pooling(config["pooling_mode"])
        except ValueError:
            raise InvalidInput(
                f"{config_path}: pooling_mode {config['pooling_mode']!r} is not supported; Lockstep supports mean, cls and max"
            ) from None
    chosen = [mode for mode, key in _ST_KEYS.items() if config.get(key)]
    unsupported = [
        key
        for key, value in config.items()
        if key.startswith("pooling_mode_") and value and key not in _ST_KEYS.values()
    ]
    if unsupported or len(chosen) != 1:
        raise InvalidInput(
            f"{config_path}: exactly one of {sorted(_ST_KEYS.values())} must be true "
            f"(found {chosen + unsupported or 'none'}); Lockstep supports mean, cls and max pooling"
        )
    return chosen[0]


def write_pooling(model_dir: Path, mode: Pooling, dim: int) -> None:
    """Write `1_Pooling/config.json` in sentence-transformers' format."""
    config = {"word_embedding_dimension": dim, "pooling_mode_mean_sqrt_len_tokens": False}
    config.update({key: mode is m for m, key in _ST_KEYS.items()})
    folder = Path(model_dir) / POOLING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
