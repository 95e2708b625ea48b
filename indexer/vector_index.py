"""A FAISS inner-product index over unit vectors, addressed by document id.

The index kind is a FAISS factory string: `Flat` (exact, the default), `HNSW32`,
`IVF256,Flat`, `IVF256,PQ16`... Vectors are checked where they enter (float32,
C-contiguous, right dimension, finite, unit norm within 1e-3) with errors that say
how to fix them. Each document gets an int64 label; re-adding a document replaces it.
Index kinds that cannot remove vectors (HNSW) hide removed labels from results
instead, with a FAISS selector that skips them inside the graph search, so a search
still asks for k results however many are hidden; the next release build compacts
them away. An index served from a GPU (`to_gpu`) keeps its CPU index as the master:
writes go to both, removals happen on the master and are hidden on the GPU copy
(FAISS's GPU indexes cannot remove), a search asks the GPU for k plus the hidden
count, and once `GPU_RECOPY_HIDDEN` labels are hidden the GPU copy is made again
from the master, so the fetch never nears FAISS's GPU limit of `GPU_MAX_K` results
(a search that would pass it reads the master). Kinds that learn from the data
(IVF lists, PQ and SQ codebooks) are trained once, on a seeded sample of the vectors
given to `train`: a release build passes all of its vectors, so the centroids see the
whole corpus; an `add` to an untrained index trains on that add's vectors. Only Flat is
exact; every other kind gets its recall measured when a release is built. A search
can be limited to a set of documents, a metadata filter's matches (`_search_allowed`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from training.errors import InvalidInput

NORM_TOLERANCE = 1e-3
TRAIN_POINTS_PER_CENTROID = 256
CODEBOOK_SIZE = 256
TRAIN_SEED = 13
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.json"
GPU_MAX_K = 2048  # the most results FAISS's GPU indexes return per query
GPU_RECOPY_HIDDEN = 1024  # labels hidden on a GPU copy before it is copied again from its CPU master
EXACT_FILTER_MAX = 8192  # allowed documents up to which a filtered HNSW search scores them exactly (a few ms at 384-d)
FILTER_WIDEN_MAX = 16  # the most a filter widens ef_search or nprobe
POSTFILTER_SHARE = 0.5  # a filter leaving in this share of the index or more filters an unfiltered search's results
LABEL_CACHE_SIZE = 16  # allowed-document sets whose labels a filtered search keeps until the index changes
# Sizes a factory string sets that allocate with the index, refused above these before FAISS allocates anything.
# FAISS suggests 4*sqrt(N) to 16*sqrt(N) IVF lists for N vectors (2^20 serves billions), and HNSW links per vector
# of 16 to 64 (each vector stores twice that many at its bottom level).
FACTORY_LIMITS = (
    (re.compile(r"IVF(\d+)"), 1 << 20, "IVF lists", "use about 4-16 times the square root of the corpus size"),
    (re.compile(r"IMI2x(\d+)"), 10, "IMI bits per half", "use IVF with fewer lists"),
    (re.compile(r"HNSW(\d+)"), 512, "HNSW links per vector", "use 16 to 64"),
)


DeviceCopy = Callable[[faiss.Index, str], faiss.Index]  # (CPU index, factory) -> its copy on a device, or itself


MAX_EF_SEARCH = 4096
MAX_NPROBE = 65536


@dataclass(frozen=True)
class SearchParams:
    """One search's breadth, overriding the release's: HNSW's `ef_search`, IVF's `nprobe` (capped at its list count).
    None keeps the release's; a parameter the index kind lacks is ignored, so one request works across kinds, as
    Qdrant's per-search `hnsw_ef` does."""

    ef_search: int | None = None
    nprobe: int | None = None

    def __post_init__(self) -> None:
        for name, value, most in (("ef_search", self.ef_search, MAX_EF_SEARCH), ("nprobe", self.nprobe, MAX_NPROBE)):
            if value is not None and not 1 <= value <= most:
                raise InvalidInput(f"{name} must be between 1 and {most}, got {value}")


@dataclass(frozen=True)
class Hit:
    """One search result: a document id and its inner-product (cosine) score."""

    doc_id: str
    score: float


