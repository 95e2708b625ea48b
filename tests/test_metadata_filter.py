"""Metadata filters: refused with the bad part named, and matched by SQLite exactly as a plain Python reading of the
documented semantics matches them, on random documents and random filters."""

from __future__ import annotations

import operator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer.corpus_store import CorpusStore, Document
from indexer import field_index
from indexer.metadata_filter import MAX_CONDITIONS, parse_filter, to_sql
from training.errors import InvalidInput, NotFound

FIELDS = ["a", "b", "n.x"]
scalars = st.one_of(st.booleans(), st.integers(-3, 3), st.sampled_from([1.5, 2.0, -0.5]), st.sampled_from(["", "x", "y", "1", "é"]))
values = st.one_of(st.none(), scalars, st.lists(scalars, max_size=3), st.lists(st.lists(scalars, max_size=2), max_size=2))
metadata = st.fixed_dictionaries(
    {}, optional={"a": values, "b": values, "n": st.one_of(values, st.fixed_dictionaries({}, optional={"x": values}))}
)
ordered = st.one_of(st.integers(-3, 3), st.sampled_from([1.5, -0.5]), st.sampled_from(["", "x", "y", "1"]))


def _condition() -> st.SearchStrategy[dict]:
    field = st.sampled_from([*FIELDS, "n"])
    operand = st.one_of(
        scalars,
        st.fixed_dictionaries({"$eq": scalars}), st.fixed_dictionaries({"$ne": scalars}),
        st.dictionaries(st.sampled_from(["$gt", "$gte", "$lt", "$lte"]), ordered, min_size=1, max_size=2),
        st.fixed_dictionaries({"$in": st.lists(scalars, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"$nin": st.lists(scalars, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"$exists": st.booleans()}),
    )
    return st.dictionaries(field, operand, min_size=1, max_size=2)


filters = st.recursive(
    _condition(),
    lambda inner: st.one_of(
        st.fixed_dictionaries({"$and": st.lists(inner, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"$or": st.lists(inner, min_size=1, max_size=3)}),
    ),
    max_leaves=5,
)

MISSING = object()
ORDER = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}


def _lookup(meta: dict, field: str) -> object:
    value: object = meta
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def _kind(value: object) -> str | None:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "text" if isinstance(value, str) else None


def _elements(value: object) -> list:
    if value is MISSING or value is None or isinstance(value, dict):
        return []
    return list(value) if isinstance(value, list) else [value]


def _any(value: object, test, operand) -> bool:
    return any(_kind(e) == _kind(operand) and test(e, operand) for e in _elements(value))


def _oracle(meta: dict, raw: dict) -> bool:
    """The documented semantics, read literally."""
    results = []
    for key, operand in raw.items():
        if key == "$and":
            results.append(all(_oracle(meta, part) for part in operand))
        elif key == "$or":
            results.append(any(_oracle(meta, part) for part in operand))
        else:
            value = _lookup(meta, key)
            for op, arg in (operand.items() if isinstance(operand, dict) else [("$eq", operand)]):
                if op in ("$eq", "$ne"):
                    results.append(_any(value, operator.eq, arg) == (op == "$eq"))
                elif op in ORDER:
                    results.append(_any(value, ORDER[op], arg))
                elif op in ("$in", "$nin"):
                    results.append(any(_any(value, operator.eq, item) for item in arg) == (op == "$in"))
                else:
                    results.append((value is not MISSING and value is not None) == arg)
    return all(results)


@pytest.fixture(scope="module", params=["unindexed", "indexed"])
def store(tmp_path_factory, request):
    """A corpus store whose fields are read from the metadata, or from indexes on every field the tests filter by
    (both must give the answers the documented semantics say)."""
    store = CorpusStore(tmp_path_factory.mktemp("filter") / "corpus.sqlite3")
    if request.param == "indexed":
        for field in (*FIELDS, "n", "lang", "year", "tags", "author.name", "source"):
            store.index_field(field)
    yield store
    store.close()


@settings(max_examples=150, deadline=None)
@given(docs=st.lists(metadata, min_size=1, max_size=12), raw=filters)
def test_sqlite_matches_what_the_documented_semantics_say(store, docs, raw):
    """Guards against SQLite's cross-type comparisons (a string greater than every number, true equal to 1), arrays
    not matched by their elements, $ne / $nin missing documents without the field, objects read as arrays, and
    $and / $or combining wrongly."""
    for doc_id in {c.doc_id for c in store.changes_since(0) if c.document is not None}:
        store.delete(doc_id)
    store.upsert([Document(id=f"d{i}", title="", text=f"t{i}", metadata=meta) for i, meta in enumerate(docs)])
    expected = {f"d{i}" for i, meta in enumerate(docs) if _oracle(meta, raw)}
    assert store.matching_ids(parse_filter(raw)) == expected


def test_the_examples_in_the_docs_select_what_they_say(store):
    for doc_id in {c.doc_id for c in store.changes_since(0) if c.document is not None}:
        store.delete(doc_id)
    store.upsert([
        Document(id="old", title="", text="a", metadata={"lang": "en", "year": 2012, "tags": ["bio"]}),
        Document(id="new", title="", text="b", metadata={"lang": "de", "year": 2018, "tags": ["med", "bio"],
                                                          "author": {"name": "Ada"}}),
        Document(id="text-year", title="", text="c", metadata={"lang": "en", "year": "2019", "source": None}),
    ])
    assert store.matching_ids(parse_filter({"lang": "en"})) == {"old", "text-year"}
    assert store.matching_ids(parse_filter({"year": {"$gte": 2015, "$lt": 2020}})) == {"new"}
    assert store.matching_ids(parse_filter({"tags": {"$in": ["med"]}})) == {"new"}
    assert store.matching_ids(parse_filter({"tags": "bio", "lang": {"$ne": "de"}})) == {"old"}
    assert store.matching_ids(parse_filter({"author.name": "Ada"})) == {"new"}
    assert store.matching_ids(parse_filter({"source": {"$exists": False}})) == {"old", "new", "text-year"}
    assert store.matching_ids(parse_filter({"$or": [{"lang": "de"}, {"year": {"$lt": 2013}}]})) == {"old", "new"}
    store.delete("new")
    assert store.matching_ids(parse_filter({"lang": "de"})) == set(), "deleted documents never match"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({}, "filter must be a non-empty JSON object"),
        ([{"a": 1}], "filter must be a non-empty JSON object"),
        ({"a": None}, "filter.a must be a string, a finite number or a boolean, got None; match a missing field with $exists"),
        ({"a": [1, 2]}, "filter.a must be a string, a finite number or a boolean, got [1, 2]"),
        ({"a": float("nan")}, "filter.a must be a string, a finite number or a boolean"),
        ({"a": {"$lt": 2**64}}, "filter.a.$lt is an integer beyond 64 bits"),
        ({"a": {}}, "filter.a must hold at least one operator"),
        ({"a": {"$regex": "x"}}, "filter.a.$regex: unknown operator; use one of $eq"),
        ({"a": {"$gt": True}}, "filter.a.$gt orders numbers or strings; a boolean has no order"),
        ({"a": {"$in": []}}, "filter.a.$in must be a list of 1 to 1024 values"),
        ({"a": {"$in": "x"}}, "filter.a.$in must be a list of 1 to 1024 values"),
        ({"a": {"$nin": [1, {"b": 2}]}}, "filter.a.$nin[1] must be a string"),
        ({"a": {"$exists": 1}}, "filter.a.$exists must be true or false, got 1"),
        ({"$not": {"a": 1}}, "filter.$not: unknown operator at the top of a filter"),
        ({"$or": []}, "filter.$or must be a non-empty list of non-empty filter objects"),
        ({"$and": [{"a": 1}, {}]}, "filter.$and must be a non-empty list"),
        ({"$or": [{"a": {"$gt": []}}]}, "filter.$or[0].a.$gt must be a string"),
        ({"a..b": 1}, "field 'a..b' must be a dotted path of names"),
        ({'a"]': 1}, "must be a dotted path of names made of letters, digits, _ or -"),
        ({"$and": [{"$and": [{"$and": [{"$and": [{"$and": [{"$and": [{"$and": [{"$and": [{"$and": [{"a": 1}]}]}]}]}]}]}]}]}]},
         "nests $and / $or deeper than 8 levels"),
        ({f"f{i}": 1 for i in range(MAX_CONDITIONS + 1)}, f"filter has {MAX_CONDITIONS + 1} conditions; at most {MAX_CONDITIONS}"),
    ],
)
def test_bad_filters_are_refused_naming_the_part_to_fix(raw, fragment):
    with pytest.raises(InvalidInput) as raised:
        parse_filter(raw)
    assert fragment in str(raised.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["a", "$in", "$or", "$gt", "b.c", ""]) | st.text(max_size=3), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(raw=json_values)
