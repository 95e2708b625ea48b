"""Losses: each against a naive loop, a hand-computed example and sentence-transformers' maths.

The naive references below use plain Python floats and loops, so they share no code
(and no vectorisation bug) with the losses. sentence-transformers' losses are called
through their `compute_loss_from_embeddings` on the same embeddings; they need no model
for that, so `model=None`.
"""

import logging
import math
import random
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sentence_transformers.sentence_transformer.losses import (
    DistillKLDivLoss,
    MultipleNegativesRankingLoss,
    TripletDistanceMetric,
)
from sentence_transformers.sentence_transformer.losses import MarginMSELoss as STMarginMSELoss
from sentence_transformers.sentence_transformer.losses import TripletLoss as STTripletLoss
from sentence_transformers.util import pairwise_cos_sim

from training import fast_dropout
from training.fast_dropout import cpu_dropout
from training.losses import (
    MAX_HARD_NEGATIVES,
    CachedInfoNCELoss,
    Candidate,
    InfoNCELoss,
    KLDistillationLoss,
    MarginMSELoss,
    TokenBatch,
    TripletLoss,
    false_negative_mask,
    relative_teacher_scores,
)


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _random_mask(rows: int, columns: int, seed: int) -> torch.Tensor:
    mask = torch.rand(rows, columns, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask[range(rows), range(rows)] = False
    return mask


# Naive references: Python floats, one loop per sum.


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.tolist(), b.tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _cross_entropy(scores: list[float], target: int) -> float:
    top = max(scores)
    return top + math.log(sum(math.exp(s - top) for s in scores)) - scores[target]


def _naive_infonce(queries, positives, negatives, temperature, mask=None, symmetric=False) -> float:
    batch_size = len(queries)
    candidates = list(positives) + ([n for row in negatives for n in row] if negatives is not None else [])

    def kept(i: int, j: int) -> bool:
        return mask is None or not bool(mask[i][j])

    forward = []
    for i in range(batch_size):
        columns = [j for j in range(len(candidates)) if j == i or kept(i, j)]
        scores = [_cos(queries[i], candidates[j]) / temperature for j in columns]
        forward.append(_cross_entropy(scores, columns.index(i)))
    loss = sum(forward) / batch_size
    if not symmetric:
        return loss
    backward = []
    for i in range(batch_size):
        rows = [k for k in range(batch_size) if k == i or kept(k, i)]
        scores = [_cos(queries[k], positives[i]) / temperature for k in rows]
        backward.append(_cross_entropy(scores, rows.index(i)))
    return (loss + sum(backward) / batch_size) / 2


def _naive_mask(query_ids, positives, negatives, known_positives=None, teacher_scores=None, threshold=None):
    candidates = list(positives) + [n for row in negatives or [] for n in row]
    batch_size = len(positives)
    mask = []
    for i in range(batch_size):
        row = []
        for j, candidate in enumerate(candidates):
            same_query = j < batch_size and query_ids[j] == query_ids[i]
            known = candidate.doc_id in (known_positives or {}).get(query_ids[i], ())
            teacher = teacher_scores is not None and float(teacher_scores[i][j]) >= threshold
            same = candidate.doc_id == positives[i].doc_id or candidate.text.strip() == positives[i].text.strip()
            row.append(j != i and (same or same_query or known or teacher))
        mask.append(row)
    return torch.tensor(mask, dtype=torch.bool)


def _st_infonce(queries, positives, negatives, temperature, symmetric) -> torch.Tensor:
    if symmetric:
        theirs = MultipleNegativesRankingLoss(
            None, scale=1 / temperature, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"
        )
    else:
        theirs = MultipleNegativesRankingLoss(None, scale=1 / temperature)
    columns = [queries, positives]
    if negatives is not None:
        columns += [negatives[:, h] for h in range(negatives.shape[1])]
    return theirs.compute_loss_from_embeddings(columns, None)


# InfoNCE


@pytest.mark.parametrize("hard_negatives", [0, 1, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_matches_naive_loop(hard_negatives, symmetric):
    """Guards against a wrong candidate layout (rows/columns swapped) or a wrong softmax axis."""
    queries, positives = _random(4, 8, seed=1), _random(4, 8, seed=2)
    negatives = _random(4, hard_negatives, 8, seed=3) if hard_negatives else None
    loss = InfoNCELoss(temperature=0.07, symmetric=symmetric)
    ours = loss.compute_loss_from_embeddings(queries, positives, negatives)
    expected = _naive_infonce(queries, positives, negatives, 0.07, symmetric=symmetric)
    assert ours.loss.item() == pytest.approx(expected, rel=1e-10)
    assert ours.masked == 0


def test_infonce_hand_computed():
    """Guards against missing normalisation or temperature applied the wrong way (multiplied, not divided)."""
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    loss = InfoNCELoss(temperature=0.5)
    # each row: cos 1 to its positive, 0 to the other -> logits (2, 0)
    assert loss(queries, positives).loss.item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)
    # a hard negative equal to the target direction doubles the denominator: logits (2, 0, 0, 2)
    negatives = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])
    assert loss(queries, positives, negatives).loss.item() == pytest.approx(
        math.log(2) + math.log1p(math.exp(-2)), abs=1e-6
    )