def check_vectors(vectors: object, dim: int, what: str = "vectors") -> np.ndarray:
    """Return `vectors` if they are usable for inner-product search, else raise with the fix."""
    if not isinstance(vectors, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(vectors).__name__}; use np.asarray(x, dtype=np.float32)")
    if vectors.dtype != np.float32:
        raise TypeError(f"{what} must be float32, got {vectors.dtype}; convert with x.astype(np.float32)")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"{what} must have shape (n, {dim}), got {vectors.shape}; encode with this index's model")
    if not vectors.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous; pass np.ascontiguousarray(x)")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{what} contain NaN or infinite values; check the encoder output")
    norms = np.linalg.norm(vectors, axis=1)
    worst = float(np.abs(norms - 1.0).max()) if len(norms) else 0.0
    if worst > NORM_TOLERANCE:
        raise ValueError(
            f"{what} must have unit L2 norm (within {NORM_TOLERANCE}) for inner-product search; "
            f"worst deviation is {worst:.4g}; normalise with x / np.linalg.norm(x, axis=1, keepdims=True)"
        )
    return vectors


def _check_sizes(factory: str) -> None:
    """InvalidInput when `factory` asks for more lists or links than `FACTORY_LIMITS` allow."""
    for pattern, limit, what, advice in FACTORY_LIMITS:
        for match in pattern.finditer(factory):
            if int(match.group(1)) > limit:
                raise InvalidInput(f"index type {factory!r} asks for {match.group(1)} {what}, more than the {limit} "
                                   f"Lockstep builds; {advice}")


def _build_faiss(dim: int, factory: str) -> faiss.Index:
    _check_sizes(factory)
    try:
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InvalidInput(
            f"index type {factory!r} is not a valid FAISS factory string (try 'Flat', 'HNSW32' or 'IVF256,Flat')"
        ) from exc
    try:
        faiss.extract_index_ivf(base)
    except RuntimeError:
        return faiss.IndexIDMap2(base)
    return base


