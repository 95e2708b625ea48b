"""Training end to end on a tiny model: stages, gates, early stopping, collapse abort, checkpoints."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from training.batch_sampler import no_duplicate_batches
from training.bi_encoder import BiEncoder
from training.diagnostics import Thresholds
from training.examples import TrainingExample, load_pairs
from training.errors import InvalidInput
from training.fine_tune import TrainingData, fine_tune
from training.losses import Candidate
from training.metrics_log import read_log
from training.recipe import load_recipe, parse_recipe, parse_recipe_text
from training.stage import DEFAULT_MINE_MARGIN, StageConfig
from training.trainer import TrainingAborted
from tests.training_data import synthetic_task


TINY = Thresholds(collapse_max_mean_cosine=0.99, collapse_min_dim_std=0.001)


def _recipe(*stages, **run):
    return parse_recipe({"run": {"seed": 3, "dev_fraction": 0.25, "precision": "fp32", **run}, "stage": list(stages)})


def test_in_batch_recipe_improves_dev_and_saves_a_loadable_model(tiny_model_dir, tmp_path):
    """Guards against a trainer that runs but does not learn, or saves something sentence-transformers cannot load."""
    data = synthetic_task()
    recipe = _recipe({"name": "mnr", "loss": "infonce", "epochs": 6, "learning_rate": 5e-4, "batch_size": 16, "symmetric": True})
    summary = fine_tune(tiny_model_dir, data, recipe, tmp_path / "model", tmp_path / "run", thresholds=TINY)
    assert summary.final["ndcg@10"] > summary.base["ndcg@10"] + 0.05
    assert summary.stages[0]["gated"] is False
    records = read_log(tmp_path / "run")
    kinds = {r["type"] for r in records}
    assert {"eval", "step", "stage", "summary", "stage_start", "stage_end"} <= kinds
    step = next(r for r in records if r["type"] == "step")
    assert {"loss", "lr", "masked", "grad_norm", "negatives_above_positive"} <= set(step)
    evaluation = next(r for r in records if r["type"] == "eval" and r["stage"] == "mnr")
    for signal in ("mean_dim_std", "mean_pairwise_cosine", "ndcg@10_low_overlap", "ndcg@10_high_overlap", "ndcg@10_train", "query_norm_mean", "doc_norm_mean"):
        assert signal in evaluation
    trained = BiEncoder.load(tmp_path / "model")
    theirs = SentenceTransformer(str(tmp_path / "model"), device="cpu").encode(["apple banana"], normalize_embeddings=True)
    assert np.allclose(trained.encode(["apple banana"]), theirs, atol=1e-5)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["ndcg@10"] == summary.final["ndcg@10"]


def test_training_is_reproducible(tiny_model_dir, tmp_path):
    data = synthetic_task(40)
    recipe = _recipe({"name": "mnr", "epochs": 1, "learning_rate": 1e-4, "batch_size": 8})
    first = fine_tune(tiny_model_dir, data, recipe, tmp_path / "a", tmp_path / "ra", thresholds=TINY)
    second = fine_tune(tiny_model_dir, data, recipe, tmp_path / "b", tmp_path / "rb", thresholds=TINY)
    assert BiEncoder.load(tmp_path / "a").fingerprint == BiEncoder.load(tmp_path / "b").fingerprint
    assert first.final == second.final


def test_mined_and_cached_stages_run_and_report_mining(tiny_model_dir, tmp_path):
    data = synthetic_task()
    recipe = _recipe(
        {"name": "mnr", "epochs": 3, "learning_rate": 5e-4, "batch_size": 16},
        {"name": "mined", "negatives": "mined", "hard_negatives": 2, "epochs": 1, "learning_rate": 1e-4,
         "batch_size": 16, "mini_batch_size": 5, "mine_window_start": 1, "mine_window_end": 20},
        {"name": "triplet", "loss": "triplet", "negatives": "mined", "hard_negatives": 1, "epochs": 1,
         "learning_rate": 1e-4, "batch_size": 8, "mine_window_start": 1, "mine_window_end": 20},
    )
    summary = fine_tune(tiny_model_dir, data, recipe, tmp_path / "model", tmp_path / "run", thresholds=TINY)
    assert [s["name"] for s in summary.stages] == ["mnr", "mined", "triplet"]
    mining = [r for r in read_log(tmp_path / "run") if r["type"] == "mining"]
    assert len(mining) == 2 and mining[0]["kept"] > 0
    dropped = mining[0]["dropped_known_positive"] + mining[0]["dropped_too_close"] + mining[0]["dropped_by_teacher"]
    assert dropped + mining[0]["kept"] + mining[0]["not_needed"] == mining[0]["candidates"]
    assert summary.final["ndcg@10"] >= summary.base["ndcg@10"], "gates keep only improvements"


def test_a_stage_that_hurts_is_rolled_back(tiny_model_dir, tmp_path):
    """Guards against a later stage silently undoing an earlier stage's gains."""
    data = synthetic_task()
    recipe = _recipe(
        {"name": "good", "epochs": 6, "learning_rate": 5e-4, "batch_size": 16},
        {"name": "harmful", "epochs": 1, "learning_rate": 5e-2, "batch_size": 16, "temperature": 5.0, "warmup_ratio": 0.0},
    )
    summary = fine_tune(tiny_model_dir, data, recipe, tmp_path / "model", tmp_path / "run", thresholds=TINY)
    good, harmful = summary.stages
    assert harmful["gated"] is True and harmful["best_step"] == 0
    assert summary.final["ndcg@10"] == pytest.approx(good["ndcg@10"])
    evaluated = BiEncoder.load(tmp_path / "model")
    assert evaluated.fingerprint != BiEncoder.load(tiny_model_dir).fingerprint


