"""`POST /v1/embeddings`: OpenAI-compatible query embeddings from the live release's model."""

import base64

from fastapi import APIRouter

from service.deps import LiveDep, StateDep
from service.http_errors import ERROR_RESPONSES
from service.schemas import (
    MAX_EMBEDDING_INPUTS,
    MAX_QUERY_CHARS,
    EmbeddingItem,
    EmbeddingsRequest,
    EmbeddingsResponse,
    Usage,
)
from training.errors import EmptyInput, InvalidInput
from training.utf8 import require_utf8

router = APIRouter(tags=["embeddings"])


def _texts(body: EmbeddingsRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise EmptyInput("input is empty; send a string or a non-empty list of strings")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise InvalidInput(f"input has {len(texts)} texts; send at most {MAX_EMBEDDING_INPUTS} per request")
    for position, text in enumerate(texts):
        if len(text) > MAX_QUERY_CHARS:
            raise InvalidInput(f"input {position} has {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
        require_utf8(text, f"input {position}")
    return texts


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERROR_RESPONSES)
async def embeddings(body: EmbeddingsRequest, live: LiveDep, state: StateDep) -> EmbeddingsResponse:
    encoded = await state.batcher.embed(live, _texts(body))
    as_base64 = body.encoding_format == "base64"
    data = [
        EmbeddingItem(index=i, embedding=base64.b64encode(row.tobytes()).decode() if as_base64 else row.tolist())
        for i, row in enumerate(encoded.vectors)
    ]
    return EmbeddingsResponse(
        data=data,
        model=live.manifest.model.name,
        usage=Usage(prompt_tokens=encoded.tokens, total_tokens=encoded.tokens),
        release=live.release_id,
    )