def test_symmetric_infonce_hand_computed():
    """Guards against a backward term scored over the wrong axis (queries are the candidates for a document)."""
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    positives = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # forward: row 0 logits (2, 0) target 0; row 1 logits (2, 0) target 1
    forward = (math.log1p(math.exp(-2)) + 2 + math.log1p(math.exp(-2))) / 2
    # backward: document 0 sees queries (2, 2), document 1 sees (0, 0): log 2 each
    expected = (forward + math.log(2)) / 2
    assert InfoNCELoss(0.5, symmetric=True)(queries, positives).loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("hard_negatives", [0, 1, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_matches_sentence_transformers(hard_negatives, symmetric):
    """Guards against drifting from the reference MNR loss (scale = 1/temperature, cosine similarity).

    sentence-transformers orders hard negatives column by column, we order them row by row;
    a softmax does not depend on the order of its candidates, so the losses must agree.
    """
    queries, positives = _random(6, 16, seed=4), _random(6, 16, seed=5)
    negatives = _random(6, hard_negatives, 16, seed=6) if hard_negatives else None
    ours = InfoNCELoss(0.05, symmetric=symmetric)(queries, positives, negatives).loss
    theirs = _st_infonce(queries, positives, negatives, 0.05, symmetric)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-10)


def test_infonce_gradients_match_sentence_transformers():
    """Guards against a loss whose value matches but whose graph is cut (e.g. scores detached too early)."""
    tensors = [_random(5, 8, seed=7).requires_grad_(), _random(5, 8, seed=8).requires_grad_()]
    negatives = _random(5, 2, 8, seed=9).requires_grad_()
    InfoNCELoss(0.05, symmetric=True)(*tensors, negatives).loss.backward()
    ours = [t.grad.clone() for t in (*tensors, negatives)]
    for t in (*tensors, negatives):
        t.grad = None
    _st_infonce(*tensors, negatives, 0.05, symmetric=True).backward()
    for mine, theirs in zip(ours, [t.grad for t in (*tensors, negatives)]):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)


def test_infonce_scores_are_detached_cosines_before_temperature():
    """Guards against diagnostics reported in logit units (x 1/temperature) or holding the graph alive."""
    queries, positives, negatives = _random(3, 8, seed=10), _random(3, 8, seed=11), _random(3, 2, 8, seed=12)
    scores = InfoNCELoss(0.05)(queries.requires_grad_(), positives, negatives).scores
    assert scores.shape == (3, 3 + 6) and not scores.requires_grad
    candidates = [*positives, *negatives.reshape(6, 8)]
    expected = torch.tensor([[_cos(q, c) for c in candidates] for q in queries], dtype=scores.dtype)
    torch.testing.assert_close(scores, expected)


@pytest.mark.parametrize("symmetric", [False, True])
def test_masked_infonce_equals_loss_over_unmasked_candidates(symmetric):
    """Guards against a mask that is ignored, shifted by one column, or not transposed for the backward term."""
    queries, positives, negatives = _random(4, 8, seed=13), _random(4, 8, seed=14), _random(4, 2, 8, seed=15)
    mask = _random_mask(4, 12, seed=16)
    ours = InfoNCELoss(0.1, symmetric=symmetric)(queries, positives, negatives, candidate_mask=mask)
    expected = _naive_infonce(queries, positives, negatives, 0.1, mask=mask.tolist(), symmetric=symmetric)
    assert ours.loss.item() == pytest.approx(expected, rel=1e-10)
    assert ours.masked == int(mask.sum()) > 0


