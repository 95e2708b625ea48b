"""Running a recipe end to end: split, evaluate the base model, train each stage behind its gate, save.

Inputs are plain mappings (queries, qrels, document texts) so the caller decides where
they come from (BEIR files, uploaded pairs, the corpus store). Each stage starts from
the previous stage's best weights and keeps only improvements on dev nDCG@10: a
stage that does not beat its starting point is rolled back and reported as gated.
The run directory gets the metrics log, the recipe, the mining reports, each stage's
best checkpoint (`checkpoints/<stage>/`, sentence-transformers layout) and a summary
with the last diagnostics and the remedies of any alert that fired.

Under torchrun every process runs this function; the first alone evaluates, mines,
trains the teacher and writes, and hands what it computed to the others (see
`training.distributed`), so the folders look as they do after a single-process run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from training import distributed
from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.dev_eval import DevSet
from training.diagnostics import Thresholds, alert_dicts, alerts_for
from training.eval_data import split_judged
from training.examples import (
    TrainingExample,
    examples_from_qrels,
    known_positives,
    with_given_negatives,
)
from training.metrics_log import METRICS_FILE, MetricsLog
from training.mining import MiningConfig, MiningReport, mine_hard_negatives
from training.precision import resolve_training
from training.recipe import Recipe, TeacherConfig
from training.stage import StageConfig
from training.sts import load_sts
from training.teacher import obtain_teacher
from training.teacher_cache import TeacherScoreCache
from training.trainer import Progress, TrainingContext, train_stage

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class TrainingData:
    """Queries, their judgements, the corpus texts (doc id -> title and text as the encoder sees it)
    and the negatives given with the pairs (query id -> doc ids), which stages with `negatives = "given"` train on."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    documents: dict[str, str]
    negatives: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_examples(cls, examples: list[TrainingExample]) -> TrainingData:
        """Treat pairs/triplets as judgements: each positive is relevant, every text is a document, and each
        negative stays a negative of its query unless another pair names it a positive of that query."""
        documents = {}
        for e in examples:
            documents[e.positive.doc_id] = e.positive.text
            documents.update((n.doc_id, n.text) for n in e.negatives)
        qrels: dict[str, dict[str, int]] = {}
        for e in examples:
            qrels.setdefault(e.query_id, {})[e.positive.doc_id] = 1
        negatives: dict[str, dict[str, None]] = {}
        for e in examples:
            negatives.setdefault(e.query_id, {}).update((n.doc_id, None) for n in e.negatives if n.doc_id not in qrels[e.query_id])
        given = {query_id: tuple(ids) for query_id, ids in negatives.items() if ids}
        return cls({e.query_id: e.query for e in examples}, qrels, documents, given)


@dataclass
class _Miner:
    """Hard negatives for a stage, mined with the encoder's current weights; the teacher is obtained once, when first needed."""

    encoder: BiEncoder
    examples: list[TrainingExample]
    documents: dict[str, str]
    positives: dict[str, set[str]]
    teacher_config: TeacherConfig | None
    run_dir: Path
    precision: str
    seed: int
    show_progress: bool
    teacher: tuple[CrossEncoder, TeacherScoreCache] | None = None

    def mine(self, stage: StageConfig) -> tuple[list[TrainingExample], MiningReport]:
        use_teacher = stage.negatives == "teacher"
        if use_teacher and self.teacher is None:
            self.teacher = obtain_teacher(
                self.teacher_config, self.encoder, self.examples, self.documents, self.positives,
                self.run_dir, self.precision, self.show_progress, self.seed,
            )
        teacher, cache = self.teacher if use_teacher else (None, None)
        return mine_hard_negatives(
            self.encoder, self.examples, self.documents, self.positives,
            MiningConfig(
                count=stage.hard_negatives, window_start=stage.mine_window_start, window_end=stage.mine_window_end,
                margin=stage.student_margin(), relative_margin=stage.mine_relative_margin,
                teacher_margin=stage.mine_teacher_margin, seed=self.seed,
            ),
            teacher=teacher, teacher_cache=cache, precision=self.precision, show_progress=self.show_progress,
        )