class VectorIndex:
    """FAISS index plus the map between FAISS labels and document ids."""

    def __init__(self, dim: int, factory: str = "Flat", ef_construction: int | None = None) -> None:
        """`ef_construction` is how widely HNSW searches while linking each new vector (FAISS default 40):
        higher builds slower and gives a graph with better recall at the same `ef_search`."""
        self.dim = dim
        self.factory = factory
        self._index = _build_faiss(dim, factory)
        self._doc_of: list[str | None] = []
        self._label_of: dict[str, int] = {}
        self._hidden: set[int] = set()
        self._skip_hidden: tuple | None = None
        self._lock = threading.Lock()
        self._master = self._index
        self._device_copy: DeviceCopy | None = None
        self._version = 0
        self._allowed_labels: OrderedDict[frozenset[str], tuple[int, np.ndarray]] = OrderedDict()
        if ef_construction is not None and (hnsw := self._hnsw()) is not None:
            hnsw.hnsw.efConstruction = ef_construction

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._label_of

    def doc_ids(self) -> list[str]:
        return list(self._label_of)

    def _ivf(self) -> faiss.IndexIVF | None:
        try:
            return faiss.extract_index_ivf(self._master)
        except RuntimeError:
            return None

    def _inner(self) -> faiss.Index:
        """The master's index under its id map (IVF kinds have none)."""
        return faiss.downcast_index(self._master.index) if isinstance(self._master, faiss.IndexIDMap2) else self._master

    def _hnsw(self) -> faiss.IndexHNSW | None:
        inner = self._inner()
        return inner if isinstance(inner, faiss.IndexHNSW) else None

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Tune the recall/speed trade-off of HNSW (`ef_search`) or IVF (`nprobe`) indexes."""
        with self._lock:
            if ef_search is not None and (hnsw := self._hnsw()) is not None:
                hnsw.hnsw.efSearch = ef_search
            if nprobe is not None and (ivf := self._ivf()) is not None:
                ivf.nprobe = nprobe
                self._recopy()

    def search_params(self, overrides: SearchParams | None = None) -> dict[str, int]:
        """The search parameters that apply to this index kind and the values a search runs at: `overrides` where
        given, else the index's own."""
        params = {}
        if (hnsw := self._hnsw()) is not None:
            params["ef_search"] = int((overrides and overrides.ef_search) or hnsw.hnsw.efSearch)
        if (ivf := self._ivf()) is not None:
            params["nprobe"] = int(min(ivf.nlist, (overrides and overrides.nprobe) or ivf.nprobe))
        return params

    def _overridden(self, overrides: SearchParams | None) -> faiss.SearchParameters | None:
        """FAISS parameters for a search at `overrides`, or None where they change nothing for this index kind
        (so a search without overrides runs exactly as before, without even looking at the index kind)."""
        if overrides is None or (overrides.ef_search is None and overrides.nprobe is None):
            return None
        applied = self.search_params(overrides)
        if applied == self.search_params():
            return None
        if "ef_search" in applied:
            return faiss.SearchParametersHNSW(efSearch=applied["ef_search"])
        return faiss.SearchParametersIVF(nprobe=applied["nprobe"])

    @property
    def exact(self) -> bool:
        """True for brute-force (Flat) indexes, whose results need no recall check; lossy PQ/SQ codes are not exact."""
        return isinstance(self._inner(), faiss.IndexFlat)

    @property
    def needs_training(self) -> bool:
        """True while the index (IVF, PQ, SQ) has yet to learn its centroids or codebooks; see `train`."""
        return not self._master.is_trained

    def train(self, vectors: np.ndarray) -> None:
        """Train the index on a seeded sample of `vectors`; pass all the vectors to be indexed, so the sample
        represents them all. The sample holds up to `TRAIN_POINTS_PER_CENTROID` points per IVF list or
        codebook entry (FAISS's own cap); an index that is already trained is left as it is."""
        check_vectors(vectors, self.dim)
        with self._lock:
            self._train_locked(vectors)

    def _train_locked(self, vectors: np.ndarray) -> None:
        if self._master.is_trained:
            return
        ivf = self._ivf()
        needed = ivf.nlist if ivf is not None else 1
        if len(vectors) < needed:
            raise InvalidInput(
                f"index type {self.factory!r} needs at least {needed} vectors to train, got {len(vectors)}; "
                "use fewer IVF lists or the 'Flat' index for a small corpus"
            )
        size = TRAIN_POINTS_PER_CENTROID * max(needed, CODEBOOK_SIZE)
        if len(vectors) > size:
            rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(len(vectors), size=size, replace=False))
            vectors = np.ascontiguousarray(vectors[rows])
        try:
            self._master.train(vectors)
        except RuntimeError as exc:  # PQ codebooks need 2^bits points each, and FAISS says so only as an assertion
            reason = str(exc).strip().rsplit("failed: ", 1)[-1]
            raise InvalidInput(
                f"index type {self.factory!r} could not be trained on {len(vectors)} vectors ({reason}); a PQ "
                f"codebook needs at least {CODEBOOK_SIZE} of them: use the 'Flat' or 'HNSW32' index for a small corpus"
            ) from exc
        self._recopy()

    @property
    def _on_gpu(self) -> bool:
        return self._index is not self._master

    def _recopy(self) -> None:
        """Make the GPU copy again from the master (after training, new search parameters, or enough hidden labels);
        nothing on the CPU."""
        if self._on_gpu:
            self._index, self._hidden = self._device_copy(self._master, self.factory), set()

    def _drop(self, doc_ids: Sequence[str]) -> None:
        labels = [self._label_of.pop(doc_id) for doc_id in doc_ids if doc_id in self._label_of]
        if not labels:
            return
        self._version += 1
        for label in labels:
            self._doc_of[label] = None
        ids = np.asarray(labels, dtype=np.int64)
        if self._on_gpu:
            self._master.remove_ids(ids)
            self._hidden.update(labels)
            if len(self._hidden) >= GPU_RECOPY_HIDDEN:
                self._recopy()
            return
        try:
            self._index.remove_ids(ids)
        except RuntimeError:
            self._hidden.update(labels)
            self._skip_hidden = None

    def _hidden_skipped(self, ef_search: int) -> faiss.SearchParametersHNSW:
        """HNSW search parameters at `ef_search` whose selector skips the hidden labels (built once per change of
        them; the selectors are kept referenced, as FAISS holds them by pointer)."""
        if self._skip_hidden is None:
            batch = faiss.IDSelectorBatch(np.fromiter(self._hidden, dtype=np.int64, count=len(self._hidden)))
            self._skip_hidden = (batch, faiss.IDSelectorNot(batch))
        return faiss.SearchParametersHNSW(sel=self._skip_hidden[1], efSearch=ef_search)

    def add(self, doc_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add or replace documents' vectors; an untrained index is first trained on these (see `train`)."""
        check_vectors(vectors, self.dim)
        if len(doc_ids) != len(vectors):
            raise ValueError(f"got {len(doc_ids)} ids for {len(vectors)} vectors")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("document ids in one add must be unique")
        if not doc_ids:
            return
        with self._lock:
            self._train_locked(vectors)
            self._drop(doc_ids)
            first = len(self._doc_of)
            labels = np.arange(first, first + len(doc_ids), dtype=np.int64)
            self._index.add_with_ids(vectors, labels)
            if self._on_gpu:
                self._master.add_with_ids(vectors, labels)
            self._doc_of.extend(doc_ids)
            self._label_of.update(zip(doc_ids, labels.tolist()))
            self._version += 1

    def remove(self, doc_ids: Sequence[str]) -> None:
        """Remove documents' vectors; unknown ids are ignored."""
        with self._lock:
            self._drop(doc_ids)

    def search(
        self, queries: np.ndarray, k: int, allowed: AbstractSet[str] | None = None, overrides: SearchParams | None = None
    ) -> list[list[Hit]]:
        """Top-k documents per query by inner product, best first; only documents in `allowed` if it is given (see
        `_search_allowed`); at `overrides` of the index's search parameters if given. A search with overrides on a
        GPU copy runs on its CPU master, where FAISS takes per-search parameters for every kind."""
        check_vectors(queries, self.dim, "query vectors")
        if k < 1:
            raise ValueError("k must be at least 1")
        if allowed is not None:
            return self._search_allowed(queries, k, allowed, overrides)
        with self._lock:
            total = self._index.ntotal
            if total == 0:
                return [[] for _ in range(len(queries))]
            params = self._overridden(overrides)
            hnsw = self._hnsw() if self._hidden and not self._on_gpu else None
            if hnsw is not None:
                ef_search = self.search_params(overrides)["ef_search"]
                scores, labels = self._index.search(queries, min(k, total), params=self._hidden_skipped(ef_search))
            elif self._on_gpu and (k + len(self._hidden) > GPU_MAX_K or params is not None):
                scores, labels = self._master.search(queries, max(1, min(k, self._master.ntotal)), params=params)
            else:
                scores, labels = self._index.search(queries, min(k + len(self._hidden), total), params=params)
            rows = [
                [(self._doc_of[label], float(score)) for score, label in zip(row_scores, row_labels)
                 if label >= 0 and self._doc_of[label] is not None]
                for row_scores, row_labels in zip(scores, labels)
            ]
        return [[Hit(doc_id, score) for doc_id, score in row[:k]] for row in rows]

    def _search_allowed(
        self, queries: np.ndarray, k: int, allowed: AbstractSet[str], overrides: SearchParams | None = None
    ) -> list[list[Hit]]:
        """Top-k among the `allowed` documents.

        A filter that leaves in at least `POSTFILTER_SHARE` of the index is applied to an
        unfiltered search for enough more results that k allowed ones are among them
        (exact wherever the index is), falling back to a search that only visits
        allowed documents when some query gets fewer. That search runs on the CPU
        master (FAISS's GPU indexes take no selectors): Flat searches with a selector of
        the allowed labels and stays exact. HNSW scores up to `EXACT_FILTER_MAX` allowed
        documents exactly (`_exact_among`): a graph search that may only return
        a few nodes walks past most of its candidates and comes back short. Past that,
        and for IVF (which cannot return stored vectors), the selector search widens
        `ef_search` or `nprobe` (the index's, or `overrides`) by the share of the index the filter leaves out, up to
        `FILTER_WIDEN_MAX` times, so about as many allowed candidates are looked at as an
        unfiltered search looks at in all.
        """
        size = len(self)
        if size and len(allowed) >= POSTFILTER_SHARE * size:
            fetch = min(size, max(k, -(-2 * k * size // len(allowed))))
            rows = self.search(queries, fetch, overrides=overrides)
            kept = [[hit for hit in row if hit.doc_id in allowed][:k] for row in rows]
            if all(len(row) == k or len(full) < fetch for row, full in zip(kept, rows)):
                return kept
        with self._lock:
            labels = self._labels_of(allowed)
            if len(labels) == 0:
                return [[] for _ in range(len(queries))]
            hnsw, ivf = self._hnsw(), self._ivf()
            if hnsw is not None and len(labels) <= EXACT_FILTER_MAX:
                found = self._exact_among(queries, k, labels)
            else:
                widen = min(FILTER_WIDEN_MAX, -(-self._master.ntotal // len(labels)))
                selector = faiss.IDSelectorBatch(labels)
                breadth = self.search_params(overrides)
                if hnsw is not None:
                    params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(k, breadth["ef_search"]) * widen)
                elif ivf is not None:
                    params = faiss.SearchParametersIVF(sel=selector, nprobe=min(ivf.nlist, breadth["nprobe"] * widen))
                else:
                    params = faiss.SearchParameters(sel=selector)
                scores, found_labels = self._master.search(queries, min(k, len(labels)), params=params)
                found = found_labels, scores
            return [
                [Hit(self._doc_of[label], float(score)) for label, score in zip(row_labels, row_scores)
                 if label >= 0 and self._doc_of[label] is not None]
                for row_labels, row_scores in zip(*found)
            ]

    def _exact_among(self, queries: np.ndarray, k: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k (labels, scores) among sorted `labels` of an HNSW index: a scan of its flat storage with a
        selector of their positions where it has one (an HNSW index removes nothing, it hides, so its id map holds
        every label it was given, in the ascending order they were assigned), else their reconstructed vectors scored
        one by one. The scan needs neither a copy of the vectors nor a multi-threaded matrix product, whose thread
        start-up took 7 ms a query on two busy cores against 1 ms for the scan."""
        storage = faiss.downcast_index(self._inner().storage)
        id_map = faiss.vector_to_array(self._master.id_map)
        positions = np.searchsorted(id_map, labels)
        if isinstance(storage, faiss.IndexFlat) and np.array_equal(id_map[np.minimum(positions, len(id_map) - 1)], labels):
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(positions))
            scores, found = storage.search(queries, min(k, len(labels)), params=params)
            return np.where(found >= 0, id_map[found], -1), scores
        scores = np.einsum("qd,nd->qn", queries, self._master.reconstruct_batch(labels))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return labels[order], np.take_along_axis(scores, order, axis=1)

    def _labels_of(self, allowed: AbstractSet[str]) -> np.ndarray:
        """The sorted labels of the `allowed` documents in the index (call under the lock). Those of the last
        `LABEL_CACHE_SIZE` frozensets are kept until the index changes: the corpus store hands out the same
        frozenset for a repeated filter, and looking up 100,000 ids takes about 60 ms."""
        cacheable = isinstance(allowed, frozenset)
        cached = self._allowed_labels.get(allowed) if cacheable else None
        if cached is not None and cached[0] == self._version:
            return cached[1]
        labels = np.fromiter((self._label_of[d] for d in allowed if d in self._label_of), dtype=np.int64)
        labels.sort()
        if cacheable:
            self._allowed_labels[allowed] = (self._version, labels)
            self._allowed_labels.move_to_end(allowed)
            while len(self._allowed_labels) > LABEL_CACHE_SIZE:
                self._allowed_labels.popitem(last=False)
        return labels

    def to_gpu(self, device_copy: DeviceCopy | None = None) -> None:
        """Search (and apply catch-up writes) on the GPU where FAISS can, keeping the CPU index as the master (see
        the module doc); `device_copy` makes the GPU copy of an index (default `serving_device.index_to_gpu`,
        which returns the index itself where it cannot)."""
        from indexer.serving_device import index_to_gpu

        with self._lock:
            self._device_copy = device_copy or index_to_gpu
            self._index = self._device_copy(self._master, self.factory)

    def reconstruct(self, doc_id: str) -> np.ndarray:
        """The stored vector of one document (Flat and HNSW indexes)."""
        with self._lock:
            return self._master.reconstruct(self._label_of[doc_id])

    def stored_vectors(self, doc_ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The stored vectors of those of `doc_ids` still in the index, read under the index lock so that no write
        runs beside them: (ids found, vectors in that order). FAISS raises RuntimeError for index types that cannot
        return a stored vector (IVF-PQ, say)."""
        with self._lock:
            found = [doc_id for doc_id in doc_ids if doc_id in self._label_of]
            vectors = [self._master.reconstruct(self._label_of[doc_id]) for doc_id in found]
        return found, np.asarray(vectors, dtype=np.float32).reshape(len(found), self.dim)

    def save(self, folder: Path) -> list[Path]:
        """Write the index and id map into `folder`; returns the files written."""
        folder = Path(folder)
        with self._lock:
            faiss.write_index(self._master, str(folder / INDEX_FILE))
            hidden = [] if self._on_gpu else sorted(self._hidden)  # the master holds no hidden labels
            ids = {"dim": self.dim, "factory": self.factory, "doc_ids": self._doc_of, "hidden": hidden}
        (folder / IDS_FILE).write_text(json.dumps(ids))
        return [folder / INDEX_FILE, folder / IDS_FILE]

    @classmethod
    def load(cls, folder: Path) -> VectorIndex:
        folder = Path(folder)
        ids = json.loads((folder / IDS_FILE).read_text())
        index = cls.__new__(cls)
        index.dim, index.factory = ids["dim"], ids["factory"]
        index._index = faiss.read_index(str(folder / INDEX_FILE))
        index._doc_of = ids["doc_ids"]
        index._label_of = {doc_id: label for label, doc_id in enumerate(index._doc_of) if doc_id is not None}
        index._hidden = set(ids["hidden"])
        index._skip_hidden = None
        index._lock = threading.Lock()
        index._master = index._index
        index._device_copy = None
        index._version = 0
        index._allowed_labels = OrderedDict()
        if index._index.d != index.dim:
            raise ValueError(f"{folder}: index dimension {index._index.d} does not match id map dimension {index.dim}")
        return index