@settings(max_examples=40, deadline=None)
@given(
    batch_size=st.integers(1, 6),
    hard_negatives=st.integers(0, 3),
    temperature=st.floats(0.02, 1.0),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_infonce_is_non_negative_and_masking_never_raises_it(batch_size, hard_negatives, temperature, symmetric, seed):
    """Guards against a mask that adds candidates back, or a loss that can go negative (a sign error)."""
    queries, positives = _random(batch_size, 8, seed=seed), _random(batch_size, 8, seed=seed + 1)
    negatives = _random(batch_size, hard_negatives, 8, seed=seed + 2) if hard_negatives else None
    mask = _random_mask(batch_size, batch_size * (1 + hard_negatives), seed=seed + 3)
    loss = InfoNCELoss(temperature, symmetric=symmetric)
    plain = loss(queries, positives, negatives).loss.item()
    masked = loss(queries, positives, negatives, candidate_mask=mask).loss.item()
    assert 0 <= masked <= plain + 1e-12


@pytest.mark.parametrize("temperature", [0.0, -0.05, math.inf, math.nan])
def test_infonce_refuses_bad_temperature(temperature):
    """Guards against a zero, negative or non-finite temperature silently producing inf/NaN losses."""
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        InfoNCELoss(temperature=temperature)


def test_infonce_refuses_bad_shapes_and_masks():
    """Guards against broadcasting mismatched inputs into a plausible-looking but wrong loss."""
    loss = InfoNCELoss()
    queries, positives = _random(3, 8), _random(3, 8, seed=1)
    with pytest.raises(ValueError, match="at most 20 hard negatives"):
        loss(queries, positives, _random(3, MAX_HARD_NEGATIVES + 1, 8))
    loss(queries, positives, _random(3, MAX_HARD_NEGATIVES, 8))
    assert loss(queries, positives, _random(3, 0, 8)).loss.item() == pytest.approx(loss(queries, positives).loss.item())
    with pytest.raises(ValueError, match="positives must have the queries' shape"):
        loss(queries, _random(4, 8))
    with pytest.raises(ValueError, match=r"negatives must have shape \(B, H, d\)"):
        loss(queries, positives, _random(3, 8))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        loss(queries, positives, candidate_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        loss(queries, positives, candidate_mask=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="never mask a query's own positive"):
        loss(queries, positives, candidate_mask=torch.eye(3, dtype=torch.bool))


# False-negative masks


def _masking_batch():
    query_ids = ["q0", "q1", "q2", "q3"]
    positives = [Candidate("d0", "alpha"), Candidate("d1", "beta"), Candidate("d0", "alpha"), Candidate("d3", "gamma")]
    negatives = [
        [Candidate("d9", "zeta"), Candidate("d5", "delta")],  # columns 4, 5
        [Candidate("d6", " beta\n"), Candidate("d7", "eta")],  # columns 6, 7
        [Candidate("d8", "theta"), Candidate("d1", "beta two")],  # columns 8, 9
        [Candidate("d4", "iota"), Candidate("d2", "kappa")],  # columns 10, 11
    ]
    known = {"q1": {"d8"}, "q3": {"d7", "d3", "unseen"}}
    return query_ids, positives, negatives, known


def test_mask_flags_exactly_the_false_negatives():
    """Guards against a duplicate document, duplicate text or known positive staying in a query's negatives."""
    query_ids, positives, negatives, known = _masking_batch()
    mask = false_negative_mask(query_ids, positives, negatives, known)
    assert mask.dtype == torch.bool and mask.shape == (4, 12)
    flagged = {tuple(pair) for pair in mask.nonzero().tolist()}
    # rows 0 and 2 share d0; " beta\n" has row 1's text; d1 is row 1's document; d8 and d7 are known positives
    assert flagged == {(0, 2), (2, 0), (1, 6), (1, 9), (1, 8), (3, 7)}
    assert torch.equal(mask, _naive_mask(query_ids, positives, negatives, known))


def test_mask_matches_naive_rules_on_random_batches():
    """Guards against the vectorised comparison disagreeing with the written rules on collision-heavy batches."""
    rng = random.Random(0)
    for _ in range(25):
        batch_size, width = rng.randint(1, 6), rng.randint(0, 3)

        def candidate() -> Candidate:
            return Candidate(f"d{rng.randint(0, 6)}", rng.choice(["a", " a", "b", "c ", "d", "e"]))

        query_ids = [f"q{rng.randint(0, 4)}" for _ in range(batch_size)]
        positives = [candidate() for _ in range(batch_size)]
        negatives = [[candidate() for _ in range(width)] for _ in range(batch_size)]
        known = {f"q{k}": {f"d{rng.randint(0, 6)}"} for k in range(3)}
        teacher = _random(batch_size, batch_size * (1 + width), seed=rng.randint(0, 999))
        ours = false_negative_mask(query_ids, positives, negatives, known, teacher, 1.0)
        assert torch.equal(ours, _naive_mask(query_ids, positives, negatives, known, teacher, 1.0))


def test_mask_applies_teacher_threshold_but_never_the_target():
    """Guards against a teacher threshold that removes a query's own positive (the loss would become NaN)."""
    query_ids = ["q0", "q1"]
    positives = [Candidate("d0", "alpha"), Candidate("d1", "beta")]
    negatives = [[Candidate("d2", "gamma")], [Candidate("d3", "delta")]]
    teacher = torch.tensor([[9.0, 0.1, 0.8, 0.0], [9.0, 9.0, 0.2, 0.8]])
    mask = false_negative_mask(query_ids, positives, negatives, teacher_scores=teacher, teacher_threshold=0.8)
    assert mask.tolist() == [[False, False, True, False], [True, False, False, True]]


@pytest.mark.parametrize(("batch_size", "hard_negatives"), [(1, 1), (3, 2), (4, 5)])
def test_relative_teacher_scores_place_each_query_s_own_margins_and_nothing_else(batch_size, hard_negatives):
    """Guards against a query's teacher margins landing in another row's negative columns, or other rows'
    candidates (which have no teacher score for this query) being masked by a relative threshold."""
    own = _random(batch_size, 1 + hard_negatives, seed=batch_size)
    relative = relative_teacher_scores(own)
    assert relative.shape == (batch_size, batch_size * (1 + hard_negatives))
    for i in range(batch_size):
        for j in range(relative.shape[1]):
            negative = j - batch_size - i * hard_negatives
            if j == i:
                expected = 0.0
            elif 0 <= negative < hard_negatives:
                expected = float(own[i, 1 + negative] - own[i, 0])
            else:
                expected = -math.inf
            assert relative[i, j].item() == expected
    for bad in (torch.zeros(2, 1), torch.tensor([[1.0, math.nan]])):
        with pytest.raises(ValueError, match="own teacher scores must be"):
            relative_teacher_scores(bad)


def test_mask_never_masks_the_target_even_when_listed_as_known():
    """Guards against a query's own positive, listed in its qrels, being dropped from its own softmax."""
    mask = false_negative_mask(["q0", "q1"], [Candidate("d0", "a"), Candidate("d0", "a")], None, {"q0": {"d0"}})
    assert mask.tolist() == [[False, True], [True, False]]


def test_repeated_query_masks_the_other_rows_positive():
    """Guards against two relevant documents of one query (two qrels rows in one batch) pushed apart."""
    positives = [Candidate("d0", "a"), Candidate("d1", "b"), Candidate("d2", "c")]
    mask = false_negative_mask(["q0", "q0", "q1"], positives, None)
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_masked_loss_from_mask_equals_loss_without_the_false_negatives():
    """Guards against masking that changes the loss differently from deleting the false negatives."""
    query_ids, positives, negatives, known = _masking_batch()
    mask = false_negative_mask(query_ids, positives, negatives, known)
    q, p, n = _random(4, 8, seed=17), _random(4, 8, seed=18), _random(4, 2, 8, seed=19)
    result = InfoNCELoss(0.05)(q, p, n, candidate_mask=mask)
    assert result.masked == 6
    candidates = [*p, *n.reshape(8, 8)]
    per_query = []
    for i in range(4):
        kept = [j for j in range(12) if not mask[i, j]]
        scores = [_cos(q[i], candidates[j]) / 0.05 for j in kept]
        per_query.append(_cross_entropy(scores, kept.index(i)))
    assert result.loss.item() == pytest.approx(sum(per_query) / 4, rel=1e-10)


def test_mask_refuses_inconsistent_inputs():
    """Guards against ragged negatives or half-given teacher settings producing a misaligned mask."""
    positives = [Candidate("d0", "a"), Candidate("d1", "b")]
    with pytest.raises(ValueError, match="same number of hard negatives"):
        false_negative_mask(["q0", "q1"], positives, [[Candidate("d2", "c")], []])
    with pytest.raises(ValueError, match="one row per query"):
        false_negative_mask(["q0", "q1"], positives, [[Candidate("d2", "c")]])
    with pytest.raises(ValueError, match="one positive per query"):
        false_negative_mask(["q0"], positives, None)
    with pytest.raises(ValueError, match="must be given together"):
        false_negative_mask(["q0", "q1"], positives, None, teacher_scores=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="must be given together"):
        false_negative_mask(["q0", "q1"], positives, None, teacher_threshold=0.5)
    with pytest.raises(ValueError, match=r"teacher_scores must have shape \(B, C\)"):
        false_negative_mask(["q0", "q1"], positives, None, teacher_scores=torch.zeros(2, 3), teacher_threshold=0.5)


# Gradient caching

QUERIES = ["protein study", "quick brown fox", "python library function", "apple banana", "vector index query"]
POSITIVES = [
    "protein study of cancer cells and genes",
    "the quick brown fox jumps over the lazy dog",
    "python library function class error",
    "apple banana cherry red green",
    "a vector index answers a query with a document",
]
NEGATIVES = [
    "cancer risk trial",
    "gene data",
    "lazy dog",
    "fast red fox",
    "class error test",
    "data train test",
    "green blue",
    "small large fruit",
    "search model release",
    "document release",
]


def _tokens(encoder, texts) -> TokenBatch:
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    return TokenBatch(batch["input_ids"], batch["attention_mask"])


def _groups(encoder, hard_negatives: int) -> list[TokenBatch]:
    groups = [_tokens(encoder, QUERIES), _tokens(encoder, POSITIVES)]
    if hard_negatives:
        rows = [NEGATIVES[2 * i + h] for i in range(len(QUERIES)) for h in range(hard_negatives)]
        groups.append(_tokens(encoder, rows))
    return groups


def _gradients(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def _uncached(encoder, groups, loss, chunk, mask=None, seed=0):
    """Loss and gradients from one graph over the whole batch, the embeddings made in `chunk`-row pieces."""
    torch.manual_seed(seed)
    encoder.model.zero_grad()
    pieces = [[group.rows(start, start + chunk) for start in range(0, len(group), chunk)] for group in groups]
    embeddings = [torch.cat([encoder.embed(p.input_ids, p.attention_mask) for p in group]) for group in pieces]
    hard = embeddings[2].view(len(groups[0]), -1, embeddings[2].shape[-1]) if len(groups) == 3 else None
    result = loss.compute_loss_from_embeddings(embeddings[0], embeddings[1], hard, mask)
    result.loss.backward()
    return result.loss.item(), _gradients(encoder.model)


def _cached(encoder, groups, cached, mask=None, seed=0):
    torch.manual_seed(seed)
    encoder.model.zero_grad()
    result = cached.backward(*groups, candidate_mask=mask)
    return result, _gradients(encoder.model)


def _assert_same_gradients(ours, reference):
    assert ours.keys() == reference.keys() and len(ours) > 10
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("numpy_masks", [False, True], ids=["torch-masks", "numpy-masks"])
@pytest.mark.parametrize(
    ("hard_negatives", "symmetric", "mini_batch_size", "masked"),
    [(0, False, 2, False), (2, False, 3, False), (2, True, 2, True), (1, True, 4, False)],
)
def test_cached_infonce_equals_full_batch_with_dropout(
    tiny_encoder, hard_negatives, symmetric, mini_batch_size, masked, numpy_masks, monkeypatch
):
    """Guards against GradCache gradients that differ from the plain loss's (dropout not replayed, wrong rows).

    The model is in train mode, so dropout is on; the reference embeds the same mini-batches in
    the same order from the same seed, so both see the same dropout masks, and builds one graph. With the
    masks the trainers draw on the CPU (`training.fast_dropout`) the replay must redraw them too.
    """
    monkeypatch.setattr(fast_dropout, "NUMPY_MASK_MIN", 0)  # the tiny model's tensors are below it
    with cpu_dropout(tiny_encoder.model) if numpy_masks else nullcontext():
        _check_cached_against_full_batch(tiny_encoder, hard_negatives, symmetric, mini_batch_size, masked)


def _check_cached_against_full_batch(tiny_encoder, hard_negatives, symmetric, mini_batch_size, masked):
    tiny_encoder.model.train()
    groups = _groups(tiny_encoder, hard_negatives)
    columns = 5 * (1 + hard_negatives)
    mask = _random_mask(5, columns, seed=20) if masked else None
    loss = InfoNCELoss(0.05, symmetric=symmetric)
    reference_loss, reference = _uncached(tiny_encoder, groups, loss, mini_batch_size, mask)
    cached = CachedInfoNCELoss(tiny_encoder.embed, 0.05, symmetric=symmetric, mini_batch_size=mini_batch_size)
    result, ours = _cached(tiny_encoder, groups, cached, mask)
    assert not result.loss.requires_grad
    assert result.loss.item() == pytest.approx(reference_loss, abs=1e-5)
    assert result.masked == (int(mask.sum()) if masked else 0)
    _assert_same_gradients(ours, reference)

    _, other_dropout = _uncached(tiny_encoder, groups, loss, mini_batch_size, mask, seed=1)
    assert any(
        not torch.allclose(other_dropout[name], reference[name], rtol=0, atol=1e-5) for name in reference
    ), "dropout did not change the gradients, so this test cannot tell replayed dropout from none"


def test_cached_infonce_equals_single_pass_in_eval_mode(tiny_encoder):
    """Guards against mini-batching changing the maths itself (padding, row order, gradient scaling)."""
    tiny_encoder.model.eval()
    groups = _groups(tiny_encoder, hard_negatives=2)
    loss = InfoNCELoss(0.05, symmetric=True)
    reference_loss, reference = _uncached(tiny_encoder, groups, loss, chunk=len(groups[2]))
    cached = CachedInfoNCELoss(tiny_encoder.embed, 0.05, symmetric=True, mini_batch_size=2)
    result, ours = _cached(tiny_encoder, groups, cached)
    assert result.loss.item() == pytest.approx(reference_loss, abs=1e-5)
    _assert_same_gradients(ours, reference)


def test_cached_infonce_refuses_bad_settings(tiny_encoder):
    """Guards against a zero mini-batch size (an endless or empty loop) or negatives misaligned with queries."""
    for size in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="mini_batch_size must be a positive integer"):
            CachedInfoNCELoss(tiny_encoder.embed, mini_batch_size=size)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        CachedInfoNCELoss(tiny_encoder.embed, temperature=0)
    cached = CachedInfoNCELoss(tiny_encoder.embed, mini_batch_size=2)
    queries, positives, negatives = _groups(tiny_encoder, hard_negatives=2)
    with pytest.raises(ValueError, match="B\\*H rows"):
        cached.backward(queries, positives, negatives.rows(0, 7))
    with pytest.raises(ValueError, match="one positive per query"):
        cached.backward(queries, positives.rows(0, 4))
    with pytest.raises(ValueError, match="same shape"):
        TokenBatch(queries.input_ids, queries.attention_mask[:, :-1])


# Triplet


def _naive_triplet(anchors, positives, negatives, margin) -> float:
    losses = [
        max(0.0, margin - (_cos(a, p) - _cos(a, n)))
        for a, p, row in zip(anchors, positives, negatives)
        for n in row
    ]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("hard_negatives", [1, 3])
def test_triplet_matches_naive_loop_and_sentence_transformers(hard_negatives):
    """Guards against averaging over anchors instead of triplets, or a distance/similarity sign mix-up."""
    anchors, positives = _random(5, 8, seed=21), _random(5, 8, seed=22)
    negatives = _random(5, hard_negatives, 8, seed=23)
    ours = TripletLoss(margin=0.3)(anchors, positives, negatives)
    assert ours.loss.item() == pytest.approx(_naive_triplet(anchors, positives, negatives, 0.3), rel=1e-10)
    theirs = STTripletLoss(None, distance_metric=TripletDistanceMetric.COSINE, triplet_margin=0.3)
    flat = [anchors.repeat_interleave(hard_negatives, 0), positives.repeat_interleave(hard_negatives, 0)]
    expected = theirs.compute_loss_from_embeddings([*flat, negatives.reshape(-1, 8)], None)
    assert ours.loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert ours.scores.shape == (5, 1 + hard_negatives) and ours.masked == 0


def test_triplet_hand_computed():
    """Guards against a hinge that rewards already-separated triplets or ignores the margin."""
    anchors = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    positives = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])
    # margins: 0.2 - (1 - 0) -> 0; 0.2 - (1 - 1) = 0.2; 0.2 - (0 - 1) = 1.2
    assert TripletLoss(0.2)(anchors, positives, negatives).loss.item() == pytest.approx(1.4 / 3, abs=1e-6)


