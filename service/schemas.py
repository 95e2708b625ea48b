"""Request and response bodies of the HTTP API, one pair per use."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from indexer.vector_index import MAX_EF_SEARCH, MAX_NPROBE

MAX_K = 1000
MAX_QUERY_CHARS = 4096
MAX_TEXT_CHARS = 200_000
MAX_BATCH_DOCUMENTS = 512
MAX_EMBEDDING_INPUTS = 256


class IndexSearchParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ef_search: int | None = Field(None, ge=1, le=MAX_EF_SEARCH, description="HNSW candidates kept while searching")
    nprobe: int | None = Field(None, ge=1, le=MAX_NPROBE, description="IVF lists searched (at most the index's)")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., max_length=MAX_QUERY_CHARS, description="The query text")
    k: int = Field(10, ge=1, le=MAX_K, description="How many results to return")
    rerank: bool = Field(False, description="Rerank the candidates with the release's cross-encoder")
    rerank_weight: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Cross-encoder's weight when its standardised score is fused with the bi-encoder's "
        "(1: rank by the cross-encoder alone); default: the service's LOCKSTEP_RERANK_WEIGHT",
    )
    lexical_weight: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Hybrid search: BM25's weight when its standardised score is fused with the bi-encoder's over "
        "both retrievers' candidates (0: dense only, 1: BM25 only); default: the service's LOCKSTEP_LEXICAL_WEIGHT (0)",
    )
    filter: dict | None = Field(
        None,
        description='Search only documents whose metadata matches, in the MongoDB style: {"lang": "en", "year": '
        '{"$gte": 2015}}; operators $eq $ne $gt $gte $lt $lte $in $nin $exists, and $and / $or of filters',
        examples=[{"lang": "en", "year": {"$gte": 2015}}],
    )
    search_params: IndexSearchParams | None = Field(
        None, description="This search's breadth in an approximate index instead of the release's (recall vs speed)",
    )


class SearchResult(BaseModel):
    id: str
    score: float
    title: str
    text: str
    metadata: dict


class SearchResponse(BaseModel):
    release: str
    results: list[SearchResult]
    timings_ms: dict[str, float]
    search_params: dict[str, int] = Field(
        description="The parameters the release's index was searched at: ef_search (HNSW), nprobe (IVF); empty for Flat",
    )


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


def _non_finite_path(value: object, path: str) -> str | None:
    """Where in a parsed JSON value a NaN or an infinity sits (`metadata.scores[2]`), or None if nowhere."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        children = ((f"{path}.{key}", child) for key, child in value.items())
    elif isinstance(value, list):
        children = ((f"{path}[{position}]", child) for position, child in enumerate(value))
    else:
        return None
    for child_path, child in children:
        found = _non_finite_path(child, child_path)
        if found is not None:
            return found
    return None


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=512)
    title: str = Field("", max_length=MAX_TEXT_CHARS)
    text: str = Field("", max_length=MAX_TEXT_CHARS)
    metadata: dict = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _finite_metadata(cls, metadata: dict) -> dict:
        """Refuse NaN and infinities, which the request parser accepts but JSON cannot return (they come back null)."""
        found = _non_finite_path(metadata, "metadata")
        if found is not None:
            raise ValueError(f"{found} is NaN or infinite, which JSON cannot hold; "
                             "send a finite number, a string or null")
        return metadata


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(..., max_length=MAX_BATCH_DOCUMENTS)


class UpsertResponse(BaseModel):
    inserted: int
    updated: int
    unchanged: int
    seq: int
    release: str | None = Field(
        None, description="The live release the writes were applied to; null when none is live, or when applying "
                          "failed (stored all the same; the next catch-up applies them)",
    )


class DocumentOut(BaseModel):
    id: str
    title: str
    text: str
    metadata: dict


class DocumentPage(BaseModel):
    documents: list[DocumentOut]
    next_after: str | None = Field(
        None, description="Pass as `after` for the next page; null when this page is the last",
    )


class FieldIndexOut(BaseModel):
    field: str
    values: int = Field(description="Values the index holds: one per document with the field, one per array element")


class FieldIndexList(BaseModel):
    fields: list[FieldIndexOut]


class DeleteResponse(BaseModel):
    deleted: str
    seq: int
    release: str | None


class Health(BaseModel):
    status: str
    release: str | None = None


PathOrPairs = str | list[dict]
PathOrQueries = str | dict[str, str]
PathOrQrels = str | dict[str, dict[str, int]]


