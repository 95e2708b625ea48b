"""Training across processes: the process group torchrun describes, and the collectives the trainer needs.

`torchrun --nproc_per_node N` starts N copies of one run and tells each its place in
the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Each copy
joins the group over NCCL with one GPU per process where CUDA is available, over gloo
on CPUs otherwise. Every process walks the same seeded global batches and embeds its
own shard; `gather_with_grad` hands every process the whole batch's embeddings with
their gradients intact, so each computes the loss over the global batch of candidates,
and DistributedDataParallel averages the parameter gradients. Work that needs doing
once (dev evaluation, mining, the teacher, every file) runs on the first process;
`from_main` hands its result to the others, which wait for it. Started without
torchrun's environment, nothing here joins a group and every helper is the
single-process identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as collectives
from torch.nn.parallel import DistributedDataParallel

from training.bi_encoder import BiEncoder

T = TypeVar("T")

# How long a process waits in a collective: the others wait while the first
# evaluates on the dev set, mines hard negatives or trains a teacher.
WAIT_LIMIT = timedelta(hours=6)
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def process_group() -> Iterator[None]:
    """Join the process group torchrun describes for the block, and leave it after; no-op when not started by torchrun."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        yield
        return
    device_id = None
    if torch.cuda.is_available():
        device_id = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device_id)
    dist.init_process_group("nccl" if device_id is not None else "gloo", timeout=WAIT_LIMIT, device_id=device_id)
    try:
        yield
    finally:
        dist.destroy_process_group()


def is_active() -> bool:
    """Whether this process belongs to a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's place in the group (0 in a single process)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """How many processes train together (1 in a single process)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Whether this is the process that evaluates, mines and writes files."""
    return rank() == 0


def device(single: str = "cpu") -> torch.device:
    """Where this process trains: its own GPU in an NCCL group, the CPU in a gloo group, else `single`."""
    if is_active():
        if dist.get_backend() == dist.Backend.NCCL:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(single)


def barrier() -> None:
    """Wait until every process gets here."""
    if is_active():
        dist.barrier()


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` run on the first process only, its (picklable) result handed to every process."""
    if not is_active():
        return compute()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_with_grad(rows: torch.Tensor) -> torch.Tensor:
    """Every process's `rows` concatenated in rank order, on every process; shards may differ in length.

    The backward pass hands each process the sum, over processes, of the gradients
    flowing into its own rows (`torch.distributed.nn.functional.all_gather`, whose backward
    is a reduce-scatter with sum; shorter shards are padded to gather, then trimmed). When every process computes the same loss on the gathered rows, that
    sum is world_size times the loss's gradient, which DistributedDataParallel's
    averaging divides back out: parameters get exactly the whole batch's gradient.
    """
    if not is_active():
        return rows
    counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([len(rows)], device=rows.device))
    lengths = [int(count) for count in counts]
    padded = torch.cat([rows, rows.new_zeros((max(lengths) - len(rows), *rows.shape[1:]))])
    shards = collectives.all_gather(padded)
    return torch.cat([shard[:length] for shard, length in zip(shards, lengths)])


@dataclass(frozen=True)
class SyncedEmbed:
    """How a training step embeds: `embed(input_ids, attention_mask)` gives pooled vectors with a graph,
    and the parameter gradients of each backward pass are averaged over processes unless
    it runs under `no_sync()`, where they only accumulate until the next synchronised pass."""

    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    no_sync: Callable[[], AbstractContextManager]


class _Embedding(torch.nn.Module):
    """The encoder's `embed` as a module, so DistributedDataParallel sees its parameters and its forward."""

    def __init__(self, encoder: BiEncoder) -> None:
        super().__init__()
        self.model = encoder.model
        self.embed = encoder.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids, attention_mask)


@contextmanager
def data_parallel(encoder: BiEncoder) -> Iterator[SyncedEmbed]:
    """The encoder wrapped in DistributedDataParallel for the block (the plain encoder in a single process).

    Unused parameters (a pooler the pooling ignores) are expected, so the wrapper looks for them.
    """
    if not is_active():
        yield SyncedEmbed(encoder.embed, nullcontext)
        return
    on_gpu = encoder.device.type == "cuda"
    wrapped = DistributedDataParallel(
        _Embedding(encoder), device_ids=[encoder.device.index] if on_gpu else None, find_unused_parameters=True
    )
    yield SyncedEmbed(wrapped, wrapped.no_sync)
