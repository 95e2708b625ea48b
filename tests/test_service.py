"""The HTTP API in-process: search, embeddings, document writes, health, errors."""

import base64
from concurrent.futures import ThreadPoolExecutor

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.release_builder import BuildOptions, build_release
from indexer.settings import Settings
from service.app import create_app
from tests.conftest import SAMPLE_DOCS


@pytest.fixture
def built(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    return build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)


@pytest.fixture
def client(data_dir, built):
    with TestClient(create_app(Settings(data_dir=data_dir, poll_interval_s=0.1))) as client:
        yield client


def test_search_answers_from_the_active_release(client, built):
    response = client.post("/v1/search", json={"query": "Fruit apple banana cherry red green", "k": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["release"] == built.release_id
    assert body["results"][0] == {
        "id": "d3",
        "score": pytest.approx(1.0, abs=1e-4),
        "title": "Fruit",
        "text": "apple banana cherry red green",
        "metadata": {},
    }
    assert len(body["results"]) == 3 and set(body["timings_ms"]) == {"encode", "search", "fetch", "total"}


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ({"query": "   "}, 400, "query is empty"),
        ({"query": "x", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"query": "x", "k": 1001}, 422, "less than or equal to 1000"),
        ({"query": "x" * 5000}, 422, "query: String should have at most 4096"),
        ({"k": 3}, 422, "query: Field required"),
        ({"query": "x", "unknown": 1}, 422, "unknown: Extra inputs"),
        ({"query": "x", "rerank": True}, 422, "no cross-encoder"),
        ({"query": "x", "rerank": True, "rerank_weight": 1.5}, 422, "rerank_weight: Input should be less than or equal to 1"),
        ({"query": "x", "filter": "lang=en"}, 422, "filter: Input should be a valid dictionary"),
        ({"query": "x", "filter": {"year": {"$gt": True}}}, 422, "filter.year.$gt orders numbers or strings"),
        ({"query": "x", "filter": {}}, 422, "filter must be a non-empty JSON object"),
        ('{"query": "pear \\ud800 tart"}', 422, "query: Input should be a valid string, unable to parse raw data"),
    ],
)
def test_bad_search_input_is_a_4xx_that_says_what_to_fix(client, payload, status, fragment):
    body = {"content": payload, "headers": {"content-type": "application/json"}} if isinstance(payload, str) else {"json": payload}
    response = client.post("/v1/search", **body)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error", "error_type"} and fragment in body["error"]


