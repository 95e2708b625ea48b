"""A release loaded for serving: its model and its index, as one unit.

Loading checks every file against the manifest's checksums and the model against
the manifest's fingerprint, and refuses the release if anything differs, so a query
is never scored by one model against another model's vectors. Queries run on the
release's precision and runtime (`release_runtime`): an int8 release encodes through
the quantised model stored (and checksummed) in its folder, the one its documents were
embedded with (ONNX on onnxruntime, OpenVINO IR on openvino), an fp32 or bf16 openvino
release through the graph compiled from its model.
After loading, writes made to the corpus since the release was built are caught up
with the same model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

from indexer.corpus_store import Change, CorpusStore, Document
from indexer.hybrid_search import LEXICAL_CANDIDATES, check_lexical_weight, fuse_runs
from indexer.manifest import Manifest, int8_model_files
from indexer.metadata_filter import Filter
from indexer.model_store import ModelStore
from indexer.release_runtime import attach_reranker_runtime, attach_runtime
from indexer.release_store import ReleaseStore, verify_files
from indexer.vector_index import Hit, SearchParams, VectorIndex
from training.bi_encoder import BiEncoder, Encoded
from training.cross_encoder import CrossEncoder
from training.errors import EmptyInput, IntegrityError, InvalidInput
from training.precision import autocast
from training.score_fusion import RerankPolicy, fuse
from training.utf8 import require_utf8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchHit:
    """A scored document."""

    score: float
    document: Document


@dataclass(frozen=True)
class SearchOutcome:
    """Results of one query and where the time went."""

    release_id: str
    hits: list[SearchHit]
    timings_ms: dict[str, float]
    search_params: dict[str, int]


class LiveRelease:
    """The model and index of one release, plus the corpus writes applied since it was built."""

    def __init__(
        self,
        manifest: Manifest,
        encoder: BiEncoder,
        index: VectorIndex,
        batch_size: int = 64,
        reranker: CrossEncoder | None = None,
        rerank_policy: RerankPolicy = RerankPolicy(),
    ) -> None:
        if not encoder.matches(manifest.model.fingerprint):
            raise IntegrityError(
                f"release {manifest.release_id} was built with model {manifest.model.fingerprint} "
                f"but was given {encoder.fingerprint}; a release is only served with its own model"
            )
        if index.dim != manifest.dim or encoder.dim != manifest.dim:
            raise IntegrityError(f"release {manifest.release_id}: index or model dimension differs from manifest {manifest.dim}")
        if (encoder.precision, encoder.runtime) != (manifest.precision, manifest.runtime):
            raise IntegrityError(
                f"release {manifest.release_id} was built in {manifest.precision} on {manifest.runtime} but was given "
                f"an encoder in {encoder.precision} on {encoder.runtime}; attach the release's runtime first"
            )
        self.manifest = manifest
        encoder.prepare_for_serving()
        self.encoder = encoder
        self.index = index
        self.batch_size = batch_size
        self.reranker = reranker
        self.rerank_policy = rerank_policy
        self.applied_seq = manifest.corpus_seq
        self._applied_ahead: dict[str, int] = {}  # document -> sequence of the state `apply_documents` applied
        self._catch_up_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._rerank_lock = threading.Lock()

    @property
    def release_id(self) -> str:
        return self.manifest.release_id

    @classmethod
    def load(
        cls,
        releases: ReleaseStore,
        release_id: str,
        *,
        batch_size: int = 64,
        rerank_policy: RerankPolicy = RerankPolicy(),
        device: str = "cpu",
    ) -> LiveRelease:
        """Load and verify a release; raises IntegrityError if it does not match its manifest."""
        manifest = releases.manifest(release_id)
        folder = releases.path(release_id)
        verify_files(folder, manifest)
        models = ModelStore(releases.data_dir)
        encoder = models.load(manifest.model, device=device)
        if manifest.precision == "int8":
            missing = [name for name in int8_model_files(manifest.runtime) if name not in manifest.files]
            if missing:
                raise IntegrityError(f"release {release_id} is int8 but its manifest lists no {', '.join(missing)}; rebuild it")
        attach_runtime(encoder, folder, manifest.precision, manifest.runtime)
        reranker = models.load_reranker(manifest.reranker, device=device) if manifest.reranker else None
        if reranker is not None:
            attach_reranker_runtime(reranker, manifest.precision, manifest.runtime)
        index = VectorIndex.load(folder)
        index.set_search_params(**manifest.search_params)
        if device == "cuda":
            index.to_gpu()
        if len(index) != manifest.doc_count:
            raise IntegrityError(
                f"release {release_id}: index holds {len(index)} vectors but the manifest says {manifest.doc_count}"
            )
        return cls(manifest, encoder, index, batch_size, reranker, rerank_policy)

    def catch_up(self, corpus: CorpusStore) -> int:
        """Apply corpus writes made after this release's sequence; returns how many were applied.

        The changes are applied in sequence order, `batch_size` at a time, each run under
        the catch-up lock and the lock let go between runs, so a write applying its own
        documents (`apply_documents`) waits for at most one run, not the whole backlog (a
        large `lockstep ingest`, another replica's writes). The documents are encoded one
        batch per hold of the query-encoding lock (`encode_documents`), so a search waits
        for at most one batch. Each change holds a document's latest state, so applying
        them in runs leaves no document half-updated. Writes committed after the call
        starts may wait for the next one. A corpus behind the release's own sequence (restored
        from an older backup) is refused: its next writes would reuse sequence numbers the
        release counts as applied.
        """
        target, applied = corpus.seq, 0
        if target < self.manifest.corpus_seq:
            raise IntegrityError(
                f"the corpus has seen {target} writes, fewer than the {self.manifest.corpus_seq} release "
                f"{self.release_id} was built from: corpus.sqlite3 was restored from an older backup than releases/, "
                "and writes made after it would be skipped. Restore both from the same backup, or build a new "
                "release from this corpus (`lockstep build --activate`)"
            )
        while self.applied_seq < target:
            with self._catch_up_lock:
                changes = corpus.changes_since(self.applied_seq, limit=self.batch_size)
                if not changes:
                    break
                self._apply([c for c in changes if self._applied_ahead.get(c.doc_id, -1) < c.seq])
                self.applied_seq = changes[-1].seq
                self._applied_ahead = {d: seq for d, seq in self._applied_ahead.items() if seq > self.applied_seq}
            applied += len(changes)
            # A lock is not handed to its waiter on release: without a pause this thread takes it straight back, and
            # under load a waiting write starved until the backlog ended. 1 ms against a batch's encode.
            time.sleep(0.001)
        if applied:
            log.info("release %s caught up %d corpus writes (seq %d)", self.release_id, applied, self.applied_seq)
        return applied

    def apply_documents(self, corpus: CorpusStore, doc_ids: Sequence[str]) -> None:
        """Bring `doc_ids` in the index to their state in the corpus now (deleted ones removed), ahead of any backlog
        of other writes: a write calls this for its own documents, so that a search after it finds them without
        the write waiting for the whole backlog. A corpus row holds a document's latest state, so applying it
        ahead of older changes to other documents is safe; catch-up, reaching it in turn, skips a state applied
        here already, so a write is encoded once."""
        with self._catch_up_lock:
            states = corpus.states(list(dict.fromkeys(doc_ids)))  # a request may write a document twice
            self._apply(states)
            self._applied_ahead.update((c.doc_id, c.seq) for c in states if c.seq > self.applied_seq)

    def _apply(self, changes: Sequence[Change]) -> None:
        """Encode and add the changed documents, remove the deleted ones; the caller holds the catch-up lock."""
        upserts = [c.document for c in changes if c.document is not None]
        texts = [doc.embedding_text() for doc in upserts]
        for start, vectors in zip(range(0, len(upserts), self.batch_size), self.encode_documents(texts)):
            self.index.add([doc.id for doc in upserts[start : start + self.batch_size]], vectors)
        self.index.remove([c.doc_id for c in changes if c.document is None])

    def encode_documents(self, texts: Sequence[str]) -> Iterator[np.ndarray]:
        """Document vectors of this release's model, one batch of `batch_size` texts per hold of the lock queries
        take, so a long run of documents delays a search by at most one batch."""
        for start in range(0, len(texts), self.batch_size):
            with self._encode_lock:
                vectors = self.encoder.encode(texts[start : start + self.batch_size], "document",
                                              batch_size=self.batch_size, show_progress=False)
            yield vectors

    @property
    def batch_dependent(self) -> bool:
        """True when a text's vector depends on the other texts encoded in the same call: dynamic int8 on ONNX
        Runtime quantises activations with one range per batch, so callers must not merge strangers' queries."""
        return self.encoder.runtime == "onnxruntime"

    def embed_queries(self, texts: list[str]) -> Encoded:
        """Query embeddings of this release's model (one encoder call at a time per release)."""
        for position, text in enumerate(texts):
            if not text.strip():
                raise EmptyInput(f"input {position} is empty; send non-blank text")
        with self._encode_lock:
            return self.encoder.encode_with_norms(texts, "query", batch_size=self.batch_size, show_progress=False)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.embed_queries(texts).vectors

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        return self.index.search(vectors, k)

    def check_search(self, query: str, rerank: bool) -> None:
        """Refuse a search this release cannot answer, before any encoding."""
        if not query.strip():
            raise EmptyInput("query is empty; send the text to search for")
        require_utf8(query, "query")
        if rerank and self.reranker is None:
            raise InvalidInput(
                f"release {self.release_id} has no cross-encoder to rerank with; send rerank=false "
                "or build a release with `lockstep build --reranker PATH`"
            )

    def search(
        self,
        corpus: CorpusStore,
        query: str,
        k: int,
        rerank: bool = False,
        rerank_weight: float | None = None,
        where: Filter | None = None,
        lexical_weight: float = 0.0,
        overrides: SearchParams | None = None,
    ) -> SearchOutcome:
        """Encode one query with this release's model, search this release's index, optionally rerank."""
        self.check_search(query, rerank)
        started = time.perf_counter()
        vector = self.encode_queries([query])
        return self.search_encoded(
            corpus, query, vector, k, rerank, encode_ms=(time.perf_counter() - started) * 1e3,
            rerank_weight=rerank_weight, where=where, lexical_weight=lexical_weight, overrides=overrides,
        )

    def search_encoded(
        self,
        corpus: CorpusStore,
        query: str,
        vector: np.ndarray,
        k: int,
        rerank: bool = False,
        encode_ms: float = 0.0,
        rerank_weight: float | None = None,
        where: Filter | None = None,
        lexical_weight: float = 0.0,
        overrides: SearchParams | None = None,
    ) -> SearchOutcome:
        """Search with a query vector this release's model produced (e.g. in a batch with other queries).

        With `where`, only documents whose metadata it matches in the corpus now are
        searched (`indexer.metadata_filter`). A `lexical_weight` above 0 fuses the index's
        candidates with BM25's over the corpus (`indexer.hybrid_search`; 1: BM25 alone).
        Reranking rescores the policy's candidates with the cross-encoder and orders them
        by the fused score (`training.score_fusion`); `rerank_weight` overrides the
        policy's weight. `overrides` sets this search's `ef_search` or `nprobe` instead of
        the release's; the outcome reports the parameters the index was searched at.
        """
        self.check_search(query, rerank)
        check_lexical_weight(lexical_weight)
        weight = self.rerank_policy.weight if rerank_weight is None else rerank_weight
        depth = max(k, self.rerank_policy.candidates) if rerank else k
        clock = [time.perf_counter()]
        names = ["search", "fetch"]
        allowed = None
        if where is not None:
            allowed = corpus.matching_ids(where)
            clock.append(time.perf_counter())
            names.insert(0, "filter")
        if lexical_weight > 0:
            hits = self.hybrid_hits(corpus, query, vector, depth, lexical_weight, where, allowed, overrides)
        else:
            hits = self.index.search(vector, depth, allowed, overrides)[0]
        clock.append(time.perf_counter())
        documents = corpus.get_many([hit.doc_id for hit in hits])
        scored = [SearchHit(hit.score, documents[hit.doc_id]) for hit in hits if hit.doc_id in documents]
        clock.append(time.perf_counter())
        if rerank:
            scored = self._rerank(query, scored, weight)
            clock.append(time.perf_counter())
            names.append("rerank")
        timings = {"encode": encode_ms}
        timings.update({name: (clock[i + 1] - clock[i]) * 1e3 for i, name in enumerate(names)})
        timings["total"] = encode_ms + (clock[-1] - clock[0]) * 1e3
        return SearchOutcome(self.release_id, scored[:k], {key: round(value, 3) for key, value in timings.items()},
                             self.index.search_params(overrides))

    def hybrid_hits(
        self,
        corpus: CorpusStore,
        query: str,
        vector: np.ndarray,
        depth: int,
        lexical_weight: float,
        where: Filter | None = None,
        allowed: AbstractSet[str] | None = None,
        overrides: SearchParams | None = None,
    ) -> list[Hit]:
        """The top `depth` of this release's index and the corpus's BM25 index fused for one query (`vector`, one
        row), each contributing at least `LEXICAL_CANDIDATES`; `where` (and its matching ids, `allowed`) limits
        both; `overrides` sets the index's search parameters."""
        pool = max(depth, LEXICAL_CANDIDATES)
        dense = self.index.search(vector, pool, allowed, overrides)[0] if lexical_weight < 1 else []
        return fuse_runs(dense, corpus.lexical_search(query, pool, where), lexical_weight)[:depth]

    def _rerank(self, query: str, hits: list[SearchHit], weight: float) -> list[SearchHit]:
        """Rescore `hits` with the cross-encoder, one rerank at a time per release; its own lock, not the encoder's,
        so a plain query never waits behind a rerank (50 long documents take seconds on a CPU)."""
        if not hits:
            return hits
        with self._rerank_lock, autocast(self.manifest.precision, self.reranker.device):
            logits = self.reranker.score([(query, hit.document.embedding_text()) for hit in hits], batch_size=self.batch_size)
        scores = fuse(np.array([hit.score for hit in hits]), logits, weight)
        order = sorted(range(len(hits)), key=lambda i: -scores[i])
        return [SearchHit(float(scores[i]), hits[i].document) for i in order]