@pytest.mark.parametrize("margin", [-0.1, math.inf, math.nan])
def test_triplet_refuses_bad_margin(margin):
    """Guards against a negative or non-finite margin that makes the hinge meaningless."""
    with pytest.raises(ValueError, match="margin must be a non-negative finite number"):
        TripletLoss(margin)


# MarginMSE


def _naive_margin_mse(queries, positives, negatives, teacher, scale) -> float:
    errors = [
        (scale * (_cos(q, p) - _cos(q, n)) - float(t)) ** 2
        for q, p, row, teacher_row in zip(queries, positives, negatives, teacher)
        for n, t in zip(row, teacher_row)
    ]
    return sum(errors) / len(errors)


@pytest.mark.parametrize("hard_negatives", [1, 3])
def test_margin_mse_matches_naive_loop_and_sentence_transformers(hard_negatives):
    """Guards against regressing absolute scores instead of margins, or pairing margins with the wrong negative."""
    queries, positives = _random(5, 8, seed=24).requires_grad_(), _random(5, 8, seed=25)
    negatives, teacher = _random(5, hard_negatives, 8, seed=26), _random(5, hard_negatives, seed=27)
    teacher_input = teacher.clone().requires_grad_()
    ours = MarginMSELoss(scale=4.0)(queries, positives, negatives, teacher_input)
    assert ours.loss.item() == pytest.approx(_naive_margin_mse(queries, positives, negatives, teacher, 4.0), rel=1e-10)
    theirs = STMarginMSELoss(None, similarity_fct=lambda a, b: 4.0 * pairwise_cos_sim(a, b))
    columns = [queries, positives, *[negatives[:, h] for h in range(hard_negatives)]]
    assert ours.loss.item() == pytest.approx(theirs.compute_loss_from_embeddings(columns, teacher).item(), rel=1e-10)
    ours.loss.backward()
    assert teacher_input.grad is None, "the teacher's margins must not receive gradients"


