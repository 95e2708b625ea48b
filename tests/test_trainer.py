"""The stage trainer on a tiny model: evaluation points, schedule length, early stopping, aborts, and which
negatives reach the loss (teacher-masked, given in the pairs file)."""

import logging
from dataclasses import dataclass, field

import pytest
import torch

from tests.conftest import WORDS
from tests.training_data import synthetic_task
from training.batch_sampler import batches_per_epoch
from training.bi_encoder import BiEncoder
from training.dev_eval import DevSet
from training.diagnostics import Thresholds
from training.errors import InvalidInput
from training.eval_data import split_queries
from training.examples import TrainingExample, with_given_negatives
from training.fast_dropout import ATTENTION_NAME
from training.fine_tune import TrainingData, fine_tune
from training.losses import Candidate, InfoNCELoss, TripletLoss
from training.metrics_log import MetricsLog, read_log
from training.recipe import named_recipe, parse_recipe
from training.schedule import warmup_cosine
from training.stage import StageConfig
from training.trainer import StageStep, TrainingAborted, TrainingContext, _for_epoch, _usable, train_stage

TINY = Thresholds(collapse_max_mean_cosine=0.99, collapse_min_dim_std=0.001)


def _state(encoder: BiEncoder) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in encoder.model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class ScriptedContext(TrainingContext):
    """A context whose dev evaluation returns scripted nDCG values and keeps the weights it saw."""

    scores: list[float] = field(default_factory=list)
    seen: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def evaluate(self) -> dict:
        self.seen.append(_state(self.encoder))
        score = self.scores[min(len(self.seen), len(self.scores)) - 1]
        return {"ndcg@10": score, "mean_dim_std": 0.1, "mean_pairwise_cosine": 0.1}


def _context(tiny_model_dir, tmp_path, scores: list[float]) -> ScriptedContext:
    return ScriptedContext(
        encoder=BiEncoder.load(tiny_model_dir), log=MetricsLog(tmp_path), dev=DevSet({}, {}, {}),
        precision="fp32", seed=3, thresholds=TINY, scores=scores,
    )


def _examples(count: int, distinct_docs: int) -> list[TrainingExample]:
    """Examples whose positives repeat every `distinct_docs`, so the sampler defers clashes."""
    return [
        TrainingExample(
            f"q{i}", f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]}",
            Candidate(f"d{i % distinct_docs}", " ".join(WORDS[(i % distinct_docs) * 2 : (i % distinct_docs) * 2 + 5])),
        )
        for i in range(count)
    ]


def test_evaluations_land_on_every_epoch_end_and_the_schedule_ends_at_the_last_step(tiny_model_dir, tmp_path):
    """Guards against epoch ends computed from epoch 0's batch count when deferrals change it per epoch:
    evaluations on the wrong steps, a skipped final evaluation (its steps then lost at the best-weights
    restore) and a learning-rate schedule that ends before or after the last step."""
    examples, stage = _examples(26, 7), StageConfig(name="s", epochs=4, batch_size=4, learning_rate=1e-4, warmup_ratio=0.25)
    counts = [batches_per_epoch(examples, stage.batch_size, 3, epoch) for epoch in range(stage.epochs)]
    assert len(set(counts)) > 1, f"the data must give different batch counts per epoch, got {counts}"
    ctx = _context(tiny_model_dir, tmp_path, [0.1 * (k + 1) for k in range(10)])
    result = train_stage(ctx, examples, stage, {})
    records = read_log(tmp_path)
    epoch_ends = [sum(counts[: epoch + 1]) for epoch in range(stage.epochs)]
    assert [r["step"] for r in records if r["type"] == "eval"] == epoch_ends
    assert result.steps == epoch_ends[-1] == next(r["steps"] for r in records if r["type"] == "stage_start")
    assert result.best_step == result.steps, "the final step was evaluated, so its weights are kept"
    steps = [r for r in records if r["type"] == "step"]
    assert [r["epoch"] for r in steps] == [epoch for epoch, count in enumerate(counts) for _ in range(count)]
    reference = warmup_cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-4), result.steps // 4, result.steps)
    rates = []
    for _ in range(result.steps):
        rates.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert [r["lr"] for r in steps] == pytest.approx(rates), "each step logs the rate it used, not the next one's"
    assert reference.get_last_lr()[0] == 0.0 and steps[-1]["lr"] > 0, "the schedule reaches 0 just after the last step"


