"""Fine-tuning on SciFact train: Lockstep's default recipe vs sentence-transformers' MNRL baseline.

Both start from the packaged all-MiniLM-L6-v2, train on the same train split of the
SciFact train qrels and are scored on the same seeded dev split (the recipe's
`dev_fraction` and `seed`); SciFact's test labels are not used. The baseline is what a
user would otherwise pick: `MultipleNegativesRankingLoss`, batch 32, 1 epoch, lr 2e-5.
Prints dev nDCG@10 of base, baseline, ours and ours + reranking with the run's
cross-encoder teacher (its scores alone, and fused with the bi-encoder's as the
service does by default), and training pairs/s of both.

    python bench/finetune_scifact.py --data ../shared/data/scifact --out bench-out/finetune
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.ingest import read_corpus  # noqa: E402
from training.bi_encoder import BiEncoder  # noqa: E402
from training.cross_encoder import CrossEncoder  # noqa: E402
from training.default_model import default_model_path  # noqa: E402
from training.dev_eval import DevSet, evaluate_encoder  # noqa: E402
from training.eval_data import load_qrels, load_queries, split_queries  # noqa: E402
from training.examples import examples_from_qrels  # noqa: E402
from training.fine_tune import TrainingData, fine_tune  # noqa: E402
from training.metrics_log import read_log  # noqa: E402
from training.precision import resolve_training  # noqa: E402
from training.recipe import load_recipe  # noqa: E402
from training.rerank_eval import evaluate_reranked  # noqa: E402
from training.score_fusion import DEFAULT_RERANK_WEIGHT  # noqa: E402
from training.teacher import TEACHER_DIR  # noqa: E402


def baseline(model_path: Path, examples, out: Path, bf16: bool = False) -> float:
    """Train with sentence-transformers' trainer and MNRL (in fp32, its default, or with its `bf16` flag); returns
    training pairs/s."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(str(model_path), device="cpu")
    dataset = Dataset.from_dict({"anchor": [e.query for e in examples], "positive": [e.positive.text for e in examples]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st-checkpoints"), num_train_epochs=1, per_device_train_batch_size=32,
        learning_rate=2e-5, warmup_ratio=0.1, save_strategy="no", report_to=[], seed=13, logging_steps=10, bf16=bf16, use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(model))
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    model.save(str(out / "st-baseline"))
    return len(examples) / elapsed


def ours_pairs_per_second(run_dir: Path) -> float:
    """Pairs/s of the first (in-batch) stage, the one comparable to the baseline."""
    steps = [r for r in read_log(run_dir) if r["type"] == "step"]
    first = steps[0]["stage"]
    stage = [r for r in steps if r["stage"] == first]
    elapsed = stage[-1]["time"] - stage[0]["time"]
    return sum(r["batch"] for r in stage[1:]) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
    parser.add_argument("--out", type=Path, default=Path("bench-out/finetune"))
    parser.add_argument("--recipe", type=Path, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe)
    documents = {doc.id: doc.embedding_text() for doc in read_corpus(args.data / "corpus.jsonl")}
    queries = load_queries(args.data / "queries.jsonl")
    qrels = load_qrels(args.data / "qrels" / "train.tsv")
    train_ids, dev_ids = split_queries(list(qrels), recipe.run.dev_fraction, recipe.run.seed)
    train_qrels = {q: qrels[q] for q in train_ids}
    dev = DevSet.build(queries, {q: qrels[q] for q in dev_ids}, {}, documents, seed=recipe.run.seed)
    examples = examples_from_qrels(queries, train_qrels, documents)
    model_path = default_model_path()
    precision = resolve_training(recipe.run.precision, BiEncoder.load(model_path).device)

    def dev_ndcg(path: Path) -> float:
        return evaluate_encoder(BiEncoder.load(path), dev, precision=precision)["ndcg@10"]

    results = {"base": dev_ndcg(model_path)}
    print(f"base dev nDCG@10 {results['base']:.4f}", flush=True)
    results["baseline_pairs_per_s"] = baseline(model_path, examples, args.out)
    results["baseline"] = dev_ndcg(args.out / "st-baseline")
    print(f"baseline dev nDCG@10 {results['baseline']:.4f}", flush=True)
    started = time.perf_counter()
    summary = fine_tune(model_path, TrainingData(queries, qrels, documents), recipe, args.out / "ours", args.out / "ours.run", show_progress=True)
    results["ours_wall_s"] = time.perf_counter() - started
    results["ours"] = summary.final["ndcg@10"]
    results["ours_pairs_per_s"] = ours_pairs_per_second(args.out / "ours.run")
    teacher_dir = args.out / "ours.run" / TEACHER_DIR
    if teacher_dir.exists():
        encoder, teacher = BiEncoder.load(args.out / "ours"), CrossEncoder.load(teacher_dir)
        results["ours_reranked_alone"] = evaluate_reranked(encoder, teacher, dev, weight=1.0, precision=precision)["ndcg@10"]
        results["ours_reranked"] = evaluate_reranked(encoder, teacher, dev, weight=DEFAULT_RERANK_WEIGHT, precision=precision)["ndcg@10"]
    results["stages"] = summary.stages
    results["precision"] = precision
    print(json.dumps(results, indent=2))
    print(f"dev nDCG@10 ({len(dev.queries)} queries): base {results['base']:.4f}, sentence-transformers MNRL {results['baseline']:.4f}, "
          f"Lockstep {results['ours']:.4f}" + (
              f", Lockstep + rerank {results['ours_reranked']:.4f} (cross-encoder alone {results['ours_reranked_alone']:.4f})"
              if "ours_reranked" in results else ""))
    print(f"training pairs/s: sentence-transformers {results['baseline_pairs_per_s']:.1f}, Lockstep stage 1 {results['ours_pairs_per_s']:.1f} ({precision})")
    print("reproduce: python bench/finetune_scifact.py --data ../shared/data/scifact --out bench-out/finetune")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