def test_collapse_is_detected_and_aborts(tiny_model_dir, tmp_path):
    """Guards against a collapsing run finishing 'successfully' with a useless model."""
    data = synthetic_task()
    recipe = _recipe({"name": "collapse", "epochs": 6, "learning_rate": 0.5, "batch_size": 16, "eval_every": 2, "warmup_ratio": 0.0})
    with pytest.raises(TrainingAborted, match="representation collapse"):
        fine_tune(tiny_model_dir, data, recipe, tmp_path / "model", tmp_path / "run", thresholds=TINY)
    alerts = [r for r in read_log(tmp_path / "run") if r["type"] == "alert"]
    assert alerts and alerts[0]["mode"] == "collapse" and "temperature" in alerts[0]["remedy"]


def test_batches_never_repeat_a_document_or_text():
    examples = [
        TrainingExample(f"q{i}", f"query {i}", Candidate(f"d{i % 5}", f"text {i % 5}"), (Candidate(f"n{i % 7}", f"neg {i % 7}"),))
        for i in range(40)
    ]
    seen = []
    for batch in no_duplicate_batches(examples, 4, seed=1):
        ids = [examples[i].positive.doc_id for i in batch] + [n.doc_id for i in batch for n in examples[i].negatives]
        assert len(ids) == len(set(ids))
        seen.extend(batch)
    assert sorted(seen) == list(range(40)), "every example is used exactly once per epoch"


def test_no_batch_is_one_example_with_nothing_to_contrast():
    """Guards against batches of a single in-batch example (zero loss, zero gradient, yet an optimiser step and a
    scheduled step) filling most of an epoch when many pairs share one answer."""
    shared = [TrainingExample(f"f{i}", f"faq question {i}", Candidate("answer", "the one answer")) for i in range(30)]
    other = [TrainingExample(f"q{i}", f"query {i}", Candidate(f"d{i}", f"text {i}")) for i in range(30)]
    batches = list(no_duplicate_batches(shared + other, 8, seed=2))
    assert batches and all(len(batch) >= 2 for batch in batches)
    used = [i for batch in batches for i in batch]
    assert len(used) == len(set(used)) and set(range(30, 60)) <= set(used)
    with_negative = [TrainingExample("q", "lone query", Candidate("a", "the one answer"), (Candidate("n", "neg"),))]
    assert list(no_duplicate_batches(with_negative, 8, seed=0)) == [[0]], "one example with negatives still trains"


