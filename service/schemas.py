"""Request and response bodies of the HTTP API, one pair per use."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_K = 1000
MAX_QUERY_CHARS = 4096
MAX_TEXT_CHARS = 200_000
MAX_BATCH_DOCUMENTS = 512
MAX_EMBEDDING_INPUTS = 256


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., max_length=MAX_QUERY_CHARS, description="The query text")
    k: int = Field(10, ge=1, le=MAX_K, description="How many results to return")
    rerank: bool = Field(False, description="Rerank the candidates with the release's cross-encoder")


class SearchResult(BaseModel):
    id: str
    score: float
    title: str
    text: str


class SearchResponse(BaseModel):
    release: str
    results: list[SearchResult]
    timings_ms: dict[str, float]


class EmbeddingsRequest(BaseModel):
    """OpenAI-compatible embeddings request; `model` is accepted and reported, the active release decides."""

    input: str | list[str] = Field(..., description="A text or a list of texts")
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage
    release: str


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=512)
    title: str = Field("", max_length=MAX_TEXT_CHARS)
    text: str = Field("", max_length=MAX_TEXT_CHARS)
    metadata: dict = Field(default_factory=dict)


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(..., max_length=MAX_BATCH_DOCUMENTS)


class UpsertResponse(BaseModel):
    inserted: int
    updated: int
    unchanged: int
    seq: int
    release: str | None = Field(None, description="The live release the writes were applied to, if any")


class DocumentOut(BaseModel):
    id: str
    title: str
    text: str
    metadata: dict


class DeleteResponse(BaseModel):
    deleted: str
    seq: int
    release: str | None


class Health(BaseModel):
    status: str
    release: str | None = None
