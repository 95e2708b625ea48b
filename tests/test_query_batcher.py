"""QueryBatcher on its own: two releases' requests interleaved, encoder failures, faults outside the encoder, stop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from indexer.live_release import LiveRelease
from indexer.release_builder import BuildOptions, build_release
from service.query_batcher import QueryBatcher
from tests.conftest import SAMPLE_DOCS
from training.errors import NotReady

QUERIES = [doc.embedding_text() for doc in SAMPLE_DOCS] + ["apple", "quick brown dog", "cancer genes"]
TIMEOUT_S = 30.0


@pytest.fixture
def two_releases(corpus, releases, tiny_model_dir, other_model_dir) -> tuple[LiveRelease, LiveRelease]:
    corpus.upsert(SAMPLE_DOCS)
    first = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    second = build_release(corpus, releases, BuildOptions(model_path=other_model_dir, precision="fp32"))
    return LiveRelease.load(releases, first.release_id), LiveRelease.load(releases, second.release_id)


async def _ask(batcher: QueryBatcher, requests: list[tuple[LiveRelease, str]]) -> list:
    """Send every request at once through a started batcher; answers or exceptions, in order."""
    await batcher.start()
    try:
        calls = (batcher.embed(live, [text]) for live, text in requests)
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), TIMEOUT_S)
    finally:
        await batcher.stop()


def _assert_unbatched(live: LiveRelease, text: str, answer) -> None:
    assert not isinstance(answer, BaseException), f"{text!r} on {live.release_id} failed: {answer!r}"
    np.testing.assert_allclose(answer.vectors, live.embed_queries([text]).vectors, atol=1e-5)


def test_interleaved_releases_get_their_own_models_answers_in_bounded_batches(two_releases):
    """Guards against a query encoded by another release's model, answers handed to the wrong caller,
    or single-text batches larger than max_batch."""
    first, second = two_releases
    assert not np.allclose(first.embed_queries(["apple"]).vectors, second.embed_queries(["apple"]).vectors)
    sizes: list[int] = []
    requests = [(live, text) for text in QUERIES for live in (first, second)]
    answers = asyncio.run(_ask(QueryBatcher(max_wait_ms=20.0, max_batch=4, on_batch=sizes.append), requests))
    for (live, text), answer in zip(requests, answers, strict=True):
        _assert_unbatched(live, text, answer)
    assert sum(sizes) == len(requests) and max(sizes) <= 4
    assert len(sizes) < len(requests), "concurrent requests were not batched"


def test_an_int8_onnx_release_answers_each_request_exactly_as_alone(corpus, releases, tiny_model_dir):
    """Guards against a query's vector depending on which strangers' queries shared its encoder call: ONNX
    Runtime's dynamic int8 scales activations per batch, padding included."""
    corpus.upsert(SAMPLE_DOCS)
    built = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="int8"))
    live = LiveRelease.load(releases, built.release_id)
    assert live.batch_dependent
    merged = live.embed_queries(QUERIES).vectors
    alone = [live.embed_queries([text]).vectors for text in QUERIES]
    assert not all(np.array_equal(merged[i : i + 1], alone[i]) for i in range(len(QUERIES))), "batching changes nothing"
    sizes: list[int] = []
    answers = asyncio.run(_ask(QueryBatcher(max_wait_ms=20.0, max_batch=64, on_batch=sizes.append),
                               [(live, text) for text in QUERIES]))
    for answer, expected in zip(answers, alone, strict=True):
        assert np.array_equal(answer.vectors, expected)
    assert sizes == [1] * len(QUERIES)


def test_a_request_that_breaks_the_encoder_fails_alone(two_releases, monkeypatch):
    """Guards against one bad request failing the strangers batched with it, or the other release's requests."""
    first, second = two_releases
    encode = first.embed_queries

    def chokes_on_poison(texts: list[str]):
        if "poison" in texts:
            raise RuntimeError("the encoder choked on poison")
        return encode(texts)

    monkeypatch.setattr(first, "embed_queries", chokes_on_poison)
    requests = [(first, "apple"), (second, "apple"), (first, "poison"), (second, "poison"), (first, "cancer genes")]
    answers = asyncio.run(_ask(QueryBatcher(max_wait_ms=20.0, max_batch=64), requests))
    assert isinstance(answers[2], RuntimeError) and "poison" in str(answers[2])
    for position in (0, 1, 3, 4):
        live, text = requests[position]
        _assert_unbatched(live, text, answers[position])


def test_a_fault_outside_the_encoder_leaves_batching_running(two_releases):
    """Guards against an exception in the batching task killing it, so every later request waits forever."""
    first, second = two_releases

    def broken_metrics(size: int) -> None:
        raise RuntimeError("metrics backend down")

    batcher = QueryBatcher(max_wait_ms=5.0, on_batch=broken_metrics)

    async def two_rounds() -> list:
        await batcher.start()
        try:
            together = [batcher.embed(first, ["apple"]), batcher.embed(second, ["apple"])]
            answers = await asyncio.wait_for(asyncio.gather(*together, return_exceptions=True), TIMEOUT_S)
            return [*answers, await asyncio.wait_for(batcher.embed(second, ["cancer genes"]), TIMEOUT_S)]
        finally:
            await batcher.stop()

    asked = [(first, "apple"), (second, "apple"), (second, "cancer genes")]
    for (live, text), answer in zip(asked, asyncio.run(two_rounds()), strict=True):
        _assert_unbatched(live, text, answer)


def test_stop_fails_waiting_requests_instead_of_leaving_them_hanging(two_releases):
    """Guards against requests taken off the queue, but not yet encoded, waiting forever after shutdown."""
    first, _ = two_releases
    batcher = QueryBatcher(max_wait_ms=10_000.0)

    async def stop_while_collecting() -> list:
        await batcher.start()
        waiting = [asyncio.create_task(batcher.embed(first, [text])) for text in ("apple", "cancer genes")]
        await asyncio.sleep(0.05)
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), TIMEOUT_S)

    for answer in asyncio.run(stop_while_collecting()):
        assert isinstance(answer, NotReady) and "shutting down" in str(answer)
