"""Hard-negative mining with the current model: candidates from a rank window, false negatives filtered out.

For each training query the corpus is searched exactly (FAISS inner product over unit
vectors); candidates ranked inside `[window_start, window_end)` are kept unless they
are known positives, score too close to the positive (absolute margin, or relative
margin as a share of the positive's score; neither set, no such filter), or, with a
cross-encoder teacher, are scored by the teacher within `teacher_margin` of the
positive. The survivors are sampled with a seed. Every candidate is counted once, as
dropped (by reason), kept, or not needed (a survivor beyond `count`), so the counts add
up to the candidates looked at. Drops are counted by reason because a high rate of
too-close candidates is itself a sign of false negatives in the data (Qu et al.,
2021, "RocketQA"; Moreira et al., 2024, "NV-Retriever: Improving text embedding
models with effective hard-negative mining").
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.examples import TrainingExample
from training.losses import Candidate
from training.precision import autocast
from training.stage import DEFAULT_MINE_MARGIN
from training.teacher_cache import TeacherScoreCache


@dataclass(frozen=True)
class MiningConfig:
    count: int = 3
    window_start: int = 10
    window_end: int = 100
    margin: float | None = DEFAULT_MINE_MARGIN
    relative_margin: float | None = None
    teacher_margin: float | None = None
    seed: int = 13


@dataclass(frozen=True)
class MiningReport:
    """How many candidates were looked at and why the dropped ones were dropped.

    candidates = dropped_known_positive + dropped_too_close + dropped_by_teacher + kept + not_needed.
    """

    examples: int
    candidates: int
    dropped_known_positive: int
    dropped_too_close: int
    dropped_by_teacher: int
    kept: int
    not_needed: int
    examples_short_of_negatives: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def mine_hard_negatives(
    encoder: BiEncoder,
    examples: Sequence[TrainingExample],
    documents: Mapping[str, str],
    known_positives: Mapping[str, set[str]],
    config: MiningConfig,
    *,
    teacher: CrossEncoder | None = None,
    teacher_cache: TeacherScoreCache | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    show_progress: bool = False,
) -> tuple[list[TrainingExample], MiningReport]:
    """Return the examples with up to `config.count` mined negatives each, and the report."""
    doc_ids = list(documents)
    with autocast(precision, encoder.device):
        doc_vectors = encoder.encode([documents[d] for d in doc_ids], "document", batch_size=batch_size, show_progress=show_progress)
        query_vectors = encoder.encode([e.query for e in examples], "query", batch_size=batch_size, show_progress=False)
        positive_vectors = encoder.encode([e.positive.text for e in examples], "document", batch_size=batch_size, show_progress=False)
    index = faiss.IndexFlatIP(doc_vectors.shape[1])
    index.add(doc_vectors)
    depth = min(config.window_end, len(doc_ids))
    scores, rows = index.search(query_vectors, depth)
    positive_scores = np.sum(query_vectors * positive_vectors, axis=1)
    limits = _student_limits(positive_scores, config)
    rng = random.Random(config.seed)
    counts = {"candidates": 0, "known": 0, "close": 0, "teacher": 0, "kept": 0, "not_needed": 0, "short": 0}
    mined: list[TrainingExample] = []
    for i, example in enumerate(examples):
        positives = known_positives.get(example.query_id, set()) | {example.positive.doc_id}
        survivors = []
        for rank in range(config.window_start, depth):
            doc_id = doc_ids[rows[i, rank]]
            counts["candidates"] += 1
            if doc_id in positives or documents[doc_id].strip() == example.positive.text.strip():
                counts["known"] += 1
                continue
            if scores[i, rank] > limits[i]:
                counts["close"] += 1
                continue
            survivors.append(Candidate(doc_id, documents[doc_id]))
        rng.shuffle(survivors)
        sampled = survivors[: config.count * 3 if teacher else config.count]
        counts["not_needed"] += len(survivors) - len(sampled)
        mined.append(example.with_negatives(sampled))
    if teacher is not None:
        with autocast(precision, teacher.device):
            mined = _filter_with_teacher(mined, teacher, teacher_cache, config, counts)
    for example in mined:
        counts["kept"] += len(example.negatives)
        counts["short"] += len(example.negatives) < config.count
    report = MiningReport(
        examples=len(examples),
        candidates=counts["candidates"],
        dropped_known_positive=counts["known"],
        dropped_too_close=counts["close"],
        dropped_by_teacher=counts["teacher"],
        kept=counts["kept"],
        not_needed=counts["not_needed"],
        examples_short_of_negatives=counts["short"],
    )
    return mined, report


def _student_limits(positive_scores: np.ndarray, config: MiningConfig) -> np.ndarray:
    """Per example, the score a candidate must not exceed: the positive's score less the margin, or less the
    relative margin's share of it if that is lower; no limit where neither margin is set."""
    limits = np.full(len(positive_scores), np.inf, dtype=np.float64)
    if config.margin is not None:
        limits = positive_scores - config.margin
    if config.relative_margin is not None:
        limits = np.minimum(limits, positive_scores * (1 - config.relative_margin))
    return limits


def score_with_teacher(
    teacher: CrossEncoder, examples: Sequence[TrainingExample], cache: TeacherScoreCache | None
) -> list[np.ndarray]:
    """Teacher scores per example: the positive first, then each negative."""
    pairs = [(e.query, text) for e in examples for text in (e.positive.text, *(n.text for n in e.negatives))]
    flat = cache.get_or_score(teacher, pairs) if cache is not None else teacher.score(pairs)
    out, start = [], 0
    for example in examples:
        width = 1 + len(example.negatives)
        out.append(np.asarray(flat[start : start + width], dtype=np.float32))
        start += width
    return out


def _filter_with_teacher(
    examples: list[TrainingExample],
    teacher: CrossEncoder,
    cache: TeacherScoreCache | None,
    config: MiningConfig,
    counts: dict[str, int],
) -> list[TrainingExample]:
    margin = config.teacher_margin if config.teacher_margin is not None else 0.0
    filtered = []
    for example, scores in zip(examples, score_with_teacher(teacher, examples, cache)):
        keep = [(n, s) for n, s in zip(example.negatives, scores[1:]) if s < scores[0] - margin]
        counts["teacher"] += len(example.negatives) - len(keep)
        counts["not_needed"] += max(0, len(keep) - config.count)
        keep = keep[: config.count]
        filtered.append(example.with_negatives([n for n, _ in keep]).with_teacher_scores([scores[0], *(s for _, s in keep)]))
    return filtered
