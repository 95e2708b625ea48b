"""Batches without duplicates: no document id and no text appears twice in one batch.

A duplicate in a batch becomes a false negative for in-batch contrastive losses
(the same document is both the target and a negative). Examples that would clash
are deferred to a later batch rather than dropped. Shuffling is seeded per epoch.
Processes that train together walk the same global batches and each takes its own
contiguous `shard`, so the guarantee holds for the global batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

from training.examples import TrainingExample

T = TypeVar("T")


def _keys(example: TrainingExample) -> set[str]:
    keys = {f"q:{example.query.strip()}"}
    for candidate in (example.positive, *example.negatives):
        keys.add(f"id:{candidate.doc_id}")
        keys.add(f"text:{candidate.text.strip()}")
    return keys


def no_duplicate_batches(
    examples: Sequence[TrainingExample], batch_size: int, seed: int, epoch: int = 0, drop_last: bool = False, shards: int = 1
) -> Iterator[list[int]]:
    """Yield lists of example indices; within a list no query text, document id or document text repeats.

    Batches of fewer than `shards` examples are skipped, so every process gets at least one,
    and so is a batch of one example without negatives of its own: it has nothing to
    contrast with (its loss and gradient are zero), yet the optimiser would still step on
    it and the schedule would count it. Such batches are what is left when many examples
    share a document (one answer to many questions) or a query; those examples wait for
    an epoch whose shuffle places them in a full batch.
    """
    if batch_size < 2:
        raise ValueError("batch_size must be at least 2 for in-batch negatives")
    for batch in _batches(examples, batch_size, seed, epoch, drop_last):
        if len(batch) >= shards and (len(batch) > 1 or examples[batch[0]].negatives):
            yield batch


def _batches(
    examples: Sequence[TrainingExample], batch_size: int, seed: int, epoch: int, drop_last: bool
) -> Iterator[list[int]]:
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    keys = [_keys(example) for example in examples]
    pending = order
    while pending:
        batch: list[int] = []
        seen: set[str] = set()
        deferred: list[int] = []
        yielded_full = False
        for index in pending:
            if keys[index] & seen:
                deferred.append(index)
                continue
            batch.append(index)
            seen |= keys[index]
            if len(batch) == batch_size:
                yield batch
                yielded_full = True
                batch, seen = [], set()
        if batch and deferred and yielded_full:
            deferred = batch + deferred
        elif batch and not (drop_last and len(batch) < batch_size):
            yield batch
        pending = deferred


def batches_per_epoch(
    examples: Sequence[TrainingExample], batch_size: int, seed: int, epoch: int, shards: int = 1
) -> int:
    """How many batches `no_duplicate_batches` yields in `epoch`; deferrals make it differ between epochs."""
    return sum(1 for _ in no_duplicate_batches(examples, batch_size, seed, epoch, shards=shards))


def shard(batch: Sequence[T], index: int, shards: int) -> Sequence[T]:
    """Process `index`'s contiguous part of a global batch; the first `len(batch) % shards` parts hold one more."""
    size, extra = divmod(len(batch), shards)
    start = index * size + min(index, extra)
    return batch[start : start + size + int(index < extra)]