def test_pairs_and_triplets_files(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        '{"query": "q one", "positive": "doc one", "negatives": ["doc two"]}\n'
        '{"anchor": "q two", "positive": "doc two", "negative": "doc one"}\n'
        '{"query_id": "7", "query": "q", "positive_id": "d7", "positive": "p"}\n'
    )
    examples = load_pairs(path)
    assert [len(e.negatives) for e in examples] == [1, 1, 0]
    assert examples[0].negatives[0].doc_id == examples[1].positive.doc_id, "same text, same id"
    assert examples[2].query_id == "7" and examples[2].positive.doc_id == "d7"
    data = TrainingData.from_examples(examples)
    assert data.qrels["7"] == {"d7": 1} and len(data.documents) == 3
    assert data.negatives == {examples[0].query_id: (examples[1].positive.doc_id,), examples[1].query_id: (examples[0].positive.doc_id,)}
    path.write_text('{"query": "q", "positive": ""}\n')
    with pytest.raises(InvalidInput, match=r"pairs\.jsonl:1: "):
        load_pairs(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query": "q", "positive": "p", "negatives": ["n"], "negative_ids": 5}', "must be a list with one id per negative"),
        ('{"query": "q", "positive": "p", "negatives": ["n"], "negative_ids": ["a", "b"]}', "one id per negative"),
        ('{"query": "q \\ud800", "positive": "p"}', "query holds '\\ud800', a lone surrogate"),
        ('{"query": "q", "positive": "p", "negatives": ["ok", "\\udfff"]}', "negative 1 holds '\\udfff'"),
        ('{"query": "q", "positive": "p", "query_id": ' + "9" * 5000 + "}", "more than 4300 digits"),
        ('{"query": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    ],
)
def test_bad_pairs_lines_name_the_file_and_line(tmp_path, line, message):
    """Guards against tracebacks (TypeError, ValueError, RecursionError) from a bad line instead of `file:line`."""
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n\n' + line + "\n")
    with pytest.raises(InvalidInput, match=r"pairs\.jsonl:3: ") as raised:
        load_pairs(path)
    assert message in str(raised.value)


def test_pairs_that_are_not_utf8_or_unreadable_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"query": "q", "positive": "p"}\n{"query": "caf\xe9", "positive": "p"}\n')
    with pytest.raises(InvalidInput, match=r"pairs\.jsonl:2: not valid UTF-8"):
        load_pairs(path)

    def denied(self, *args, **kwargs):  # tests run as root, who reads any file, so the refusal is simulated
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "open", denied)
    with pytest.raises(InvalidInput, match=r"pairs\.jsonl: cannot be read \(Permission denied\)"):
        load_pairs(path)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"loss": "nope"}, "loss must be one of"),
        ({"loss": "margin_mse", "hard_negatives": 1, "negatives": "mined"}, "'teacher'"),
        ({"temperature": 0}, "temperature must be a positive"),
        ({"hard_negatives": 21, "negatives": "mined"}, "between 0 and 20"),
        ({"typo_field": 1}, "unknown settings ['typo_field']"),
        ({"epochs": 1e9}, "epochs must be an integer, got 1000000000.0"),
        ({"epochs": 10**9}, "epochs must be an integer from 1 to 1000"),
        ({"batch_size": 10**8}, "batch_size must be an integer from 2 to 65536"),
        ({"batch_size": 8, "mini_batch_size": 16}, "mini_batch_size must be at most batch_size (8)"),
        ({"negatives": "mined", "hard_negatives": 1, "mine_window_end": 10**6}, "mine_window_end at most 10000"),
        ({"hard_negatives": "1", "negatives": "mined"}, "hard_negatives must be an integer, got '1'"),
        ({"distill_scale": 0}, "distill_scale must be a positive finite number, got 0"),
        ({"triplet_margin": -0.1}, "triplet_margin must be a non-negative finite number"),
        ({"symmetric": 1}, "symmetric must be true or false, got 1"),
        ({"teacher_mask_threshold": "0.1"}, "teacher_mask_threshold must be a number or unset, got '0.1'"),
        ({"negatives": 3}, "negatives must be one of 'in_batch', 'given', 'mined', 'teacher', got 3"),
        ({"negatives": "mined", "hard_negatives": 1, "mine_margin": float("nan")}, "mine_margin must be a finite number or unset"),
    ],
)
def test_bad_recipes_are_refused_with_the_field(stage, message):
    with pytest.raises(InvalidInput) as raised:
        _recipe({"name": "s", **stage})
    assert message in str(raised.value)


