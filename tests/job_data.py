"""A corpus, training files and a tiny-model recipe for job tests (the synthetic task of tests.training_data)."""

from __future__ import annotations

import json
from pathlib import Path

from indexer.corpus_store import CorpusStore, Document
from tests.training_data import synthetic_task

TINY_RECIPE = """
[run]
seed = 3
dev_fraction = 0.25
precision = "fp32"

[diagnostics]
collapse_max_mean_cosine = 0.99
collapse_min_dim_std = 0.001
drift_max_norm_ratio_change = 0.001  # so tight that any training fires it: reports have a fired panel to show

[[stage]]
name = "mnr"
loss = "infonce"
epochs = 6
learning_rate = 5e-4
batch_size = 16
symmetric = true
"""


def write_task(folder: Path, corpus: CorpusStore, documents: int = 80) -> dict[str, str]:
    """Ingest the synthetic documents and write its queries and qrels; returns the file paths by name."""
    task = synthetic_task(documents)
    corpus.upsert(Document(id=doc_id, title="", text=text) for doc_id, text in task.documents.items())
    folder.mkdir(parents=True, exist_ok=True)
    queries, qrels = folder / "queries.jsonl", folder / "qrels.tsv"
    queries.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in task.queries.items()))
    rows = [f"{q}\t{d}\t{g}\n" for q, judged in task.qrels.items() for d, g in judged.items()]
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(rows))
    return {"queries": str(queries), "qrels": str(qrels)}
