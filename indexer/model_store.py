"""Content-addressed model copies (bi-encoders and rerankers): `models/<fingerprint>/`, shared by releases.

A model is stored by loading it, saving it in sentence-transformers' layout, and
re-loading the saved copy to fingerprint it, so the fingerprint in a manifest is the
fingerprint of exactly the files that will be served; a copy already stored intact is
re-loaded instead of written again. Loading verifies it again.
Storing or reusing a model touches its folder: a build stores its model long before it
publishes the release that references it, and `releases gc` spares an unreferenced
model folder touched within `STALE_SECONDS`.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path

from indexer.durable_files import fsync_dir, fsync_tree
from indexer.manifest import ModelRef, RerankerRef
from indexer.release_store import STAGING_PREFIX, touch
from training.bi_encoder import BiEncoder
from training.cross_encoder import CrossEncoder
from training.errors import IntegrityError, NotFound
from training.fingerprint import fingerprint_hex
from training.pooling import Pooling

log = logging.getLogger(__name__)


def _folder_name(fingerprint: str) -> str:
    return fingerprint_hex(fingerprint)[:32]


def model_ref(encoder: BiEncoder, path: str) -> ModelRef:
    settings = encoder.settings
    return ModelRef(
        fingerprint=encoder.fingerprint,
        path=path,
        name=encoder.name,
        pooling=settings.pooling.value,
        query_max_length=settings.query_max_length,
        document_max_length=settings.document_max_length,
    )


class ModelStore:
    """Stores and loads models by fingerprint under `<data_dir>/models/`."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)

    def put(
        self,
        source: str | Path,
        *,
        name: str | None = None,
        pooling: Pooling | None = None,
        query_max_length: int | None = None,
        document_max_length: int | None = None,
        device: str = "cpu",
    ) -> tuple[BiEncoder, ModelRef]:
        """Store the model at `source` (if not stored yet) and return it loaded from the store onto `device`."""
        source = Path(source).resolve()
        if source.parent == self.models_dir.resolve() and not any((pooling, query_max_length, document_max_length)):
            encoder = BiEncoder.load(source, name=name, device=device)
            if _folder_name(encoder.fingerprint) == source.name:
                touch(source)
                return encoder, model_ref(encoder, f"models/{source.name}")
        original = BiEncoder.load(
            source,
            name=name,
            pooling=pooling,
            query_max_length=query_max_length,
            document_max_length=document_max_length,
        )
        stored, folder = self._store(original, BiEncoder, device)
        stored.name = original.name  # a display name, outside the fingerprint: this build's, not the stored copy's
        return stored, model_ref(stored, f"models/{folder.name}")

    def put_reranker(
        self, source: str | Path, *, max_length: int | None = None, name: str | None = None
    ) -> tuple[CrossEncoder, RerankerRef]:
        """Store a cross-encoder by fingerprint and return it loaded from the store; `name` (default: the source
        folder's name) is what the release records it as."""
        stored, folder = self._store(CrossEncoder.load(source, max_length=max_length), CrossEncoder)
        ref = RerankerRef(stored.fingerprint, f"models/{folder.name}", name or Path(source).name, stored.max_length)
        return stored, ref

    def load_reranker(self, ref: RerankerRef, device: str = "cpu") -> CrossEncoder:
        """Load a stored cross-encoder and refuse it unless it still hashes to `ref.fingerprint`."""
        folder = self.data_dir / ref.path
        if not folder.is_dir():
            raise NotFound(f"reranker folder {folder} is missing; rebuild the release with `lockstep build --reranker PATH`")
        reranker = CrossEncoder.load(folder, max_length=ref.max_length, device=device)
        if not reranker.matches(ref.fingerprint):
            raise IntegrityError(
                f"reranker at {folder} has fingerprint {reranker.fingerprint}, but the release was built with "
                f"{ref.fingerprint}; rebuild the release or restore the original reranker files"
            )
        return reranker

    def _store(self, original, kind: type, device: str = "cpu"):
        """`original` as stored in `models/<fingerprint>`, loaded onto `device`, and its folder, touched.

        A folder that already holds these weights intact is reused without writing the
        model again (a repeated `lockstep build --model PATH`). Otherwise the model is saved
        to staging, re-loaded there, and moved into place (`_put_in_place`). Whether a copy
        is intact is checked on the CPU, so a failure of the device (a GPU out of memory)
        is never taken for damaged files; the device load comes last.
        """
        folder = self.models_dir / _folder_name(original.fingerprint)
        stored = _intact(folder, original.fingerprint, kind)
        if stored is None:
            staging = self.models_dir / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
            try:
                original.save(staging)
                stored = kind.load(staging)
                folder = self.models_dir / _folder_name(stored.fingerprint)
                _put_in_place(staging, folder, stored.fingerprint, kind)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        touch(folder)
        return (stored if device == "cpu" else kind.load(folder, device=device)), folder

    def load(self, ref: ModelRef, device: str = "cpu") -> BiEncoder:
        """Load a stored model and refuse it unless it still hashes to `ref.fingerprint`."""
        folder = self.data_dir / ref.path
        if not folder.is_dir():
            raise NotFound(f"model folder {folder} is missing; rebuild the release with `lockstep build`")
        encoder = BiEncoder.load(folder, device=device)
        if not encoder.matches(ref.fingerprint):
            raise IntegrityError(
                f"model at {folder} has fingerprint {encoder.fingerprint}, but the release was built with "
                f"{ref.fingerprint}; refusing to serve vectors of one model with another. "
                "Rebuild the release (`lockstep build --activate`) or restore the original model files"
            )
        return encoder


def _intact(folder: Path, fingerprint: str, kind: type):
    """The model in `folder` loaded on the CPU if it hashes to `fingerprint`; None if the folder is missing, or
    damaged (logged: it is replaced)."""
    if not folder.is_dir():
        return None
    try:
        model = kind.load(folder)
    except MemoryError:
        raise
    except Exception as exc:  # on the CPU, a folder fails to load in many ways, all of them its files (safetensors, JSON, tokenizer)
        log.warning("stored model %s cannot be loaded (%s: %s); storing it again", folder, type(exc).__name__, exc)
        return None
    if not model.matches(fingerprint):
        log.warning("stored model %s no longer hashes to its name (files changed); storing it again", folder)
        return None
    return model


def _put_in_place(staging: Path, folder: Path, fingerprint: str, kind: type) -> None:
    """Move the fsynced `staging` copy to `folder`, unless `folder` already holds an intact copy (another build
    stored the same model meanwhile); a damaged copy there is swapped out with two renames, so a crash leaves the
    folder either old or new for at most that instant, and deleted only after the new copy is in place."""
    fsync_tree(staging)
    try:
        staging.rename(folder)
    except OSError:
        if _intact(folder, fingerprint, kind) is not None:
            return
        damaged = folder.with_name(f"{STAGING_PREFIX}{secrets.token_hex(4)}")
        folder.rename(damaged)
        staging.rename(folder)
        shutil.rmtree(damaged, ignore_errors=True)
    fsync_dir(folder.parent)
