"""Versioned releases on disk and the pointer that says which one is live.

A release is an immutable folder `releases/<id>/` (index, id map, manifest) that
points at a content-addressed model folder `models/<hash>/`. Releases are staged in a
hidden folder, fsynced, then renamed into place, so a crash never leaves a partial
release listed. The active release is named by `releases/ACTIVE.json`, replaced
atomically; it also keeps the history of earlier active releases for rollback.
Pointer updates hold an advisory file lock, so processes sharing a data dir agree.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from indexer.durable_files import fsync_dir, fsync_tree, write_atomic
from indexer.manifest import MANIFEST_FILE, Manifest
from training.errors import Conflict, InvalidInput, NotFound

POINTER_FILE = "ACTIVE.json"
STAGING_PREFIX = ".staging-"
STALE_STAGING_SECONDS = 24 * 3600
_RELEASE_ID = re.compile(r"^r-\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_release_id() -> str:
    """A sortable, unique release id such as `r-20261128T150102Z-3fa9c1`."""
    return time.strftime("r-%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(3)


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

    def list(self) -> list[Manifest]:
        """Every published release, oldest first."""
        found = [
            Manifest.read(entry)
            for entry in self.releases_dir.iterdir()
            if _RELEASE_ID.match(entry.name) and (entry / MANIFEST_FILE).is_file()
        ]
        return sorted(found, key=lambda m: (m.created, m.release_id))

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

    def activate(self, release_id: str) -> Pointer:
        """Make `release_id` live; the previous active release becomes the rollback target."""
        self.manifest(release_id)
        with self._locked():
            pointer = self.pointer()
            if pointer.active == release_id:
                return pointer
            if pointer.active is not None:
                pointer.history.append(pointer.active)
            pointer.active = release_id
            self._write_pointer(pointer)
        return pointer

    def rollback(self) -> Pointer:
        """Re-activate the release that was active before the current one."""
        with self._locked():
            pointer = self.pointer()
            while pointer.history:
                candidate = pointer.history.pop()
                if self.exists(candidate) and candidate != pointer.active:
                    pointer.active = candidate
                    self._write_pointer(pointer)
                    return pointer
            raise Conflict("there is no earlier release to roll back to; activate one by id instead")

    def delete(self, release_id: str) -> None:
        """Delete a release that is not active."""
        folder = self.path(release_id)
        with self._locked():
            pointer = self.pointer()
            if pointer.active == release_id:
                raise Conflict(f"release {release_id} is active; activate or roll back to another release first")
            if not (folder / MANIFEST_FILE).is_file():
                raise NotFound(f"release {release_id} does not exist")
            self._remove_release_folder(folder)
            if release_id in pointer.history:
                pointer.history = [r for r in pointer.history if r != release_id]
                self._write_pointer(pointer)

    def _remove_release_folder(self, folder: Path) -> None:
        trash = self.releases_dir / f"{STAGING_PREFIX}deleted-{folder.name}"
        os.replace(folder, trash)
        fsync_dir(self.releases_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def gc(self, keep: int) -> list[str]:
        """Delete all but the newest `keep` releases (never the active one), unused models and stale staging."""
        if keep < 1:
            raise InvalidInput("keep must be at least 1")
        active = self.active()
        releases = self.list()
        newest = {m.release_id for m in releases[-keep:]}
        removed = []
        for manifest in releases:
            if manifest.release_id not in newest and manifest.release_id != active:
                self.delete(manifest.release_id)
                removed.append(manifest.release_id)
        now = time.time()
        for entry in self.releases_dir.glob(f"{STAGING_PREFIX}*"):
            if now - entry.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        used = {Path(ref.path).name for m in self.list() for ref in (m.model, m.reranker) if ref is not None}
        for entry in self.models_dir.iterdir():
            if entry.name not in used and not entry.name.startswith("."):
                shutil.rmtree(entry, ignore_errors=True)
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
