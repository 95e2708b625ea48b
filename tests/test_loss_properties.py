"""Properties of the losses on random small batches: references, invariances and bounds.

Embeddings are drawn from a pool of basis vectors, their negations and a few random unit
vectors, so exact duplicates, cosines of exactly +1/-1 and orthogonal pairs are common.
The InfoNCE reference uses the form loss_i = log(1 + sum_j exp((s_ij - s_ii) / tau)), a
different formula from the loss's cross-entropy, computed in Python floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from training.losses import (
    CachedInfoNCELoss,
    InfoNCELoss,
    KLDistillationLoss,
    MarginMSELoss,
    TokenBatch,
    TripletLoss,
)

FAST = settings(max_examples=30, deadline=None)
VOCAB = 12

temperatures = st.floats(0.01, 1.0)
seeds = st.integers(0, 2**16)


def _pool(dim: int, seed: int) -> torch.Tensor:
    basis = torch.eye(dim, dtype=torch.float64)
    random = torch.randn(4, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.cat([basis, -basis, torch.nn.functional.normalize(random, dim=-1)])


@st.composite
def unit_rows(draw, shape: tuple[int, ...], dim: int, seed: int) -> torch.Tensor:
    """`shape + (dim,)` unit vectors picked from a small pool, so duplicates are frequent."""
    pool = _pool(dim, seed)
    rows = math.prod(shape)
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=rows, max_size=rows))
    return pool[picks].reshape(*shape, dim)


@st.composite
def positive_scales(draw, rows: int) -> torch.Tensor:
    """One positive factor per row, spanning six orders of magnitude."""
    exponents = draw(st.lists(st.floats(-3, 3), min_size=rows, max_size=rows))
    return torch.tensor([10.0**e for e in exponents], dtype=torch.float64)


@dataclass(frozen=True)
class ContrastiveBatch:
    """Queries, positives, optional hard negatives and a candidate mask for `InfoNCELoss`."""

    queries: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor | None
    mask: torch.Tensor

    @property
    def hard_negatives(self) -> int:
        return 0 if self.negatives is None else self.negatives.shape[1]

    def candidates(self) -> list[torch.Tensor]:
        rows = list(self.positives)
        return rows + ([] if self.negatives is None else list(self.negatives.reshape(-1, self.queries.shape[1])))


@st.composite
def contrastive_batches(draw, min_hard: int = 0) -> ContrastiveBatch:
    batch_size, hard, dim = draw(st.integers(1, 6)), draw(st.integers(min_hard, 3)), draw(st.integers(2, 6))
    seed = draw(seeds)
    queries = draw(unit_rows((batch_size,), dim, seed))
    positives = draw(unit_rows((batch_size,), dim, seed))
    negatives = draw(unit_rows((batch_size, hard), dim, seed)) if hard else None
    columns = batch_size * (1 + hard)
    flags = draw(st.lists(st.booleans(), min_size=batch_size * columns, max_size=batch_size * columns))
    mask = torch.tensor(flags, dtype=torch.bool).reshape(batch_size, columns)
    mask[range(batch_size), range(batch_size)] = False
    return ContrastiveBatch(queries, positives, negatives, mask)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.tolist(), b.tolist()
    return math.fsum(p * q for p, q in zip(x, y)) / math.sqrt(math.fsum(p * p for p in x) * math.fsum(q * q for q in y))


def _log_one_plus(exponents: list[float]) -> float:
    return math.log1p(math.fsum(math.exp(e) for e in exponents))


def _reference_infonce(batch: ContrastiveBatch, temperature: float, masked: bool, symmetric: bool) -> float:
    """Mean over rows of log(1 + sum over kept other candidates of exp((s_ij - s_ii) / tau))."""
    candidates, size = batch.candidates(), len(batch.queries)
    kept = [[not (masked and bool(batch.mask[i, j])) for j in range(len(candidates))] for i in range(size)]
    forward = []
    for i, query in enumerate(batch.queries):
        target = _cosine(query, candidates[i])
        others = [(_cosine(query, c) - target) / temperature for j, c in enumerate(candidates) if j != i and kept[i][j]]
        forward.append(_log_one_plus(others))
    loss = math.fsum(forward) / size
    if not symmetric:
        return loss
    backward = []
    for i, positive in enumerate(batch.positives):
        target = _cosine(batch.queries[i], positive)
        others = [(_cosine(q, positive) - target) / temperature for k, q in enumerate(batch.queries) if k != i and kept[k][i]]
        backward.append(_log_one_plus(others))
    return (loss + math.fsum(backward) / size) / 2


def _infonce(batch: ContrastiveBatch, temperature: float, symmetric: bool, masked: bool = True):
    loss = InfoNCELoss(temperature, symmetric=symmetric)
    return loss(batch.queries, batch.positives, batch.negatives, candidate_mask=batch.mask if masked else None)


# InfoNCE


@FAST
@given(batch=contrastive_batches(), temperature=temperatures, symmetric=st.booleans(), masked=st.booleans())
def test_infonce_equals_per_row_reference(batch, temperature, symmetric, masked):
    """Guards against a wrong target column, a mask applied to the wrong entries, or a symmetric term over the wrong axis."""
    result = _infonce(batch, temperature, symmetric, masked)
    expected = _reference_infonce(batch, temperature, masked, symmetric)
    assert result.loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.masked == (int(batch.mask.sum()) if masked else 0)


@FAST
@given(
    batch=contrastive_batches(),
    temperature=temperatures,
    symmetric=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_infonce_is_finite_and_non_negative(batch, temperature, symmetric, dtype):
    """Guards against overflow at small temperatures (exp of 100) or a sign error, in either precision."""
    negatives = None if batch.negatives is None else batch.negatives.to(dtype)
    loss = InfoNCELoss(temperature, symmetric=symmetric)(
        batch.queries.to(dtype), batch.positives.to(dtype), negatives, candidate_mask=batch.mask
    ).loss
    assert torch.isfinite(loss) and loss.item() >= 0


@FAST
@given(batch=contrastive_batches(), temperature=temperatures, symmetric=st.booleans(), data=st.data())
def test_infonce_is_invariant_to_permuting_the_batch(batch, temperature, symmetric, data):
    """Guards against a loss that depends on row order (e.g. targets not following their queries)."""
    size, hard = len(batch.queries), batch.hard_negatives
    order = data.draw(st.permutations(range(size)))
    columns = order + [size + row * hard + h for row in order for h in range(hard)]
    permuted = ContrastiveBatch(
        batch.queries[order],
        batch.positives[order],
        None if batch.negatives is None else batch.negatives[order],
        batch.mask[order][:, columns],
    )
    original, shuffled = _infonce(batch, temperature, symmetric), _infonce(permuted, temperature, symmetric)
    assert shuffled.loss.item() == pytest.approx(original.loss.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(shuffled.scores, original.scores[order][:, columns], rtol=0, atol=1e-15)
    assert shuffled.masked == original.masked


@FAST
@given(batch=contrastive_batches(), temperature=temperatures, symmetric=st.booleans(), data=st.data())
def test_masking_more_candidates_never_raises_the_loss(batch, temperature, symmetric, data):
    """Guards against a mask that adds terms to a denominator, or unmasks when combined with another mask."""
    flags = data.draw(st.lists(st.booleans(), min_size=batch.mask.numel(), max_size=batch.mask.numel()))
    more = batch.mask | torch.tensor(flags, dtype=torch.bool).reshape(batch.mask.shape)
    size = len(batch.queries)
    more[range(size), range(size)] = False
    wider = ContrastiveBatch(batch.queries, batch.positives, batch.negatives, more)
    assert _infonce(wider, temperature, symmetric).loss.item() <= _infonce(batch, temperature, symmetric).loss.item() + 1e-12


@FAST
@given(batch=contrastive_batches(min_hard=1), temperature=temperatures, symmetric=st.booleans())
def test_masking_every_hard_negative_equals_having_none(batch, temperature, symmetric):
    """Guards against masked candidates that still leak into the softmax (e.g. a large finite fill value)."""
    size = len(batch.queries)
    mask = batch.mask.clone()
    mask[:, size:] = True
    masked = _infonce(ContrastiveBatch(batch.queries, batch.positives, batch.negatives, mask), temperature, symmetric)
    without = _infonce(ContrastiveBatch(batch.queries, batch.positives, None, mask[:, :size]), temperature, symmetric)
    assert masked.loss.item() == pytest.approx(without.loss.item(), rel=1e-12, abs=1e-14)


@FAST
@given(batch=contrastive_batches(), temperature=temperatures, symmetric=st.booleans(), data=st.data())
def test_infonce_ignores_embedding_norms(batch, temperature, symmetric, data):
    """Guards against dot products standing in for cosines (inputs need not be normalised)."""
    size, hard = len(batch.queries), batch.hard_negatives
    negatives = batch.negatives
    if negatives is not None:
        negatives = negatives * data.draw(positive_scales(size * hard)).reshape(size, hard, 1)
    scaled = ContrastiveBatch(
        batch.queries * data.draw(positive_scales(size)).unsqueeze(1),
        batch.positives * data.draw(positive_scales(size)).unsqueeze(1),
        negatives,
        batch.mask,
    )
    original, rescaled = _infonce(batch, temperature, symmetric), _infonce(scaled, temperature, symmetric)
    assert rescaled.loss.item() == pytest.approx(original.loss.item(), rel=1e-9, abs=1e-12)


# Gradient caching


class BagOfTokens(torch.nn.Module):
    """A tiny float64 encoder with dropout: embedding table, masked mean, linear projection."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, 5, generator=generator, dtype=torch.float64))
        self.project = torch.nn.Parameter(torch.randn(5, 4, generator=generator, dtype=torch.float64))
        self.dropout = torch.nn.Dropout(0.3)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.dropout(self.table[input_ids]) * attention_mask.unsqueeze(-1)
        return (tokens.sum(dim=1) / attention_mask.sum(dim=1, keepdim=True)) @ self.project


