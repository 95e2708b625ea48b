"""The bi-encoder trainer: one stage of contrastive training with evaluation, early stopping and diagnostics.

AdamW with linear warmup then cosine decay, gradient clipping, bf16 autocast where the
hardware supports it, dropout masks drawn fast on the CPU (`training.fast_dropout`),
seeded batches without duplicates, false negatives masked inside the loss (with a
teacher threshold, also the hard negatives a teacher scores close to the positive). The sampler defers clashing examples, so the number of batches
differs between epochs: every epoch's count is taken before training, so the schedule
ends exactly at the last step and an evaluation lands on the last step of each epoch.
The dev set is also evaluated every `eval_every` steps; the best weights are kept and
restored at the end, training stops early after `patience` evaluations without
improvement, and a run whose embeddings collapse for `collapse_patience` evaluations
in a row, or for `collapse_step_patience` training batches in a row (a fast collapse
between evaluations), or whose loss is not finite, is aborted with the best weights restored.
Every step and evaluation is appended to the run's metrics log.

Under torchrun (see `training.distributed`) each process embeds its shard of every
global batch through DistributedDataParallel and scores the gathered global batch;
the first process alone evaluates, logs and shows progress, and hands the evaluation
to the others so that every process stops and restores at the same step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from training import distributed
from training.batch_sampler import batches_per_epoch, no_duplicate_batches, shard
from training.bi_encoder import BiEncoder
from training.dev_eval import DevSet, evaluate_encoder
from training.diagnostics import (
    REMEDIES,
    CollapseStats,
    Thresholds,
    alert_dicts,
    alerts_for,
    collapse_stats,
    is_collapsed,
    negatives_above_positive,
)
from training.errors import LockstepError
from training.examples import TrainingExample
from training.fast_dropout import cpu_dropout
from training.losses import (
    CachedInfoNCELoss,
    InfoNCELoss,
    KLDistillationLoss,
    MarginMSELoss,
    TokenBatch,
    TripletLoss,
    false_negative_mask,
    relative_teacher_scores,
)
from training.losses.output import LossOutput
from training.metrics_log import MetricsLog
from training.precision import autocast
from training.schedule import build_optimizer, warmup_cosine
from training.stage import StageConfig

Progress = Callable[[str, int, int, dict], None]


class TrainingAborted(LockstepError):
    """Training stopped because a failure mode persisted (e.g. representation collapse)."""


class TrainingCancelled(LockstepError):
    """Training stopped because the caller asked it to."""


@dataclass
class TrainingContext:
    """What every stage of a run shares. `log` is None on every process but the first, which alone writes."""

    encoder: BiEncoder
    log: MetricsLog | None
    dev: DevSet | None = None
    known_positives: Mapping[str, set[str]] = field(default_factory=dict)
    precision: str = "fp32"
    seed: int = 13
    thresholds: Thresholds = field(default_factory=Thresholds)
    baseline: dict = field(default_factory=dict)
    eval_batch_size: int = 64
    show_progress: bool = False
    progress: Progress | None = None
    should_stop: Callable[[], bool] | None = None
    step_offset: int = 0
    first_batch: dict = field(default_factory=dict)

    def collapse_baseline(self) -> dict:
        """What the collapse bounds are relative to: the base model's dev evaluation, or where the run has no dev
        set, the collapse statistics of its first training batch (taken before any update)."""
        return self.baseline if "mean_dim_std" in self.baseline else self.first_batch

    def evaluate(self) -> dict:
        """Dev metrics and signals, computed on the first process and handed to every process."""
        if self.dev is None:
            return {}
        report = self.progress
        return distributed.from_main(lambda: evaluate_encoder(
            self.encoder, self.dev, batch_size=self.eval_batch_size, precision=self.precision,
            progress=(lambda done, total: report("dev evaluation", done, total, {})) if report else None,
        ))

    def record(self, kind: str, **fields) -> None:
        """Append to the metrics log, where this process keeps one."""
        if self.log is not None:
            self.log.write(kind, **fields)


@dataclass(frozen=True)
class StageResult:
    """How a stage ended."""

    name: str
    steps: int
    best: dict
    best_step: int
    stopped_early: bool
    examples_used: int


def _usable(examples: Sequence[TrainingExample], stage: StageConfig) -> list[TrainingExample]:
    """Examples with enough negatives (and teacher scores) for the stage (`_for_epoch` picks which negatives)."""
    return [
        example for example in examples
        if len(example.negatives) >= stage.hard_negatives
        and (stage.negatives != "teacher" or len(example.teacher_scores) >= 1 + stage.hard_negatives)
    ]


def _for_epoch(usable: Sequence[TrainingExample], stage: StageConfig, seed: int, epoch: int) -> list[TrainingExample]:
    """Each example with the `hard_negatives` it trains on in `epoch`.

    Mined and teacher-scored negatives come hardest first, so the first ones are kept
    (with their teacher scores). Given negatives have no order, and a query's are pooled
    from every line that names it, so each epoch draws its own seeded sample: over
    examples and epochs every given negative gets trained on, not just the first.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    chosen = []
    for example in usable:
        if stage.negatives == "given" and len(example.negatives) > stage.hard_negatives:
            chosen.append(example.with_negatives(rng.sample(list(example.negatives), stage.hard_negatives)))
            continue
        trimmed = example.with_negatives(example.negatives[: stage.hard_negatives])
        if stage.negatives == "teacher":
            trimmed = trimmed.with_teacher_scores(example.teacher_scores[: 1 + stage.hard_negatives])
        chosen.append(trimmed)
    return chosen