def test_a_stage_whose_examples_all_share_one_document_stops_with_what_to_fix(tiny_model_dir, tmp_path):
    """Guards against such a stage reaching the schedule with zero steps and failing with its internal ValueError."""
    examples = [TrainingExample(f"q{i}", f"question {i}", Candidate("d", "the only answer")) for i in range(8)]
    with pytest.raises(TrainingAborted, match=r"its 8 usable examples form no batch of two or more without a repeated"):
        train_stage(_context(tiny_model_dir, tmp_path, [0.1]), examples, StageConfig(name="s", batch_size=4), {})


def test_given_negatives_pooled_for_a_query_are_drawn_per_epoch_and_mined_ones_keep_their_order():
    """Guards against a query's pooled given negatives (one per triplet line) training only the first line's, for
    every example and every epoch, and against reordering mined negatives, which come hardest first."""
    negatives = tuple(Candidate(f"n{i}", f"negative {i}") for i in range(6))
    examples = [TrainingExample(f"q{i}", f"query {i}", Candidate(f"d{i}", f"doc {i}"), negatives) for i in range(4)]
    usable = _usable(examples, StageConfig(name="g", negatives="given", hard_negatives=1))
    given = StageConfig(name="g", negatives="given", hard_negatives=1)
    drawn = [_for_epoch(usable, given, seed=3, epoch=epoch) for epoch in range(3)]
    picked = {e.negatives[0].doc_id for epoch in drawn for e in epoch}
    assert len(picked) >= 4 and all(len(e.negatives) == 1 for epoch in drawn for e in epoch)
    assert drawn[0] == _for_epoch(usable, given, seed=3, epoch=0), "seeded: the same draw on a rerun"
    mined = _for_epoch(usable, StageConfig(name="m", negatives="mined", hard_negatives=2), seed=3, epoch=1)
    assert all([n.doc_id for n in e.negatives] == ["n0", "n1"] for e in mined)


def test_a_plateau_stops_early_and_restores_the_best_weights(tiny_model_dir, tmp_path):
    """Guards against patience that never stops a stalled stage, or a stop that keeps the last weights instead
    of the best ones."""
    examples = _examples(16, 16)
    stage = StageConfig(name="s", epochs=3, batch_size=4, learning_rate=1e-3, eval_every=1, patience=2, warmup_ratio=0.0)
    ctx = _context(tiny_model_dir, tmp_path, [0.1, 0.3, 0.2, 0.2, 0.2])
    result = train_stage(ctx, examples, stage, {})
    assert result.stopped_early and result.steps == 4 < 3 * 4 and result.best_step == 2
    assert result.best["ndcg@10"] == 0.3
    assert not _same(ctx.seen[1], ctx.seen[3]), "the weights moved after the best evaluation"
    assert _same(_state(ctx.encoder), ctx.seen[1]), "the weights of the best evaluation (step 2) are restored"
    assert [r["stopped_early"] for r in read_log(tmp_path) if r["type"] == "stage_end"] == [True]


