"""Settings shared by the CLI, the service and the workers, read from `LOCKSTEP_*` variables.

Embedded defaults need no server: data under `./lockstep-data`, the packaged
all-MiniLM-L6-v2, an exact (Flat) index, serving on loopback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from training.errors import InvalidInput
from training.score_fusion import DEFAULT_RERANK_CANDIDATES, DEFAULT_RERANK_WEIGHT, RerankPolicy


class Settings(BaseSettings):
    """Every knob Lockstep reads from the environment (prefix `LOCKSTEP_`)."""

    model_config = SettingsConfigDict(env_prefix="LOCKSTEP_", extra="ignore")

    data_dir: Path = Field(Path("./lockstep-data"), description="Where the corpus, models and releases live")
    model: Path | None = Field(None, description="Model folder for new builds; default: packaged all-MiniLM-L6-v2")
    reranker: Path | None = Field(None, description="Cross-encoder folder new builds carry for `rerank: true`")
    rerank_candidates: int = Field(
        DEFAULT_RERANK_CANDIDATES, ge=1, le=1000, description="Candidates the cross-encoder rescores per query"
    )
    rerank_weight: float = Field(
        DEFAULT_RERANK_WEIGHT, ge=0.0, le=1.0,
        description="Cross-encoder's weight when its standardised score is fused with the bi-encoder's (1: rank by it alone)",
    )
    lexical_weight: float = Field(
        0.0, ge=0.0, le=1.0,
        description="BM25's weight in hybrid search when a request sends none (0: dense only; 1: BM25 only)",
    )
    max_waiting_reranks: int = Field(
        32, ge=0, le=10_000,
        description="Reranked searches an API process lets wait while one reranks; past that, `rerank: true` gets 503",
    )
    index_type: str = Field("Flat", description="FAISS factory string for new builds: Flat, HNSW32, IVF256,Flat ...")
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="Encoding precision of new builds: auto (bf16 where the CPU or GPU supports it, fp16 on a GPU "
        "without bf16, else fp32), fp32, bf16, fp16 (GPUs), or int8 (quantised model, kept only if it agrees with fp32)",
    )
    runtime: Literal["torch", "openvino"] = Field(
        "torch",
        description="What runs the encoder of new builds: torch, or openvino (CPU only, compiled graph, "
        "faster; needs `pip install 'lockstep[openvino]'`). int8 on torch is dynamically quantised and runs on "
        "ONNX Runtime; int8 on openvino is statically quantised on a sample of the corpus (faster still)",
    )
    int8_activations: Literal["auto", "calibrated", "dynamic"] = Field(
        "auto",
        description="How int8 builds quantise activations: calibrated (ranges measured on a corpus sample; openvino "
        "only, fastest), dynamic (measured per batch at run time; on openvino per 64 values of each token, closest "
        "to fp32, no calibration), or auto (calibrated on openvino, dynamic on torch)",
    )
    ef_search: int = Field(64, ge=1, le=4096, description="HNSW search breadth of new builds (recall vs speed)")
    ef_construction: int = Field(40, ge=4, le=4096, description="HNSW build breadth of new builds (graph quality)")
    nprobe: int = Field(16, ge=1, le=65536, description="IVF lists searched per query in new builds (recall vs speed)")
    batch_size: int = Field(64, ge=1, le=4096, description="Encoder batch size")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where releases are served, built and trained: auto (the GPU when torch sees one), cpu or cuda"
    )
    shard_size: int = Field(
        4096, ge=1, description="Documents per shard of a job's re-embed; the shards are encoded by any free workers"
    )
    dynamic_batching: bool = Field(True, description="Group concurrent query encodes into one encoder call")
    batch_wait_ms: float = Field(
        0.0, ge=0, le=100,
        description="How long a query waits for others to batch with; at 0 a batch is what queued while the encoder was busy",
    )
    max_query_batch: int = Field(64, ge=1, le=1024, description="Most query texts encoded in one call")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    poll_interval_s: float = Field(2.0, gt=0, description="How often the service checks for a new active release")
    keep_releases: int = Field(5, ge=1, description="Releases kept by `lockstep releases gc`")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    broker_url: str | None = Field(
        None, description="Celery broker, e.g. redis://127.0.0.1:6379/0; default: a SQLite broker in the data dir"
    )
    queue: str = Field("lockstep", description="Celery queue the jobs go to")
    admin_token: SecretStr | None = Field(None, description="Bearer token the jobs and admin routes require")
    cors_origins: list[str] = Field(
        default_factory=list, description='Browser origins allowed to call the API, as JSON: ["https://app.example"]; '
        "default: none (CORS closed)"
    )
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond)")
    training_roots: list[Path] = Field(
        default_factory=list, description="Folders whose files HTTP jobs may name (training data, models, dev sets), "
        'as JSON: ["/srv/data"]; the data dir is always allowed'
    )
    dev_queries: Path | None = Field(None, description="Queries JSONL the promotion gate evaluates on")
    dev_qrels: Path | None = Field(None, description="Judgements (BEIR qrels TSV) the promotion gate evaluates on")
    gate_tolerance: float = Field(0.01, ge=0, le=1, description="How far below the live nDCG@10 a candidate may be")
    job_stale_after_s: float = Field(300.0, gt=0, description="A running job without a heartbeat this long is lost")
    job_max_attempts: int = Field(3, ge=1, description="Runs of a job before a lost worker fails it for good")

    @property
    def corpus_path(self) -> Path:
        return self.data_dir / "corpus.sqlite3"

    @property
    def jobs_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def load(cls, **values: object) -> Settings:
        """The settings from the environment, with `values` given in code taking precedence; InvalidInput naming
        each bad value and its variable, where pydantic would raise a ValidationError."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise _invalid(exc) from None
        except SettingsError as exc:  # a list setting that is not JSON, before any field validation runs
            raise InvalidInput(f"invalid settings: {exc}; list settings such as LOCKSTEP_CORS_ORIGINS and "
                               "LOCKSTEP_TRAINING_ROOTS are JSON lists, e.g. '[\"/srv/data\"]'") from None

    def with_values(self, **values: object) -> Settings:
        """These settings with `values` (a command's options; None leaves a setting as it is), validated as the
        environment is: InvalidInput for a value out of range."""
        try:
            return type(self).model_validate(self.model_dump() | {k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise _invalid(exc) from None

    def broker(self) -> str:
        """The Celery broker URL: `broker_url`, or a SQLite file in the data dir that needs no server."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite3').resolve()}"

    def redis_url(self) -> str | None:
        """The broker URL when it is Redis (used for release notifications), else None."""
        return self.broker_url if self.broker_url and self.broker_url.startswith(("redis://", "rediss://")) else None

    def lexical_weight_for(self, requested: float | None) -> float:
        """The BM25 weight a search uses: the one it asked for, else `lexical_weight`."""
        return self.lexical_weight if requested is None else requested

    def rerank_policy(self) -> RerankPolicy:
        """How searches with `rerank: true` rerank: candidates rescored and the cross-encoder's weight."""
        return RerankPolicy(self.rerank_candidates, self.rerank_weight)

    def model_path(self) -> Path:
        """The model folder new builds use."""
        from training.default_model import default_model_path

        return self.model or default_model_path()

    def model_name(self) -> str | None:
        from training.default_model import DEFAULT_MODEL_NAME

        return None if self.model else DEFAULT_MODEL_NAME


def _invalid(error: ValidationError) -> InvalidInput:
    """One message for every bad setting: its name, the variable that sets it, what is wrong and the value given."""
    problems = []
    for problem in error.errors():
        name = ".".join(str(part) for part in problem["loc"])
        problems.append(f"{name} (LOCKSTEP_{name.upper()}): {problem['msg']}, got {problem.get('input')!r}")
    return InvalidInput("invalid settings: " + "; ".join(problems))
