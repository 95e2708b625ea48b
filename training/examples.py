"""Training examples: a query, its positive document and optional hard negatives.

Read from pairs/triplets JSONL or built from BEIR queries + qrels + corpus. Each
line of a JSONL file is one of
`{"query": str, "positive": str, "negatives": [str, ...]}` (ids optional:
`"query_id"`, `"positive_id"`, `"negative_ids"`), or sentence-transformers'
triplet columns `{"anchor": str, "positive": str, "negative": str}`. Errors name
the file and line. Documents carry ids so false negatives can be recognised. The
negatives a file gives are trained on by stages with `negatives = "given"`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from training.errors import InvalidInput
from training.input_file import read_jsonl
from training.losses.false_negatives import Candidate
from training.utf8 import require_utf8


@dataclass(frozen=True)
class TrainingExample:
    """One query with one positive document, zero or more hard negatives, and optional teacher scores.

    `teacher_scores`, when present, holds the teacher's score of the positive followed
    by one score per negative (for MarginMSE and KL distillation).
    """

    query_id: str
    query: str
    positive: Candidate
    negatives: tuple[Candidate, ...] = ()
    teacher_scores: tuple[float, ...] = ()

    def with_negatives(self, negatives: Sequence[Candidate]) -> TrainingExample:
        return replace(self, negatives=tuple(negatives), teacher_scores=())

    def with_teacher_scores(self, scores: Sequence[float]) -> TrainingExample:
        if len(scores) != 1 + len(self.negatives):
            raise ValueError(f"need {1 + len(self.negatives)} teacher scores (positive, then negatives), got {len(scores)}")
        return replace(self, teacher_scores=tuple(float(s) for s in scores))


def _text_id(text: str) -> str:
    return "text:" + hashlib.sha256(text.strip().encode()).hexdigest()[:16]


def _parse_line(obj: object) -> TrainingExample:
    if not isinstance(obj, dict):
        raise InvalidInput("expected a JSON object")
    query = obj.get("query", obj.get("anchor"))
    positive = obj.get("positive")
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput('needs a non-empty "query" (or "anchor") string')
    if not isinstance(positive, str) or not positive.strip():
        raise InvalidInput('needs a non-empty "positive" string')
    negatives = obj.get("negatives", [obj["negative"]] if "negative" in obj else [])
    if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
        raise InvalidInput('"negatives" must be a list of non-empty strings')
    for what, text in (("query", query), ("positive", positive), *((f"negative {i}", n) for i, n in enumerate(negatives))):
        require_utf8(text, what)
    negative_ids = obj.get("negative_ids") or [_text_id(n) for n in negatives]
    if not isinstance(negative_ids, list) or len(negative_ids) != len(negatives):
        raise InvalidInput('"negative_ids" must be a list with one id per negative')
    return TrainingExample(
        query_id=str(obj.get("query_id") or _text_id(query)),
        query=query,
        positive=Candidate(str(obj.get("positive_id") or _text_id(positive)), positive),
        negatives=tuple(Candidate(str(i), t) for i, t in zip(negative_ids, negatives)),
    )


def load_pairs(path: str | Path) -> list[TrainingExample]:
    """Examples from a pairs/triplets JSONL file; raises InvalidInput as `file:line: problem`."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file; pass a JSONL file of query/positive pairs")
    examples = [example for _, example in read_jsonl(path, _parse_line)]
    if not examples:
        raise InvalidInput(f"{path}: the file holds no training pairs")
    return examples


def examples_from_qrels(
    queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]], documents: Mapping[str, str]
) -> list[TrainingExample]:
    """One example per (query, relevant document) judgement; `documents` maps doc id to embedding text."""
    examples = []
    missing = 0
    for query_id in sorted(qrels):
        if query_id not in queries:
            missing += 1
            continue
        for doc_id, relevance in sorted(qrels[query_id].items()):
            if relevance > 0 and doc_id in documents:
                examples.append(TrainingExample(query_id, queries[query_id], Candidate(doc_id, documents[doc_id])))
    if not examples:
        raise InvalidInput(
            "no training pairs: none of the judged query/document ids were found in the queries and corpus files"
        )
    return examples


def with_given_negatives(
    examples: Sequence[TrainingExample], negatives: Mapping[str, Sequence[str]], documents: Mapping[str, str]
) -> list[TrainingExample]:
    """Each example with the negatives given for its query (doc ids into `documents`), so that stages with
    `negatives = "given"` train on them; examples of queries without given negatives are unchanged."""
    missing = sorted({doc_id for ids in negatives.values() for doc_id in ids if doc_id not in documents})
    if missing:
        raise InvalidInput(f"given negatives {missing[:5]} are not in the documents; add their texts to the corpus")
    return [
        e.with_negatives([Candidate(doc_id, documents[doc_id]) for doc_id in negatives[e.query_id]])
        if negatives.get(e.query_id) else e
        for e in examples
    ]


def known_positives(examples: Sequence[TrainingExample], qrels: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, set[str]]:
    """Every document known to be relevant to each query (from the examples and, if given, the qrels)."""
    positives: dict[str, set[str]] = {}
    for example in examples:
        positives.setdefault(example.query_id, set()).add(example.positive.doc_id)
    for query_id, labels in (qrels or {}).items():
        positives.setdefault(query_id, set()).update(doc_id for doc_id, rel in labels.items() if rel > 0)
    return positives
