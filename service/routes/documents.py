"""`PUT /v1/documents`, `GET` and `DELETE /v1/documents/{id}`: corpus writes that reach the live index.

The id is matched as a path (`{doc_id:path}`), so an id with `/` in it, which PUT
accepts, can be read and deleted too.
"""

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from indexer.ingest import parse_document
from service.deps import StateDep
from service.http_errors import ERROR_RESPONSES
from service.schemas import DeleteResponse, DocumentOut, UpsertRequest, UpsertResponse
from training.errors import EmptyInput, InvalidInput

router = APIRouter(tags=["documents"])


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


@router.get("/v1/documents/{doc_id:path}", response_model=DocumentOut, responses=ERROR_RESPONSES)
async def get_document(doc_id: str, state: StateDep) -> DocumentOut:
    doc = await run_in_threadpool(state.corpus.get, doc_id)
    return DocumentOut(id=doc.id, title=doc.title, text=doc.text, metadata=doc.metadata)


@router.delete("/v1/documents/{doc_id:path}", response_model=DeleteResponse, responses=ERROR_RESPONSES)
async def delete_document(doc_id: str, state: StateDep) -> DeleteResponse:
    seq, release = await run_in_threadpool(state.holder.delete, doc_id)
    return DeleteResponse(deleted=doc_id, seq=seq, release=release)
