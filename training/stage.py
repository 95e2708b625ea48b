"""One training stage's settings: which loss, which negatives, and the optimisation knobs.

A recipe is a list of stages; each is validated when it is built, so a bad recipe
fails before any training starts with a message naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from training.errors import InvalidInput
from training.typed_fields import check_fields

LossName = Literal["infonce", "triplet", "margin_mse", "kl"]
NegativeSource = Literal["in_batch", "given", "mined", "teacher"]
LOSSES = ("infonce", "triplet", "margin_mse", "kl")
NEGATIVE_SOURCES = ("in_batch", "given", "mined", "teacher")
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 65536
MAX_MINE_WINDOW = 10_000
DEFAULT_MINE_MARGIN = 0.05


@dataclass(frozen=True)
class StageConfig:
    """Settings of one stage.

    `negatives`: in-batch only; `given`, the negatives each pair brings in its pairs or triplets
    file (pairs with fewer than `hard_negatives` are left out of the stage); mined with the
    current model; or mined and teacher-scored.
    `teacher_mask_threshold` (InfoNCE on teacher-scored negatives only): a hard negative the
    teacher scores at least its positive's score minus this margin is masked out of its own
    query's softmax, RocketQA's denoising (Qu et al., 2021, arXiv:2010.08191) applied at the
    loss rather than at mining (`mine_teacher_margin`), so the example still trains and the
    document stays a negative for the batch's other queries. None: no teacher masking.
    `mine_margin`: a mined candidate the current model scores within this margin of its
    positive is dropped as a likely false negative. Unset, it is `DEFAULT_MINE_MARGIN`
    for `mined` negatives and no filter for `teacher` ones (`student_margin`).
    `kl_scale` multiplies the student's cosines before KL distillation's temperature (see
    `KLDistillationLoss`); 20 gives cosine students logits as spread as a cross-encoder's.
    """

    name: str = "stage"
    loss: LossName = "infonce"
    negatives: NegativeSource = "in_batch"
    hard_negatives: int = 0
    epochs: int = 1
    learning_rate: float = 2e-5
    temperature: float = 0.05
    batch_size: int = 32
    mini_batch_size: int = 0
    symmetric: bool = False
    mask_false_negatives: bool = True
    teacher_mask_threshold: float | None = None
    triplet_margin: float = 0.2
    distill_scale: float = 1.0
    kl_temperature: float = 1.0
    kl_scale: float = 20.0
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_every: int = 0
    patience: int = 0
    mine_window_start: int = 10
    mine_window_end: int = 100
    mine_margin: float | None = None
    mine_relative_margin: float | None = None
    mine_teacher_margin: float | None = None

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> InvalidInput:
            return InvalidInput(f"stage {self.name!r}: {field} must be {expected}, got {getattr(self, field)!r}")

        if self.loss not in LOSSES:
            raise bad("loss", f"one of {', '.join(LOSSES)}")
        if self.negatives not in NEGATIVE_SOURCES:
            raise bad("negatives", f"one of {', '.join(NEGATIVE_SOURCES)}")
        if not 0 <= self.hard_negatives <= 20:
            raise bad("hard_negatives", "between 0 and 20")
        if self.negatives != "in_batch" and self.hard_negatives < 1:
            raise bad("hard_negatives", f"at least 1 when negatives = {self.negatives!r}")
        if self.negatives == "in_batch" and self.hard_negatives:
            raise bad("negatives", "'given', 'mined' or 'teacher' when hard_negatives > 0 (in-batch stages use no hard negatives)")
        if self.loss in ("triplet", "margin_mse", "kl") and self.hard_negatives < 1:
            raise bad("hard_negatives", f"at least 1 for the {self.loss} loss")
        if self.loss in ("margin_mse", "kl") and self.negatives != "teacher":
            raise bad("negatives", f"'teacher' for the {self.loss} loss (it needs teacher scores)")
        for name, low, high in (("epochs", 1, MAX_EPOCHS), ("batch_size", 2, MAX_BATCH_SIZE)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise bad(name, f"an integer from {low} to {high}")
        if self.mini_batch_size > self.batch_size:
            raise bad("mini_batch_size", f"at most batch_size ({self.batch_size})")
        for name in ("learning_rate", "temperature", "kl_temperature", "kl_scale", "max_grad_norm", "distill_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise bad(name, "a positive finite number")
        if not (math.isfinite(self.triplet_margin) and self.triplet_margin >= 0):
            raise bad("triplet_margin", "a non-negative finite number (0.1 to 0.5 is usual)")
        if self.teacher_mask_threshold is not None:
            self._check_teacher_mask(bad)
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "in [0, 1)")
        if self.mini_batch_size < 0 or self.eval_every < 0 or self.patience < 0 or self.weight_decay < 0:
            raise InvalidInput(f"stage {self.name!r}: mini_batch_size, eval_every, patience and weight_decay must be >= 0")
        for name in ("mine_margin", "mine_relative_margin", "mine_teacher_margin"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise bad(name, "a finite number or unset")
        if not 0 <= self.mine_window_start < self.mine_window_end <= MAX_MINE_WINDOW:
            raise bad("mine_window_start", f"in [0, mine_window_end={self.mine_window_end}), and mine_window_end at "
                      f"most {MAX_MINE_WINDOW}")

    def student_margin(self) -> float | None:
        """The margin mining applies with the current model's scores: `mine_margin` if set, else
        `DEFAULT_MINE_MARGIN` for mined negatives and None for teacher-scored ones. A teacher judges every candidate
        (`mine_teacher_margin`); the student's filter before it would drop the candidates closest to the positive,
        the most informative ones to distil, on the student's say alone (the closeness it flags is the proxy for
        false negatives that a teacher replaces; Qu et al., 2021, "RocketQA")."""
        if self.mine_margin is not None:
            return self.mine_margin
        return None if self.negatives == "teacher" else DEFAULT_MINE_MARGIN

    def _check_teacher_mask(self, bad: Callable[[str, str], InvalidInput]) -> None:
        threshold = self.teacher_mask_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise bad("teacher_mask_threshold", "a finite number (a margin below the positive's teacher score) or unset")
        if self.loss != "infonce" or self.negatives != "teacher" or not self.mask_false_negatives:
            raise InvalidInput(
                f"stage {self.name!r}: teacher_mask_threshold needs loss = 'infonce', negatives = 'teacher' and "
                f"mask_false_negatives = true (got loss {self.loss!r}, negatives {self.negatives!r}, "
                f"mask_false_negatives {self.mask_false_negatives}); unset it or change those"
            )

    @classmethod
    def from_dict(cls, data: object) -> StageConfig:
        """A stage from its parsed table; InvalidInput naming the stage for an unknown setting or a value of the
        wrong type, before the checks of `__post_init__`."""
        if not isinstance(data, dict):
            raise InvalidInput(f"each [[stage]] must be a table, got {data!r}")
        check_fields(cls, data, f"stage {data.get('name', '?')!r}")
        return cls(**data)
