"""The cross-encoder teacher of a run: loaded from a folder, or trained first on the run's own pairs.

No reranker weights can be downloaded, so by default the teacher is trained here,
initialised from the packaged MiniLM, with the listwise loss over each training
query's positive and negatives mined by the current bi-encoder. Its scores are
cached on disk per teacher fingerprint, so later stages and later runs reuse them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.cross_encoder_training import CrossEncoderTrainingConfig, RerankGroup, train_cross_encoder
from training.default_model import default_model_path
from training.examples import TrainingExample
from training.mining import MiningConfig, mine_hard_negatives
from training.recipe import TeacherConfig
from training.teacher_cache import TeacherScoreCache

log = logging.getLogger(__name__)

TEACHER_DIR = "teacher"
CACHE_FILE = "teacher_scores.sqlite3"


def rerank_groups(examples: Sequence[TrainingExample]) -> list[RerankGroup]:
    return [RerankGroup(e.query, e.positive.text, tuple(n.text for n in e.negatives)) for e in examples if e.negatives]


def train_teacher(
    config: TeacherConfig,
    encoder: BiEncoder,
    examples: Sequence[TrainingExample],
    documents: Mapping[str, str],
    positives: Mapping[str, set[str]],
    out_dir: Path,
    precision: str = "fp32",
    seed: int = 13,
    show_progress: bool = False,
) -> CrossEncoder:
    """Train a cross-encoder on `examples` with negatives mined by `encoder`, save it to `out_dir`."""
    mined, report = mine_hard_negatives(
        encoder, examples, documents, positives,
        MiningConfig(count=config.negatives, window_start=0, window_end=50, margin=0.0, seed=seed),
        precision=precision, show_progress=show_progress,
    )
    log.info("teacher training data: %s", report.as_dict())
    teacher = CrossEncoder.load(
        config.init or default_model_path(), max_length=config.max_length, seed=seed, device=str(encoder.device)
    )
    training = CrossEncoderTrainingConfig(
        loss=config.loss, epochs=config.epochs, learning_rate=config.learning_rate, batch_size=config.batch_size,
        precision=precision, seed=seed,
    )
    train_cross_encoder(teacher, rerank_groups(mined), training, show_progress=show_progress)
    teacher.save(out_dir)
    return teacher


def obtain_teacher(
    config: TeacherConfig,
    encoder: BiEncoder,
    examples: Sequence[TrainingExample],
    documents: Mapping[str, str],
    positives: Mapping[str, set[str]],
    run_dir: Path,
    precision: str,
    show_progress: bool,
    seed: int,
) -> tuple[CrossEncoder, TeacherScoreCache]:
    """The configured teacher (trained into `<run_dir>/teacher` with the run's `seed` if none is given) and its
    score cache."""
    if config.model:
        teacher = CrossEncoder.load(config.model, max_length=config.max_length, device=str(encoder.device))
    else:
        teacher = train_teacher(config, encoder, examples, documents, positives, run_dir / TEACHER_DIR, precision,
                                seed=seed, show_progress=show_progress)
    return teacher, TeacherScoreCache(run_dir / CACHE_FILE)
