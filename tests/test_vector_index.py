"""The FAISS index wrapper: entry checks, recall against brute force, add/remove, save/load."""

import faiss
import numpy as np
import pytest

from indexer import vector_index
from indexer.vector_index import SearchParams, VectorIndex, check_vectors
from training.errors import InvalidInput

DIM = 16


def unit(rows: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]


def recall(index: VectorIndex, base: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    truth = exact_top(base, queries, k)
    found = index.search(queries, k)
    hits = sum(len({f"doc{j}" for j in row} & {h.doc_id for h in res}) for row, res in zip(truth, found))
    return hits / (k * len(queries))


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (unit(3).astype(np.float64), TypeError, "float32"),
        ([[1.0] * DIM], TypeError, "numpy array"),
        (unit(3)[:, :8].copy(), ValueError, "shape"),
        (np.asfortranarray(unit(3)), ValueError, "C-contiguous"),
        (unit(3) * 2, ValueError, "unit L2 norm"),
        (np.full((1, DIM), np.nan, dtype=np.float32), ValueError, "NaN"),
    ],
)
def test_vectors_are_checked_on_entry(bad, error, message):
    """Guards against silently indexing vectors that make inner product differ from cosine."""
    with pytest.raises(error, match=message):
        check_vectors(bad, DIM)


@pytest.mark.parametrize(("factory", "minimum"), [("Flat", 1.0), ("HNSW32", 0.95), ("IVF16,Flat", 0.8)])
def test_recall_against_exact_search(factory, minimum):
    base, queries = unit(2000), unit(50, seed=1)
    index = VectorIndex(DIM, factory)
    index.set_search_params(ef_search=64, nprobe=8)
    index.add([f"doc{i}" for i in range(len(base))], base)
    assert recall(index, base, queries) >= minimum


def test_add_rejects_mismatched_or_duplicate_ids():
    index = VectorIndex(DIM)
    with pytest.raises(ValueError, match="ids for"):
        index.add(["a"], unit(2))
    with pytest.raises(ValueError, match="unique"):
        index.add(["a", "a"], unit(2))


def test_empty_index_returns_no_hits():
    assert VectorIndex(DIM).search(unit(2), 3) == [[], []]


def test_scores_are_inner_products_best_first():
    base = unit(20)
    index = VectorIndex(DIM)
    index.add([f"doc{i}" for i in range(20)], base)
    hits = index.search(base[:1], 5)[0]
    assert hits[0].doc_id == "doc0" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    expected = sorted((base @ base[0]).tolist(), reverse=True)[:5]
    assert [h.score for h in hits] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat"])
def test_replace_and_remove(factory):
    """Guards against stale vectors surviving an update or delete (HNSW cannot remove natively)."""
    base = unit(40)
    index = VectorIndex(DIM, factory)
    index.set_search_params(nprobe=4)
    ids = [f"doc{i}" for i in range(40)]
    index.add(ids, base)
    index.add(["doc0"], base[1:2].copy())
    index.remove(["doc1", "unknown"])
    assert len(index) == 39 and "doc1" not in index
    hits = index.search(base[1:2].copy(), 3)[0]
    assert hits[0].doc_id == "doc0" and "doc1" not in {h.doc_id for h in hits}
    assert len(index.search(base[:1], 39)[0]) == 39


