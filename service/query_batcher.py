"""Dynamic batching of query encodes: concurrent requests share one encoder call.

Requests put their texts on a queue; one task takes the first, waits at most
`max_wait_ms` for more (up to `max_batch` texts), and encodes each release's texts
in one call off the event loop. While a batch is being encoded the next one fills,
so under load batches grow by themselves and the encoder's fixed cost per call is
paid once per batch instead of once per request. That is why the service waits 0 ms
by default: a lone query is encoded at once, and queries that arrive while the
encoder is busy form the next batch. Texts are only ever batched with
others for the same release, so a query is never encoded by another release's model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from indexer.live_release import LiveRelease
from training.bi_encoder import Encoded
from training.errors import EmptyInput


@dataclass
class _Pending:
    live: LiveRelease
    texts: list[str]
    future: asyncio.Future


class QueryBatcher:
    """Encodes query texts for a release, batching concurrent callers when enabled."""

    def __init__(self, enabled: bool = True, max_wait_ms: float = 0.0, max_batch: int = 64, on_batch=None) -> None:
        self.enabled = enabled
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self.enabled:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def embed(self, live: LiveRelease, texts: list[str]) -> Encoded:
        """Query embeddings of `texts` by `live`'s model, in order."""
        for position, text in enumerate(texts):
            if not text.strip():
                raise EmptyInput(f"input {position} is empty; send non-blank text")
        if self._queue is None:
            encoded = await run_in_threadpool(live.embed_queries, texts)
            self._observe(len(texts))
            return encoded
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(live, list(texts), future))
        return await future

    def _observe(self, size: int) -> None:
        if self.on_batch is not None:
            self.on_batch(size)

    async def _collect(self) -> list[_Pending]:
        first = await self._queue.get()
        batch, size = [first], len(first.texts)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            batch.append(item)
            size += len(item.texts)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            groups: dict[int, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(id(item.live), []).append(item)
            for items in groups.values():
                texts = [text for item in items for text in item.texts]
                try:
                    encoded = await run_in_threadpool(items[0].live.embed_queries, texts)
                except Exception as exc:  # delivered to every waiting request, which raises it
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                self._observe(len(texts))
                start = 0
                for item in items:
                    if not item.future.done():
                        item.future.set_result(encoded.rows(start, start + len(item.texts)))
                    start += len(item.texts)
