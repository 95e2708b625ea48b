"""Fine-tuning a cross-encoder on groups of one query, one positive and its negatives.

Two losses, both over the raw logits the reranker returns at inference:

- `bce`: every (query, positive) pair is labelled 1 and every (query, negative) pair 0,
  binary cross-entropy with logits per pair, i.e. pointwise relevance classification
  (Nogueira & Cho, 2019, "Passage Re-ranking with BERT").
- `listwise`: softmax cross-entropy over [positive, negatives...] per group with the
  positive as target, the localised contrastive estimation loss (Gao, Dai & Callan, 2021,
  "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipelines"). It only asks
  the positive to beat its own negatives, which is what reranking needs; pick it when the
  negatives are hard ones mined from the retriever. Pick `bce` when the scores must also
  be comparable across queries (a relevance threshold).

The loss maths takes a padded `(groups, 1 + negatives)` score matrix, so it is tested on
plain tensors without a model. Training is seeded (shuffling and dropout, whose masks
`training.fast_dropout` draws on the CPU), clips
gradients, uses AdamW with warmup and cosine decay (`training.schedule`) and leaves the
model in eval mode. The head (the classifier and the pooler feeding it) trains at
`head_learning_rate_factor` times the rate: from a bi-encoder checkpoint it starts from
scratch with near-zero logits, and at the encoder's rate much of a teacher's few hundred
steps is spent near chance. In bf16, autocast covers each step's forward pass and
nothing else: autocast caches the bf16 copy of every weight until its region is left,
so one region around the whole loop would run every step on the weights as they were
at the first step while the optimiser updated the fp32 weights unseen. Left out here:
gradient accumulation, mining negatives and distillation from a teacher's scores (see
`training.teacher_cache`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.cross_encoder import CrossEncoder
from training.fast_dropout import cpu_dropout
from training.precision import TrainingPrecision, autocast
from training.schedule import build_optimizer, warmup_cosine

RerankLoss = Literal["bce", "listwise"]
ProgressCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class RerankGroup:
    """One query with one relevant document and at least one non-relevant one."""

    query: str
    positive: str
    negatives: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.query, str) or not isinstance(self.positive, str):
            raise ValueError("a RerankGroup's query and positive must be strings")
        if isinstance(self.negatives, str):
            raise ValueError("negatives must be a tuple of documents, not a single string")
        object.__setattr__(self, "negatives", tuple(self.negatives))
        if not self.negatives or not all(isinstance(doc, str) for doc in self.negatives):
            raise ValueError(f"query {self.query!r:.60} needs at least one negative document, all strings")
        if self.positive in self.negatives:
            raise ValueError(
                f"query {self.query!r:.60}: the positive also appears among the negatives; drop it from them"
            )

    def pairs(self) -> list[tuple[str, str]]:
        """(query, document) pairs, the positive first."""
        return [(self.query, doc) for doc in (self.positive, *self.negatives)]


@dataclass(frozen=True)
class CrossEncoderTrainingConfig:
    """How to train: the loss, epochs, optimiser settings, the forward pass's precision and the seed."""

    loss: RerankLoss = "listwise"
    epochs: int = 1
    learning_rate: float = 2e-5
    batch_size: int = 16
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    head_learning_rate_factor: float = 20.0
    precision: TrainingPrecision = "fp32"
    seed: int = 13

    def __post_init__(self) -> None:
        if self.loss not in ("bce", "listwise"):
            raise ValueError(f"loss must be 'bce' or 'listwise', got {self.loss!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive finite number, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size (groups per step) must be at least 1, got {self.batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive finite number, got {self.max_grad_norm}")
        if not (math.isfinite(self.head_learning_rate_factor) and self.head_learning_rate_factor > 0):
            raise ValueError(f"head_learning_rate_factor must be a positive finite number, got {self.head_learning_rate_factor}")


def group_scores(flat: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-pair logits into a `(groups, max size)` matrix padded with -inf, and its validity mask."""
    if flat.ndim != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} logits in one dimension, got shape {tuple(flat.shape)}")
    width = max(sizes)
    mask = torch.arange(width, device=flat.device).unsqueeze(0) < torch.tensor(sizes, device=flat.device).unsqueeze(1)
    scores = flat.new_full((len(sizes), width), float("-inf"))
    return scores.masked_scatter(mask, flat), mask


def listwise_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over groups of cross-entropy with the positive (column 0) as target; padding is -inf."""
    if scores.ndim != 2 or scores.shape[1] < 2 or scores.shape != mask.shape:
        raise ValueError(
            f"scores must be (groups, 1 + negatives >= 2) with a mask of that shape, got {tuple(scores.shape)}"
        )
    targets = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.masked_fill(~mask, float("-inf")), targets)


def bce_loss(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over every valid pair: column 0 labelled 1, the rest 0."""
    if scores.ndim != 2 or scores.shape != mask.shape:
        raise ValueError(f"scores must be (groups, 1 + negatives) with a mask of that shape, got {tuple(scores.shape)}")
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(scores[mask], labels[mask])


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"bce": bce_loss, "listwise": listwise_loss}


def build_reranker_optimizer(model: CrossEncoder, config: CrossEncoderTrainingConfig) -> torch.optim.AdamW:
    """`training.schedule.build_optimizer` with the head at `head_learning_rate_factor` times the rate."""
    factor = config.head_learning_rate_factor
    return build_optimizer(model.model, config.learning_rate, config.weight_decay,
                           rate_factor=lambda name: factor if model.is_head_parameter(name) else 1.0)


def train_cross_encoder(
    model: CrossEncoder,
    groups: Sequence[RerankGroup],
    config: CrossEncoderTrainingConfig,
    *,
    progress: ProgressCallback | None = None,
    show_progress: bool = False,
) -> list[dict]:
    """Train `model` in place; returns one `{"step", "loss", "lr"}` record per optimiser step."""
    if not groups:
        raise ValueError("train_cross_encoder needs at least one RerankGroup")
    if not all(isinstance(group, RerankGroup) for group in groups):
        raise ValueError("groups must be RerankGroup instances (query, positive, negatives)")
    loss_fn = LOSSES[config.loss]
    steps_per_epoch = math.ceil(len(groups) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_reranker_optimizer(model, config)
    scheduler = warmup_cosine(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    history: list[dict] = []
    bar = tqdm(total=total_steps, desc=f"training reranker ({config.loss})", unit="step", disable=not show_progress)
    rng_devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), bar, cpu_dropout(model.model):
        torch.manual_seed(config.seed)
        shuffler = torch.Generator().manual_seed(config.seed)
        model.model.train()
        try:
            for _ in range(config.epochs):
                order = torch.randperm(len(groups), generator=shuffler).tolist()
                for start in range(0, len(groups), config.batch_size):
                    chosen = [groups[i] for i in order[start : start + config.batch_size]]
                    batch = model.batch([pair for group in chosen for pair in group.pairs()])
                    with autocast(config.precision, model.device):
                        flat = model.logits(batch.input_ids, batch.attention_mask, batch.token_type_ids)
                    loss = loss_fn(*group_scores(flat.float(), [1 + len(group.negatives) for group in chosen]))
                    step = len(history) + 1
                    if not torch.isfinite(loss):
                        raise ValueError(f"loss became {loss.item()} at step {step}; lower the learning rate")
                    lr = scheduler.get_last_lr()[0]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    history.append({"step": step, "loss": loss.item(), "lr": lr})
                    bar.update(1)
                    if progress is not None:
                        progress(step, total_steps, loss.item())
        finally:
            model.model.eval()
    return history
