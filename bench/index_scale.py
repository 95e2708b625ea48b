"""Index kinds at scale: build time, memory, recall@10 against exact search and single-query latency.

Generates N seeded synthetic unit vectors (384-d, like all-MiniLM-L6-v2) drawn around
a few thousand centres, as real embeddings cluster by topic, plus held-out queries
from the same distribution. Each index kind is built through Lockstep's VectorIndex
(the same code releases use) and compared with exact inner-product search (Flat),
which is the baseline measured in the same run. Memory is the size of the saved index:
FAISS holds an index in memory as the same arrays it writes (vectors or codes, graph
links, centroids), and a release loads it whole.

    python bench/index_scale.py                      # 1M vectors: Flat, HNSW32, IVF1024,PQ48
    python bench/index_scale.py --n 200000 --kind HNSW32 --kind IVF256,Flat
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.targets import verdict  # noqa: E402
from indexer.vector_index import VectorIndex  # noqa: E402

DIM = 384
K = 10


def synthetic(n: int, queries: int, centres: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around random centres; with noise 0.03 two vectors of one topic have cosine about 0.74,
    about what sentence embeddings of documents on one subject show (0.08 makes the data nearly uniform
    on the sphere, the worst case for any approximate index)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, DIM)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, DIM), dtype=np.float32)
        for start in range(0, count, 100_000):
            size = min(100_000, count - start)
            block = means[rng.integers(0, centres, size)] + noise * rng.standard_normal((size, DIM)).astype(np.float32)
            out[start : start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return out

    return draw(n), draw(queries)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def measure(kind: str, ids: list[str], vectors: np.ndarray, queries: np.ndarray, exact: list[set[str]],
            ef_search: int, nprobe: int, ef_construction: int, latency_queries: int) -> dict:
    started = time.perf_counter()
    index = VectorIndex(DIM, kind, ef_construction)
    index.add(ids, vectors)
    build_s = time.perf_counter() - started
    index.set_search_params(ef_search=ef_search, nprobe=nprobe)
    folder = Path(tempfile.mkdtemp(prefix="index-scale-"))
    try:
        index.save(folder)
        size = folder_size(folder)
    finally:
        shutil.rmtree(folder)
    found = index.search(queries, K)
    recall = float(np.mean([len({h.doc_id for h in hits} & truth) / K for hits, truth in zip(found, exact)]))
    latencies = []
    for row in queries[:latency_queries]:
        tick = time.perf_counter()
        index.search(row[None, :], K)
        latencies.append(time.perf_counter() - tick)
    return {"kind": kind, "build_s": build_s, "size_mb": size / 2**20, "recall@10": recall,
            "p50_ms": float(np.percentile(latencies, 50)) * 1e3, "p99_ms": float(np.percentile(latencies, 99)) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall")
    parser.add_argument("--latency-queries", type=int, default=300, help="single queries timed one by one")
    parser.add_argument("--kind", action="append", help="a FAISS factory string to compare with Flat (repeatable); "
                        "default: HNSW32 and IVF1024,PQ48")
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=40, help="HNSW build breadth (FAISS default 40)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--noise", type=float, default=0.03, help="spread of vectors around their topic centre")
    args = parser.parse_args()
    others = args.kind or ["HNSW32", "IVF1024,PQ48"]
    kind_flags = " ".join(f"--kind {kind}" for kind in others)
    print(f"command: python bench/index_scale.py --n {args.n} --queries {args.queries} {kind_flags} "
          f"--ef-search {args.ef_search} --ef-construction {args.ef_construction} --nprobe {args.nprobe} --seed {args.seed} --noise {args.noise} --latency-queries {args.latency_queries}")
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    vectors, queries = synthetic(args.n, args.queries, centres=max(10, args.n // 500), seed=args.seed,
                                 noise=args.noise)
    ids = [str(i) for i in range(args.n)]
    kinds = ["Flat"] + [kind for kind in others if kind != "Flat"]
    flat = VectorIndex(DIM, "Flat")
    flat.add(ids, vectors)
    exact = [{h.doc_id for h in hits} for hits in flat.search(queries, K)]
    del flat
    rows = [measure(kind, ids, vectors, queries, exact, args.ef_search, args.nprobe, args.ef_construction,
                    args.latency_queries)
            for kind in kinds]
    base = rows[0]
    print(f"\n{args.n:,} x {DIM} vectors, {args.queries} queries, k={K}; ratios against Flat in this run")
    print(f"{'index':<16}{'build s':>9}{'memory MB':>11}{'recall@10':>11}{'p50 ms':>9}{'p99 ms':>9}{'p50 vs Flat':>13}")
    for row in rows:
        print(f"{row['kind']:<16}{row['build_s']:>9.1f}{row['size_mb']:>11.0f}{row['recall@10']:>11.4f}"
              f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{base['p50_ms'] / row['p50_ms']:>12.1f}x")
    for row in rows[1:]:
        print(verdict(f"{row['kind']} recall@10", row["recall@10"], 0.95, unit=""))
        print(verdict(f"{row['kind']} p50", row["p50_ms"], 2, " ms", at_most=True))


if __name__ == "__main__":
    main()