def test_malformed_json_is_a_422_not_a_500(client):
    response = client.post("/v1/search", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "error" in response.json()


def test_embeddings_are_openai_compatible_and_match_the_release_model(client, built, tiny_model_dir):
    from training.bi_encoder import BiEncoder

    response = client.post("/v1/embeddings", json={"input": ["apple banana", "quick fox"], "model": "anything"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["model"] == "tiny-bert-0"
    assert [item["index"] for item in body["data"]] == [0, 1]
    release_model = BiEncoder.load(tiny_model_dir)
    release_model.precision = built.precision
    expected = release_model.encode(["apple banana", "quick fox"], "query")
    assert np.allclose([item["embedding"] for item in body["data"]], expected, atol=1e-5)
    assert body["usage"]["prompt_tokens"] > 0
    single = client.post("/v1/embeddings", json={"input": "apple banana", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(single["data"][0]["embedding"]), dtype=np.float32)
    assert np.allclose(decoded, expected[0], atol=1e-5)


@pytest.mark.parametrize(
    ("payload", "status"),
    [({"input": []}, 400), ({"input": [""]}, 400), ({"input": ["x"] * 257}, 422), ({"input": 5}, 422)],
)
def test_bad_embedding_input(client, payload, status):
    response = client.post("/v1/embeddings", json=payload)
    assert response.status_code == status and response.json()["error"]


def test_a_lone_surrogate_in_one_embedding_input_is_a_422_naming_it(client, built):
    """Guards against the tokenizer's TypeError on text UTF-8 cannot hold surfacing as a 500."""
    response = client.post("/v1/embeddings", content='{"input": ["apple", "fox \\udc80"]}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert "input 1 holds '\\udc80', a lone surrogate" in response.json()["error"]
    assert client.post("/v1/embeddings", json={"input": ["apple"]}).status_code == 200


def test_document_writes_reach_the_live_index(client, built):
    """Guards against writes that land in the corpus but never become searchable (or deletable)."""
    doc = {"id": "new", "title": "Berries", "text": "cherry cherry red small", "metadata": {"src": "test"}}
    response = client.put("/v1/documents", json={"documents": [doc]})
    assert response.status_code == 200
    assert response.json() == {"inserted": 1, "updated": 0, "unchanged": 0, "seq": 6, "release": built.release_id}
    assert client.get("/v1/documents/new").json() == doc
    top = client.post("/v1/search", json={"query": "Berries cherry cherry red small", "k": 1}).json()
    assert top["results"][0]["id"] == "new"
    assert client.delete("/v1/documents/new").json() == {"deleted": "new", "seq": 7, "release": built.release_id}
    hits = client.post("/v1/search", json={"query": "Berries cherry cherry red small", "k": 10}).json()["results"]
    assert "new" not in {hit["id"] for hit in hits}
    assert client.get("/v1/documents/new").status_code == 404
    assert client.delete("/v1/documents/new").status_code == 404


def test_search_filters_by_the_corpus_metadata_as_it_is_now_and_returns_it(client, built):
    """Guards against filtered searches returning documents outside the filter, reading the metadata the release
    was built with instead of the latest writes, or dropping the metadata from the results."""
    docs = [{"id": f"m{i}", "title": "Fruit", "text": "apple banana cherry red green",
             "metadata": {"year": 2010 + i, "tags": ["odd" if i % 2 else "even", "fruit"]}} for i in range(6)]
    assert client.put("/v1/documents", json={"documents": docs}).status_code == 200
    query = {"query": "Fruit apple banana cherry red green", "k": 10}
    body = client.post("/v1/search", json={**query, "filter": {"year": {"$gte": 2013}}}).json()
    assert {r["id"] for r in body["results"]} == {"m3", "m4", "m5"}
    assert {r["id"]: r["metadata"] for r in body["results"]}["m3"] == {"year": 2013, "tags": ["odd", "fruit"]}
    assert list(body["timings_ms"]) == ["encode", "filter", "search", "fetch", "total"]
    both = {"$or": [{"tags": "odd", "year": {"$lt": 2012}}, {"lang": "py"}]}
    assert {r["id"] for r in client.post("/v1/search", json={**query, "filter": both}).json()["results"]} == {"m1", "d5"}
    docs[3]["metadata"] = {"year": 1999}
    assert client.put("/v1/documents", json={"documents": [docs[3]]}).status_code == 200
    body = client.post("/v1/search", json={**query, "k": 2, "filter": {"year": {"$gte": 2013}}}).json()
    assert sorted(r["id"] for r in body["results"]) == ["m4", "m5"]
    assert client.post("/v1/search", json={**query, "filter": {"year": 3000}}).json()["results"] == []


def test_hybrid_search_fuses_bm25_over_the_corpus_as_it_is_now(client, built):
    """Guards against hybrid searches that ignore BM25, miss words written after the release was built, or fuse
    with a weight outside [0, 1]."""
    lexical = client.post("/v1/search", json={"query": "cherry bananas", "k": 3, "lexical_weight": 1}).json()
    assert [hit["id"] for hit in lexical["results"]] == ["d3"], "only d3 holds the words; bananas is stemmed"
    hybrid = client.post("/v1/search", json={"query": "cherry bananas", "k": 5, "lexical_weight": 0.5}).json()
    assert hybrid["results"][0]["id"] == "d3" and len(hybrid["results"]) == 5
    assert list(hybrid["timings_ms"]) == ["encode", "search", "fetch", "total"]
    doc = {"id": "fresh", "title": "Zyzzyva", "text": "a weevil named zyzzyva", "metadata": {"kind": "insect"}}
    assert client.put("/v1/documents", json={"documents": [doc]}).status_code == 200
    found = client.post("/v1/search", json={"query": "zyzzyva", "k": 3, "lexical_weight": 0.5,
                                            "filter": {"kind": "insect"}}).json()["results"]
    assert [hit["id"] for hit in found] == ["fresh"]
    refused = client.post("/v1/search", json={"query": "x", "lexical_weight": 1.5})
    assert refused.status_code == 422 and "lexical_weight: Input should be less than or equal to 1" in refused.json()["error"]


def test_the_service_default_lexical_weight_applies_unless_a_request_sends_one(data_dir, built):
    with TestClient(create_app(Settings(data_dir=data_dir, lexical_weight=1.0))) as client:
        default = client.post("/v1/search", json={"query": "cherry bananas", "k": 3}).json()["results"]
        dense = client.post("/v1/search", json={"query": "cherry bananas", "k": 3, "lexical_weight": 0}).json()["results"]
    assert [hit["id"] for hit in default] == ["d3"]
    assert len(dense) == 3


def test_a_document_id_with_slashes_can_be_read_and_deleted(client, built):
    """Guards against ids that PUT accepts (`notes/2024/a.txt`) but GET and DELETE cannot reach."""
    doc = {"id": "notes/2024/a.txt", "title": "Notes", "text": "green apple notes", "metadata": {}}
    assert client.put("/v1/documents", json={"documents": [doc]}).status_code == 200
    assert client.get("/v1/documents/notes/2024/a.txt").json() == doc
    assert client.get("/v1/documents/notes%2F2024%2Fa.txt").json() == doc
    deleted = client.delete("/v1/documents/notes/2024/a.txt")
    assert deleted.json() == {"deleted": "notes/2024/a.txt", "seq": 7, "release": built.release_id}
    assert client.get("/v1/documents/notes/2024/a.txt").status_code == 404


@pytest.mark.parametrize(
    ("metadata", "where"),
    [('{"score": NaN}', "metadata.score"), ('{"scores": [1, Infinity]}', "metadata.scores[1]"),
     ('{"a": {"b": -Infinity}}', "metadata.a.b")],
)
def test_non_finite_metadata_is_refused_with_422(client, corpus, metadata, where):
    """Guards against NaN or Infinity in metadata being stored and later returned as null."""
    before = corpus.seq
    body = '{"documents": [{"id": "nan", "text": "green apple", "metadata": %s}]}' % metadata
    response = client.put("/v1/documents", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error_type"] == "validation"
    assert f"documents.0.metadata: Value error, {where} is NaN or infinite" in response.json()["error"]
    assert "send a finite number" in response.json()["error"] and corpus.seq == before


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"documents": []}, "documents is empty"),
        ({"documents": [{"id": "x"}]}, "documents[0]: document 'x' has neither"),
        ({"documents": [{"id": "x", "text": "t"}] * 513}, "at most 512"),
        ({"documents": [{"id": "", "text": "t"}]}, "documents.0.id"),
    ],
)
def test_bad_document_writes_change_nothing(client, payload, fragment, corpus):
    before = corpus.seq
    response = client.put("/v1/documents", json=payload)
    assert 400 <= response.status_code < 500 and fragment in response.json()["error"]
    assert corpus.seq == before


def test_health_readiness_metrics(client, built):
    assert client.get("/healthz").json() == {"status": "ok", "release": None}
    assert client.get("/readyz").json() == {"status": "ready", "release": built.release_id}
    client.post("/v1/search", json={"query": "apple"})
    metrics = client.get("/metrics").text
    assert f'lockstep_active_release{{release="{built.release_id}"}} 1.0' in metrics
    assert 'lockstep_http_requests_total{method="POST",route="/v1/search",status="200"}' in metrics
    assert "lockstep_index_documents 5.0" in metrics


def test_invented_http_methods_share_one_metrics_label(client):
    """Guards against one set of series per method token a client invents, which grows /metrics without bound."""
    for method in ("FOO1", "FOO2"):
        client.request(method, "/v1/search")
    metrics = client.get("/metrics").text
    assert 'method="OTHER"' in metrics and "FOO1" not in metrics and "FOO2" not in metrics


def test_not_ready_until_a_release_is_active(data_dir, corpus, releases, tiny_model_dir):
    with TestClient(create_app(Settings(data_dir=data_dir, poll_interval_s=0.05))) as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and "lockstep build --activate" in response.json()["error"]
        assert client.post("/v1/search", json={"query": "apple"}).status_code == 503
        corpus.upsert(SAMPLE_DOCS)
        client.put("/v1/documents", json={"documents": [{"id": "late", "text": "green apple"}]})
        manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
        _wait_for(lambda: client.get("/readyz").status_code == 200)
        assert client.post("/v1/search", json={"query": "apple"}).json()["release"] == manifest.release_id


def test_activation_by_another_process_is_picked_up(client, built, corpus, releases, other_model_dir):
    """Guards against a service that keeps serving an old release after `lockstep releases activate`."""
    newer = build_release(corpus, releases, BuildOptions(model_path=other_model_dir), activate=True)
    _wait_for(lambda: client.get("/readyz").json()["release"] == newer.release_id)
    body = client.post("/v1/search", json={"query": "Fruit apple banana cherry red green", "k": 1}).json()
    assert body["release"] == newer.release_id and body["results"][0]["id"] == "d3"
    releases.rollback()
    _wait_for(lambda: client.get("/readyz").json()["release"] == built.release_id)


def test_unknown_route_uses_the_error_shape(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error_type"] == "not_found"


def _wait_for(condition, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_rerank_uses_the_release_cross_encoder(data_dir, corpus, releases, tiny_model_dir):
    """Guards against `rerank: true` silently returning bi-encoder order, a reranker from another release,
    or a fused score that mixes up which candidate each score belongs to."""
    from training.cross_encoder import CrossEncoder
    from training.score_fusion import fuse

    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, reranker_path=tiny_model_dir, precision="fp32")
    manifest = build_release(corpus, releases, options, activate=True)
    assert manifest.reranker is not None and manifest.reranker.path != manifest.model.path
    reranker = CrossEncoder.load(releases.data_dir / manifest.reranker.path)
    settings = Settings(data_dir=data_dir, rerank_candidates=4, rerank_weight=0.4)
    with TestClient(create_app(settings)) as client:
        alone = client.post("/v1/search", json={"query": "apple banana", "k": 3, "rerank": True, "rerank_weight": 1}).json()
        fused = client.post("/v1/search", json={"query": "apple banana", "k": 3, "rerank": True}).json()
        plain = client.post("/v1/search", json={"query": "apple banana", "k": 4}).json()
    assert "rerank" in alone["timings_ms"] and len(alone["results"]) == len(fused["results"]) == 3
    candidates = {hit["id"]: hit for hit in plain["results"]}
    texts = [f"{candidates[i]['title']} {candidates[i]['text']}" for i in candidates]
    logits = reranker.score([("apple banana", t) for t in texts])
    for body, scores in ((alone, logits), (fused, fuse([hit["score"] for hit in candidates.values()], logits, 0.4))):
        expected = sorted(zip(scores, candidates), reverse=True)[:3]
        assert [hit["id"] for hit in body["results"]] == [doc_id for _, doc_id in expected]
        assert [hit["score"] for hit in body["results"]] == pytest.approx([score for score, _ in expected], abs=1e-4)


def test_waiting_reranks_take_no_worker_thread_and_a_flood_is_refused(data_dir, corpus, releases, tiny_model_dir):
    """Guards against reranks waiting for their turn inside the threadpool: a burst of them held every thread, so a
    plain search (its encode and fetch run in threads) waited behind the whole rerank backlog."""
    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, reranker_path=tiny_model_dir,
                                                 precision="fp32"), activate=True)
    settings = Settings(data_dir=data_dir, max_waiting_reranks=2)
    rerank = {"query": "apple banana", "k": 2, "rerank": True}
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(8) as pool:
        client.portal.call(lambda: setattr(anyio.to_thread.current_default_thread_limiter(), "total_tokens", 2))
        state = client.app.state.lockstep
        live = state.holder.current
        with live._rerank_lock:
            admitted = [pool.submit(client.post, "/v1/search", json=rerank) for _ in range(3)]
            _wait_for(lambda: state.rerank_gate._queued == 3)
            flood = client.post("/v1/search", json=rerank)
            plain = pool.submit(client.post, "/v1/search", json={"query": "apple banana", "k": 2}).result(timeout=30)
            assert not any(call.done() for call in admitted)
        answers = [call.result(timeout=30) for call in admitted]
    assert plain.status_code == 200 and len(plain.json()["results"]) == 2
    assert flood.status_code == 503 and "3 reranked searches are already running or waiting" in flood.json()["error"]
    assert [answer.status_code for answer in answers] == [200, 200, 200]


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("bf16", 1e-2), ("fp16", 1e-2)])
def test_dynamic_batching_groups_concurrent_queries_with_identical_answers(data_dir, corpus, releases, tiny_model_dir,
                                                                           precision, tolerance):
    """Guards against batching changing answers (the same documents in the same order, scores and embeddings equal
    to the precision's rounding: a batch pads its queries to one length, which changes the products' shapes), for
    searches and embeddings alike, or mixing releases inside one encoder call."""
    import asyncio

    import httpx

    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision=precision), activate=True)
    queries = [doc.embedding_text() for doc in SAMPLE_DOCS] * 4 + ["apple", "quick brown dog", "cancer genes"]

    async def answers(batching: bool):
        app = create_app(Settings(data_dir=data_dir, dynamic_batching=batching, batch_wait_ms=20.0))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                responses = await asyncio.gather(*(client.post("/v1/search", json={"query": q, "k": 3}) for q in queries),
                                                 *(client.post("/v1/embeddings", json={"input": q}) for q in queries))
                metrics = (await client.get("/metrics")).text
        searches = [r.json() for r in responses[: len(queries)]]
        embeddings = np.array([r.json()["data"][0]["embedding"] for r in responses[len(queries):]])
        return searches, embeddings, metrics

    batched, batched_vectors, batched_metrics = asyncio.run(answers(True))
    single, single_vectors, single_metrics = asyncio.run(answers(False))
    for left, right in zip(batched, single):
        assert [h["id"] for h in left["results"]] == [h["id"] for h in right["results"]]
        assert [h["score"] for h in left["results"]] == pytest.approx([h["score"] for h in right["results"]], abs=tolerance)
    np.testing.assert_allclose(batched_vectors, single_vectors, atol=tolerance)
    batches = float(batched_metrics.split("lockstep_encoder_batch_texts_count ")[1].split()[0])
    assert batches < 2 * len(queries), "concurrent queries were not grouped"
    assert float(single_metrics.split("lockstep_encoder_batch_texts_count ")[1].split()[0]) == 2 * len(queries)


