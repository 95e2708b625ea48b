"""Confine the files an HTTP job may name to configured folders, so the API cannot be used to read the server's disk.

A job's paths (training data, corpus, model, dev set) must resolve, symlinks
followed, inside the data dir or one of `LOCKSTEP_TRAINING_ROOTS`; anything else
is refused before the job is recorded, and the refusal names the allowed folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from training.errors import InvalidInput

PATH_PARAMS = ("pairs", "queries", "qrels", "corpus", "model", "dev_queries", "dev_qrels")


def confine_paths(params: dict, roots: Sequence[Path]) -> None:
    """Raise InvalidInput for the first path parameter that lies outside every root."""
    allowed = [root.resolve() for root in roots]
    for key in PATH_PARAMS:
        value = params.get(key)
        if not isinstance(value, str) or not value:
            continue
        try:
            path = Path(value).resolve()
        except (ValueError, OSError) as exc:
            raise InvalidInput(f"{key}: {value!r} is not a usable path ({exc})") from exc
        if not any(path.is_relative_to(root) for root in allowed):
            folders = ", ".join(str(root) for root in allowed)
            raise InvalidInput(f"{key}: {value} is outside the folders jobs may read ({folders}); move the file "
                               "there, send the data inline, or add its folder to LOCKSTEP_TRAINING_ROOTS")