def test_hnsw_skips_hidden_documents_inside_the_search_and_still_fetches_only_k(tmp_path, monkeypatch):
    """Guards against search cost growing with every update between rebuilds: HNSW cannot remove vectors, and
    asking FAISS for k + hidden results made each search after 100,000 updates fetch 100,000 hits."""
    base, queries = unit(600), unit(20, seed=1)
    index = VectorIndex(DIM, "HNSW32")
    index.set_search_params(ef_search=256)
    index.add([f"doc{i}" for i in range(600)], base)
    gone = [f"doc{i}" for i in range(0, 600, 3)]
    index.remove(gone[:100])
    index.add(gone[100:], unit(len(gone) - 100, seed=2))
    live = {f"doc{i}": base[i] for i in range(600) if f"doc{i}" not in gone[:100]}
    live.update(zip(gone[100:], unit(len(gone) - 100, seed=2)))
    names, vectors = list(live), np.stack(list(live.values()))
    fetched, search = [], faiss.IndexIDMap2.search

    def counting(self, x, k, **kwargs):
        fetched.append(k)
        return search(self, x, k, **kwargs)

    monkeypatch.setattr(faiss.IndexIDMap2, "search", counting)
    found = index.search(queries, 10)
    assert fetched == [10] and all(len(row) == 10 for row in found)
    truth = [{names[j] for j in row} for row in exact_top(vectors, queries, 10)]
    assert sum(len(t & {h.doc_id for h in row}) for t, row in zip(truth, found)) / 200 >= 0.95
    assert not any(h.doc_id in gone[:100] for row in found for h in row)
    index.save(tmp_path)
    assert [[h.doc_id for h in row] for row in VectorIndex.load(tmp_path).search(queries, 10)] == \
        [[h.doc_id for h in row] for row in found]

class GpuLikeCopy(faiss.IndexIDMap2):
    """What FAISS's GPU copy of a Flat index does that matters here, for machines without a GPU: it adds and
    searches like the CPU index, refuses `remove_ids`, and refuses more than `GPU_MAX_K` results per query.
    `tests/test_serving_device.py` runs the same scenario on a real GPU where one is present."""

    made = 0

    def __init__(self, master: faiss.Index, factory: str) -> None:
        super().__init__(faiss.IndexFlatIP(master.d))  # faiss keeps the inner index referenced
        if master.ntotal:
            self.add_with_ids(master.index.reconstruct_n(0, master.ntotal), faiss.vector_to_array(master.id_map))
        GpuLikeCopy.made += 1

    def remove_ids(self, ids):
        raise RuntimeError("remove_ids not implemented for this type of index")

    def search(self, x, k, **kwargs):
        if kwargs.get("params") is not None:
            raise RuntimeError("FAISS's GPU indexes take no search parameters with a selector")
        if k > vector_index.GPU_MAX_K:
            raise RuntimeError(f"k = {k} is above the {vector_index.GPU_MAX_K} a GPU index returns")
        return super().search(x, k, **kwargs)


def gpu_writes_keep_answering_like_the_cpu(tmp_path, device_copy) -> None:
    """Replace 2,500 of 3,000 documents on an index served through `device_copy`, checking its answers against a
    CPU index given the same writes; shared with the GPU test."""
    cpu, served, queries = VectorIndex(DIM), VectorIndex(DIM), unit(8, seed=1)
    for index in (cpu, served):
        index.add([f"d{i}" for i in range(3000)], unit(3000))
    served.to_gpu(device_copy)
    assert served._on_gpu, "the index did not move to the device, so nothing here would be tested"
    for start in range(0, 2500, 250):
        ids, vectors = [f"d{i}" for i in range(start, start + 250)], unit(250, seed=start + 2)
        for index in (cpu, served):
            index.add(ids, vectors)
            index.remove([f"d{2990 + start // 250}"])
        for k in (10, 1500):
            assert _ranked(served.search(queries, k)) == _ranked(cpu.search(queries, k)), (start, k)
    served.save(tmp_path)
    assert _ranked(VectorIndex.load(tmp_path).search(queries, 50)) == _ranked(cpu.search(queries, 50))
    assert len(VectorIndex.load(tmp_path)) == len(cpu) == 2990


def _ranked(rows) -> list[list[str]]:
    return [[hit.doc_id for hit in row] for row in rows]


