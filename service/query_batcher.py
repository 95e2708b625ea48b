"""Dynamic batching of query encodes: concurrent requests share one encoder call.

Requests put their texts on a queue; one task takes the first and waits at most
`max_wait_ms` for more, stopping early once the batch holds `max_batch` texts. A
request is never split, so a request of many texts (the embeddings route takes up to
256) can carry a batch past `max_batch`; requests of one text never do. Each
release's texts in the batch are encoded in one call off the event loop. While a
batch is being encoded the next one fills, so under load batches grow by themselves
and the encoder's fixed cost per call is paid once per batch instead of once per
request. That is why the service waits 0 ms by default: a lone query is encoded at
once, and queries that arrive while the encoder is busy form the next batch. Texts
are only ever batched with others for the same release, so a query is never encoded
by another release's model.

A release whose encoder's vectors depend on what shares the call (int8 on ONNX Runtime
scales its activations per batch: `LiveRelease.batch_dependent`) has each request
encoded in a call of its own, so its answers never depend on strangers' queries.

If a merged call fails, each of its requests is encoded alone, so a request that
breaks the encoder fails by itself and not the strangers it was batched with. Every
request taken from the queue gets an answer or an error, and an error in one batch
never stops the loop; on `stop` the requests still waiting fail with NotReady.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from indexer.live_release import LiveRelease
from training.bi_encoder import Encoded
from training.errors import EmptyInput, NotReady

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    live: LiveRelease
    texts: list[str]
    future: asyncio.Future


def _fail(items: list[_Pending], exc: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)


def _by_release(batch: list[_Pending]) -> list[list[_Pending]]:
    """The batch's requests grouped by release, in order of first arrival."""
    groups: dict[int, list[_Pending]] = {}
    for item in batch:
        groups.setdefault(id(item.live), []).append(item)
    return list(groups.values())


class QueryBatcher:
    """Encodes query texts for a release, batching concurrent callers when enabled."""

    def __init__(
        self, enabled: bool = True, max_wait_ms: float = 0.0, max_batch: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.enabled = enabled
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._batch: list[_Pending] = []

    async def start(self) -> None:
        if self.enabled:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop batching; requests taken or still queued fail with NotReady instead of waiting forever."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        queue, self._queue = self._queue, None
        waiting = self._batch
        while queue is not None and not queue.empty():
            waiting.append(queue.get_nowait())
        _fail(waiting, NotReady("the service is shutting down; send the request again"))
        self._batch = []

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
        """Report a batch's size (metrics); a failing observer is logged, never passed to the requests."""
        if self.on_batch is None:
            return
        try:
            self.on_batch(size)
        except Exception:
            log.exception("recording a query batch of %d texts failed", size)

    async def _collect(self) -> None:
        """Fill `_batch` in place, so `stop` finds every request taken off the queue."""
        first = await self._queue.get()
        self._batch, size = [first], len(first.texts)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            self._batch.append(item)
            size += len(item.texts)

    async def _run(self) -> None:
        while True:
            await self._collect()
            for items in _by_release(self._batch):
                try:
                    await self._encode(items)
                except Exception as exc:  # a fault outside the encoder: fail this group's unanswered requests only
                    log.exception("a query batch of release %s failed; its unanswered requests get the error",
                                  items[0].live.release_id)
                    _fail(items, exc)
            self._batch = []

    async def _encode(self, items: list[_Pending]) -> None:
        """Encode one release's requests in one call; if it fails, encode each alone so only the bad one fails."""
        items = [item for item in items if not item.future.done()]
        if not items:
            return
        if len(items) > 1 and items[0].live.batch_dependent:
            for item in items:
                await self._encode([item])
            return
        texts = [text for item in items for text in item.texts]
        try:
            encoded = await run_in_threadpool(items[0].live.embed_queries, texts)
        except Exception as exc:  # delivered to the waiting request, which raises it
            if len(items) == 1:
                _fail(items, exc)
                return
            log.warning("encoding %d batched requests of release %s failed (%s); encoding each alone",
                        len(items), items[0].live.release_id, exc)
            for item in items:
                await self._encode([item])
            return
        start = 0
        for item in items:
            if not item.future.done():
                item.future.set_result(encoded.rows(start, start + len(item.texts)))
            start += len(item.texts)
        self._observe(len(texts))
