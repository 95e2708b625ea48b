"""The holder's swap: a write made while a new release is being switched in is never missing from it."""

from __future__ import annotations

import threading
import time

import numpy as np

from indexer.corpus_store import CorpusStore, Document
from indexer.release_builder import BuildOptions, build_release
from service.release_holder import ReleaseHolder
from tests.conftest import SAMPLE_DOCS

LATE = Document(id="late", title="", text="a write that lands while the next release is switched in")


class WriteDuringCatchUp(CorpusStore):
    """A corpus that runs `hook` once, the next time a release reads how far its changes go, after reading it: a
    write landing just after a catch-up has looked, which no sleep could place reliably."""

    hook = None

    @property
    def seq(self) -> int:
        seq = super().seq
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return seq


class SwitchRecordingHolder(ReleaseHolder):
    """Records, at the moment each release is switched in, whether it already holds the late write."""

    def __init__(self, *args, **kwargs) -> None:
        self.held_at_switch: dict[str, bool] = {}
        super().__init__(*args, **kwargs)

    @property
    def current(self):
        return self._current

    @current.setter
    def current(self, live) -> None:
        if live is not None:
            self.held_at_switch[live.release_id] = LATE.id in live.index
        self._current = live


def test_a_write_between_catch_up_and_switch_is_in_the_release_switched_in(data_dir, releases, tiny_model_dir):
    """Guards against a write that applied itself to the outgoing release after the incoming one had caught up:
    the incoming release was switched in without it, and a search right after the write could miss it."""
    corpus = WriteDuringCatchUp(data_dir / "corpus.sqlite3")
    corpus.upsert(SAMPLE_DOCS)
    first = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
    holder = SwitchRecordingHolder(releases, corpus)
    assert holder.refresh() and holder.current.release_id == first.release_id
    second = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
    written = []
    corpus.hook = lambda: written.append(holder.write([LATE]))

    assert holder.refresh()
    (result, applied_to), = written
    assert result.inserted == 1 and applied_to == first.release_id, "the write should land on the outgoing release"
    assert holder.held_at_switch[second.release_id], "the incoming release was switched in without the write"
    assert holder.current.release_id == second.release_id and LATE.id in holder.current.index
    corpus.close()


def test_a_write_waits_for_one_run_of_a_catch_up_backlog_not_all_of_it(data_dir, corpus, releases, tiny_model_dir):
    """Guards against an API write waiting for a whole catch-up backlog (a large `lockstep ingest` picked up by the
    poll) before it answered, holding its request for minutes."""
    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
    holder = ReleaseHolder(releases, corpus, batch_size=4)
    holder.refresh()
    live = holder.current
    corpus.upsert([Document(id=f"n{i}", title="note", text=f"apple {i} banana {i % 3}") for i in range(40)])
    encode, runs = live.encoder.encode, []

    def slow(texts, kind="query", **kwargs):
        runs.append(len(texts))
        time.sleep(0.1)
        return encode(texts, kind, **kwargs)

    live.encoder.encode = slow
    backlog = threading.Thread(target=live.catch_up, args=(corpus,))
    backlog.start()
    while not runs:
        time.sleep(0.01)
    result, applied_to = holder.write([LATE])
    assert backlog.is_alive(), "the write waited for the whole backlog"
    assert applied_to == live.release_id and result.changed == (LATE.id,)
    assert live.search(corpus, LATE.text, 1).hits[0].document.id == LATE.id
    backlog.join()
    assert len(runs) < 14, f"the write made the backlog run {len(runs)} encodes"
    assert all(f"n{i}" in live.index for i in range(40))
    encoded = len(runs)
    assert live.catch_up(corpus) == 1 and live.applied_seq == corpus.seq, "the write's own change is caught up in turn"
    assert len(runs) == encoded, "catch-up encoded again the state the write had already applied"
    assert np.allclose(live.index.reconstruct(LATE.id), encode([LATE.embedding_text()], "document")[0], atol=1e-5)
    unchanged, _ = holder.write([LATE])
    assert unchanged.changed == () and live.catch_up(corpus) == 0
    holder.delete("n0")
    assert "n0" not in live.index and live.catch_up(corpus) == 1 and "n0" not in live.index
    twice = Document(id="twice", title="", text="first words"), Document(id="twice", title="", text="second words")
    assert holder.write(list(twice))[0].changed == ("twice", "twice")
    assert np.allclose(live.index.reconstruct("twice"), encode([twice[1].embedding_text()], "document")[0], atol=1e-5)


def test_a_served_release_that_cannot_catch_up_says_why_at_each_poll(data_dir, corpus, releases, tiny_model_dir, tmp_path):
    """Guards against the poll raising on the served release's catch-up (a corpus restored behind it): a traceback
    every poll and nothing in `last_error` to tell the operator."""
    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
    holder = ReleaseHolder(releases, corpus)
    holder.refresh()
    holder.corpus = CorpusStore(tmp_path / "older.sqlite3")
    assert holder.refresh() is False
    assert "cannot apply corpus writes: the corpus has seen 0 writes, fewer than the 5" in holder.last_error
    assert holder.require() is holder.current
    holder.corpus.close()


def test_a_stored_write_whose_encode_fails_is_not_a_failure_and_catch_up_applies_it(data_dir, corpus, releases,
                                                                                   tiny_model_dir):
    """Guards against answering a committed write with a 500 because applying it to the live index failed (the
    encoder out of memory): the client would retry a write that was stored."""
    corpus.upsert(SAMPLE_DOCS)
    build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir), activate=True)
    holder = ReleaseHolder(releases, corpus)
    holder.refresh()
    live, encode = holder.current, holder.current.encoder.encode
    live.encoder.encode = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    result, applied_to = holder.write([LATE])
    assert result.inserted == 1 and applied_to is None and corpus.get(LATE.id).text == LATE.text
    live.encoder.encode = encode
    holder.refresh()
    assert LATE.id in live.index