def test_the_student_margin_defaults_by_negative_source_and_yields_to_a_set_one():
    """Guards against a teacher stage whose mining drops the candidates closest to the positive on the student's
    scores before the teacher judges them, and against a set margin being overridden."""
    mined = StageConfig(name="m", negatives="mined", hard_negatives=1)
    teacher = StageConfig(name="t", loss="margin_mse", negatives="teacher", hard_negatives=1)
    assert (mined.student_margin(), teacher.student_margin()) == (DEFAULT_MINE_MARGIN, None)
    assert replace(teacher, mine_margin=0.02).student_margin() == 0.02
    assert replace(mined, mine_margin=0.0).student_margin() == 0.0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('stage = [1]', "each [[stage]] must be a table, got 1"),
        ('[run]\ndev_fraction = "x"\n[[stage]]\nname = "s"', "[run]: dev_fraction must be a number, got 'x'"),
        ('[teacher]\nepochs = 1.5\n[[stage]]\nname = "s"', "[teacher]: epochs must be an integer, got 1.5"),
        ('[diagnostics]\ncollapse_patience = "2"\n[[stage]]\nname = "s"', "collapse_patience must be an integer"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_refused_with_the_section(toml, message):
    """Guards against TOML values of the wrong type reaching the checks as a TypeError (a 500 over HTTP)."""
    with pytest.raises(InvalidInput) as raised:
        parse_recipe_text(toml, "r.toml")
    assert str(raised.value).startswith("r.toml: ") and message in str(raised.value)


def test_shipped_default_recipe_parses():
    recipe = load_recipe()
    assert [s.name for s in recipe.stages] == ["in-batch", "hard-negatives", "distill"]
    assert recipe.teacher is not None and recipe.stages[-1].loss == "margin_mse"
    assert [s.student_margin() for s in recipe.stages[1:]] == [0.05, None], "the teacher judges the distilled negatives"


def test_report_renders_every_diagnostic(tiny_model_dir, tmp_path):
    """Guards against a report that silently omits a failure-mode plot."""
    from training.report import render_report

    data = synthetic_task(40)
    recipe = _recipe({"name": "mnr", "epochs": 2, "learning_rate": 1e-4, "batch_size": 8})
    fine_tune(tiny_model_dir, data, recipe, tmp_path / "model", tmp_path / "run", thresholds=TINY)
    page = render_report(tmp_path / "run").read_text()
    for caption in ("Loss", "Overfitting", "Collapse", "Collapse (cosine)", "False negatives", "Shortcut learning", "Drift"):
        assert f"<figcaption>{caption}</figcaption>" in page
    assert page.count("data:image/png;base64,") >= 8 and "Remedies by failure mode" in page
    with pytest.raises(InvalidInput, match="no metrics.jsonl"):
        render_report(tmp_path / "nothing")


def test_distillation_stages_train_a_teacher_and_use_its_cached_scores(tiny_model_dir, tmp_path):
    """Guards against the teacher path (train teacher, mine, score, MarginMSE/KL) breaking unnoticed."""
    from training.teacher_cache import TeacherScoreCache

    data = synthetic_task(48)
    recipe = parse_recipe({
        "run": {"seed": 3, "dev_fraction": 0.25, "precision": "fp32"},
        "teacher": {"init": str(tiny_model_dir), "epochs": 1, "batch_size": 8, "negatives": 3, "max_length": 64},
        "stage": [
            {"name": "margin", "loss": "margin_mse", "negatives": "teacher", "hard_negatives": 2, "epochs": 1,
             "learning_rate": 1e-4, "batch_size": 8, "mine_window_start": 1, "mine_window_end": 20,
             "mine_teacher_margin": -100.0},
            {"name": "kl", "loss": "kl", "negatives": "teacher", "hard_negatives": 2, "epochs": 1,
             "learning_rate": 1e-4, "batch_size": 8, "mine_window_start": 1, "mine_window_end": 20,
             "mine_teacher_margin": -100.0},
        ],
    })
    summary = fine_tune(tiny_model_dir, data, recipe, tmp_path / "model", tmp_path / "run", thresholds=TINY)
    assert [s["name"] for s in summary.stages] == ["margin", "kl"]
    assert all(s["examples"] > 0 for s in summary.stages)
    assert (tmp_path / "run" / "teacher" / "model.safetensors").exists()
    mining = [r for r in read_log(tmp_path / "run") if r["type"] == "mining"]
    assert [r["stage"] for r in mining] == ["margin", "kl"]
    assert all(r["dropped_too_close"] == 0 and r["dropped_by_teacher"] == 0 for r in mining), \
        "with a teacher and no mine_margin set, the student's margin filter is off"
    with TeacherScoreCache(tmp_path / "run" / "teacher_scores.sqlite3") as cache:
        assert len(cache) > 0, "teacher scores were cached on disk"
    for stage in ("margin", "kl"):
        assert (tmp_path / "run" / "checkpoints" / stage / "modules.json").exists()
    steps = [r for r in read_log(tmp_path / "run") if r["type"] == "step"]
    assert {r["stage"] for r in steps} == {"margin", "kl"} and all(np.isfinite(r["loss"]) for r in steps)


def test_a_trained_teacher_follows_the_run_seed(tiny_model_dir, tmp_path):
    """Guards against every run training the same teacher whatever its seed (the seed never reaching the teacher's
    mining, head initialisation and shuffling), so seeded reruns would not vary the teacher at all."""
    from training.examples import examples_from_qrels, known_positives
    from training.recipe import TeacherConfig
    from training.teacher import obtain_teacher

    data = synthetic_task(24)
    examples = examples_from_qrels(data.queries, data.qrels, data.documents)
    config = TeacherConfig(init=str(tiny_model_dir), epochs=1, batch_size=8, negatives=2, max_length=32)

    def head(seed: int, run: str) -> torch.Tensor:
        teacher, _ = obtain_teacher(config, BiEncoder.load(tiny_model_dir), examples, data.documents,
                                    known_positives(examples), tmp_path / run, "fp32", False, seed)
        return torch.cat([p.detach().flatten() for p in teacher.model.classifier.parameters()])

    assert torch.equal(head(3, "a"), head(3, "b"))
    assert not torch.equal(head(3, "c"), head(4, "d"))