def test_a_gpu_served_index_keeps_answering_after_thousands_of_writes(tmp_path):
    """Guards against searches failing once about 2,000 documents changed on a GPU-served release: GPU indexes
    cannot remove vectors, so each write hid one more label and a search asked for k plus all of them, past
    FAISS's GPU limit of 2048 results."""
    GpuLikeCopy.made = 0
    gpu_writes_keep_answering_like_the_cpu(tmp_path, GpuLikeCopy)
    assert GpuLikeCopy.made == 3, "the copy is made again from the CPU master after each 1024 hidden labels"


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_save_and_load_round_trip(tmp_path, factory):
    base = unit(30)
    index = VectorIndex(DIM, factory)
    index.add([f"doc{i}" for i in range(30)], base)
    index.remove(["doc3"])
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path)
    assert loaded.factory == factory and len(loaded) == 29 and "doc3" not in loaded
    assert [h.doc_id for h in loaded.search(base[:5], 4)[2]] == [h.doc_id for h in index.search(base[:5], 4)[2]]


def test_invalid_factory_and_untrainable_ivf():
    with pytest.raises(InvalidInput, match="factory string"):
        VectorIndex(DIM, "NotAnIndex")
    with pytest.raises(InvalidInput, match="at least 64 vectors"):
        VectorIndex(DIM, "IVF64,Flat").add(["a", "b"], unit(2))
    with pytest.raises(InvalidInput, match="at least 64 vectors"):
        VectorIndex(DIM, "IVF64,Flat").train(unit(2))
    for factory in ("PQ4", "IVF4,PQ4"):
        index = VectorIndex(DIM, factory)
        with pytest.raises(InvalidInput, match=r"could not be trained on 100 vectors \(Number of training points "
                                               r"\(100\) should be at least .* codebook needs at least 256"):
            index.add([str(i) for i in range(100)], unit(100))
        assert index.needs_training and len(index) == 0


@pytest.mark.parametrize(
    ("factory", "message"),
    [("IVF2000000000,Flat", "2000000000 IVF lists"), ("IVF64_HNSW100000,Flat", "100000 HNSW links"),
     ("HNSW4096", "4096 HNSW links"), ("IMI2x12,PQ8", "12 IMI bits")],
)
def test_factory_sizes_that_would_allocate_gigabytes_are_refused_before_faiss(factory, message):
    """Guards against an index type whose construction alone allocates more than the machine has (an IVF list
    costs tens of bytes before any vector is added)."""
    with pytest.raises(InvalidInput, match=f"asks for {message}"):
        VectorIndex(DIM, factory)
    assert VectorIndex(DIM, "IVF4096_HNSW32,Flat").factory == "IVF4096_HNSW32,Flat"


@pytest.mark.parametrize(("factory", "exact"), [("Flat", True), ("HNSW32", False), ("IVF4,Flat", False),
                                                 ("SQ8", False), ("PQ4x4", False), ("HNSW16,SQ8", False)])
def test_only_flat_is_exact(factory, exact):
    """Guards against skipping the recall check of lossy PQ/SQ indexes, which have neither HNSW nor IVF."""
    assert VectorIndex(DIM, factory).exact is exact


def test_training_on_all_vectors_then_adding_in_chunks():
    """Guards against IVF training on the first chunk added: more lists than that chunk holds must still work."""
    base, queries = unit(2000), unit(50, seed=1)
    index = VectorIndex(DIM, "IVF128,Flat")
    assert index.needs_training
    index.train(base)
    assert not index.needs_training
    for start in range(0, len(base), 100):
        index.add([f"doc{i}" for i in range(start, start + 100)], base[start : start + 100])
    index.set_search_params(nprobe=128)
    assert len(index) == 2000 and recall(index, base, queries) == pytest.approx(1.0)


