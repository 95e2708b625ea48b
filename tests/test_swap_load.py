"""A short version of `bench/swap_load.py` on tiny models: 16 clients, three swaps, zero failures, one release per reply."""

from __future__ import annotations

import asyncio

import pytest

from bench.swap_load import TOKEN, drive, expected_scores, mismatches
from indexer.release_builder import BuildOptions, build_release
from tests.conftest import SAMPLE_DOCS
from tests.processes import start_server, stop

pytestmark = pytest.mark.integration

QUERIES = ["protein cells", "quick brown fox", "python library error", "red apple banana", "search index vector",
           "lazy dog data", "green small fast", "gene cancer study"]


def test_sixteen_clients_across_three_swaps_never_fail_and_each_reply_is_scored_by_one_release(
    corpus, releases, data_dir, tiny_model_dir, other_model_dir
):
    corpus.upsert(SAMPLE_DOCS)
    first = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    second = build_release(corpus, releases, BuildOptions(model_path=other_model_dir, precision="fp32"))
    expected = expected_scores(data_dir, [first.release_id, second.release_id], QUERIES, 20)
    server, base = start_server(data_dir, admin_token=TOKEN)
    try:
        swaps = [second.release_id, first.release_id, second.release_id]
        result = asyncio.run(drive(base, QUERIES, clients=16, duration_s=8.0, swap_to=swaps))
    finally:
        stop(server)
    figures = result.summary()
    print(f"swap load: {figures}")
    assert result.swaps == swaps
    assert not result.failures, result.failures[:5]
    assert not mismatches(result, expected)
    assert {release for release, _, _ in result.replies} == {first.release_id, second.release_id}
    assert figures["requests"] > 100