def test_any_json_is_either_refused_with_invalid_input_or_runs(store, raw):
    """Guards against filters that pass parsing and then fail inside SQLite (an integer past 64 bits, say): a 500
    where a 422 belongs."""
    try:
        parsed = parse_filter(raw)
    except InvalidInput:
        return
    assert isinstance(store.matching_ids(parsed), frozenset)


def test_answers_are_reused_until_any_process_writes_and_never_confuse_true_with_1(tmp_path):
    """Guards against a cached answer outliving a write made through another store (another process), and against
    filters that compare equal in Python but not in JSON sharing a cache entry."""
    path = tmp_path / "corpus.sqlite3"
    reader, writer = CorpusStore(path), CorpusStore(path)
    try:
        writer.upsert([Document(id="t", title="", text="a", metadata={"flag": True}),
                       Document(id="one", title="", text="b", metadata={"flag": 1})])
        flag_true, flag_one = parse_filter({"flag": True}), parse_filter({"flag": 1})
        first = reader.matching_ids(flag_true)
        assert first == {"t"} and reader.matching_ids(flag_true) is first, "read once while nothing changes"
        assert reader.matching_ids(flag_one) == {"one"}
        writer.upsert([Document(id="t2", title="", text="c", metadata={"flag": True})])
        assert reader.matching_ids(flag_true) == {"t", "t2"}
        writer.delete("t")
        assert reader.matching_ids(flag_true) == {"t2"}
    finally:
        reader.close()
        writer.close()