class StageStep:
    """Computes one optimisation step's loss and gradients for a global batch.

    This process embeds its shard; the loss is computed over every process's embeddings,
    gathered, so it equals the single-process loss on the whole batch.
    """

    def __init__(self, ctx: TrainingContext, stage: StageConfig, synced: distributed.SyncedEmbed) -> None:
        self.ctx, self.stage = ctx, stage
        self.encoder = ctx.encoder
        device = self.encoder.device
        self.device = device

        def embed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            with autocast(ctx.precision, device):
                return synced.embed(input_ids, attention_mask).float()

        self.embed = embed
        if stage.loss == "infonce" and stage.mini_batch_size:
            self.cached = CachedInfoNCELoss(
                embed, stage.temperature, stage.symmetric, stage.mini_batch_size,
                gather=distributed.gather_with_grad, no_sync=synced.no_sync,
            )
        self.infonce = InfoNCELoss(stage.temperature, stage.symmetric)
        self.triplet = TripletLoss(stage.triplet_margin)
        self.margin_mse = MarginMSELoss(stage.distill_scale)
        self.kl = KLDistillationLoss(stage.kl_temperature, stage.kl_scale)

    def _tokens(self, texts: list[str], kind: str) -> TokenBatch:
        input_ids, attention_mask = self.encoder.token_batch(texts, kind)
        return TokenBatch(input_ids, attention_mask)

    def _embed_all(self, tokens: TokenBatch) -> torch.Tensor:
        return distributed.gather_with_grad(self.embed(tokens.input_ids, tokens.attention_mask))

    def mask(self, batch: list[TrainingExample]) -> torch.Tensor:
        """The global batch's false-negative mask; with `teacher_mask_threshold`, each query's own hard
        negatives that the teacher scores within that margin of its positive are masked too (RocketQA)."""
        h, threshold = self.stage.hard_negatives, self.stage.teacher_mask_threshold
        teacher = {}
        if threshold is not None:
            scores = torch.tensor([e.teacher_scores for e in batch], dtype=torch.float32)
            teacher = {"teacher_scores": relative_teacher_scores(scores), "teacher_threshold": -threshold}
        return false_negative_mask(
            [e.query_id for e in batch],
            [e.positive for e in batch],
            [list(e.negatives) for e in batch] if h else None,
            known_positives=self.ctx.known_positives,
            **teacher,
        ).to(self.device)

    def __call__(self, batch: list[TrainingExample]) -> tuple[LossOutput, torch.Tensor | None]:
        """Back-propagate one global batch; returns the loss output and the false-negative mask used (if any)."""
        stage, h = self.stage, self.stage.hard_negatives
        mask = None
        local = shard(batch, distributed.rank(), distributed.world_size())
        queries = self._tokens([e.query for e in local], "query")
        positives = self._tokens([e.positive.text for e in local], "document")
        negatives = self._tokens([n.text for e in local for n in e.negatives], "document") if h else None
        if stage.loss == "infonce":
            if stage.mask_false_negatives:
                mask = self.mask(batch)
            if stage.mini_batch_size:
                return self.cached.backward(queries, positives, negatives, mask), mask
            q, p = self._embed_all(queries), self._embed_all(positives)
            n = self._embed_all(negatives).view(len(batch), h, -1) if h else None
            out = self.infonce.compute_loss_from_embeddings(q, p, n, mask)
        else:
            q, p = self._embed_all(queries), self._embed_all(positives)
            n = self._embed_all(negatives).view(len(batch), h, -1)
            if stage.loss == "triplet":
                out = self.triplet.compute_loss_from_embeddings(q, p, n)
            else:
                teacher = torch.tensor([e.teacher_scores for e in batch], dtype=torch.float32, device=self.device)
                if stage.loss == "margin_mse":
                    out = self.margin_mse.compute_loss_from_embeddings(q, p, n, teacher[:, :1] - teacher[:, 1:])
                else:
                    out = self.kl.compute_loss_from_embeddings(q, torch.cat([p.unsqueeze(1), n], dim=1), teacher)
        out.loss.backward()
        return replace(out, documents=p.detach()), mask


