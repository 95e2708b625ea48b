"""How long idle OpenMP threads spin before they sleep, set before torch loads its OpenMP runtime.

libgomp, torch's OpenMP runtime, keeps the threads of a finished parallel region
spinning for `GOMP_SPINCOUNT` iterations (300,000 by default, about a millisecond) so
that the next region starts at once. In a server the next piece of work is often not
torch's: the FAISS search, the document fetch and the Python around them run while
torch's idle threads still hold the cores. At 10,000 the threads still bridge the
microseconds between one encode's operators but free the cores soon after it ends: on
a 2-core machine a lone search over HTTP went from 18.6-21.7 ms to 12.4-14.1 ms at p50,
with the same throughput at 16 clients and in corpus encoding (docs/benchmarks.md).
libgomp reads the variable once, when it loads, so the `service` and `workers`
packages set it when they are imported, before anything of theirs imports torch; a
value already in the environment is kept, and a process that loaded torch earlier
keeps its own.
"""

from __future__ import annotations

import os

SPIN_COUNT = "10000"


def default_spin_count() -> None:
    """Set `GOMP_SPINCOUNT` to `SPIN_COUNT` unless the environment already sets it."""
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