def test_margin_mse_hand_computed():
    """Guards against a missing scale or a margin taken in the wrong direction (negative minus positive)."""
    queries = torch.tensor([[1.0, 0.0]])
    positives = torch.tensor([[2.0, 0.0]])
    negatives = torch.tensor([[[0.0, 5.0], [-1.0, 0.0]]])
    # student margins: 2 * (1 - 0) = 2 and 2 * (1 - (-1)) = 4; teacher 3 and 3 -> errors 1 and 1
    result = MarginMSELoss(scale=2.0)(queries, positives, negatives, torch.tensor([[3.0, 3.0]]))
    assert result.loss.item() == pytest.approx(1.0, abs=1e-6)


def test_margin_mse_refuses_bad_settings_and_shapes():
    """Guards against a zero scale (a constant student) or teacher margins broadcast over the wrong axis."""
    for scale in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            MarginMSELoss(scale)
    loss = MarginMSELoss()
    queries, positives, negatives = _random(3, 8), _random(3, 8, seed=1), _random(3, 2, 8, seed=2)
    with pytest.raises(ValueError, match=r"teacher_margins must have shape \(B, H\)"):
        loss(queries, positives, negatives, _random(3))
    with pytest.raises(ValueError, match=r"negatives must have shape \(B, H, d\)"):
        loss(queries, positives, _random(3, 8), _random(3, 1))


