"""The BM25 index in the corpus store, and hybrid fusion: kept exact through writes, deletes and re-opens, safe
against query syntax, indexed once for a corpus written before it existed."""

from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer import lexical_index
from indexer.corpus_store import CorpusStore, Document
from indexer.hybrid_search import fuse_runs
from indexer.metadata_filter import parse_filter
from indexer.vector_index import Hit
from training.errors import InvalidInput

WORDS = ["fox", "dog", "cat", "bird", "fish", "tree", "stone", "river", "cloud", "moon"]  # words Porter leaves alone
IDS = [f"d{i}" for i in range(8)]


@pytest.fixture
def store(tmp_path):
    store = CorpusStore(tmp_path / "corpus.sqlite3")
    yield store
    store.close()


writes = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(IDS), st.lists(st.sampled_from(WORDS), max_size=4),
                  st.lists(st.sampled_from(WORDS), max_size=4)),
        st.tuples(st.just("delete"), st.sampled_from(IDS)),
    ),
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(steps=writes, query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3))
def test_a_search_finds_exactly_the_live_documents_holding_a_query_word(tmp_path_factory, steps, query):
    """Guards against words of replaced or deleted documents staying searchable, and new ones missing."""
    store = CorpusStore(tmp_path_factory.mktemp("lexical") / "corpus.sqlite3")
    model: dict[str, set[str]] = {}
    try:
        for step in steps:
            if step[0] == "put":
                _, doc_id, title, text = step
                store.upsert([Document(id=doc_id, title=" ".join(title), text=" ".join(text))])
                model[doc_id] = set(title) | set(text)
            elif step[1] in model:
                store.delete(step[1])
                del model[step[1]]
        found = store.lexical_search(" ".join(query), limit=100)
        assert {doc_id for doc_id, _ in found} == {doc_id for doc_id, words in model.items() if words & set(query)}
        assert [score for _, score in found] == sorted((score for _, score in found), reverse=True)
    finally:
        store.close()


def test_words_are_stemmed_ranked_by_bm25_and_filtered_by_metadata(store):
    store.upsert([
        Document(id="a", title="Vitamin D", text="vitamin D deficiency and the risk of infections", metadata={"y": 1}),
        Document(id="b", title="Infection", text="a study of one infection in cells", metadata={"y": 2}),
        Document(id="c", title="Foxes", text="the quick brown fox", metadata={"y": 1}),
    ] + [Document(id=f"filler{i}", title="", text=f"unrelated words number {i}") for i in range(20)])
    found = store.lexical_search("vitamins and infection", limit=10)
    assert [doc_id for doc_id, _ in found] == ["a", "b"], "stemmed: vitamins matches vitamin, infections infection"
    assert found[0][1] > found[1][1] > 0
    assert [doc_id for doc_id, _ in store.lexical_search("vitamins infection", 10, parse_filter({"y": 2}))] == ["b"]


@pytest.mark.parametrize("query", ['fox NEAR(cat)', '"fox', "fox*", "-fox", "fox AND OR", "title:fox", "fox^2", "(((", "'; DROP TABLE documents; --"])
def test_query_syntax_in_user_text_is_never_interpreted(store, query):
    store.upsert([Document(id="c", title="Foxes", text="the quick brown fox")])
    assert [doc_id for doc_id, _ in store.lexical_search(query, 10)] == (["c"] if "fox" in query else [])


def test_a_query_without_words_finds_nothing(store):
    store.upsert([Document(id="c", title="", text="fox")])
    assert store.lexical_search("  ?! -- ", 10) == []


def test_a_corpus_written_before_the_index_existed_is_indexed_once_on_open(tmp_path):
    path = tmp_path / "corpus.sqlite3"
    store = CorpusStore(path)
    store.upsert([Document(id="a", title="", text="fox"), Document(id="b", title="", text="dog")])
    store.delete("b")
    store.close()
    db = sqlite3.connect(path)
    db.executescript(f"DROP TABLE documents_fts; DROP TABLE lexical_ids; DELETE FROM counters WHERE name = '{lexical_index.BUILT}';")
    db.close()
    reopened = CorpusStore(path)
    try:
        assert reopened.lexical_search("fox dog", 10)[0][0] == "a" and len(reopened.lexical_search("fox dog", 10)) == 1
        reopened.upsert([Document(id="b", title="", text="dog")])
        assert {doc_id for doc_id, _ in reopened.lexical_search("fox dog", 10)} == {"a", "b"}
    finally:
        reopened.close()


def test_fusion_standardises_each_list_and_places_missing_documents_below_its_lowest():
    dense = [Hit("a", 0.9), Hit("b", 0.7), Hit("c", 0.5)]
    lexical = [("c", 12.0), ("d", 6.0), ("b", 3.0)]
    # z(dense): a 1.2247, b 0, c -1.2247, missing -2.2247; z(lexical): c 1.3363, d -0.2673, b -1.0690, missing -2.0690
    fused = fuse_runs(dense, lexical, 0.5)
    assert [hit.doc_id for hit in fused] == ["c", "a", "b", "d"]
    assert [hit.score for hit in fused] == pytest.approx([0.0558, -0.4222, -0.5345, -1.2460], abs=1e-4)
    lone = {hit.doc_id: hit.score for hit in fuse_runs(dense, [("c", 5.0)], 0.5)}
    assert lone == pytest.approx({"a": 0.1124, "b": -0.5, "c": -0.6124}, abs=1e-4), \
        "a single lexical match (z 0) still scores one standard deviation above the documents BM25 did not find"
    assert [hit.doc_id for hit in fuse_runs(dense, lexical, 1.0)] == ["c", "d", "b"]
    assert [hit.doc_id for hit in fuse_runs(dense, [], 0.3)] == ["a", "b", "c"]
    with pytest.raises(InvalidInput, match="lexical weight must be between 0"):
        fuse_runs(dense, lexical, 1.5)