def test_training_draws_a_seeded_sample_from_all_the_vectors(monkeypatch):
    """Guards against training on a prefix of the vectors, or on a different sample on every build."""
    monkeypatch.setattr(vector_index, "TRAIN_POINTS_PER_CENTROID", 1)
    monkeypatch.setattr(vector_index, "CODEBOOK_SIZE", 100)
    seen = []
    monkeypatch.setattr(faiss.IndexIDMap2, "train", lambda self, x: seen.append(x.copy()))
    base = unit(1000)
    for _ in range(2):
        VectorIndex(DIM, "SQ8").train(base)
    assert len(seen[0]) == 100 and np.array_equal(seen[0], seen[1])
    rows = [int(np.flatnonzero((base == row).all(axis=1))[0]) for row in seen[0]]
    assert rows == sorted(rows) and rows[-1] > 500, "the sample spans the whole array"


@pytest.mark.parametrize(
    ("factory", "exact_max", "minimum"),
    [("Flat", None, 1.0), ("HNSW32", None, 1.0), ("HNSW32,SQ8", None, 0.9), ("HNSW32", 0, 0.9), ("IVF16,Flat", None, 0.9)],
    ids=["flat", "hnsw-scored-exactly", "hnsw-sq8-scored-from-decoded-vectors", "hnsw-selector", "ivf-selector"],
)
def test_a_filtered_search_returns_only_allowed_documents_ranked_as_exact_search_ranks_them(factory, exact_max, minimum, monkeypatch):
    """Guards against filtered searches leaking documents outside the filter or removed ones, and against graph or
    list searches that come back short or miss the best allowed documents when the filter leaves out 90%."""
    if exact_max is not None:
        monkeypatch.setattr(vector_index, "EXACT_FILTER_MAX", exact_max)
    base, queries = unit(2000), unit(20, seed=1)
    index = VectorIndex(DIM, factory)
    index.add([f"doc{i}" for i in range(2000)], base)
    removed = [f"doc{i}" for i in range(0, 2000, 20)]
    index.remove(removed)
    allowed = {f"doc{i}" for i in range(0, 2000, 10)} | {"never-added"}
    live = sorted(int(d[3:]) for d in allowed - set(removed) - {"never-added"})
    found = index.search(queries, 10, allowed)
    assert all(len(row) == 10 and {h.doc_id for h in row} <= allowed - set(removed) for row in found)
    truth = [[f"doc{live[j]}" for j in row] for row in exact_top(base[live], queries, 10)]
    share = sum(len(set(t) & {h.doc_id for h in row}) for t, row in zip(truth, found)) / 200
    assert share >= minimum, share
    if minimum == 1.0:
        assert _ranked(found) == truth
        assert all(h.score == pytest.approx(float(q @ base[int(h.doc_id[3:])]), abs=1e-5) for q, row in zip(queries, found) for h in row)


def test_a_filtered_search_with_few_or_no_allowed_documents():
    index = VectorIndex(DIM, "HNSW32")
    index.add([f"doc{i}" for i in range(50)], unit(50))
    queries = unit(2, seed=1)
    assert index.search(queries, 10, set()) == [[], []]
    assert index.search(queries, 10, {"unknown"}) == [[], []]
    assert [len(row) for row in index.search(queries, 10, {"doc3", "doc7", "doc9"})] == [3, 3]


def test_a_gpu_served_index_answers_filtered_searches_from_its_master():
    """Guards against filtered searches sent to a GPU copy, whose FAISS indexes take no selectors."""
    cpu, served, queries = VectorIndex(DIM), VectorIndex(DIM), unit(4, seed=1)
    for index in (cpu, served):
        index.add([f"d{i}" for i in range(500)], unit(500))
        index.remove(["d10"])
    served.to_gpu(GpuLikeCopy)
    allowed = {f"d{i}" for i in range(0, 500, 5)}
    assert _ranked(served.search(queries, 20, allowed)) == _ranked(cpu.search(queries, 20, allowed))
    assert "d10" not in {h.doc_id for row in served.search(queries, 100, allowed) for h in row}


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_a_broad_filter_filters_an_unfiltered_search_and_falls_back_when_it_comes_up_short(factory):
    """Guards against a broad filter returning fewer than k results, or other than the exact best allowed ones,
    when the documents nearest the query are the ones it leaves out."""
    base, query = unit(2000), unit(1, seed=1)
    index = VectorIndex(DIM, factory)
    index.set_search_params(ef_search=256)
    index.add([f"doc{i}" for i in range(2000)], base)
    nearest = exact_top(base, query, 60)[0]
    for excluded in (nearest[10:20], nearest):  # the unfiltered top 20 still holds 10 allowed ones; then none
        allowed = frozenset(f"doc{i}" for i in range(2000) if i not in set(excluded))
        rows = [i for i in range(2000) if i not in set(excluded)]
        truth = [f"doc{rows[j]}" for j in exact_top(base[rows], query, 10)[0]]
        assert _ranked(index.search(query, 10, allowed)) == [truth]


