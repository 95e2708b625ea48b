"""Training across processes on CPU (gloo, two processes): the same maths as one process, one set of outputs."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import WORDS
from tests.job_data import TINY_RECIPE
from tests.processes import free_port
from tests.training_data import synthetic_task
from training import distributed
from training.batch_sampler import no_duplicate_batches, shard
from training.bi_encoder import BiEncoder
from training.examples import TrainingExample
from training.fine_tune import fine_tune
from training.losses import Candidate
from training.metrics_log import read_log
from training.recipe import load_recipe
from training.report import render_report
from training.stage import StageConfig
from training.trainer import StageStep, TrainingContext

WORLD = 2
STEPS = {
    "in-batch, symmetric": StageConfig(loss="infonce", batch_size=5, symmetric=True),
    "hard negatives, masked": StageConfig(loss="infonce", negatives="mined", hard_negatives=2, batch_size=5),
    "GradCache": StageConfig(loss="infonce", negatives="mined", hard_negatives=1, batch_size=5, mini_batch_size=2, symmetric=True),
    "MarginMSE": StageConfig(loss="margin_mse", negatives="teacher", hard_negatives=2, batch_size=5),
}
KNOWN_POSITIVES = {"q0": {"d3"}}


def _global_batch(hard_negatives: int) -> list[TrainingExample]:
    """Five examples (shards of 3 and 2); each second negative is another example's positive, so the mask bites."""
    rng = random.Random(7)
    docs = [Candidate(f"d{i}", " ".join(rng.sample(WORDS, 6))) for i in range(10)]
    batch = []
    for i in range(5):
        example = TrainingExample(f"q{i}", " ".join(rng.sample(WORDS, 3)), docs[i], (docs[5 + i], docs[(i + 1) % 5]))
        example = example.with_teacher_scores([rng.uniform(-1, 1) for _ in range(3)])
        batch.append(example if hard_negatives == 2 else example.with_negatives(example.negatives[:hard_negatives]))
    return batch


def _step(encoder: BiEncoder, stage: StageConfig) -> dict:
    """One trainer step on the global batch, in eval mode (no dropout); the loss and every parameter's gradient."""
    encoder.model.eval()
    encoder.model.zero_grad(set_to_none=True)
    ctx = TrainingContext(encoder=encoder, log=None, known_positives=KNOWN_POSITIVES)
    with distributed.data_parallel(encoder) as synced:
        out, _ = StageStep(ctx, stage, synced)(_global_batch(stage.hard_negatives))
    grads = {name: p.grad.clone() for name, p in encoder.model.named_parameters() if p.grad is not None}
    return {"loss": float(out.loss.detach()), "grads": grads}