def test_the_corpus_can_be_read_a_page_at_a_time_filtered_while_it_is_written(client, built):
    """Guards against pages that skip or repeat documents when writes land between them, and against a filter that
    the listing reads differently from search."""
    docs = [{"id": f"p/{i:02d}", "title": "", "text": f"page document {i}", "metadata": {"even": i % 2 == 0}}
            for i in range(25)]
    assert client.put("/v1/documents", json={"documents": docs}).status_code == 200
    seen, after = [], None
    while True:
        params = {"limit": 4, "filter": '{"even": true}', **({"after": after} if after else {})}
        page = client.get("/v1/documents", params=params).json()
        seen += [doc["id"] for doc in page["documents"]]
        if len(seen) == 4:  # a write between pages: one new matching document after the cursor, one before it
            client.put("/v1/documents", json={"documents": [{"id": "p/99", "title": "", "text": "late", "metadata": {"even": True}},
                                                            {"id": "a-first", "title": "", "text": "x", "metadata": {"even": True}}]})
        after = page["next_after"]
        if after is None:
            break
    assert seen == [f"p/{i:02d}" for i in range(0, 25, 2)] + ["p/99"]
    everything = client.get("/v1/documents", params={"limit": 1000}).json()
    assert everything["next_after"] is None and len(everything["documents"]) == 5 + 25 + 2
    assert everything["documents"][0] == {"id": "a-first", "title": "", "text": "x", "metadata": {"even": True}}


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"limit": 0}, "limit: Input should be greater than or equal to 1"),
        ({"limit": 1001}, "limit: Input should be less than or equal to 1000"),
        ({"filter": "{lang"}, "filter is not JSON: Expecting property name enclosed in double quotes at column 2"),
        ({"filter": '{"lang": {"$near": 1}}'}, "filter.lang.$near: unknown operator"),
    ],
)
def test_bad_listing_parameters_are_a_422_that_says_what_to_fix(client, params, fragment):
    response = client.get("/v1/documents", params=params)
    assert response.status_code == 422 and fragment in response.json()["error"]