def test_non_finite_gradients_abort_before_updating_and_restore_the_best_weights(tiny_model_dir, tmp_path, monkeypatch):
    """Guards against an overflow in the backward pass (a finite loss, infinite gradients) being clipped into NaN
    weights, after which the run ended on a misleading "loss became nan"."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def overflowing_from_the_second_step(parameters, max_norm, **kwargs):
        calls.append(1)
        norm = clip(parameters, max_norm, **kwargs)
        return norm if len(calls) < 2 else norm * float("inf")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing_from_the_second_step)
    stage = StageConfig(name="s", epochs=2, batch_size=4, learning_rate=1e-3, eval_every=1, warmup_ratio=0.0)
    ctx = _context(tiny_model_dir, tmp_path, [0.1, 0.2])
    with pytest.raises(TrainingAborted, match=r"the gradients became inf \(the loss was \d+\.\d{4}\) at step 2, so no update"):
        train_stage(ctx, _examples(16, 16), stage, {})
    assert len(ctx.seen) == 1 and _same(_state(ctx.encoder), ctx.seen[0])


def test_a_non_finite_loss_aborts_before_updating_and_restores_the_best_weights(tiny_model_dir, tmp_path, monkeypatch):
    """Guards against a NaN loss that is stepped into the weights (every later step is NaN) or that ends the
    run without saying what happened and what to change."""
    original = InfoNCELoss.compute_loss_from_embeddings
    calls = []

    def nan_from_the_second_call(self, *args, **kwargs):
        calls.append(1)
        out = original(self, *args, **kwargs)
        return out if len(calls) < 2 else type(out)(out.loss * float("nan"), out.masked, out.scores)

    monkeypatch.setattr(InfoNCELoss, "compute_loss_from_embeddings", nan_from_the_second_call)
    stage = StageConfig(name="s", epochs=2, batch_size=4, learning_rate=1e-3, eval_every=1, warmup_ratio=0.0)
    ctx = _context(tiny_model_dir, tmp_path, [0.1, 0.2])
    with pytest.raises(TrainingAborted, match=r"the loss became nan at step 2, so no update was applied and the best weights were restored"):
        train_stage(ctx, _examples(16, 16), stage, {})
    assert len(ctx.seen) == 1 and _same(_state(ctx.encoder), ctx.seen[0])


def test_training_steps_draw_dropout_masks_fast_and_evaluations_run_as_before(tiny_model_dir, tmp_path, monkeypatch):
    """Guards against the trainer drawing its CPU dropout masks with torch's per-element generator (a third of a
    step's time on 256-token documents), or leaving the swapped attention behind after the stage."""
    seen = []
    original = InfoNCELoss.compute_loss_from_embeddings

    def spy(self, *args, **kwargs):
        seen.append(ctx.encoder.model.config._attn_implementation)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InfoNCELoss, "compute_loss_from_embeddings", spy)
    ctx = _context(tiny_model_dir, tmp_path, [0.1, 0.2])
    train_stage(ctx, _examples(16, 16), StageConfig(name="s", epochs=1, batch_size=4, warmup_ratio=0.0), {})
    assert seen == [ATTENTION_NAME] * 4
    assert ctx.encoder.model.config._attn_implementation == "sdpa"


def _without_dev(tiny_model_dir, tmp_path, thresholds: Thresholds) -> TrainingContext:
    return TrainingContext(encoder=BiEncoder.load(tiny_model_dir), log=MetricsLog(tmp_path), precision="fp32", seed=3,
                           thresholds=thresholds)


@pytest.mark.parametrize("mini_batch_size", [0, 2])
def test_a_collapse_between_evaluations_aborts_on_the_training_batches(tiny_model_dir, tmp_path, mini_batch_size):
    """Guards against a collapse that only the dev evaluations could see: a run without a dev set (or one that
    collapses within an epoch) trained a collapsed model to the end. Plain and cached InfoNCE both hand the
    batch's documents to the check."""
    start = _state(BiEncoder.load(tiny_model_dir))
    thresholds = Thresholds(collapse_max_mean_cosine=0.99, collapse_min_dim_std=0.001, collapse_step_patience=3)
    ctx = _without_dev(tiny_model_dir, tmp_path, thresholds)
    stage = StageConfig(name="s", epochs=40, batch_size=8, mini_batch_size=mini_batch_size, learning_rate=0.5,
                        warmup_ratio=0.0)
    with pytest.raises(TrainingAborted, match=r"representation collapse on 3 training batches in a row \(dim std "
                                              r"\d\.\d{4}, mean cosine 0\.99\d\) at step \d+, so no update"):
        train_stage(ctx, _examples(16, 16), stage, {})
    steps = [r for r in read_log(tmp_path) if r["type"] == "step"]
    assert steps[0]["batch_mean_cosine"] < 0.99 and steps[-1]["batch_mean_cosine"] > 0.99
    assert len(steps) < 40 * 2, "the run stopped long before its last step"
    assert _same(_state(ctx.encoder), start), "without a dev set the best weights are the starting ones"


def test_without_a_dev_set_the_batches_are_judged_against_the_first_batch(tiny_model_dir, tmp_path):
    """Guards against absolute bounds aborting a healthy model that starts past them (an anisotropic model's high
    mean cosine) when there is no base evaluation to judge it against: bounds that call every batch collapsed
    abort at once unless they are moved relative to the run's first batch."""
    thresholds = Thresholds(collapse_max_mean_cosine=0.0, collapse_min_dim_std=1.0, collapse_step_patience=1)
    ctx = _without_dev(tiny_model_dir, tmp_path, thresholds)
    stage = StageConfig(name="s", epochs=2, batch_size=4, learning_rate=1e-5, warmup_ratio=0.0)
    result = train_stage(ctx, _examples(16, 16), stage, {})
    assert result.steps == 8
    first = next(r for r in read_log(tmp_path) if r["type"] == "step")
    assert ctx.first_batch == {"mean_dim_std": first["batch_dim_std"], "mean_pairwise_cosine": first["batch_mean_cosine"]}


