"""Real Lockstep processes for integration tests: `lockstep serve` (uvicorn) and `python -m workers` (Celery)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lockstep_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a child process: the data dir plus LOCKSTEP_<NAME> for each setting.

    Jobs may name files anywhere under the temp dir, where tests write their models and training data.
    """
    env = {**os.environ, "LOCKSTEP_DATA_DIR": str(data_dir), "LOCKSTEP_POLL_INTERVAL_S": "0.2", "LOCKSTEP_LOG_LEVEL": "warning",
           "LOCKSTEP_TRAINING_ROOTS": json.dumps([tempfile.gettempdir()])}
    env.update({f"LOCKSTEP_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def start_server(data_dir: Path, log: Path | None = None, **settings: str) -> tuple[subprocess.Popen, str]:
    """`lockstep serve` on a free port (output appended to `log` if given); returns it and its URL once /readyz is 200."""
    port = free_port()
    with open(log or os.devnull, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=lockstep_env(data_dir, **settings),
            stdout=out if log else None, stderr=subprocess.STDOUT if log else None,
        )
    base = f"http://127.0.0.1:{port}"
    wait_ready(process, base)
    return process, base


def wait_ready(process: subprocess.Popen, base: str, within_s: float = 60, log: Path | None = None) -> None:
    """Poll `base`/readyz every 0.1 s until it answers 200; fail the test (with `log`'s text) if `process` exits
    or `within_s` passes first, and kill it then."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            pytest.fail(f"the server exited with status {process.returncode}" + (f": {log.read_text()}" if log else ""))
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"the server did not become ready in {within_s:.0f} s" + (f": {log.read_text()}" if log else ""))


def start_worker(data_dir: Path, log: Path, **settings: str) -> subprocess.Popen:
    """A real Celery worker in its own process group (so a test can kill it and its children at once)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers"], env=lockstep_env(data_dir, **settings), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_job(client: httpx.Client, job_id: str, until, timeout: float = 180) -> dict:
    """Poll GET /v1/jobs/{id} until `until(job)` holds; fails with the job record on timeout."""
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not get there in {timeout:.0f} s: {job}")


def finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "rejected", "failed", "cancelled")
