"""The HTTP service and the `lockstep` command line."""

from indexer.openmp_spin import default_spin_count

default_spin_count()  # before torch loads its OpenMP runtime, which reads it once (see indexer.openmp_spin)
