"""Bounded load across release swaps: N concurrent clients search for a fixed time while an admin swaps releases.

Every response must succeed and be scored by exactly the release it names: its
scores are compared with the scores that release gives the same query in-process.
The same load runs first without swaps (the baseline) and then with them; prints
request counts, failures, mismatches, p50/p99 latency and throughput of both, and
the ratios.
Loopback only; stops by itself. The CI test `tests/test_swap_load.py` runs a short
version of the same driver.

    python bench/swap_load.py --scifact ../shared/data/scifact --data-dir bench-out/swap-data --docs 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "swap-load-token-5f0c9a1e7b3d"


@dataclass
class LoadResult:
    """What the clients saw: latencies of successful searches, failures, and each reply's release, query and hits."""

    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    replies: list[tuple[str, str, dict[str, float]]] = field(default_factory=list)
    swaps: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        latencies = self.latencies_ms or [float("nan")]
        return {
            "requests": len(self.replies) + len(self.failures),
            "failures": len(self.failures),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "requests_per_s": len(self.replies) / self.seconds if self.seconds else 0.0,
        }


async def drive(base: str, queries: list[str], clients: int, duration_s: float, swap_to: list[str], k: int = 10,
                token: str = TOKEN) -> LoadResult:
    """Search from `clients` concurrent clients for `duration_s` while activating `swap_to` at even intervals."""
    result = LoadResult()
    deadline = time.monotonic() + duration_s

    async def client(offset: int) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            i = offset
            while time.monotonic() < deadline:
                query = queries[i % len(queries)]
                i += clients
                started = time.perf_counter()
                try:
                    reply = await http.post("/v1/search", json={"query": query, "k": k})
                except httpx.HTTPError as exc:
                    result.failures.append(f"{query!r}: {type(exc).__name__}: {exc}")
                    continue
                if reply.status_code != 200:
                    result.failures.append(f"{query!r}: HTTP {reply.status_code} {reply.text[:200]}")
                    continue
                result.latencies_ms.append((time.perf_counter() - started) * 1e3)
                body = reply.json()
                result.replies.append((body["release"], query, {hit["id"]: hit["score"] for hit in body["results"]}))

    async def admin() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=120, headers={"Authorization": f"Bearer {token}"}) as http:
            for n, release_id in enumerate(swap_to, start=1):
                await asyncio.sleep(max(0.0, deadline - time.monotonic()) / (len(swap_to) - n + 2))
                reply = await http.post(f"/v1/admin/releases/{release_id}/activate")
                if reply.status_code != 200:
                    result.failures.append(f"activating {release_id}: HTTP {reply.status_code} {reply.text[:200]}")
                result.swaps.append(release_id)

    started = time.perf_counter()
    await asyncio.gather(admin(), *(client(c) for c in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def mismatches(result: LoadResult, expected: dict[str, dict[str, dict[str, float]]], tolerance: float = 1e-4) -> list[str]:
    """Replies whose scores are not those of the release they name (`expected[release][query][doc id]`)."""
    wrong = []
    for release_id, query, hits in result.replies:
        reference = expected.get(release_id, {}).get(query)
        if reference is None:
            wrong.append(f"{query!r} answered by unknown release {release_id}")
            continue
        for doc_id, score in hits.items():
            if doc_id not in reference or abs(reference[doc_id] - score) > tolerance:
                wrong.append(f"{query!r} on {release_id}: {doc_id} scored {score}, expected {reference.get(doc_id)}")
    return wrong


def expected_scores(data_dir: Path, release_ids: list[str], queries: list[str], depth: int) -> dict:
    """Each release's scores for each query, computed in-process (the reference the served scores must match).

    Take `depth` above the served k: a query encoded in a batch with others can differ
    in the last float bits, which may swap two documents tied at the k-th place.
    """
    from indexer.corpus_store import CorpusStore
    from indexer.live_release import LiveRelease
    from indexer.release_store import ReleaseStore

    corpus, releases = CorpusStore(data_dir / "corpus.sqlite3"), ReleaseStore(data_dir)
    try:
        table = {}
        for release_id in release_ids:
            live = LiveRelease.load(releases, release_id)
            table[release_id] = {q: {h.document.id: h.score for h in live.search(corpus, q, depth).hits} for q in queries}
        return table
    finally:
        corpus.close()


def _two_releases(data_dir: Path, scifact: Path, docs: int) -> list[str]:
    """Build (or reuse) two releases of the SciFact head whose vectors differ: mean and CLS pooling of MiniLM."""
    from indexer.corpus_store import CorpusStore
    from indexer.ingest import ingest_file
    from indexer.release_builder import BuildOptions, build_release
    from indexer.release_store import ReleaseStore
    from training.default_model import default_model_path
    from training.pooling import Pooling

    releases = ReleaseStore(data_dir)
    if len(releases.list()) >= 2:
        return [m.release_id for m in releases.list()[-2:]]
    head = data_dir.parent / f"scifact-head-{docs}.jsonl"
    with open(scifact / "corpus.jsonl") as source:
        head.write_text("".join(line for _, line in zip(range(docs), source)))
    corpus = CorpusStore(data_dir / "corpus.sqlite3")
    try:
        ingest_file(corpus, head)
        built = [build_release(corpus, releases, BuildOptions(model_path=default_model_path(), pooling=pooling,
                                                              precision="fp32"), show_progress=True)
                 for pooling in (Pooling.MEAN, Pooling.CLS)]
    finally:
        corpus.close()
    releases.activate(built[0].release_id)
    return [m.release_id for m in built]


def _serve(data_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "LOCKSTEP_ADMIN_TOKEN": TOKEN, "LOCKSTEP_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "service.cli", "--data-dir", str(data_dir), "serve", "--port", str(port)]
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not become ready in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scifact", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-out/swap-data"))
    parser.add_argument("--docs", type=int, default=1000, help="SciFact documents to index")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--swaps", type=int, default=3)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    first, second = _two_releases(data_dir, args.scifact, args.docs)
    queries = [json.loads(line)["text"] for line in (args.scifact / "queries.jsonl").read_text().splitlines()][:200]
    expected = expected_scores(data_dir, [first, second], queries, 20)
    swap_to = [second if n % 2 == 0 else first for n in range(args.swaps)]
    server = _serve(data_dir, args.port)
    base = f"http://127.0.0.1:{args.port}"
    try:
        steady = asyncio.run(drive(base, queries, args.clients, args.duration, []))
        result = asyncio.run(drive(base, queries, args.clients, args.duration, swap_to))
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    wrong = mismatches(steady, expected) + mismatches(result, expected)
    for label, run in (("no swaps", steady), (f"{len(result.swaps)} swaps", result)):
        figures = run.summary()
        print(f"{label:>9}: {args.clients} clients, {args.duration:.0f} s: {figures['requests']} requests, "
              f"{figures['failures']} failed; p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
              f"{figures['requests_per_s']:.1f} req/s")
    calm, swapping = steady.summary(), result.summary()
    print(f"with swaps vs without: p99 {swapping['p99_ms'] / calm['p99_ms']:.2f}x, "
          f"throughput {swapping['requests_per_s'] / calm['requests_per_s']:.2f}x; "
          f"{len(wrong)} replies scored by another release than named ({len(result.swaps)} swaps)")
    for line in (steady.failures + result.failures + wrong)[:10]:
        print("  ", line)
    print(f"reproduce: python bench/swap_load.py --scifact ../shared/data/scifact --data-dir bench-out/swap-data "
          f"--docs {args.docs} --clients {args.clients} --duration {args.duration:.0f} --swaps {args.swaps}")
    if steady.failures or result.failures or wrong:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