# KL distillation


def _naive_kl(queries, candidates, teacher, temperature, scale) -> float:
    total = 0.0
    for q, row, teacher_row in zip(queries, candidates, teacher):
        student = [scale * _cos(q, c) / temperature for c in row]
        target = [float(t) / temperature for t in teacher_row]
        student_log_z = max(student) + math.log(sum(math.exp(s - max(student)) for s in student))
        target_log_z = max(target) + math.log(sum(math.exp(t - max(target)) for t in target))
        for s, t in zip(student, target):
            p = math.exp(t - target_log_z)
            total += p * ((t - target_log_z) - (s - student_log_z))
    return temperature**2 * total / len(queries)


@pytest.mark.parametrize(("temperature", "scale"), [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 20.0), (2.0, 7.5)])
def test_kl_distillation_matches_naive_loop_and_sentence_transformers(temperature, scale):
    """Guards against KL taken the wrong way round, a missing temperature**2, averaging over candidates,
    or a student scale applied to the teacher too (or not at all)."""
    queries, candidates, teacher = _random(4, 8, seed=28), _random(4, 5, 8, seed=29), 10 * _random(4, 5, seed=30)
    ours = KLDistillationLoss(temperature, scale)(queries, candidates, teacher)
    assert ours.loss.item() == pytest.approx(_naive_kl(queries, candidates, teacher, temperature, scale), rel=1e-9)
    theirs = DistillKLDivLoss(None, similarity_fct=lambda a, b: scale * pairwise_cos_sim(a, b), temperature=temperature)
    columns = [queries, *[candidates[:, n] for n in range(5)]]
    assert ours.loss.item() == pytest.approx(theirs.compute_loss_from_embeddings(columns, teacher).item(), rel=1e-9)
    assert ours.scores.shape == (4, 5)


