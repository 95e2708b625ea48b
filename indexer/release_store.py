"""Versioned releases on disk and the pointer that says which one is live.

A release is an immutable folder `releases/<id>/` (index, id map, manifest) that
points at a content-addressed model folder `models/<hash>/`. Releases are staged in a
hidden folder, fsynced, then renamed into place, so a crash never leaves a partial
release listed. The active release is named by `releases/ACTIVE.json`, replaced
atomically; it also keeps the history of earlier active releases for rollback.
Pointer updates, deletes and gc hold an advisory file lock, so processes sharing a data
dir agree; a release is activated only after its files are checked against its manifest.
gc collects staging leftovers and unused model folders only once they have not been
touched for `STALE_SECONDS`: a running build touches its staging and model folders
(`touch`) as it goes, since its model is stored long before its release is published.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from indexer.durable_files import fsync_dir, fsync_tree, sha256_file, write_atomic
from indexer.manifest import MANIFEST_FILE, Manifest
from training.errors import Conflict, IntegrityError, InvalidInput, NotFound

log = logging.getLogger(__name__)

POINTER_FILE = "ACTIVE.json"
STAGING_PREFIX = ".staging-"
STALE_SECONDS = 24 * 3600
_RELEASE_ID = re.compile(r"^r-\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_release_id() -> str:
    """A sortable, unique release id such as `r-20261128T150102Z-3fa9c1`."""
    return time.strftime("r-%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(3)


def touch(folder: Path) -> None:
    """Mark a folder as in use now (its mtime): gc collects leftovers untouched for `STALE_SECONDS`."""
    os.utime(folder)


def _untouched_since(path: Path, moment: float) -> bool:
    try:
        return path.stat().st_mtime < moment
    except FileNotFoundError:
        return False


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Refuse (IntegrityError) a release folder whose files are missing or differ from the sha256 in its manifest."""
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"release {manifest.release_id} is missing {name}; build the release again")
        if sha256_file(path) != expected:
            raise IntegrityError(
                f"release {manifest.release_id}: {name} does not match its manifest checksum; "
                "the release was modified after it was built; build the release again or activate another"
            )


class ActiveChanged(Conflict):
    """A conditional activation found another release live than the one it was decided against (HTTP 409)."""


@dataclass(frozen=True)
class ReleaseListing:
    """The published releases whose manifest reads, oldest first, and those whose manifest does not (id -> why)."""

    manifests: list[Manifest]
    unreadable: dict[str, str]


@dataclass
class Pointer:
    """The active release and the releases that were active before it, oldest first."""

    active: str | None = None
    history: list[str] = field(default_factory=list)


