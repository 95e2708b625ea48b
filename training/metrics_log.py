"""The per-step metrics log of a training run: one JSON object per line, flushed as written.

Lines carry `"type"`: `step` (loss, learning rate, masked false negatives, ...),
`eval` (dev metrics and failure-mode signals), `alert`, `stage` (a stage's outcome)
and `summary`. The report and the job progress read the same file.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends records to `<run_dir>/metrics.jsonl`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields) -> dict:
        record = {"type": kind, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return record


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
