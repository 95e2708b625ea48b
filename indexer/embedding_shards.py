"""Embedding shards: one corpus snapshot cut into shards that workers encode apart, then assembled into a release.

`plan_shards` stores the model, reads the corpus once as one snapshot (its change
sequence goes into the manifest, so writes made while the shards are encoded are
caught up by whoever serves the release, as after any build), and writes into a
folder `plan.json` (the release spec and the shard sizes) and each shard's input (the
ids and texts of its documents, in corpus order), so every shard sees the same corpus
version. `encode_shard` encodes one input with the stored model at the planned
precision (touching the model's folder with each chunk, so `releases gc` spares the
model of a re-embed whose release is not published yet) and writes
`shard-NNNNN.npz` (ids, float32 unit vectors, norms) atomically
(temporary file, fsync, rename): a shard file is complete or absent, and one already
there that matches its input is kept, not encoded again. An int8 plan also keeps the
int8 gate's sample (`int8-sample.npz`: the sampled rows with their int8 vectors, norms
and token counts), whose rows each shard takes from there instead of encoding them
again, as a single-process build does. `assemble_release` refuses
while any shard is missing or differs from its recorded checksum, and otherwise adds
the shards to the index in order and publishes through the same path as a
single-process build. Nothing here knows about jobs or Celery.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from indexer.corpus_store import CorpusStore
from indexer.durable_files import fsync_dir, sha256_file, write_atomic
from indexer.manifest import Manifest, int8_model_files
from indexer.model_store import ModelStore
from indexer.release_builder import (
    BuildOptions, BuildProgress, EmbeddedDocuments, EncodedRows, ReleaseSpec, embed_documents, keep_in_use,
    publish_release, quantise_if_int8, release_spec, snapshot_for_build,
)
from indexer.release_runtime import attach_runtime
from indexer.release_store import ReleaseStore
from training.bi_encoder import BiEncoder, Encoded
from training.errors import IntegrityError, InvalidInput

PLAN_FILE = "plan.json"
INT8_SAMPLE_FILE = "int8-sample.npz"


@dataclass(frozen=True)
class ShardPlan:
    """A planned re-embed: the release it builds and how many documents each shard holds, in corpus order."""

    spec: ReleaseSpec
    shard_size: int
    sizes: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.sizes)


@dataclass(frozen=True)
class EncodedShard:
    """A shard's vector file on disk: its checksum, and whether it was already there (nothing was encoded)."""

    shard: int
    checksum: str
    reused: bool


def input_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.input.jsonl"


def vectors_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.npz"


def read_plan(folder: Path) -> ShardPlan:
    """The plan `plan_shards` wrote into `folder`; IntegrityError when there is none."""
    path = folder / PLAN_FILE
    if not path.is_file():
        raise IntegrityError(f"{folder} holds no shard plan; plan the re-embed again")
    data = json.loads(path.read_text())
    return ShardPlan(ReleaseSpec.from_dict(data["spec"]), data["shard_size"], tuple(data["sizes"]))


def plan_shards(
    corpus: CorpusStore,
    releases: ReleaseStore,
    options: BuildOptions,
    release_id: str,
    folder: Path,
    shard_size: int,
    progress: BuildProgress | None = None,
) -> ShardPlan:
    """Snapshot the corpus and write the plan and every shard's input into `folder` (emptied first)."""
    if shard_size < 1:
        raise InvalidInput(f"shard size must be at least 1, not {shard_size}")
    report = progress or (lambda stage, done, total: None)
    model, seq, documents = snapshot_for_build(corpus, releases, options, report)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    gate = quantise_if_int8(model, documents, folder, options, report)
    agreement = gate.agreement if gate is not None else None
    if gate is not None:
        encoded = gate.sample.encoded
        _write_arrays(folder / INT8_SAMPLE_FILE, rows=gate.sample.rows, vectors=encoded.vectors, norms=encoded.norms,
                      lengths=encoded.lengths)
    sizes = []
    for shard, start in enumerate(range(0, len(documents), shard_size)):
        chunk = documents[start : start + shard_size]
        lines = (json.dumps({"id": doc.id, "text": doc.embedding_text()}, ensure_ascii=False) + "\n" for doc in chunk)
        write_atomic(input_path(folder, shard), "".join(lines))
        sizes.append(len(chunk))
    plan = ShardPlan(release_spec(release_id, model, options, seq, len(documents), agreement), shard_size, tuple(sizes))
    write_atomic(folder / PLAN_FILE, json.dumps({"spec": asdict(plan.spec), "shard_size": shard_size, "sizes": sizes}))
    report("plan", plan.count, plan.count)
    return plan


def _read_input(folder: Path, shard: int) -> tuple[list[str], list[str]]:
    path = input_path(folder, shard)
    if not path.is_file():
        raise IntegrityError(f"shard {shard} has no input at {path}; plan the re-embed again")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [row["id"] for row in rows], [row["text"] for row in rows]


