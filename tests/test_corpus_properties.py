"""The corpus store against a dict model: random upserts, deletes, rejected batches and re-opens.

A hypothesis state machine applies each step to a real SQLite store and to the model, then
checks contents, counts, the change sequence and `changes_since` after every step. Ids come
from a small pool, so re-inserts, no-op rewrites, duplicates within a batch and writes to
deleted ids are frequent; text and metadata include NUL, non-ASCII and nested JSON.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from indexer.corpus_store import Change, CorpusStore, Document, WriteResult
from training.errors import NotFound

IDS = ["a", "b", "c", "é", "日本", "a\x00", " "]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=6,
)
texts = st.one_of(st.sampled_from(["", "same", "x\x00y"]), st.text(max_size=8))
documents = st.builds(
    Document,
    id=st.sampled_from(IDS),
    title=texts,
    text=texts,
    metadata=st.one_of(st.just({}), st.dictionaries(st.text(max_size=3), json_values, max_size=3)),
)
invalid_documents = st.sampled_from(
    [
        Document(id="a", text="lone surrogate \ud800"),
        Document(id="\udfff", text="an id UTF-8 cannot encode"),
        Document(id="b", metadata={"tags": {"a", "b"}}),
        Document(id="c", metadata={"raw": b"bytes"}),
        Document(id="new", metadata={1: "int key", "b": "str key"}),
    ]
)


def _content(document: Document) -> str:
    """Title, text and metadata as canonical JSON: equal exactly when the content is the same JSON value."""
    return json.dumps([document.title, document.text, document.metadata], sort_keys=True, ensure_ascii=False)


class CorpusStoreMachine(RuleBasedStateMachine):
    """Drives a `CorpusStore` and a model: live documents, each id's last sequence, the current sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="corpus-machine-"))
        self.path = self.folder / "corpus.sqlite3"
        self.store = CorpusStore(self.path)
        self.live: dict[str, Document] = {}
        self.last_seq: dict[str, int] = {}
        self.seq = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _apply(self, batch: list[Document]) -> WriteResult:
        """What the model says an upsert of `batch` does, applied to the model."""
        inserted = updated = unchanged = 0
        changed = []
        for document in batch:
            current = self.live.get(document.id)
            if current is not None and _content(current) == _content(document):
                unchanged += 1
                continue
            inserted, updated = (inserted + 1, updated) if current is None else (inserted, updated + 1)
            changed.append(document.id)
            self.seq += 1
            self.live[document.id], self.last_seq[document.id] = document, self.seq
        return WriteResult(inserted=inserted, updated=updated, unchanged=unchanged, seq=self.seq,
                           changed=tuple(changed))

    @rule(batch=st.lists(documents, max_size=6))
    def upsert(self, batch):
        assert self.store.upsert(batch) == self._apply(batch)

    @rule(batch=st.lists(documents, max_size=4))
    def upsert_through_another_connection(self, batch):
        other = CorpusStore(self.path)
        try:
            assert other.upsert(batch) == self._apply(batch)
        finally:
            other.close()

    @rule(batch=st.lists(documents, max_size=4), bad=invalid_documents, data=st.data())
    def rejected_batch(self, batch, bad, data):
        position = data.draw(st.integers(0, len(batch)))
        with pytest.raises((TypeError, ValueError)):
            self.store.upsert([*batch[:position], bad, *batch[position:]])

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def delete(self, data):
        doc_id = data.draw(st.sampled_from(sorted(self.live)))
        self.seq += 1
        assert self.store.delete(doc_id) == self.seq
        del self.live[doc_id]
        self.last_seq[doc_id] = self.seq

    @rule(doc_id=st.sampled_from(IDS))
    def delete_missing_changes_nothing(self, doc_id):
        if doc_id in self.live:
            return
        with pytest.raises(NotFound):
            self.store.delete(doc_id)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = CorpusStore(self.path)

    @rule(after=st.integers(-1, 40))
    def changes_since(self, after):
        assert self.store.changes_since(after) == self._expected_changes(after)

    def _expected_changes(self, after: int) -> list[Change]:
        written = sorted((seq, doc_id) for doc_id, seq in self.last_seq.items() if seq > after)
        return [Change(seq=seq, doc_id=doc_id, document=self.live.get(doc_id)) for seq, doc_id in written]

    @invariant()
    def contents_match_the_model(self):
        seq, snapshot = self.store.snapshot()
        assert seq == self.store.seq == self.seq
        assert self.store.count() == len(self.live)
        assert snapshot == [self.live[doc_id] for doc_id in sorted(self.live)]
        assert [_content(d) for d in snapshot] == [_content(self.live[d.id]) for d in snapshot], "JSON types changed"
        assert self.store.get_many(IDS) == {doc_id: self.live[doc_id] for doc_id in IDS if doc_id in self.live}
        for doc_id in IDS:
            if doc_id in self.live:
                assert self.store.get(doc_id) == self.live[doc_id]
            else:
                with pytest.raises(NotFound):
                    self.store.get(doc_id)

    @invariant()
    def change_log_matches_the_model(self):
        assert self.store.changes_since(0) == self._expected_changes(0)
        assert self.store.changes_since(self.seq) == []


CorpusStoreMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=15, deadline=None)
test_corpus_store_matches_a_dict_model = CorpusStoreMachine.TestCase
