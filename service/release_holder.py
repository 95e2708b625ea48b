"""Holds the release being served and swaps it when the active pointer moves.

A new release is loaded completely (model, index, catch-up) before the reference
is switched in one assignment; a request that already took the old reference
finishes on it, so no query mixes two releases. A release that fails to load or
catch up, for whatever reason (a checksum mismatch, a corrupt model file, an
unreadable manifest), is reported in `last_error` and the current one keeps
serving, or none, which /readyz reports as 503 with the reason. It is tried again
(re-read and re-hashed) only every `RETRY_REFUSED_S` seconds or when the pointer
moves, not at every poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from indexer.corpus_store import CorpusStore, Document, WriteResult
from indexer.live_release import LiveRelease
from indexer.release_store import ReleaseStore
from training.errors import LockstepError, NotReady
from training.score_fusion import RerankPolicy

log = logging.getLogger(__name__)

RETRY_REFUSED_S = 30.0


class ReleaseHolder:
    """The live release of one process, kept in step with the data dir's active pointer."""

    def __init__(
        self, releases: ReleaseStore, corpus: CorpusStore, batch_size: int = 64,
        rerank_policy: RerankPolicy = RerankPolicy(), device: str = "cpu",
    ) -> None:
        self.releases = releases
        self.corpus = corpus
        self.batch_size = batch_size
        self.rerank_policy = rerank_policy
        self.device = device
        self.current: LiveRelease | None = None
        self.last_error: str | None = None
        self._refused: tuple[str, float] | None = None
        self._refresh_lock = threading.Lock()
        self._swap_lock = threading.Lock()

    def require(self) -> LiveRelease:
        """The live release, or NotReady explaining how to get one."""
        live = self.current
        if live is None:
            reason = self.last_error or "no release is active; build one with `lockstep build --activate`"
            raise NotReady(reason)
        return live

    def refresh(self) -> bool:
        """Load the active release if it is not the one served, and catch up corpus writes. True if swapped."""
        with self._refresh_lock:
            active = self.releases.active()
            live = self.current
            swapped = False
            if active is not None and not self._recently_refused(active) and (live is None or live.release_id != active):
                try:
                    candidate = LiveRelease.load(
                        self.releases, active, batch_size=self.batch_size, rerank_policy=self.rerank_policy,
                        device=self.device,
                    )
                    candidate.catch_up(self.corpus)
                    self._swap_in(candidate)
                except LockstepError as exc:
                    self._refuse(active, str(exc))
                    return False
                except Exception as exc:  # a corrupt model file or manifest: refuse it like a checksum mismatch
                    self._refuse(active, f"{type(exc).__name__}: {exc}", with_traceback=True)
                    return False
                self.last_error = self._refused = None
                swapped = True
                log.info("now serving release %s", active)
            if self.current is not None:
                if self.current.release_id == active:
                    self.last_error = self._refused = None
                try:
                    self.current.catch_up(self.corpus)
                except LockstepError as exc:  # a corpus restored behind the release, say: say so at every poll
                    self.last_error = f"release {self.current.release_id} cannot apply corpus writes: {exc}"
                    log.error("%s", self.last_error)
            return swapped

    def _swap_in(self, candidate: LiveRelease) -> None:
        """Serve `candidate` from now on, with every write committed before the switch applied to it.

        A write applies itself to whichever release it reads as current, under the same
        lock: one that read the old release committed before this catch-up ran, so the
        candidate holds it when it is switched in, and a search that follows the write
        finds it whichever release answers.
        """
        with self._swap_lock:
            candidate.catch_up(self.corpus)
            self.current = candidate

    def _refuse(self, release_id: str, cause: str, with_traceback: bool = False) -> None:
        """Record why `release_id` is not served, for /readyz and the admin routes, and hold off retrying it."""
        self.last_error = f"release {release_id} could not be loaded: {cause}"
        self._refused = (release_id, time.monotonic())
        live = self.current
        report = log.exception if with_traceback else log.error
        report("%s; still serving %s", self.last_error, live.release_id if live else "nothing")

    def _recently_refused(self, release_id: str) -> bool:
        refused = self._refused
        return refused is not None and refused[0] == release_id and time.monotonic() - refused[1] < RETRY_REFUSED_S

    def write(self, documents: list[Document]) -> tuple[WriteResult, str | None]:
        """Upsert documents into the corpus, then into the live index with the live model."""
        result = self.corpus.upsert(documents)
        return result, self._apply_to_live(result.changed)

    def delete(self, doc_id: str) -> tuple[int, str | None]:
        """Delete a document from the corpus and from the live index."""
        seq = self.corpus.delete(doc_id)
        return seq, self._apply_to_live([doc_id])

    def _apply_to_live(self, doc_ids: Sequence[str]) -> str | None:
        """Apply the written documents to the live release ahead of any catch-up backlog (`apply_documents`); the
        release, or None when none is live or applying failed. The write is committed by then, so a failure here
        (the encoder out of memory, say) is logged and left to the next poll's catch-up, not answered as a 500
        for a write that was stored."""
        with self._swap_lock:
            live = self.current
        if live is None:
            return None
        try:
            live.apply_documents(self.corpus, doc_ids)
        except Exception:
            log.exception("applying %d written documents to release %s failed; they are stored, and catch-up "
                          "retries them at the next poll", len(doc_ids), live.release_id)
            return None
        return live.release_id
