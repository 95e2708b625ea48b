"""The holder's swap: a write made while a new release is being switched in is never missing from it."""

from __future__ import annotations

from indexer.corpus_store import CorpusStore, Document
from indexer.release_builder import BuildOptions, build_release
from service.release_holder import ReleaseHolder
from tests.conftest import SAMPLE_DOCS

LATE = Document(id="late", title="", text="a write that lands while the next release is switched in")


class WriteDuringCatchUp(CorpusStore):
    """A corpus that runs `hook` once, the next time a release reads its changes, after reading them: a write
    landing just after a catch-up has looked, which no sleep could place reliably."""

    hook = None

    def changes_since(self, seq: int):
        changes = super().changes_since(seq)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return changes


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
