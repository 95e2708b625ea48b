"""One reranked search at a time per API process, waited for on the event loop instead of in a worker thread.

A rerank scores its candidates with the cross-encoder, seconds on a CPU. Waiting for
its turn inside the threadpool would park one of the pool's threads per waiting
rerank, and a burst of them would starve plain searches, writes and the release
watcher of threads. Waiting here costs no thread, and past `max_waiting` a reranked
search is refused with 503 (retry), so a flood cannot queue without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from training.errors import NotReady


class RerankGate:
    """Admits one rerank at a time; at most `max_waiting` more wait for it."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._turn = asyncio.Lock()
        self._queued = 0

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold the rerank turn for the block, or NotReady at once when `max_waiting` reranks already wait."""
        if self._queued > self.max_waiting:
            raise NotReady(
                f"{self._queued} reranked searches are already running or waiting in this process; retry shortly, "
                "search with rerank=false, or raise LOCKSTEP_MAX_WAITING_RERANKS"
            )
        self._queued += 1
        try:
            async with self._turn:
                yield
        finally:
            self._queued -= 1
