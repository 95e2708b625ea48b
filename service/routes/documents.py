"""`PUT /v1/documents`, `GET` and `DELETE /v1/documents/{id}`: corpus writes that reach the live index; `GET
/v1/documents`: the corpus a page at a time, optionally filtered by metadata.

The id is matched as a path (`{doc_id:path}`), so an id with `/` in it, which PUT
accepts, can be read and deleted too.
"""

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from indexer.corpus_store import Document
from indexer.ingest import parse_document
from indexer.metadata_filter import parse_filter_text
from service.deps import StateDep
from service.http_errors import ERROR_RESPONSES
from service.schemas import (
    DeleteResponse,
    DocumentOut,
    DocumentPage,
    UpsertRequest,
    UpsertResponse,
)
from training.errors import EmptyInput, InvalidInput

router = APIRouter(tags=["documents"])
MAX_PAGE = 1000


@router.put("/v1/documents", response_model=UpsertResponse, responses=ERROR_RESPONSES)
async def upsert_documents(body: UpsertRequest, state: StateDep) -> UpsertResponse:
    if not body.documents:
        raise EmptyInput("documents is empty; send at least one document")
    documents = []
    for position, item in enumerate(body.documents):
        try:
            documents.append(parse_document(item.model_dump()))
        except InvalidInput as exc:
            raise InvalidInput(f"documents[{position}]: {exc}") from exc
    result, release = await run_in_threadpool(state.holder.write, documents)
    return UpsertResponse(
        inserted=result.inserted, updated=result.updated, unchanged=result.unchanged, seq=result.seq, release=release
    )


@router.get("/v1/documents", response_model=DocumentPage, responses=ERROR_RESPONSES)
async def list_documents(
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Documents per page")] = 100,
    after: Annotated[str | None, Query(description="The `next_after` of the previous page")] = None,
    filter: Annotated[str | None, Query(description='A metadata filter as JSON, as in search: {"lang": "en"}')] = None,
) -> DocumentPage:
    where = parse_filter_text(filter) if filter is not None else None
    page = await run_in_threadpool(state.corpus.page, limit, after, where)
    return DocumentPage(
        documents=[_document_out(doc) for doc in page],
        next_after=page[-1].id if len(page) == limit else None,
    )


@router.get("/v1/documents/{doc_id:path}", response_model=DocumentOut, responses=ERROR_RESPONSES)
async def get_document(doc_id: str, state: StateDep) -> DocumentOut:
    return _document_out(await run_in_threadpool(state.corpus.get, doc_id))


def _document_out(doc: Document) -> DocumentOut:
    return DocumentOut(id=doc.id, title=doc.title, text=doc.text, metadata=doc.metadata)


@router.delete("/v1/documents/{doc_id:path}", response_model=DeleteResponse, responses=ERROR_RESPONSES)
async def delete_document(doc_id: str, state: StateDep) -> DeleteResponse:
    seq, release = await run_in_threadpool(state.holder.delete, doc_id)
    return DeleteResponse(deleted=doc_id, seq=seq, release=release)
