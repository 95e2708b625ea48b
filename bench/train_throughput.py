"""Training throughput: Lockstep's in-batch InfoNCE vs sentence-transformers' trainer with MNRL, and GradCache memory.

Both train all-MiniLM-L6-v2 for one epoch on the same SciFact (query, positive) pairs
with batch 32, lr 2e-5, 10% warmup and the model's own maximum lengths; pairs/s is
measured in the same run, so the ratio is what to compare. The target compares with
the sentence-transformers trainer as it runs by default (fp32); where Lockstep trains
in bf16, the baseline also runs with its own `bf16` flag, and that ratio is printed
too. The memory part runs
one optimisation step per setting in a fresh process and reports its peak resident
memory: cached InfoNCE (GradCache, mini-batches of 32) at batch 1024 against plain
InfoNCE at batch 64, on (title, text) pairs of SciFact documents (the train judgements
have fewer than 1024 pairs).

    python bench/train_throughput.py --data ../shared/data/scifact
    python bench/train_throughput.py --data ../shared/data/scifact --pairs 256 --skip-memory
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.finetune_scifact import baseline  # noqa: E402
from bench.targets import verdict  # noqa: E402
from indexer.ingest import read_corpus  # noqa: E402
from training.bi_encoder import BiEncoder  # noqa: E402
from training.default_model import default_model_path  # noqa: E402
from training.eval_data import load_qrels, load_queries  # noqa: E402
from training.examples import examples_from_qrels  # noqa: E402
from training.metrics_log import MetricsLog  # noqa: E402
from training.precision import resolve_training  # noqa: E402
from training.stage import StageConfig  # noqa: E402
from training.trainer import TrainingContext, train_stage  # noqa: E402


def scifact_examples(data: Path, limit: int):
    documents = {doc.id: doc.embedding_text() for doc in read_corpus(data / "corpus.jsonl")}
    examples = examples_from_qrels(load_queries(data / "queries.jsonl"), load_qrels(data / "qrels" / "train.tsv"), documents)
    return examples[:limit]


def ours(examples, stage: StageConfig, precision: str, run_dir: Path) -> float:
    """One stage of Lockstep's trainer without evaluation; returns training pairs/s."""
    encoder = BiEncoder.load(default_model_path())
    ctx = TrainingContext(encoder=encoder, log=MetricsLog(run_dir), precision=precision)
    started = time.perf_counter()
    result = train_stage(ctx, examples, stage, {})
    return result.examples_used * stage.epochs / (time.perf_counter() - started)


def title_pairs(data: Path, limit: int):
    """(title, text) pairs of distinct corpus documents: enough pairs for a batch of 1024, at real lengths."""
    documents = [doc for doc in read_corpus(data / "corpus.jsonl") if doc.title and doc.text][:limit]
    return examples_from_qrels({f"t{d.id}": d.title for d in documents}, {f"t{d.id}": {d.id: 1} for d in documents},
                               {d.id: d.text for d in documents})


def probe_memory(data: Path, batch: int, mini_batch: int) -> None:
    """One optimisation step at `batch` (cached when `mini_batch` > 0); prints the process's peak RSS in MiB."""
    examples = title_pairs(data, batch)
    stage = StageConfig(name="probe", batch_size=batch, mini_batch_size=mini_batch, epochs=1, warmup_ratio=0.0)
    with tempfile.TemporaryDirectory() as run_dir:
        ours(examples, stage, "fp32", Path(run_dir))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def measure_memory(data: Path, batch: int, mini_batch: int) -> float:
    command = [sys.executable, __file__, "--data", str(data), "--probe", f"{batch}:{mini_batch}"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
    parser.add_argument("--pairs", type=int, default=512, help="training pairs for the throughput comparison")
    parser.add_argument("--precision", default="auto", help="auto, fp32 or bf16 for Lockstep (the baseline runs fp32, and bf16 too when Lockstep does)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the GradCache memory comparison")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        batch, mini_batch = (int(part) for part in args.probe.split(":"))
        probe_memory(args.data, batch, mini_batch)
        return
    print(f"command: python bench/train_throughput.py --data {args.data} --pairs {args.pairs} --precision {args.precision}"
          + (" --skip-memory" if args.skip_memory else ""))
    examples = scifact_examples(args.data, args.pairs)
    precision = resolve_training(args.precision, torch.device("cpu"))
    stage = StageConfig(name="mnr", batch_size=32, learning_rate=2e-5, warmup_ratio=0.1, epochs=1)
    with tempfile.TemporaryDirectory() as out:
        theirs_rate = baseline(default_model_path(), examples, Path(out))
        theirs_bf16 = baseline(default_model_path(), examples, Path(out), bf16=True) if precision == "bf16" else None
        ours_fp32 = ours(examples, stage, "fp32", Path(out) / "fp32")
        ours_rate = ours(examples, stage, precision, Path(out) / precision) if precision != "fp32" else ours_fp32
    print(f"\n{len(examples)} pairs, batch 32, one epoch")
    print(f"sentence-transformers MNRL (fp32)  {theirs_rate:7.2f} pairs/s  1.00x")
    if theirs_bf16 is not None:
        print(f"sentence-transformers MNRL (bf16)  {theirs_bf16:7.2f} pairs/s  {theirs_bf16 / theirs_rate:.2f}x")
    print(f"Lockstep InfoNCE fp32              {ours_fp32:7.2f} pairs/s  {ours_fp32 / theirs_rate:.2f}x")
    if precision != "fp32":
        print(f"Lockstep InfoNCE {precision:<18}{ours_rate:7.2f} pairs/s  {ours_rate / theirs_rate:.2f}x")
    print(verdict(f"training pairs/s vs sentence-transformers (Lockstep in {precision})", ours_rate / theirs_rate, 1.5))
    if theirs_bf16 is not None:
        print(f"Lockstep bf16 vs sentence-transformers with its bf16 flag: {ours_rate / theirs_bf16:.2f}x")
    if not args.skip_memory:
        plain = measure_memory(args.data, 64, 0)
        cached = measure_memory(args.data, 1024, 32)
        print(f"peak RSS: plain InfoNCE batch 64 {plain:.0f} MiB, cached InfoNCE batch 1024 (mini-batch 32) "
              f"{cached:.0f} MiB ({cached / plain:.2f}x)")


if __name__ == "__main__":
    main()