def test_a_repeated_filter_sees_documents_added_since_its_last_search():
    """Guards against the labels kept for a repeated filter going stale when the index changes under it."""
    index = VectorIndex(DIM)
    index.add([f"doc{i}" for i in range(100)], unit(100))
    query = unit(1, seed=1)
    allowed = frozenset({"doc1", "doc2", "late"})
    assert {h.doc_id for h in index.search(query, 5, allowed)[0]} == {"doc1", "doc2"}
    index.add(["late"], query)
    assert index.search(query, 5, allowed)[0][0].doc_id == "late"
    index.remove(["doc1"])
    assert {h.doc_id for h in index.search(query, 5, allowed)[0]} == {"late", "doc2"}


@pytest.mark.parametrize(("factory", "name", "values"), [("HNSW32", "ef_search", (1, 8, 256)), ("IVF64,Flat", "nprobe", (1, 4, 64))])
def test_a_search_with_its_own_parameters_answers_as_the_index_set_to_them_does(factory, name, values, monkeypatch):
    """Guards against per-search parameters being ignored, leaking into the index's own setting (other requests'
    searches), or answering otherwise than the index set to the same value: unfiltered, after removals, and
    filtered through a selector (whose breadth is widened from the request's value, not the index's)."""
    monkeypatch.setattr(vector_index, "EXACT_FILTER_MAX", 0)
    base, queries = unit(3000, dim=64), unit(20, seed=1, dim=64)  # 64-d, where a narrow search misses neighbours
    ids = [f"d{i}" for i in range(3000)]
    index = VectorIndex(64, factory)
    index.add(ids, base)
    own = index.search_params()
    allowed = frozenset(ids[::3])
    truths = (exact_top(base, queries, 10), exact_top(base[::3], queries, 10) * 3)
    for removed in (0, 30):
        index.remove(ids[:removed])
        recalls = []
        for value in values:
            overrides = SearchParams(**{name: value})
            answers = (index.search(queries, 10, overrides=overrides), index.search(queries, 10, allowed, overrides))
            assert index.search_params() == own and index.search_params(overrides) == {name: value}
            index.set_search_params(**{name: value})
            assert _ranked(answers[0]) == _ranked(index.search(queries, 10))
            assert _ranked(answers[1]) == _ranked(index.search(queries, 10, allowed))
            index.set_search_params(**own)
            recalls.append([np.mean([len({f"d{j}" for j in t if j >= removed} & {h.doc_id for h in row}) /
                                     len([j for j in t if j >= removed]) for t, row in zip(truth, found)])
                            for truth, found in zip(truths, answers)])
        assert all(low < high == pytest.approx(1.0) for low, high in zip(recalls[0], recalls[-1])), recalls
    if name == "nprobe":
        assert index.search_params(SearchParams(nprobe=1000)) == {"nprobe": 64}, "capped at the index's lists"


def test_search_parameters_out_of_range_are_refused():
    with pytest.raises(InvalidInput, match="ef_search must be between 1 and 4096, got 0"):
        SearchParams(ef_search=0)
    with pytest.raises(InvalidInput, match="nprobe must be between 1 and 65536, got 70000"):
        SearchParams(nprobe=70_000)