def test_an_index_on_a_field_is_filled_from_the_corpus_kept_by_writes_and_read_by_filters(tmp_path):
    """Guards against an index that misses documents written before it, keeps values a write replaced or a delete
    removed, or is not what a filter reads (the query plan is checked, so a filter that still parsed every
    document's metadata would fail here)."""
    store = CorpusStore(tmp_path / "corpus.sqlite3")
    try:
        store.upsert([Document(id=f"d{i}", title="", text="x", metadata={"tenant": f"t{i % 3}", "tags": [i, "x"],
                                                                           "nested": {"v": i}})
                      for i in range(9)])
        assert store.index_field("tenant") == 9 and store.index_field("tags") == 18
        assert store.index_field("tenant") == 9, "indexing twice changes nothing"
        assert store.index_field("nested") == 0, "an object-valued field has no values to index"
        assert store.indexed_fields() == {"nested": 0, "tags": 18, "tenant": 9}
        tenant = parse_filter({"tenant": "t1"})
        assert store.matching_ids(tenant) == {"d1", "d4", "d7"}
        assert store.matching_ids(parse_filter({"tags": {"$gte": 7}})) == {"d7", "d8"}
        store.upsert([Document(id="d1", title="", text="x", metadata={"tenant": "t2"}),
                      Document(id="d9", title="", text="x", metadata={"tenant": "t1", "tags": "x"})])
        store.delete("d4")
        assert store.matching_ids(tenant) == {"d7", "d9"}
        assert store.matching_ids(parse_filter({"tags": {"$in": ["x"]}})) == {f"d{i}" for i in (0, 2, 3, 5, 6, 7, 8, 9)}
        assert store.lexical_search("x", 10, tenant) and {h for h, _ in store.lexical_search("x", 10, tenant)} == {"d7", "d9"}
        assert [d.id for d in store.page(10, where=tenant)] == ["d7", "d9"]
        with store._reading() as db:
            sql, params = to_sql(tenant, field_index.fields(db))
            plan = " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN SELECT id FROM documents WHERE {sql}", params))
        assert "field_values" in plan and "SCAN documents" not in plan, plan
        store.drop_field_index("tenant")
        assert store.matching_ids(tenant) == {"d7", "d9"} and "tenant" not in store.indexed_fields()
        with pytest.raises(NotFound, match="metadata field 'tenant' is not indexed"):
            store.drop_field_index("tenant")
        with pytest.raises(InvalidInput, match="field 'a..b' must be a dotted path"):
            store.index_field("a..b")
    finally:
        store.close()
