"""`POST /v1/search`: the top-k documents for a query, from one release."""

import contextlib
import time

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from indexer.metadata_filter import parse_filter
from indexer.vector_index import SearchParams
from service.deps import LiveDep, StateDep
from service.http_errors import ERROR_RESPONSES
from service.schemas import SearchRequest, SearchResponse, SearchResult

router = APIRouter(tags=["search"])


@router.post("/v1/search", response_model=SearchResponse, responses=ERROR_RESPONSES)
async def search(body: SearchRequest, live: LiveDep, state: StateDep) -> SearchResponse:
    live.check_search(body.query, body.rerank)
    where = parse_filter(body.filter) if body.filter is not None else None
    started = time.perf_counter()
    encoded = await state.batcher.embed(live, [body.query])
    encode_ms = (time.perf_counter() - started) * 1e3
    async with state.rerank_gate.turn() if body.rerank else contextlib.nullcontext():
        outcome = await run_in_threadpool(
            live.search_encoded, state.corpus, body.query, encoded.vectors, body.k, body.rerank, encode_ms,
            body.rerank_weight, where, state.settings.lexical_weight_for(body.lexical_weight),
            SearchParams(**body.search_params.model_dump()) if body.search_params else None,
        )
    return SearchResponse(
        release=outcome.release_id,
        results=[
            SearchResult(id=hit.document.id, score=hit.score, title=hit.document.title, text=hit.document.text,
                         metadata=hit.document.metadata)
            for hit in outcome.hits
        ],
        timings_ms=outcome.timings_ms,
        search_params=outcome.search_params,
    )
