"""`POST /v1/search`: the top-k documents for a query, from one release."""

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.deps import LiveDep, StateDep
from service.http_errors import ERROR_RESPONSES
from service.schemas import SearchRequest, SearchResponse, SearchResult

router = APIRouter(tags=["search"])


@router.post("/v1/search", response_model=SearchResponse, responses=ERROR_RESPONSES)
async def search(body: SearchRequest, live: LiveDep, state: StateDep) -> SearchResponse:
    outcome = await run_in_threadpool(live.search, state.corpus, body.query, body.k, body.rerank)
    return SearchResponse(
        release=outcome.release_id,
        results=[
            SearchResult(id=hit.document.id, score=hit.score, title=hit.document.title, text=hit.document.text)
            for hit in outcome.hits
        ],
        timings_ms=outcome.timings_ms,
    )
