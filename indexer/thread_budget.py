"""How many threads this process's math libraries may use: the CPUs it may run on, not the machine's.

torch and FAISS size their OpenMP pools by the host's cores (ONNX Runtime and OpenVINO
follow torch's count here). In a container limited to 2 CPUs on a 64-core node they
would start 64 threads each that take turns on 2 CPUs' time, every parallel region
waiting for its slowest, descheduled thread. The budget is `OMP_NUM_THREADS` where it
is set (the operator's word, which both libraries read themselves), else the CPUs in
this process's affinity mask capped by its cgroup's CPU quota (cgroup v2 `cpu.max`,
v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")

log = logging.getLogger(__name__)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs this process's cgroup may use (1.5 for 150 ms per 100 ms), or None where no quota is set."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def thread_budget(env: Mapping[str, str] = os.environ, root: Path = CGROUP_ROOT, cpus: int | None = None) -> int:
    """Threads for this process: a positive `OMP_NUM_THREADS`, else `cpus` (default: the affinity mask's count)
    capped by the cgroup quota, at least 1."""
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    cpus = cpus or len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(root)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def apply_thread_budget(env: Mapping[str, str] = os.environ, root: Path = CGROUP_ROOT) -> int:
    """Size torch's and FAISS's thread pools to `thread_budget` and return it; call once at process start, before
    any model runs."""
    import faiss
    import torch

    threads = thread_budget(env, root)
    if torch.get_num_threads() != threads:
        log.info("using %d threads (torch would have started %d): the CPUs this process may use", threads,
                 torch.get_num_threads())
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    return threads