def _read_vectors(path: Path, ids: list[str], dim: int) -> EmbeddedDocuments | None:
    """The shard file at `path` if it holds exactly `ids` with float32 `dim`-wide vectors and norms, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stored_ids, vectors, norms = data["ids"].tolist(), data["vectors"], data["norms"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if stored_ids != ids or vectors.dtype != np.float32 or vectors.shape != (len(ids), dim):
        return None
    if norms.dtype != np.float32 or norms.shape != (len(ids),) or not np.isfinite(vectors).all():
        return None
    return EmbeddedDocuments(stored_ids, vectors, norms)


def _read_int8_sample(folder: Path, plan: ShardPlan) -> EncodedRows | None:
    """The int8 gate's sample the plan kept (None for a plan that is not int8); IntegrityError if it is damaged."""
    if plan.spec.int8_agreement is None:
        return None
    path = folder / INT8_SAMPLE_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            rows, vectors, norms, lengths = data["rows"], data["vectors"], data["norms"], data["lengths"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise IntegrityError(f"the int8 sample {path} is missing or unreadable; plan the re-embed again") from exc
    count = len(rows)
    if (rows.dtype.kind != "i" or np.any(np.diff(rows) <= 0) or vectors.dtype != np.float32
            or vectors.shape != (count, plan.spec.dim) or norms.shape != (count,) or lengths.shape != (count,)
            or not np.isfinite(vectors).all() or (count and not 0 <= rows[0] <= rows[-1] < plan.spec.doc_count)):
        raise IntegrityError(f"the int8 sample {path} does not fit the plan; plan the re-embed again")
    return EncodedRows(rows, Encoded(vectors, norms, lengths))


def _write_vectors(path: Path, part: EmbeddedDocuments) -> None:
    """Write a shard file so readers see it complete or not at all."""
    _write_arrays(path, ids=np.array(part.ids, dtype=str), vectors=part.vectors, norms=part.norms)


def _write_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write `arrays` as an `.npz` file that readers see complete or not at all: temporary file, fsync, rename,
    fsync folder."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("xb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _shard_encoder(data_dir: Path, folder: Path, spec: ReleaseSpec, device: str) -> BiEncoder:
    """The stored model on `device`, verified against the plan's fingerprint, at the plan's precision."""
    encoder = ModelStore(data_dir).load(spec.model, device=device)
    attach_runtime(encoder, folder, spec.precision, spec.runtime)
    return encoder


def encode_shard(
    data_dir: Path,
    folder: Path,
    shard: int,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
) -> EncodedShard:
    """Encode one shard's input on `device` into its vector file, unless a file matching the input is already there.

    Rows of an int8 plan's gate sample take the vectors the gate encoded.
    """
    plan = read_plan(folder)
    if not 0 <= shard < plan.count:
        raise InvalidInput(f"shard {shard} does not exist; the plan has shards 0 to {plan.count - 1}")
    ids, texts = _read_input(folder, shard)
    path = vectors_path(folder, shard)
    if _read_vectors(path, ids, plan.spec.dim) is not None:
        return EncodedShard(shard, sha256_file(path), reused=True)
    sample = _read_int8_sample(folder, plan)
    start = shard * plan.shard_size
    encoded_before = sample.shifted(start, start + len(ids)) if sample is not None else None
    encoder = _shard_encoder(data_dir, folder, plan.spec, device)
    parts = []
    for part in embed_documents(encoder, ids, texts, batch_size, progress, encoded_before):
        keep_in_use(data_dir, plan.spec)
        parts.append(part)
    _write_vectors(path, EmbeddedDocuments(
        ids, np.concatenate([part.vectors for part in parts]), np.concatenate([part.norms for part in parts])
    ))
    return EncodedShard(shard, sha256_file(path), reused=False)


def _assembled_parts(folder: Path, plan: ShardPlan) -> Iterator[EmbeddedDocuments]:
    for shard in range(plan.count):
        ids, _ = _read_input(folder, shard)
        part = _read_vectors(vectors_path(folder, shard), ids, plan.spec.dim)
        if part is None:
            raise IntegrityError(f"shard {shard} of release {plan.spec.release_id} does not match its input; "
                                 "encode it again")
        yield part


def assemble_release(
    releases: ReleaseStore,
    folder: Path,
    checksums: Mapping[int, str | None] | None = None,
    progress: BuildProgress | None = None,
) -> Manifest:
    """Publish the planned release from its shard files, in corpus order; refuses if any shard is missing.

    With `checksums` (shard -> sha256 recorded when it was encoded) a file that changed since is refused too.
    """
    plan = read_plan(folder)
    report = progress or (lambda stage, done, total: None)
    unusable = [
        shard for shard in range(plan.count)
        if not vectors_path(folder, shard).is_file()
        or (checksums is not None and checksums.get(shard) != sha256_file(vectors_path(folder, shard)))
    ]
    if unusable:
        raise IntegrityError(
            f"release {plan.spec.release_id} cannot be assembled: shard(s) {', '.join(map(str, unusable))} of "
            f"{plan.count} are missing or differ from what was recorded when they were encoded; encode them again"
        )
    with releases.staging(plan.spec.release_id) as staging:
        if plan.spec.int8_agreement is not None:
            for name in int8_model_files(plan.spec.runtime):
                shutil.copyfile(folder / name, staging / name)
        return publish_release(releases, staging, plan.spec, _assembled_parts(folder, plan), report)
