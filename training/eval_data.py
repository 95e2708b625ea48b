"""Reading evaluation inputs: BEIR queries (JSONL) and qrels (TSV or TREC), and dev splits.

Errors name the file and line. The dev split is seeded and independent of file
order, so the same seed always holds out the same queries.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

from training.errors import InvalidInput
from training.input_file import read_jsonl, read_lines
from training.utf8 import require_utf8


def load_queries(path: str | Path) -> dict[str, str]:
    """`{query_id: text}` from a JSONL file of `{"_id" or "id", "text"}` objects."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file; pass a queries JSONL file such as BEIR's queries.jsonl")
    return dict(query for _, query in read_jsonl(path, _query))


def _query(obj: object) -> tuple[str, str]:
    """`(query id, text)` from one queries line."""
    query_id = obj.get("_id", obj.get("id")) if isinstance(obj, dict) else None
    text = obj.get("text") if isinstance(obj, dict) else None
    if query_id is None or not isinstance(text, str) or not text.strip():
        raise InvalidInput('a query needs an "_id" (or "id") and a non-empty "text"')
    return str(query_id), require_utf8(text, "the query's text")


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """`{query_id: {doc_id: relevance}}` from BEIR TSV (`query-id corpus-id score`) or TREC (`qid 0 docid rel`)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file; pass a qrels file such as BEIR's qrels/train.tsv")
    qrels: dict[str, dict[str, int]] = {}
    for number, line in read_lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        if number == 1 and fields[0].lower() in {"query-id", "query_id", "qid"}:
            continue
        if len(fields) == 4:
            fields = [fields[0], fields[2], fields[3]]
        if len(fields) != 3:
            raise InvalidInput(f"{path}:{number}: expected `query-id<TAB>corpus-id<TAB>score`, got {len(fields)} fields")
        query_id, doc_id, score = fields
        try:
            relevance = int(float(score))
        except (ValueError, OverflowError) as exc:
            raise InvalidInput(f"{path}:{number}: relevance {score!r} is not a finite number") from exc
        qrels.setdefault(query_id, {})[doc_id] = relevance
    if not qrels:
        raise InvalidInput(f"{path}: the file holds no judgements")
    return qrels


def split_judged(qrels: Mapping[str, Mapping[str, int]], dev_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """`split_queries` over the queries with at least one relevant document: one judged only non-relevant scores 0
    on every metric whatever the model does, so in a dev split it would only dilute the gate and early stopping
    (BEIR and MTEB leave such queries out too)."""
    return split_queries([q for q, labels in qrels.items() if any(g > 0 for g in labels.values())], dev_fraction, seed)


def split_queries(query_ids: list[str], dev_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split query ids into (train, dev) with a seeded shuffle; dev gets `dev_fraction` of them."""
    if not 0.0 < dev_fraction < 1.0:
        raise InvalidInput(f"split fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    ordered = sorted(set(query_ids))
    random.Random(seed).shuffle(ordered)
    dev_size = max(1, round(len(ordered) * dev_fraction))
    return sorted(ordered[dev_size:]), sorted(ordered[:dev_size])