def test_a_negative_the_teacher_scores_as_positive_is_masked(tiny_model_dir, tmp_path, monkeypatch):
    """Guards against `teacher_mask_threshold` being accepted but never applied, so a hard negative the teacher
    judges relevant (a false negative) is still pushed away from its query."""
    examples = [
        e.with_negatives([Candidate(f"n{i}", f"{WORDS[i]} {WORDS[i + 7]} {WORDS[i + 13]}"), Candidate(f"m{i}", f"{WORDS[i + 2]} {WORDS[i + 9]}")])
        .with_teacher_scores([4.0, 3.9 if i % 2 == 0 else -2.0, -3.0])
        for i, e in enumerate(_examples(8, 8))
    ]
    masks = []
    original = InfoNCELoss.compute_loss_from_embeddings

    def spy(self, queries, positives, negatives=None, candidate_mask=None):
        masks.append(candidate_mask.cpu())
        return original(self, queries, positives, negatives, candidate_mask)

    monkeypatch.setattr(InfoNCELoss, "compute_loss_from_embeddings", spy)
    stage = StageConfig(name="s", negatives="teacher", hard_negatives=2, batch_size=4, teacher_mask_threshold=0.5)
    train_stage(_context(tiny_model_dir, tmp_path, [0.1]), examples, stage, {})
    steps = [r for r in read_log(tmp_path) if r["type"] == "step"]
    assert len(masks) == len(steps) == 2
    for mask, step in zip(masks, steps):
        assert mask.shape == (4, 4 + 4 * 2) and step["masked"] == int(mask.sum())
        flagged = {(row, column) for row, column in mask.nonzero().tolist()}
        assert all(column == 4 + 2 * row for row, column in flagged), "only a row's own first negative is masked"
    assert sum(int(m.sum()) for m in masks) == 4, "exactly the four first negatives scored 3.9, within 0.5 of the positive's 4.0"


def test_the_teacher_mask_is_refused_where_it_cannot_apply():
    """Guards against a teacher threshold silently ignored on a stage that has no teacher scores or no mask."""
    with pytest.raises(InvalidInput, match="teacher_mask_threshold needs loss = 'infonce', negatives = 'teacher'"):
        StageConfig(negatives="mined", hard_negatives=1, teacher_mask_threshold=0.5)
    with pytest.raises(InvalidInput, match="teacher_mask_threshold must be a finite number"):
        StageConfig(negatives="teacher", hard_negatives=1, teacher_mask_threshold=float("nan"))


def test_the_step_mask_marks_the_teacher_flagged_negative_only(tiny_model_dir):
    """Guards against relative teacher scores placed in the wrong columns, masking another row's negative."""
    from training import distributed

    encoder = BiEncoder.load(tiny_model_dir)
    ctx = TrainingContext(encoder=encoder, log=None)
    batch = [
        TrainingExample("q0", "a", Candidate("p0", "p zero"), (Candidate("n0", "n zero"), Candidate("m0", "m zero")), (1.0, 0.2, 0.9)),
        TrainingExample("q1", "b", Candidate("p1", "p one"), (Candidate("n1", "n one"), Candidate("m1", "m one")), (2.0, 5.0, 0.0)),
    ]
    stage = StageConfig(negatives="teacher", hard_negatives=2, batch_size=2, teacher_mask_threshold=0.25)
    with distributed.data_parallel(encoder) as synced:
        mask = StageStep(ctx, stage, synced).mask(batch)
    # columns: p0, p1, n0, m0, n1, m1; q0's m0 (0.9 >= 1.0 - 0.25) and q1's n1 (5.0 above 2.0) are masked
    assert {tuple(x) for x in mask.nonzero().tolist()} == {(0, 3), (1, 4)}


