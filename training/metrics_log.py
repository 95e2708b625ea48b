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

from training.errors import InvalidInput

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
    """The records of a run's log, in order. A last line cut short (the run was killed while writing it) is left
    out; a damaged line before it is InvalidInput naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n"),
                                                         start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if position == len(lines) - 1:
                break
            raise InvalidInput(f"{path}:{number}: not a JSON record ({exc.msg}); the log is damaged") from exc
    return records