def test_a_search_sets_its_own_index_breadth_and_reports_the_one_it_ran_at(data_dir, corpus, releases, tiny_model_dir):
    """Guards against `search_params` being accepted and ignored, leaking into later searches, or a bad value
    answering 500 instead of a 422 that names it."""
    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, index_type="HNSW8", ef_search=40),
                  activate=True)
    query = {"query": "Fruit apple banana cherry red green", "k": 3}
    with TestClient(create_app(Settings(data_dir=data_dir))) as client:
        assert client.post("/v1/search", json=query).json()["search_params"] == {"ef_search": 40}
        tuned = client.post("/v1/search", json={**query, "search_params": {"ef_search": 300, "nprobe": 5}}).json()
        assert tuned["search_params"] == {"ef_search": 300}, "nprobe does not apply to HNSW and is ignored"
        assert tuned["results"][0]["id"] == "d3"
        assert client.post("/v1/search", json=query).json()["search_params"] == {"ef_search": 40}
        for bad, message in (({"ef_search": 0}, "search_params.ef_search: Input should be greater than or equal to 1"),
                             ({"efSearch": 9}, "search_params.efSearch: Extra inputs are not permitted")):
            refused = client.post("/v1/search", json={**query, "search_params": bad})
            assert refused.status_code == 422 and message in refused.json()["error"], refused.json()