def _rank_steps(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """One of the two processes: joins the group from torchrun's variables and runs every step."""
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.process_group():
        assert distributed.world_size() == WORLD and distributed.rank() == rank
        encoder = BiEncoder.load(model_dir)
        torch.save({name: _step(encoder, stage) for name, stage in STEPS.items()}, Path(out_dir) / f"rank{rank}.pt")


def _spawn(model_dir: Path, out_dir: Path, timeout: float = 240) -> None:
    context = mp.start_processes(
        _rank_steps, args=(free_port(), str(model_dir), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish in {timeout} s")


def test_two_processes_get_the_single_process_loss_and_gradients(tiny_model_dir, tmp_path):
    """Guards against local-only negatives, a gather whose backward drops or double-counts, and shards that
    leave DDP's averaging off by the world size: each of two processes embeds its shard of five examples,
    and after DDP every parameter gradient must equal one process's on the whole batch. Gradients reach
    about 1, and summation order alone moves them by a few 1e-6, hence the tolerance."""
    _spawn(tiny_model_dir, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    encoder = BiEncoder.load(tiny_model_dir)
    for name, stage in STEPS.items():
        reference = _step(encoder, stage)
        assert reference["loss"] > 0.1, name
        assert len(reference["grads"]) > 10 and any(g.abs().max() > 1e-4 for g in reference["grads"].values()), name
        for rank, results in enumerate(ranks):
            ours = results[name]
            assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-6), (name, rank)
            assert ours["grads"].keys() == reference["grads"].keys(), (name, rank)
            for param, grad in reference["grads"].items():
                torch.testing.assert_close(ours["grads"][param], grad, rtol=1e-4, atol=1e-5, msg=f"{name}, rank {rank}, {param}")


def test_shards_split_each_global_batch_without_overlap():
    """Guards against shards that overlap, drop examples, or leave a process with nothing to embed."""
    examples = [
        TrainingExample(f"q{i}", f"query {i}", Candidate(f"d{i % 9}", f"text {i % 9}")) for i in range(34)
    ]
    for shards in (1, 2, 3):
        seen = []
        for batch in no_duplicate_batches(examples, 4, seed=5, shards=shards):
            parts = [list(shard(batch, index, shards)) for index in range(shards)]
            assert [i for part in parts for i in part] == batch, "rank order is batch order"
            assert all(parts), "every process gets at least one example"
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            seen.extend(batch)
        assert len(seen) == len(set(seen))
        if shards == 1:
            assert sorted(seen) == list(range(34)), "one process still sees every example"
    assert len(list(no_duplicate_batches(examples, 4, seed=5))) > len(list(no_duplicate_batches(examples, 4, seed=5, shards=3)))


RECIPE = TINY_RECIPE + """
[[stage]]
name = "mined"
negatives = "mined"
hard_negatives = 1
mini_batch_size = 3
learning_rate = 5e-4
batch_size = 8
"""


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_torchrun_trains_once_and_writes_what_one_process_writes(tiny_model_dir, tmp_path):
    """Guards against every process writing (duplicated log lines, racing saves), a hang at a collective,
    and a run folder that differs from a single-process run's: `lockstep train` under torchrun with two
    processes on a tiny model, then the same recipe in one process for comparison."""
    from sentence_transformers import SentenceTransformer  # here, so the processes spawned above never import it

    data = synthetic_task(48)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"query_id": q, "query": data.queries[q], "positive_id": d, "positive": data.documents[d]}) + "\n"
        for q, judged in data.qrels.items() for d in judged
    ))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "two" / "model"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
        "-m", "service.cli", "--data-dir", str(tmp_path / "data"),
        "train", "--out", str(out), "--pairs", str(pairs), "--recipe", str(recipe), "--model", str(tiny_model_dir),
    ]
    env = {**os.environ, "LOCKSTEP_LOG_LEVEL": "warning", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(f"model: {out}") == 1 and result.stdout.count("dev nDCG@10") == 1, result.stdout

    theirs = SentenceTransformer(str(out), device="cpu").encode(["apple banana", "protein cells"], normalize_embeddings=True)
    assert np.allclose(BiEncoder.load(out).encode(["apple banana", "protein cells"]), theirs, atol=1e-5)
    assert sorted(path.name for path in out.parent.iterdir()) == ["model", "model.run"]

    records = read_log(out.parent / "model.run")
    summary = [r for r in records if r["type"] == "summary"]
    assert len(summary) == 1, "the summary is written once"
    steps = [r for r in records if r["type"] == "step"]
    assert len(steps) == sum(stage["steps"] for stage in summary[0]["stages"]) > 0, "each step is logged once"
    assert [r["global_step"] for r in steps] == list(range(1, len(steps) + 1))
    assert [r["stage"] for r in records if r["type"] == "mining"] == ["mined"]

    alone = tmp_path / "one"
    fine_tune(tiny_model_dir, data, load_recipe(recipe), alone / "model", alone / "model.run")
    render_report(alone / "model.run")
    assert _files(out.parent / "model.run") == _files(alone / "model.run")
    assert _files(out) == _files(alone / "model")