def _token_batch(rows: int, seed: int) -> TokenBatch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (rows,), generator=generator)
    width = int(lengths.max())
    attention_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    input_ids = torch.randint(1, VOCAB, (rows, width), generator=generator) * attention_mask
    return TokenBatch(input_ids, attention_mask)


def _full_graph_loss(model: BagOfTokens, groups: list[TokenBatch], loss: InfoNCELoss, chunk: int, mask):
    """Embeddings made `chunk` rows at a time (the order GradCache draws dropout in), one graph, one backward."""
    embeddings = [
        torch.cat([model.embed(*_fields(group.rows(s, s + chunk))) for s in range(0, len(group), chunk)])
        for group in groups
    ]
    negatives = embeddings[2].view(len(groups[0]), -1, embeddings[2].shape[-1]) if len(groups) == 3 else None
    result = loss(embeddings[0], embeddings[1], negatives, candidate_mask=mask)
    result.loss.backward()
    return result.loss.item()


def _fields(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch.input_ids, batch.attention_mask


@settings(max_examples=30, deadline=None)
@given(
    batch_size=st.integers(1, 6),
    hard=st.integers(0, 3),
    mini_batch_size=st.integers(1, 8),
    temperature=temperatures,
    symmetric=st.booleans(),
    dropout=st.booleans(),
    masked=st.booleans(),
    seed=seeds,
)
def test_cached_infonce_equals_infonce_loss_and_gradients(
    batch_size, hard, mini_batch_size, temperature, symmetric, dropout, masked, seed
):
    """Guards against GradCache rows misaligned with their cached gradients, or chunks that drop or repeat rows.

    With dropout on, the reference embeds in the same chunks and order from the same seed,
    so both see the same dropout masks; with it off, the reference embeds each group whole.
    """
    model = BagOfTokens().train(dropout)
    groups = [_token_batch(batch_size, seed), _token_batch(batch_size, seed + 1)]
    if hard:
        groups.append(_token_batch(batch_size * hard, seed + 2))
    generator = torch.Generator().manual_seed(seed + 3)
    mask = torch.rand(batch_size, batch_size * (1 + hard), generator=generator) < 0.3
    mask[range(batch_size), range(batch_size)] = False
    mask = mask if masked else None

    torch.manual_seed(seed)
    chunk = mini_batch_size if dropout else batch_size * max(1, hard)
    expected = _full_graph_loss(model, groups, InfoNCELoss(temperature, symmetric=symmetric), chunk, mask)
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    torch.manual_seed(seed)
    cached = CachedInfoNCELoss(model.embed, temperature, symmetric=symmetric, mini_batch_size=mini_batch_size)
    negatives = groups[2] if hard else None
    result = cached.backward(groups[0], groups[1], negatives, candidate_mask=mask)
    assert result.loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    for ours, theirs in zip((p.grad for p in model.parameters()), reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


# Triplet, MarginMSE, KL distillation


@st.composite
def listwise_batches(draw, min_candidates: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries `(B, d)`, positives `(B, d)` and negatives `(B, H, d)` from the shared pool."""
    batch_size, hard, dim, seed = draw(st.integers(1, 5)), draw(st.integers(min_candidates, 4)), draw(st.integers(2, 6)), draw(seeds)
    queries = draw(unit_rows((batch_size,), dim, seed))
    positives = draw(unit_rows((batch_size,), dim, seed))
    return queries, positives, draw(unit_rows((batch_size, hard), dim, seed))


def _margins(queries, positives, negatives) -> list[list[float]]:
    """cos(q, p) - cos(q, n) for every (query, negative), in Python floats."""
    return [[_cosine(q, p) - _cosine(q, n) for n in row] for q, p, row in zip(queries, positives, negatives)]


@FAST
@given(triplets=listwise_batches(), data=st.data())
def test_triplet_loss_is_zero_exactly_when_every_margin_is_met(triplets, data):
    """Guards against a hinge that still trains on separated triplets, or one that misses violations.

    The margin is often drawn just above or below the batch's smallest cosine margin, where an
    off-by-a-little hinge would show.
    """
    margins = [m for row in _margins(*triplets) for m in row]
    near = min(margins) + data.draw(st.sampled_from([-1, 1])) * data.draw(st.floats(1e-6, 0.1))
    margin = data.draw(st.one_of(st.floats(0.0, 2.5), st.just(max(0.0, near))))
    assume(all(abs(m - margin) > 1e-9 for m in margins))
    loss = TripletLoss(margin)(*triplets).loss
    assert torch.isfinite(loss) and loss.item() >= 0
    assert (loss.item() == 0) == all(m > margin for m in margins)


@FAST
@given(triplets=listwise_batches(), margin=st.floats(0.0, 2.0), data=st.data())
def test_triplet_loss_ignores_norms_and_single_negatives_need_no_axis(triplets, margin, data):
    """Guards against dot products standing in for cosines, and `(B, d)` negatives read as anything but H = 1."""
    anchors, positives, negatives = triplets
    size, hard = negatives.shape[:2]
    scaled = (
        anchors * data.draw(positive_scales(size)).unsqueeze(1),
        positives * data.draw(positive_scales(size)).unsqueeze(1),
        negatives * data.draw(positive_scales(size * hard)).reshape(size, hard, 1),
    )
    loss = TripletLoss(margin)
    assert loss(*scaled).loss.item() == pytest.approx(loss(*triplets).loss.item(), rel=1e-9, abs=1e-12)
    single = loss(anchors, positives, negatives[:, 0]).loss.item()
    assert single == pytest.approx(loss(anchors, positives, negatives[:, :1]).loss.item(), rel=1e-12, abs=1e-15)


@FAST
@given(triplets=listwise_batches(), scale=st.floats(0.1, 20.0), offset=st.floats(-3.0, 3.0))
def test_margin_mse_is_the_squared_offset_from_the_student_margins(triplets, scale, offset):
    """Guards against margins taken the wrong way round, a missing scale, or a sum instead of a mean.

    Teacher margins equal to the student's give zero; shifting every one by `offset` gives offset**2.
    """
    student = torch.tensor(_margins(*triplets), dtype=torch.float64) * scale
    loss = MarginMSELoss(scale)
    assert loss(*triplets, student).loss.item() == pytest.approx(0.0, abs=1e-20)
    assert loss(*triplets, student + offset).loss.item() == pytest.approx(offset**2, rel=1e-9, abs=1e-20)


def _student_cosines(queries, candidates) -> torch.Tensor:
    return torch.tensor([[_cosine(q, c) for c in row] for q, row in zip(queries, candidates)], dtype=torch.float64)


@FAST
@given(triplets=listwise_batches(min_candidates=2), temperature=st.floats(0.02, 5.0), data=st.data())
def test_kl_distillation_is_zero_for_a_matching_teacher_up_to_a_shift(triplets, temperature, data):
    """Guards against KL that is not zero at the optimum, or that depends on a per-query shift of teacher scores."""
    queries, _, candidates = triplets
    shifts = data.draw(st.lists(st.floats(-50, 50), min_size=len(queries), max_size=len(queries)))
    teacher = _student_cosines(queries, candidates) + torch.tensor(shifts, dtype=torch.float64).unsqueeze(1)
    assert KLDistillationLoss(temperature, scale=1.0)(queries, candidates, teacher).loss.item() == pytest.approx(0.0, abs=1e-9)
    assert KLDistillationLoss(temperature)(queries, candidates, 20 * teacher).loss.item() == pytest.approx(0.0, abs=1e-9)


@st.composite
def teacher_rows(draw, rows: int, columns: int) -> torch.Tensor:
    """Teacher scores with some -inf (excluded candidates), at least one finite score per row."""
    values = st.one_of(st.floats(-30, 30), st.just(-math.inf))
    table = [draw(st.lists(values, min_size=columns, max_size=columns)) for _ in range(rows)]
    for row in table:
        column = draw(st.integers(0, columns - 1))
        row[column] = draw(st.floats(-30, 30))
    return torch.tensor(table, dtype=torch.float64)


@FAST
@given(triplets=listwise_batches(min_candidates=2), temperature=st.floats(0.02, 5.0), data=st.data())
def test_kl_distillation_is_finite_and_non_negative(triplets, temperature, data):
    """Guards against NaN from excluded (-inf) candidates, or a KL taken with the wrong sign."""
    queries, _, candidates = triplets
    teacher = data.draw(teacher_rows(*candidates.shape[:2]))
    for dtype in (torch.float64, torch.float32):
        loss = KLDistillationLoss(temperature)(queries.to(dtype), candidates.to(dtype), teacher.to(dtype)).loss
        assert torch.isfinite(loss) and loss.item() >= -1e-6


@FAST
@given(
    triplets=listwise_batches(min_candidates=2),
    temperature=st.floats(0.02, 5.0),
    bad=st.sampled_from(["+inf", "all -inf", "overflow"]),
    data=st.data(),
)
def test_kl_distillation_refuses_teachers_that_would_make_it_nan(triplets, temperature, bad, data):
    """Guards against a silently NaN loss (and NaN gradients) from +inf scores or a row with no finite score."""
    queries, _, candidates = triplets
    teacher = data.draw(teacher_rows(*candidates.shape[:2])).to(torch.float32)
    row = data.draw(st.integers(0, len(queries) - 1))
    if bad == "+inf":
        teacher[row, data.draw(st.integers(0, teacher.shape[1] - 1))] = math.inf
    elif bad == "all -inf":
        teacher[row] = -math.inf
    else:
        teacher[row, 0] = torch.finfo(torch.float32).max
        temperature = min(temperature, 0.5)
    with pytest.raises(ValueError, match="teacher_scores must be finite or -inf"):
        KLDistillationLoss(temperature)(queries.float(), candidates.float(), teacher)
