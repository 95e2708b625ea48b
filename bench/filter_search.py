"""Filtered search: what a metadata filter costs and how much of the exact answer it keeps, by selectivity.

Builds a corpus store of N synthetic documents whose metadata spreads over years,
languages and tags, and a VectorIndex of their 384-d vectors (the clustered synthetic
vectors of `bench/index_scale.py`). For each filter it times evaluating the filter in
SQLite (`CorpusStore.matching_ids`) after a write, reusing that answer while the corpus
is unchanged, and the filtered index search per query, against the unfiltered search of
the same index in the same run, and measures recall@10 against exact search over the
matching documents. Last, it times each filter's fresh evaluation again with indexes on
the fields the filters use (`CorpusStore.index_field`), against the same without them.

    python bench/filter_search.py                          # 100,000 documents, Flat and HNSW32
    python bench/filter_search.py --n 20000 --kind HNSW32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.index_scale import DIM, synthetic  # noqa: E402
from indexer.corpus_store import CorpusStore, Document  # noqa: E402
from indexer.metadata_filter import parse_filter  # noqa: E402
from indexer.vector_index import VectorIndex  # noqa: E402

K = 10
LANGS = ["en"] * 6 + ["de", "fr", "es", "pt"]
FILTERS = {
    "lang en (60%)": {"lang": "en"},
    "year >= 2016 (~27%)": {"year": {"$gte": 2016}},
    "tag t3 (~2%)": {"tags": "t3"},
    "year 2000 and lang de (~0.3%)": {"year": 2000, "lang": "de"},
    "tag t3 and year 2020 (~0.07%)": {"$and": [{"tags": "t3"}, {"year": 2020}]},
}


INDEXED_FIELDS = ("year", "lang", "tags")


def metadata(i: int) -> dict:
    return {"year": 1990 + i % 33, "lang": LANGS[(i * 7) % len(LANGS)], "tags": [f"t{i % 50}", f"g{i % 9}"]}


def timed(rounds: int, function, *args) -> tuple[float, object]:
    """Median milliseconds of `rounds` calls of `function(*args)`, and the last result."""
    times, result = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        result = function(*args)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), result


def fresh_ms(corpus: CorpusStore, where, rounds: int = 3) -> tuple[float, frozenset[str]]:
    """Median milliseconds of evaluating `where` right after a write (so no answer is reused), and its answer."""
    times = []
    for round_ in range(rounds):
        corpus.upsert([Document(id="bump", title="", text=f"{where!r} {round_}", metadata={})])
        ms, allowed = timed(1, corpus.matching_ids, where)
        times.append(ms)
    return statistics.median(times), allowed


def compare_field_indexes(corpus: CorpusStore) -> None:
    """Print each filter's fresh evaluation without and with indexes on its fields, and what indexing cost."""
    unindexed = {name: fresh_ms(corpus, parse_filter(raw)) for name, raw in FILTERS.items()}
    started = time.perf_counter()
    values = sum(corpus.index_field(field) for field in INDEXED_FIELDS)
    print(f"\nindexing {', '.join(INDEXED_FIELDS)}: {values} values in {time.perf_counter() - started:.1f} s")
    print("| filter | matches | unindexed ms | indexed ms | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, raw in FILTERS.items():
        indexed_ms, allowed = fresh_ms(corpus, parse_filter(raw))
        assert allowed == unindexed[name][1], f"{name}: the index changed the answer"
        print(f"| {name} | {len(allowed)} | {unindexed[name][0]:.1f} | {indexed_ms:.1f} | "
              f"{unindexed[name][0] / indexed_ms:.1f}x |")


def search_each(index: VectorIndex, queries: np.ndarray, allowed: frozenset[str] | None) -> list:
    """One search per query, as the service runs them; the top-k of each."""
    return [index.search(query[None], K, allowed)[0] for query in queries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--kind", action="append", help="FAISS factory string (repeatable); default Flat and HNSW32")
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    kinds = args.kind or ["Flat", "HNSW32"]
    print(f"command: python bench/filter_search.py --n {args.n} " + " ".join(f"--kind {kind}" for kind in kinds)
          + f" --queries {args.queries}")
    base, queries = synthetic(args.n, args.queries, centres=max(1, args.n // 50), seed=0, noise=0.03)
    ids = [f"d{i}" for i in range(args.n)]
    with tempfile.TemporaryDirectory() as folder:
        corpus = CorpusStore(Path(folder) / "corpus.sqlite3")
        corpus.upsert(Document(id=ids[i], title="", text=f"document {i}", metadata=metadata(i)) for i in range(args.n))
        for kind in kinds:
            index = VectorIndex(DIM, kind)
            index.train(base)
            index.add(ids, base)
            plain, _ = timed(3, search_each, index, queries, None)
            print(f"\n{kind}, {args.n} documents: unfiltered search {plain / len(queries):.2f} ms per query")
            print("| filter | matches | filter in SQLite ms | reused ms | filtered search ms | vs unfiltered (reused) | recall@10 |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            for name, raw in FILTERS.items():
                where = parse_filter(raw)
                corpus.upsert([Document(id="bump", title="", text=name, metadata={})])  # a write: the next read is fresh
                sql_ms, _ = timed(1, corpus.matching_ids, where)
                reused_ms, allowed = timed(5, corpus.matching_ids, where)
                search_ms, found = timed(3, search_each, index, queries, allowed)
                search_ms /= len(queries)
                rows = np.array(sorted(int(doc_id[1:]) for doc_id in allowed))
                truth = np.argsort(-(queries @ base[rows].T), axis=1, kind="stable")[:, :K] if len(rows) else None
                hits = sum(len({f"d{rows[j]}" for j in truth[i]} & {h.doc_id for h in found[i]}) for i in range(len(queries))) \
                    if truth is not None else 0
                recall = hits / (len(queries) * min(K, max(1, len(rows))))
                print(f"| {name} | {len(allowed)} | {sql_ms:.1f} | {reused_ms:.2f} | {search_ms:.2f} | "
                      f"{(reused_ms + search_ms) / (plain / len(queries)):.2f}x | {recall:.3f} |")
        compare_field_indexes(corpus)
        corpus.close()


if __name__ == "__main__":
    main()