class RetrainRequest(BaseModel):
    """A fine-tuning job. Training data: `pairs`, or `queries` + `qrels`; each a path the workers can read, or inline."""

    model_config = ConfigDict(extra="forbid")

    recipe: str | None = Field(None, description="A shipped recipe by name (default, quick, triplets); default: default")
    recipe_toml: str | None = Field(None, max_length=100_000, description="A whole recipe as TOML instead of a name")
    pairs: PathOrPairs | None = Field(None, description='Pairs/triplets JSONL path, or [{"query", "positive", "negatives"}]')
    queries: PathOrQueries | None = Field(None, description="BEIR queries.jsonl path, or {query id: text}")
    qrels: PathOrQrels | None = Field(None, description="BEIR qrels TSV path, or {query id: {doc id: grade}}")
    corpus: str | None = Field(None, description="Corpus JSONL the data refers to; default: Lockstep's corpus")
    dev_queries: str | None = Field(None, description="Queries the promotion gate evaluates on (overrides settings)")
    dev_qrels: str | None = Field(None, description="Judgements the promotion gate evaluates on")
    index_type: str | None = Field(None, description="FAISS factory string of the new release; default: the live one's")


class ReembedRequest(BaseModel):
    """Re-embed the corpus into a new release with `model` (a folder the workers can read) or the live model."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model folder; default: the active release's model")
    dev_queries: str | None = None
    dev_qrels: str | None = None
    index_type: str | None = None


class JobOut(BaseModel):
    id: str
    kind: str
    status: str = Field(..., description="queued, running, succeeded, rejected, failed or cancelled")
    step: str = Field(..., description="The step it is at or ended in: retrain, reembed, evaluate, promote")
    params: dict
    progress: dict
    metrics: dict
    outputs: dict
    message: str | None
    error: str | None
    attempts: int
    cancel_requested: bool
    created: str
    started: str | None
    updated: str
    finished: str | None


class JobList(BaseModel):
    jobs: list[JobOut]


class ReleaseOut(BaseModel):
    release_id: str
    active: bool
    manifest: dict
    job: dict | None = Field(None, description="The job that built it: id, status, message, gate and shadow metrics")


class ReleaseList(BaseModel):
    active: str | None
    serving: str | None = Field(None, description="The release this API process is serving")
    releases: list[ReleaseOut]


class PointerOut(BaseModel):
    active: str | None
    history: list[str]
    serving: str | None
    load_error: str | None = Field(
        None, description="Why this API process could not load the active release; it keeps serving `serving`"
    )


class RecipeOut(BaseModel):
    name: str
    stages: list[str] = Field(..., description="The recipe's stages in order")


class RecipeList(BaseModel):
    recipes: list[RecipeOut]


class SeriesOut(BaseModel):
    label: str
    points: list[tuple[float, float]] = Field(..., description="(global step, value) pairs")


class ThresholdOut(BaseModel):
    value: float
    label: str


class PanelOut(BaseModel):
    key: str
    title: str
    caption: str
    mode: str | None = Field(..., description="The failure mode it watches: collapse, false_negatives, shortcut, overfitting, drift")
    series: list[SeriesOut]
    thresholds: list[ThresholdOut] = Field(..., description="Where the mode's alert fires")
    fired: bool
    alerts: list[str]
    remedy: str | None


class TrainingReportOut(BaseModel):
    job: str
    status: str
    records: int = Field(..., description="Lines in the run's metrics log so far")
    thresholds: dict[str, float]
    panels: list[PanelOut]
    stages: list[dict]
    alerts: list[dict]
    events: list[dict] = Field(..., description="The run's log: stage starts and ends, evaluations, alerts, summary")
    summary: dict | None


class DriftProbeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample: int = Field(256, ge=1, le=10_000, description="Documents to re-encode")
    threshold: float = Field(0.99, gt=0, le=1, description="Cosine below which a document counts as drifted")
    seed: int = Field(0, description="Seed of the sample")


class DriftedDocumentOut(BaseModel):
    id: str
    title: str
    cosine: float


class DriftProbeOut(BaseModel):
    release: str
    model_fingerprint: str
    precision: str
    index_type: str
    sample: int
    threshold: float
    mean_cosine: float
    min_cosine: float
    below_threshold: int
    share_below: float
    worst: list[DriftedDocumentOut] = Field(..., description="The sampled documents with the lowest cosine")
    elapsed_ms: float