class ReleaseStore:
    """Lists, publishes, activates, rolls back and garbage-collects releases."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.releases_dir = self.data_dir / "releases"
        self.models_dir = self.data_dir / "models"
        self.releases_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)

    def path(self, release_id: str) -> Path:
        """The folder of a release id; refuses anything that is not a release id."""
        if not isinstance(release_id, str) or not _RELEASE_ID.match(release_id):
            raise InvalidInput(f"{release_id!r} is not a release id (expected e.g. r-20260101T000000Z-0a1b2c)")
        return self.releases_dir / release_id

    def exists(self, release_id: str) -> bool:
        return (self.path(release_id) / MANIFEST_FILE).is_file()

    def manifest(self, release_id: str) -> Manifest:
        folder = self.path(release_id)
        if not (folder / MANIFEST_FILE).is_file():
            raise NotFound(f"release {release_id} does not exist; `lockstep releases list` shows the releases")
        return Manifest.read(folder)

    def scan(self) -> ReleaseListing:
        """Every published release, oldest first, and the ones whose manifest cannot be read.

        A release deleted while the folder is read is left out; an unreadable manifest does
        not fail the listing (`delete` removes such a release).
        """
        manifests, unreadable = [], {}
        for entry in self.releases_dir.iterdir():
            if not _RELEASE_ID.match(entry.name):
                continue
            try:
                manifests.append(Manifest.read(entry))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                unreadable[entry.name] = f"{type(exc).__name__}: {exc}"
        manifests.sort(key=lambda m: (m.created, m.release_id))
        return ReleaseListing(manifests, unreadable)

    def list(self) -> list[Manifest]:
        """Every published release whose manifest reads, oldest first; unreadable ones are logged (`scan` has them)."""
        listing = self.scan()
        for release_id, reason in listing.unreadable.items():
            log.warning("release %s is left out of the listing: its %s cannot be read (%s); restore it or "
                        "`lockstep releases delete %s`", release_id, MANIFEST_FILE, reason, release_id)
        return listing.manifests

    def verified(self, release_id: str) -> Manifest:
        """The manifest of a release that is whole: it parses, its files match their checksums, its model folders exist.

        Raises NotFound when the release does not exist and IntegrityError naming what is wrong otherwise.
        """
        folder = self.path(release_id)
        try:
            manifest = Manifest.read(folder)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise NotFound(f"release {release_id} does not exist; `lockstep releases list` shows the releases") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(
                f"release {release_id}: {MANIFEST_FILE} cannot be read ({type(exc).__name__}: {exc}); "
                "build the release again"
            ) from exc
        verify_files(folder, manifest)
        for ref in (manifest.model, manifest.reranker):
            if ref is not None and not (self.data_dir / ref.path).is_dir():
                raise IntegrityError(f"release {release_id}: its model folder {ref.path} is missing; "
                                     "build the release again")
        return manifest

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.releases_dir / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def pointer(self) -> Pointer:
        path = self.releases_dir / POINTER_FILE
        if not path.exists():
            return Pointer()
        data = json.loads(path.read_text())
        return Pointer(active=data.get("active"), history=list(data.get("history", [])))

    def active(self) -> str | None:
        return self.pointer().active

    def _write_pointer(self, pointer: Pointer) -> None:
        payload = {"active": pointer.active, "history": pointer.history, "updated": time.time()}
        write_atomic(self.releases_dir / POINTER_FILE, json.dumps(payload, indent=2))

    def activate(self, release_id: str, only_if_active: tuple[str | None, ...] | None = None) -> Pointer:
        """Make `release_id` live; the previous active release becomes the rollback target.

        The release is verified (`verified`) under the lock, so it cannot be deleted between
        the check and the pointer write; a damaged release is refused and the pointer kept.
        With `only_if_active`, it is activated only while the live release is one of those
        (checked under the same lock), else ActiveChanged: a promotion gated against one
        live release must not replace another that went live meanwhile.
        """
        self.path(release_id)
        with self._locked():
            self.verified(release_id)
            pointer = self.pointer()
            if only_if_active is not None and pointer.active not in only_if_active:
                raise ActiveChanged(f"release {pointer.active} went live after {release_id} was judged against "
                                    f"{only_if_active[0]}; judge it again")
            if pointer.active == release_id:
                return pointer
            if pointer.active is not None:
                pointer.history.append(pointer.active)
            pointer.active = release_id
            self._write_pointer(pointer)
        return pointer

    def rollback(self) -> Pointer:
        """Re-activate the release that was active before the current one.

        Releases deleted since are skipped; a damaged one is refused (IntegrityError) and the pointer kept.
        """
        with self._locked():
            pointer = self.pointer()
            while pointer.history:
                candidate = pointer.history.pop()
                if self.exists(candidate) and candidate != pointer.active:
                    self.verified(candidate)
                    pointer.active = candidate
                    self._write_pointer(pointer)
                    return pointer
            raise Conflict("there is no earlier release to roll back to; activate one by id instead")

    def delete(self, release_id: str) -> None:
        """Delete a release that is not active."""
        self.path(release_id)
        with self._locked():
            self._delete_locked(release_id)

    def _delete_locked(self, release_id: str) -> None:
        """`delete`, for a caller that holds the lock."""
        folder = self.path(release_id)
        pointer = self.pointer()
        if pointer.active == release_id:
            raise Conflict(f"release {release_id} is active; activate or roll back to another release first")
        if not (folder / MANIFEST_FILE).is_file():
            raise NotFound(f"release {release_id} does not exist")
        _discard(folder)
        if release_id in pointer.history:
            pointer.history = [r for r in pointer.history if r != release_id]
            self._write_pointer(pointer)

    def gc(
        self, keep: int, unused_for: float = STALE_SECONDS, spare: Callable[[], Collection[str]] = tuple
    ) -> list[str]:
        """Delete all but the newest `keep` releases (never the active one, the rollback target, or one `spare()`
        names, read under the lock: the candidates of unfinished jobs), then what has been left untouched for
        `unused_for` seconds: staging folders of releases and of models, and model folders no release uses.

        Runs under the lock, so nothing is activated or deleted meanwhile. A build in progress keeps its
        staging and model folders by touching them, so with the default day it is never collected; a
        shorter `unused_for` (0 frees space at once) is safe only while no build runs. While a manifest is
        unreadable no model folder is collected, since that release's models are unknown.
        """
        if keep < 1:
            raise InvalidInput("keep must be at least 1")
        if not unused_for >= 0:
            raise InvalidInput(f"unused_for must be 0 or more seconds, got {unused_for}")
        with self._locked():
            pointer = self.pointer()
            listing = self.scan()
            kept = {m.release_id for m in listing.manifests[-keep:]} | {pointer.active} | set(pointer.history[-1:])
            kept |= set(spare())
            removed = [m.release_id for m in listing.manifests if m.release_id not in kept]
            for release_id in removed:
                self._delete_locked(release_id)
            stale_before = time.time() - unused_for
            leftovers = [*self.releases_dir.glob(f"{STAGING_PREFIX}*"), *self.models_dir.glob(f"{STAGING_PREFIX}*")]
            for entry in leftovers:
                if _untouched_since(entry, stale_before):
                    shutil.rmtree(entry, ignore_errors=True)
            if listing.unreadable:
                log.warning("gc kept every unused model folder: the manifests of %s cannot be read; restore or "
                            "delete those releases", ", ".join(sorted(listing.unreadable)))
                return removed
            used = {Path(ref.path).name for m in listing.manifests if m.release_id not in removed
                    for ref in (m.model, m.reranker) if ref is not None}
            for entry in self.models_dir.iterdir():
                if entry.name not in used and not entry.name.startswith(".") and _untouched_since(entry, stale_before):
                    _discard(entry)
        return removed

    @contextmanager
    def staging(self, release_id: str) -> Iterator[Path]:
        """A private folder to build a release in; removed unless `publish` moved it.

        A leftover of the same id (a build killed mid-way) is cleared first.
        """
        if self.exists(release_id):
            raise Conflict(f"release {release_id} is already published")
        folder = self.releases_dir / f"{STAGING_PREFIX}{release_id}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        try:
            yield folder
        finally:
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staging: Path, manifest: Manifest) -> Path:
        """Write the manifest, fsync everything, and rename the staging folder into place."""
        (staging / MANIFEST_FILE).write_text(manifest.to_json())
        fsync_tree(staging)
        final = self.path(manifest.release_id)
        os.rename(staging, final)
        fsync_dir(self.releases_dir)
        return final


def _discard(folder: Path) -> None:
    """Remove a folder by first renaming it to a hidden trash name beside it, so a crash mid-way never leaves a
    partial folder under its real name (gc removes the trash later)."""
    trash = folder.with_name(f"{STAGING_PREFIX}deleted-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)