def _batch_collapse_stats(documents: torch.Tensor | None) -> CollapseStats | None:
    """Collapse statistics of a training batch's document embeddings, normalised as the loss sees them; None for
    fewer than two."""
    if documents is None or len(documents) < 2:
        return None
    return collapse_stats(torch.nn.functional.normalize(documents.float(), dim=-1).cpu().numpy())


def _snapshot(encoder: BiEncoder) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in encoder.model.state_dict().items()}


def _too_few_examples(stage: StageConfig, usable: int, examples: int) -> TrainingAborted:
    fix = "lower batch_size or hard_negatives, or add training pairs"
    if stage.negatives == "given":
        fix += f" with at least {stage.hard_negatives} negatives each in the pairs file"
    return TrainingAborted(
        f"stage {stage.name!r} has {usable} usable examples (of {examples}) but a batch needs {stage.batch_size}; {fix}"
    )


def train_stage(ctx: TrainingContext, examples: Sequence[TrainingExample], stage: StageConfig, start_eval: dict) -> StageResult:
    """Train one stage; restores the best weights seen (including the stage's starting point) before returning."""
    usable = _usable(examples, stage)
    if len(usable) < stage.batch_size:
        raise _too_few_examples(stage, len(usable), len(examples))
    shards = distributed.world_size()
    if stage.batch_size < shards:
        raise TrainingAborted(f"stage {stage.name!r}: batch_size {stage.batch_size} is smaller than the {shards} processes; raise it")
    model = ctx.encoder.model
    epochs = [_for_epoch(usable, stage, ctx.seed, epoch) for epoch in range(stage.epochs)]
    epoch_steps = [batches_per_epoch(chosen, stage.batch_size, ctx.seed, epoch, shards) for epoch, chosen in enumerate(epochs)]
    total = sum(epoch_steps)
    if total == 0:
        raise TrainingAborted(
            f"stage {stage.name!r}: its {len(usable)} usable examples form no batch of two or more without a repeated "
            "document, text or query (most share one document or query); add pairs with other documents and queries, "
            "or give each pair hard negatives"
        )
    optimizer = build_optimizer(model, stage.learning_rate, stage.weight_decay)
    scheduler = warmup_cosine(optimizer, int(total * stage.warmup_ratio), total)
    torch.manual_seed(ctx.seed + distributed.rank())
    best, best_step, best_state = dict(start_eval), 0, _snapshot(ctx.encoder)
    evals_without_gain, collapsed_evals, collapsed_steps, step, stopped_early = 0, 0, 0, 0, False
    ctx.record("stage_start", stage=stage.name, examples=len(usable), steps=total, config=stage.__dict__)
    bar = tqdm(total=total, desc=f"training {stage.name}", unit="step", disable=not ctx.show_progress)
    started = time.monotonic()
    model.train()
    with bar, cpu_dropout(model), distributed.data_parallel(ctx.encoder) as synced:
        compute = StageStep(ctx, stage, synced)
        for epoch in range(stage.epochs):
            batches = no_duplicate_batches(epochs[epoch], stage.batch_size, ctx.seed, epoch, shards=shards)
            for epoch_step, indices in enumerate(batches, start=1):
                if ctx.should_stop is not None and ctx.should_stop():
                    raise TrainingCancelled(f"training cancelled during stage {stage.name!r} at step {step}")
                batch = [epochs[epoch][i] for i in indices]
                out, mask = compute(batch)
                step += 1
                loss = float(out.loss.detach())

                def abort_before_update(what: str) -> TrainingAborted:
                    optimizer.zero_grad(set_to_none=True)
                    model.load_state_dict(best_state)
                    return TrainingAborted(
                        f"stage {stage.name!r}: {what} at step {step}, so no update was applied and the best "
                        f"weights were restored. Remedy: {REMEDIES['collapse']}"
                    )

                if not np.isfinite(loss):
                    raise abort_before_update(f"the loss became {loss}")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise abort_before_update(f"the gradients became {float(grad_norm)} (the loss was {loss:.4f})")
                batch_stats = _batch_collapse_stats(out.documents)
                if batch_stats is not None:
                    if not ctx.first_batch:
                        ctx.first_batch = {"mean_dim_std": batch_stats.mean_dim_std,
                                           "mean_pairwise_cosine": batch_stats.mean_pairwise_cosine}
                    collapsed = is_collapsed(batch_stats, ctx.thresholds, ctx.collapse_baseline())
                    collapsed_steps = collapsed_steps + 1 if collapsed else 0
                    if collapsed_steps >= ctx.thresholds.collapse_step_patience:
                        raise abort_before_update(
                            f"representation collapse on {collapsed_steps} training batches in a row (dim std "
                            f"{batch_stats.mean_dim_std:.4f}, mean cosine {batch_stats.mean_pairwise_cosine:.3f})"
                        )
                learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses, read before the schedule moves
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                record = {"loss": loss, "lr": learning_rate, "grad_norm": float(grad_norm), "masked": out.masked,
                          "batch": len(batch)}
                if batch_stats is not None:
                    record.update(batch_dim_std=batch_stats.mean_dim_std, batch_mean_cosine=batch_stats.mean_pairwise_cosine)
                if out.scores is not None and stage.loss == "infonce":
                    record["negatives_above_positive"] = negatives_above_positive(
                        out.scores.float().cpu().numpy(), None if mask is None else mask.cpu().numpy()
                    )
                ctx.record("step", stage=stage.name, epoch=epoch, step=step, global_step=ctx.step_offset + step, **record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if ctx.progress is not None:
                    ctx.progress(stage.name, step, total, {"loss": loss, "elapsed_s": time.monotonic() - started})
                end_of_epoch = epoch_step == epoch_steps[epoch]
                if ctx.dev is None or not (end_of_epoch or (stage.eval_every and step % stage.eval_every == 0)):
                    continue
                evaluation = ctx.evaluate()
                alerts = alerts_for({k: v for k, v in evaluation.items() if v is not None}, ctx.baseline, ctx.thresholds)
                ctx.record("eval", stage=stage.name, step=step, global_step=ctx.step_offset + step, **evaluation)
                for alert in alert_dicts(alerts):
                    ctx.record("alert", stage=stage.name, step=step, **alert)
                stats = CollapseStats(evaluation.get("mean_dim_std", 1.0), evaluation.get("mean_pairwise_cosine", 0.0))
                collapsed_evals = collapsed_evals + 1 if is_collapsed(stats, ctx.thresholds, ctx.baseline) else 0
                if collapsed_evals >= ctx.thresholds.collapse_patience:
                    ctx.encoder.model.load_state_dict(best_state)
                    raise TrainingAborted(
                        f"stage {stage.name!r}: representation collapse for {collapsed_evals} evaluations "
                        f"(dim std {stats.mean_dim_std:.4f}, mean cosine {stats.mean_pairwise_cosine:.3f}); "
                        f"best weights restored. Remedy: {REMEDIES['collapse']}"
                    )
                if evaluation["ndcg@10"] > best.get("ndcg@10", -1.0):
                    best, best_step, best_state, evals_without_gain = evaluation, step, _snapshot(ctx.encoder), 0
                else:
                    evals_without_gain += 1
                if stage.patience and evals_without_gain >= stage.patience:
                    stopped_early = True
                    break
            if stopped_early:
                break
    if ctx.dev is not None:
        model.load_state_dict(best_state)
    model.eval()
    ctx.record("stage_end", stage=stage.name, steps=step, best_step=best_step, stopped_early=stopped_early, best=best)
    ctx.step_offset += step
    return StageResult(stage.name, step, best, best_step, stopped_early, len(usable))
