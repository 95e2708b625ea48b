"""Thread pools sized to the CPUs a process may use: its cgroup's quota and affinity, or OMP_NUM_THREADS."""

import json
import os
import subprocess
import sys

import pytest

from indexer.thread_budget import cgroup_cpu_quota, thread_budget


def _cgroup(tmp_path, v2: str | None = None, quota_us: int | None = None, period_us: int = 100_000):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if quota_us is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("v2", "quota_us", "env", "expected"),
    [
        ("150000 100000", None, {}, 2),  # 1.5 CPUs: two threads, not the node's 64
        ("100000 100000", None, {}, 1),
        ("max 100000", None, {}, 64),  # no quota: the affinity mask
        (None, 250_000, {}, 3),  # cgroup v1
        (None, -1, {}, 64),  # v1 without a quota
        (None, None, {}, 64),  # no cgroup files (a plain host)
        ("150000 100000", None, {"OMP_NUM_THREADS": "6"}, 6),  # the operator's word wins
        ("150000 100000", None, {"OMP_NUM_THREADS": "0"}, 2),  # not a thread count: ignored
    ],
)
def test_the_budget_follows_the_quota_the_affinity_or_omp_num_threads(tmp_path, v2, quota_us, env, expected):
    """Guards against a container limited to a few CPUs starting a thread per core of its node."""
    assert thread_budget(env, _cgroup(tmp_path, v2, quota_us), cpus=64) == expected


def test_a_malformed_quota_file_means_no_quota(tmp_path):
    assert cgroup_cpu_quota(_cgroup(tmp_path, v2="garbage")) is None


def test_torch_and_faiss_pools_take_the_budget_at_process_start(tmp_path):
    """Guards against the budget being computed and not applied to the libraries that start the threads (run in a
    process of its own, as a server or worker starts)."""
    root = _cgroup(tmp_path, v2="100000 100000")
    script = ("import json, sys; from pathlib import Path; from indexer.thread_budget import apply_thread_budget; "
              "import faiss, torch; n = apply_thread_budget(root=Path(sys.argv[1])); "
              "print(json.dumps([n, torch.get_num_threads(), faiss.omp_get_max_threads()]))")
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", script, str(root)], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [1, 1, 1]


@pytest.mark.parametrize(("package", "given", "expected"), [("service", None, "10000"), ("workers", None, "10000"),
                                                            ("service", "300000", "300000")])
def test_lockstep_processes_shorten_openmp_spinning_before_torch_loads(package, given, expected):
    """Guards against the spin count being set after torch's OpenMP runtime has read it (torch imported first), and
    against overriding an operator's value."""
    env = {key: value for key, value in os.environ.items() if key != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    script = (f"import sys, os; import {package}; "
              "print(json.dumps(['torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT')]))")
    out = subprocess.run([sys.executable, "-c", "import json; " + script], env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [False, expected]