@dataclass
class RunSummary:
    """What a run produced."""

    model_dir: str
    run_dir: str
    precision: str
    base: dict
    final: dict
    stages: list[dict] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    dev_queries: int = 0
    train_examples: int = 0


def fine_tune(
    model_path: str | Path,
    data: TrainingData,
    recipe: Recipe,
    out_dir: str | Path,
    run_dir: str | Path,
    *,
    show_progress: bool = False,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    thresholds: Thresholds | None = None,
    device: str = "cpu",
) -> RunSummary:
    """Fine-tune the bi-encoder at `model_path` with `recipe` on `device` (each process's own under torchrun);
    the best model is saved to `out_dir`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    main = distributed.is_main()
    show_progress, progress = show_progress and main, progress if main else None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    encoder = BiEncoder.load(model_path, device=str(distributed.device(device)))
    precision = resolve_training(recipe.run.precision, encoder.device)
    train_ids, dev_ids = split_judged(data.qrels, recipe.run.dev_fraction, recipe.run.seed)
    train_qrels = {q: data.qrels[q] for q in train_ids}
    dev_qrels = {q: data.qrels[q] for q in dev_ids}
    examples = with_given_negatives(examples_from_qrels(data.queries, train_qrels, data.documents), data.negatives, data.documents)
    if main and data.negatives and not any(stage.negatives == "given" for stage in recipe.stages):
        log.warning("%d queries bring negatives of their own, which recipe %s does not train on; use the shipped "
                    "'triplets' recipe or add a stage with negatives = \"given\"", len(data.negatives), recipe.source)
    positives = known_positives(examples, data.qrels)
    sts = load_sts(recipe.run.sts_probe) if recipe.run.sts_probe else None
    dev = DevSet.build(
        data.queries, dev_qrels, train_qrels, data.documents,
        seed=recipe.run.seed, corpus_limit=recipe.run.dev_corpus_limit, train_probe=recipe.run.train_probe, sts=sts,
    )
    if main:
        (run_dir / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2, default=str))
        (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a rerun into the same folder starts its own log
    ctx = TrainingContext(
        encoder=encoder, log=MetricsLog(run_dir) if main else None, dev=dev, known_positives=positives, precision=precision,
        seed=recipe.run.seed, thresholds=thresholds or recipe.diagnostics, eval_batch_size=recipe.run.eval_batch_size,
        show_progress=show_progress, progress=progress, should_stop=should_stop,
    )
    base = ctx.evaluate()
    ctx.baseline = base
    ctx.record("eval", stage="base", step=0, global_step=0, **base)
    if main:
        log.info("base model: dev nDCG@10 %.4f on %d queries", base["ndcg@10"], len(dev.queries))
    miner = _Miner(encoder, examples, data.documents, positives, recipe.teacher, run_dir, precision, recipe.run.seed, show_progress)
    current = base
    stages = []
    for stage in recipe.stages:
        stage_examples = examples
        if stage.negatives in ("mined", "teacher"):
            stage_examples, report = distributed.from_main(lambda: miner.mine(stage))
            ctx.record("mining", stage=stage.name, **report.as_dict())
        result = train_stage(ctx, stage_examples, stage, current)
        if main:
            encoder.save(run_dir / CHECKPOINTS_DIR / stage.name)
        gated = result.best_step == 0
        stages.append({"name": stage.name, "steps": result.steps, "best_step": result.best_step, "gated": gated,
                       "stopped_early": result.stopped_early, "examples": result.examples_used,
                       "ndcg@10": result.best.get("ndcg@10")})
        ctx.record("stage", **stages[-1])
        if gated and main:
            log.warning("stage %s did not improve dev nDCG@10 (%.4f); rolled back", stage.name, current.get("ndcg@10", 0.0))
        current = result.best
    alerts = alert_dicts(alerts_for(current, base, ctx.thresholds))
    summary = RunSummary(str(out_dir), str(run_dir), precision, base, current, stages, alerts, len(dev.queries), len(examples))
    if main:
        encoder.save(out_dir)
        ctx.record("summary", **asdict(summary))
        (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    distributed.barrier()
    return summary

