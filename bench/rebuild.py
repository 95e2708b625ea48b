"""Full rebuild time (re-embed, index, publish, activate) against pure encoding of the same corpus.

A rebuild should cost little more than encoding the corpus: everything else (reading
the snapshot, building the index, writing and fsyncing the release, switching the
pointer) is overhead, and so is compiling the graph for the openvino runtime. Both
are measured in the same run with the same model, precision, runtime and batch size;
the ratio is what to compare across machines.

    python bench/rebuild.py --scifact ../shared/data/scifact
    python bench/rebuild.py --scifact ../shared/data/scifact --limit 1000 --precision fp32
    python bench/rebuild.py --scifact ../shared/data/scifact --limit 1000 --runtime openvino
    python bench/rebuild.py --scifact ../shared/data/scifact --precision int8 --runtime openvino
    python bench/rebuild.py --scifact ../shared/data/scifact --precision int8 --runtime openvino --int8-activations dynamic

For int8 the pure encode runs a model quantised beforehand, as a release build
quantises it (same calibration documents), and the rebuild pays for quantising and
for the agreement check against fp32.

With `--rounds N` the pure encode and the rebuild alternate N times and the median of
the rounds' ratios is reported: on these VMs one pair of timings moves by a few
percent from run to run, as much as the margins against the target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import verdict  # noqa: E402
from indexer.corpus_store import CorpusStore  # noqa: E402
from indexer.ingest import read_corpus  # noqa: E402
from indexer.release_builder import BuildOptions, build_release, int8_samples  # noqa: E402
from indexer.release_runtime import choose_runtime, quantise_int8  # noqa: E402
from indexer.release_store import ReleaseStore  # noqa: E402
from training.bi_encoder import BiEncoder  # noqa: E402
from training.default_model import default_model_path  # noqa: E402
from training.precision import resolve  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scifact", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N documents")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or int8")
    parser.add_argument("--runtime", default="torch", help="torch or openvino")
    parser.add_argument("--int8-activations", default="auto", help="auto, calibrated or dynamic (int8 only)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--index-type", default="Flat")
    parser.add_argument("--rounds", type=int, default=1, help="alternate pure encode and rebuild N times; median ratio")
    args = parser.parse_args()
    limit = f" --limit {args.limit}" if args.limit else ""
    print(f"command: python bench/rebuild.py --scifact {args.scifact}{limit} --precision {args.precision} "
          f"--runtime {args.runtime} --int8-activations {args.int8_activations} --batch-size {args.batch_size} --index-type {args.index_type} --rounds {args.rounds}")
    documents = list(read_corpus(args.scifact / "corpus.jsonl"))[: args.limit or None]
    encoder = BiEncoder.load(default_model_path())
    choose_runtime(encoder, resolve(args.precision, encoder.device), args.runtime)
    texts = [doc.embedding_text() for doc in documents]
    options = BuildOptions(model_path=default_model_path(), precision=args.precision, runtime=args.runtime,
                           int8_activations=args.int8_activations, batch_size=args.batch_size, index_type=args.index_type)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="quantised-") as scratch:
        if args.precision == "int8":
            calibration = [texts[row] for row in int8_samples(len(texts), 0)[1]]
            encoder.use_int8(quantise_int8(encoder, Path(scratch), args.runtime, args.int8_activations, calibration))
        encoder.encode(texts[:64], "document", show_progress=False)
        for _ in range(args.rounds):
            rounds.append((_encode_seconds(encoder, texts, args.batch_size), _rebuild_seconds(documents, options)))
            print(f"round {len(rounds)}: pure encode {rounds[-1][0]:.1f} s, full rebuild {rounds[-1][1]:.1f} s, "
                  f"ratio {rounds[-1][1] / rounds[-1][0]:.3f}x", flush=True)
    encode_s, rebuild_s = (statistics.median(times) for times in zip(*rounds))
    ratios = sorted(rebuild / encode for encode, rebuild in rounds)
    print(f"\n{len(documents)} documents, {encoder.precision} on {encoder.runtime}, batch {args.batch_size}, "
          f"{args.index_type} index, median of {len(rounds)} round(s)")
    print(f"pure encode          {encode_s:8.1f} s  ({len(documents) / encode_s:.1f} docs/s)")
    print(f"full rebuild         {rebuild_s:8.1f} s  ({len(documents) / rebuild_s:.1f} docs/s)")
    print(f"rebuild / encode     {statistics.median(ratios):8.3f}x  (rounds {ratios[0]:.3f}x to {ratios[-1]:.3f}x)")
    print(verdict("full rebuild vs pure encode", statistics.median(ratios), 1.15, at_most=True))


def _encode_seconds(encoder: BiEncoder, texts: list[str], batch_size: int) -> float:
    started = time.perf_counter()
    encoder.encode(texts, "document", batch_size=batch_size, show_progress=False)
    return time.perf_counter() - started


def _rebuild_seconds(documents: list, options: BuildOptions) -> float:
    """Seconds to build and activate a release of `documents` in a new data directory."""
    with tempfile.TemporaryDirectory(prefix="rebuild-") as data_dir:
        corpus = CorpusStore(Path(data_dir) / "corpus.sqlite3")
        corpus.upsert(documents)
        started = time.perf_counter()
        build_release(corpus, ReleaseStore(data_dir), options, activate=True)
        seconds = time.perf_counter() - started
        corpus.close()
    return seconds


if __name__ == "__main__":
    main()
