"""STS Benchmark pairs as an out-of-domain probe: Spearman of cosine vs gold similarity.

Files are tab-separated with unbalanced quotes, so lines are split on tabs with no
CSV quoting (genre, file, year, id, score, sentence1, sentence2[, source, source]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.bi_encoder import BiEncoder
from training.diagnostics import spearman
from training.errors import InvalidInput


@dataclass(frozen=True)
class StsPair:
    first: str
    second: str
    score: float


def load_sts(path: str | Path) -> list[StsPair]:
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file; pass an STS Benchmark file such as sts-dev.csv")
    pairs = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 7:
                raise InvalidInput(f"{path}:{number}: expected at least 7 tab-separated fields, got {len(fields)}")
            try:
                score = float(fields[4])
            except ValueError as exc:
                raise InvalidInput(f"{path}:{number}: score {fields[4]!r} is not a number") from exc
            pairs.append(StsPair(fields[5], fields[6], score))
    return pairs


def sts_spearman(encoder: BiEncoder, pairs: list[StsPair], batch_size: int = 64) -> float:
    """Spearman correlation between cosine similarity and the gold scores."""
    first = encoder.encode([p.first for p in pairs], "query", batch_size=batch_size, show_progress=False)
    second = encoder.encode([p.second for p in pairs], "query", batch_size=batch_size, show_progress=False)
    return spearman(np.sum(first * second, axis=1).tolist(), [p.score for p in pairs])
