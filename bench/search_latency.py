"""End-to-end search latency over HTTP against a real `lockstep serve` process.

Builds (or reuses) a SciFact release in `--data-dir` (with the `LOCKSTEP_*` settings
of the environment, e.g. `LOCKSTEP_RUNTIME=openvino`), starts the server with and
without dynamic batching, and drives it with 1, 4 and 16 concurrent clients for a
fixed number of requests each, sending SciFact queries (k=10) over connections
opened before the clock starts. Prints p50/p99 latency and throughput per setting;
loopback only, bounded, stops by itself.

    python bench/search_latency.py --scifact ../shared/data/scifact --data-dir bench-out/search-data
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.targets import verdict  # noqa: E402

REPRODUCED_ENV = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "LOCKSTEP_RUNTIME", "LOCKSTEP_PRECISION", "LOCKSTEP_INT8_ACTIVATIONS")


def lockstep(data_dir: Path, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "service.cli", "--data-dir", str(data_dir), *args]
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})}, **popen)


def ensure_release(data_dir: Path, scifact: Path) -> None:
    if (data_dir / "releases" / "ACTIVE.json").exists():
        return
    for args in (("ingest", str(scifact / "corpus.jsonl")), ("build", "--activate")):
        if lockstep(data_dir, *args).wait() != 0:
            raise SystemExit(f"lockstep {' '.join(args)} failed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def drive(base: str, queries: list[str], clients: int, per_client: int) -> tuple[list[float], float]:
    """Each client opens its connection with an unmeasured `/healthz` first, so the figures are the server's
    steady state, not the client library's start-up (building a client and connecting took 150-300 ms for
    the first request of 16 clients started at once, which alone made the p99)."""
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient, offset: int) -> None:
        for i in range(per_client):
            query = queries[(offset * per_client + i) % len(queries)]
            started = time.perf_counter()
            response = await http.post("/v1/search", json={"query": query, "k": 10})
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1e3)

    async with contextlib.AsyncExitStack() as stack:
        https = [await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=60)) for _ in range(clients)]
        for response in await asyncio.gather(*(http.get("/healthz") for http in https)):
            response.raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c, http in enumerate(https)))
        return latencies, time.perf_counter() - started


def measure(data_dir: Path, queries: list[str], batching: bool, per_client: int) -> dict[int, dict[str, float]]:
    port = free_port()
    env = {"LOCKSTEP_DYNAMIC_BATCHING": "true" if batching else "false", "LOCKSTEP_LOG_LEVEL": "warning"}
    server = lockstep(data_dir, "serve", "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        asyncio.run(drive(base, queries, 1, 20))
        results = {}
        for clients in (1, 4, 16):
            latencies, seconds = asyncio.run(drive(base, queries, clients, per_client))
            results[clients] = {
                "p50_ms": float(np.percentile(latencies, 50)),
                "p99_ms": float(np.percentile(latencies, 99)),
                "requests_per_s": len(latencies) / seconds,
            }
        return results
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scifact", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--data-dir", type=Path, default=Path("bench-out/search-data"))
    parser.add_argument("--requests", type=int, default=40, help="requests per client per setting")
    args = parser.parse_args()
    ensure_release(args.data_dir.resolve(), args.scifact)
    active = json.loads((args.data_dir / "releases" / "ACTIVE.json").read_text())["active"]
    manifest = json.loads((args.data_dir / "releases" / active / "manifest.json").read_text())
    print(f"release {active}: {manifest['doc_count']} documents, {manifest['index_type']}, "
          f"{manifest['precision']} on {manifest.get('runtime', 'torch')}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    queries = [json.loads(line)["text"] for line in (args.scifact / "queries.jsonl").read_text().splitlines()]
    table = {batching: measure(args.data_dir.resolve(), queries, batching, args.requests) for batching in (False, True)}
    print(f"{'clients':>8}{'batching':>10}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}")
    for clients in (1, 4, 16):
        for batching in (False, True):
            row = table[batching][clients]
            print(f"{clients:>8}{'on' if batching else 'off':>10}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['requests_per_s']:>8.1f}")
    gain = table[True][16]["requests_per_s"] / table[False][16]["requests_per_s"]
    print(f"throughput at 16 clients, batching on vs off: {gain:.2f}x")
    print(verdict("p50 of one client, batching on", table[True][1]["p50_ms"], 15, " ms", at_most=True))
    print(verdict("p99 at 16 clients, batching on", table[True][16]["p99_ms"], 150, " ms", at_most=True))
    print(verdict("throughput at 16 clients, batching on vs off", gain, 2))
    settings = " ".join(f"{name}={os.environ[name]}" for name in REPRODUCED_ENV if name in os.environ)
    print(f"reproduce: {settings + ' ' if settings else ''}python bench/search_latency.py --scifact {args.scifact} "
          f"--data-dir {args.data_dir} --requests {args.requests}")


if __name__ == "__main__":
    main()