def test_kl_distillation_hand_computed():
    """Guards against a loss that is not zero when the student already matches the teacher."""
    queries = torch.tensor([[1.0, 0.0]])
    candidates = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    loss = KLDistillationLoss(temperature=1.0, scale=1.0)
    # student logits (1, 0): a teacher with the same logits gives 0; a uniform teacher gives
    # sum_n 0.5 * (log 0.5 - log q_n) with q = softmax(1, 0)
    assert loss(queries, candidates, torch.tensor([[1.0, 0.0]])).loss.item() == pytest.approx(0.0, abs=1e-7)
    q = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    expected = sum(0.5 * (math.log(0.5) - math.log(p)) for p in q)
    assert loss(queries, candidates, torch.tensor([[0.0, 0.0]])).loss.item() == pytest.approx(expected, abs=1e-6)


def test_kl_distillation_default_scale_lets_a_cosine_student_match_a_cross_encoder():
    """Guards against a flat student softmax: at scale 1 a student that ranks the candidates exactly as a
    cross-encoder does (logits spread by 8) still pays a large KL, pushing its cosines to the extremes."""
    queries = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    angles = torch.tensor([0.4, 1.2, 1.5], dtype=torch.float64)
    candidates = torch.stack([angles.cos(), angles.sin()], dim=-1).unsqueeze(0)
    cosines = angles.cos().unsqueeze(0)
    teacher = 20.0 * cosines + 3.0
    assert KLDistillationLoss().scale == 20.0
    assert KLDistillationLoss()(queries, candidates, teacher).loss.item() == pytest.approx(0.0, abs=1e-9)
    flat = KLDistillationLoss(scale=1.0)(queries, candidates, teacher).loss.item()
    assert flat == pytest.approx(_naive_kl(queries, candidates, teacher, 1.0, 1.0), rel=1e-9) and flat > 0.5


