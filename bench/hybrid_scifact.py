"""Hybrid search on SciFact: nDCG@10 of dense, BM25 and their fusion at several lexical weights, per model.

Ingests the SciFact corpus into a fresh data dir, builds a release with each model
(the packaged all-MiniLM-L6-v2 unless `--model` is given, repeatable) and scores the
809 judged train queries exactly as `lockstep eval --lexical-weight W` does
(`indexer.retrieval_eval.evaluate_release`), so the dense figure in each row is the
baseline measured in the same run. Also times writing the corpus with and without its
BM25 index, the cost every write now pays.

    python bench/hybrid_scifact.py --scifact ../shared/data/scifact
    python bench/hybrid_scifact.py --scifact ../shared/data/scifact --model models/scifact --split-fraction 0.2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer import lexical_index  # noqa: E402
from indexer.corpus_store import CorpusStore  # noqa: E402
from indexer.ingest import read_corpus  # noqa: E402
from indexer.live_release import LiveRelease  # noqa: E402
from indexer.release_builder import BuildOptions, build_release  # noqa: E402
from indexer.release_store import ReleaseStore  # noqa: E402
from indexer.retrieval_eval import evaluate_release  # noqa: E402
from training.default_model import default_model_path  # noqa: E402
from training.eval_data import load_qrels, load_queries, split_judged  # noqa: E402

WEIGHTS = (0.0, 0.3, 0.5, 0.7, 1.0)


def write_seconds(documents: list, folder: Path, indexed: bool) -> float:
    """Seconds to upsert `documents` in one transaction into a new corpus, with or without the BM25 index."""
    store = CorpusStore(folder / ("indexed.sqlite3" if indexed else "plain.sqlite3"))
    put = lexical_index.put
    if not indexed:
        lexical_index.put = lambda *args: None
    try:
        started = time.perf_counter()
        store.upsert(documents)
        return time.perf_counter() - started
    finally:
        lexical_index.put = put
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scifact", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
    parser.add_argument("--model", type=Path, action="append", help="model folder (repeatable); default the packaged MiniLM")
    parser.add_argument("--split-fraction", type=float, default=None, help="score only the seeded dev split training holds out")
    args = parser.parse_args()
    models = args.model or [default_model_path()]
    split = f" --split-fraction {args.split_fraction}" if args.split_fraction else ""
    print(f"command: python bench/hybrid_scifact.py --scifact {args.scifact}" + "".join(f" --model {m}" for m in args.model or []) + split)
    documents = list(read_corpus(args.scifact / "corpus.jsonl"))
    queries, qrels = load_queries(args.scifact / "queries.jsonl"), load_qrels(args.scifact / "qrels" / "train.tsv")
    if args.split_fraction:
        _, dev = split_judged(qrels, args.split_fraction, 13)
        qrels = {query_id: qrels[query_id] for query_id in dev}
    with tempfile.TemporaryDirectory() as folder:
        plain, indexed = write_seconds(documents, Path(folder), False), write_seconds(documents, Path(folder), True)
        print(f"writing {len(documents)} documents: {plain:.2f} s without the BM25 index, {indexed:.2f} s with it "
              f"({indexed / plain:.2f}x)")
        data = Path(folder) / "data"
        corpus = CorpusStore(data / "corpus.sqlite3")
        corpus.upsert(documents)
        releases = ReleaseStore(data)
        print("\n| model | " + " | ".join(f"weight {w}" for w in WEIGHTS) + " | best vs dense |")
        print("| --- |" + " ---: |" * (len(WEIGHTS) + 1))
        for model in models:
            manifest = build_release(corpus, releases, BuildOptions(model_path=model))
            live = LiveRelease.load(releases, manifest.release_id)
            scores = [evaluate_release(live, queries, qrels, corpus, weight)["ndcg@10"] for weight in WEIGHTS]
            print(f"| {model.name} ({manifest.precision}) | " + " | ".join(f"{s:.4f}" for s in scores)
                  + f" | {max(scores) / scores[0]:.3f}x |", flush=True)
        corpus.close()
    print(f"\nnDCG@10 over {len(qrels)} judged queries; weight 0 is dense only, 1 is BM25 only.")


if __name__ == "__main__":
    main()