def _pairs_with_negatives(documents: int) -> TrainingData:
    task = synthetic_task(documents)
    examples = [
        TrainingExample(q, task.queries[q], Candidate(f"d{i}", task.documents[f"d{i}"]),
                        (Candidate(f"d{(i + 1) % documents}", task.documents[f"d{(i + 1) % documents}"]),))
        for i, q in enumerate(task.queries)
    ]
    return TrainingData.from_examples(examples)


@pytest.mark.parametrize("loss", ["triplet", "infonce"])
def test_negatives_given_in_the_pairs_file_reach_the_loss(tiny_model_dir, tmp_path, monkeypatch, loss):
    """Guards against explicit negatives being read from a triplets file and then dropped, so the model never
    trains on them (the qrels carry positives only)."""
    data = _pairs_with_negatives(40)
    documents_embedded, negatives_seen = [], []
    original_tokens = StageStep._tokens

    def tokens_spy(self, texts, kind):
        if kind == "document":
            documents_embedded.extend(texts)
        return original_tokens(self, texts, kind)

    loss_class = TripletLoss if loss == "triplet" else InfoNCELoss
    original_loss = loss_class.compute_loss_from_embeddings

    def loss_spy(self, queries, positives, negatives=None, *rest):
        negatives_seen.append(None if negatives is None else tuple(negatives.shape))
        return original_loss(self, queries, positives, negatives, *rest)

    monkeypatch.setattr(StageStep, "_tokens", tokens_spy)
    monkeypatch.setattr(loss_class, "compute_loss_from_embeddings", loss_spy)
    recipe = parse_recipe({"run": {"seed": 3, "dev_fraction": 0.25, "precision": "fp32"}, "stage": [
        {"name": "given", "loss": loss, "negatives": "given", "hard_negatives": 1, "epochs": 1, "batch_size": 8},
    ]})
    fine_tune(tiny_model_dir, data, recipe, tmp_path / "model", tmp_path / "run", thresholds=TINY)
    train_queries, _ = split_queries(list(data.qrels), 0.25, 3)
    assert negatives_seen and all(shape is not None and shape[1] == 1 for shape in negatives_seen)
    for query_id in train_queries:
        (negative,) = data.negatives[query_id]
        assert data.documents[negative] in documents_embedded, f"{query_id}'s given negative {negative} was never embedded"



def test_the_triplets_recipe_trains_on_given_negatives_and_other_recipes_say_they_ignore_them(
    tiny_model_dir, tmp_path, caplog
):
    """Guards against a triplets file's negatives being silently unused: the shipped `triplets` recipe has a
    stage that trains on them, and a recipe without one says so when the data brings negatives."""
    triplets = named_recipe("triplets")
    assert [(s.negatives, s.hard_negatives) for s in triplets.stages] == [("in_batch", 0), ("given", 1)]
    data = _pairs_with_negatives(40)
    quick = parse_recipe({"run": {"seed": 3, "dev_fraction": 0.25, "precision": "fp32"}, "stage": [
        {"name": "in-batch", "negatives": "in_batch", "epochs": 1, "batch_size": 8},
    ]}, source="quick-test")
    with caplog.at_level(logging.WARNING, logger="training.fine_tune"):
        fine_tune(tiny_model_dir, data, quick, tmp_path / "model", tmp_path / "run", thresholds=TINY)
    assert f"{len(data.negatives)} queries bring negatives of their own, which recipe quick-test does not" in caplog.text

def test_pairs_keep_their_negatives_except_where_another_pair_calls_them_positive():
    """Guards against a negative that another pair names as relevant to the same query being trained as a
    negative, and against given negatives that point at no document text."""
    doc = {name: Candidate(name, f"text of {name}") for name in ("a", "b", "c")}
    data = TrainingData.from_examples([
        TrainingExample("q", "query", doc["a"], (doc["b"], doc["c"])),
        TrainingExample("q", "query", doc["b"], (doc["c"],)),
        TrainingExample("r", "other", doc["c"]),
    ])
    assert data.negatives == {"q": ("c",)} and data.qrels["q"] == {"a": 1, "b": 1}
    examples = with_given_negatives([TrainingExample("q", "query", doc["a"]), TrainingExample("r", "other", doc["c"])], data.negatives, data.documents)
    assert [[n.doc_id for n in e.negatives] for e in examples] == [["c"], []]
    with pytest.raises(InvalidInput, match=r"given negatives \['zz'\] are not in the documents"):
        with_given_negatives(examples, {"q": ("zz",)}, data.documents)