def test_kl_distillation_warns_once_when_teacher_collapses(caplog):
    """Guards against a temperature so low that the teacher's softmax underflows and candidates get no signal."""
    loss = KLDistillationLoss(temperature=0.01)
    queries, candidates = _random(2, 8), _random(2, 3, 8, seed=1)
    teacher = torch.tensor([[10.0, 0.0, -5.0], [1.0, 0.9, 0.8]], dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="training.losses.kl_distill"):
        loss(queries, candidates, teacher)
        loss(queries, candidates, teacher)
    warnings = [r for r in caplog.records if "underflows" in r.getMessage()]
    assert len(warnings) == 1 and "raise the temperature above 0.15" in warnings[0].getMessage()


def test_kl_distillation_refuses_bad_settings_and_inputs():
    """Guards against NaN teachers, single-candidate lists (zero gradient) and misaligned teacher scores."""
    for temperature in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            KLDistillationLoss(temperature)
    for scale in (0.0, -20.0, math.inf):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            KLDistillationLoss(scale=scale)
    loss = KLDistillationLoss()
    queries = _random(2, 8)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        loss(queries, _random(2, 1, 8), _random(2, 1))
    with pytest.raises(ValueError, match=r"teacher_scores must have shape \(B, N\)"):
        loss(queries, _random(2, 3, 8), _random(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        loss(queries, _random(2, 3, 8), torch.tensor([[0.0, math.nan, 1.0], [0.0, 0.0, 0.0]]))


def test_every_loss_computes_in_fp32_from_bf16_embeddings():
    """Guards against a bf16 loss and coarse gradients when a caller hands a loss bf16 embeddings: a bf16 cosine
    moves in steps of 2^-8, 0.08 in an InfoNCE logit at temperature 0.05."""
    queries, positives, negatives = _random(6, 16, seed=40), _random(6, 16, seed=41), _random(6, 2, 16, seed=42)
    teacher = _random(6, 2, seed=43)
    losses = [
        lambda q, p, n: InfoNCELoss(temperature=0.05)(q, p, n),
        lambda q, p, n: TripletLoss(margin=0.3)(q, p, n),
        lambda q, p, n: MarginMSELoss()(q, p, n, teacher),
        lambda q, p, n: KLDistillationLoss()(q, torch.cat([p.unsqueeze(1), n], dim=1), teacher[:, :1].repeat(1, 3)),
    ]
    for loss in losses:
        rounded = [x.bfloat16() for x in (queries, positives, negatives)]
        ours = loss(*rounded).loss
        exact = loss(*(x.double() for x in rounded)).loss
        assert ours.dtype == torch.float32 and ours.item() == pytest.approx(exact.item(), rel=1e-5)
