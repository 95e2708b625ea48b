"""The GPU when CUDA is present: serving, builds, shards and training give the CPU's answers; without one, the CPU is chosen.

The index test moves the index to the GPU where this FAISS build can, and otherwise
checks that it keeps answering from the CPU; either way it must save as a CPU index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer.embedding_shards import encode_shard, plan_shards, vectors_path
from indexer.live_release import LiveRelease
from indexer.release_builder import BuildOptions, build_release
from indexer.release_store import ReleaseStore
from indexer.serving_device import faiss_has_gpu, resolve_device
from indexer.vector_index import VectorIndex
from tests.conftest import SAMPLE_DOCS
from tests.test_vector_index import gpu_writes_keep_answering_like_the_cpu
from training import distributed
from training.errors import InvalidInput

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")


@pytest.mark.skipif(not faiss_has_gpu(), reason="needs faiss-gpu (the gpu extra) and a GPU; the CPU stand-in runs "
                                               "the same scenario in tests/test_vector_index.py")
def test_a_faiss_gpu_index_keeps_answering_after_thousands_of_writes(tmp_path):
    """Guards against GPU searches failing past FAISS's 2048-result limit as hidden labels pile up."""
    gpu_writes_keep_answering_like_the_cpu(tmp_path, None)


def test_auto_serves_on_the_cpu_without_cuda_and_a_forced_cuda_is_refused_clearly():
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(InvalidInput, match="torch sees no GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"


def _ids(results) -> list[list[str]]:
    return [[hit.doc_id for hit in row] for row in results]


def test_an_index_that_cannot_move_stays_searchable_and_saves_as_a_cpu_index(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(16, "Flat")
    index.add([f"d{i}" for i in range(50)], vectors)
    index.add(["late"], vectors[:1])
    before = _ids(index.search(vectors[:3], 5))
    index.to_gpu()
    assert _ids(index.search(vectors[:3], 5)) == before
    index.save(tmp_path)
    assert _ids(VectorIndex.load(tmp_path).search(vectors[:3], 5)) == before
    assert len(VectorIndex.load(tmp_path)) == 51


@needs_cuda
def test_a_release_served_on_the_gpu_answers_like_the_cpu(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    manifest = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"), activate=True)
    on_cpu = LiveRelease.load(releases, manifest.release_id)
    on_gpu = LiveRelease.load(releases, manifest.release_id, device="cuda")
    assert on_gpu.encoder.device.type == "cuda"
    for query in ("protein cells", "quick brown fox"):
        cpu_hits = on_cpu.search(corpus, query, 5).hits
        gpu_hits = on_gpu.search(corpus, query, 5).hits
        assert [h.document.id for h in gpu_hits] == [h.document.id for h in cpu_hits]
        assert [h.score for h in gpu_hits] == pytest.approx([h.score for h in cpu_hits], abs=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_build_forced_onto_a_missing_gpu_fails_with_one_line_and_publishes_nothing(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from service.cli import app

    data = tmp_path / "data"
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(f'{{"_id": "{d.id}", "text": "{d.text}"}}\n' for d in SAMPLE_DOCS))
    runner = CliRunner()
    assert runner.invoke(app, ["--data-dir", str(data), "ingest", str(docs)]).exit_code == 0
    monkeypatch.setenv("LOCKSTEP_DEVICE", "cuda")
    result = runner.invoke(app, ["--data-dir", str(data), "build", "--model", str(tiny_model_dir)])
    assert result.exit_code == 1 and "torch sees no GPU" in result.output and "Traceback" not in result.output
    assert ReleaseStore(data).list() == []


def test_outside_a_process_group_training_runs_on_the_device_asked_for():
    assert distributed.device() == torch.device("cpu")
    assert distributed.device("cuda") == torch.device("cuda")


@needs_cuda
def test_a_release_built_on_the_gpu_matches_the_cpu_build(corpus, releases, tiny_model_dir):
    corpus.upsert(SAMPLE_DOCS)
    on_cpu = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    on_gpu = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32", device="cuda"))
    assert on_gpu.model.fingerprint == on_cpu.model.fingerprint
    cpu_index = VectorIndex.load(releases.path(on_cpu.release_id))
    gpu_index = VectorIndex.load(releases.path(on_gpu.release_id))
    assert gpu_index.doc_ids() == cpu_index.doc_ids()
    np.testing.assert_allclose(np.stack([gpu_index.reconstruct(i) for i in cpu_index.doc_ids()]),
                               np.stack([cpu_index.reconstruct(i) for i in cpu_index.doc_ids()]), atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_half_precision_release_on_the_gpu_ranks_like_fp32_on_the_cpu(corpus, releases, tiny_model_dir, precision):
    """Guards the GPU's 16-bit encoders against drifting from fp32 beyond rounding, and their releases against
    serving queries in another precision than the corpus."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    corpus.upsert(SAMPLE_DOCS)
    on_cpu = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    on_gpu = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision=precision, device="cuda"))
    assert on_gpu.precision == precision
    cpu_index = VectorIndex.load(releases.path(on_cpu.release_id))
    gpu_index = VectorIndex.load(releases.path(on_gpu.release_id))
    ids = cpu_index.doc_ids()
    cosines = np.sum(np.stack([gpu_index.reconstruct(i) for i in ids]) * np.stack([cpu_index.reconstruct(i) for i in ids]), axis=1)
    assert cosines.min() >= 0.99
    served = LiveRelease.load(releases, on_gpu.release_id, device="cuda")
    assert served.encoder.precision == precision and served.search(corpus, "protein cells", 3).hits


@needs_cuda
def test_auto_encodes_in_a_16_bit_format_on_the_gpu_and_trains_in_one_it_has():
    from training.precision import resolve, resolve_training

    cuda = torch.device("cuda")
    assert resolve("auto", cuda) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert resolve_training("auto", cuda) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


@needs_cuda
def test_a_shard_encoded_on_the_gpu_matches_the_cpu(corpus, releases, tiny_model_dir, tmp_path):
    corpus.upsert(SAMPLE_DOCS)
    options = BuildOptions(model_path=tiny_model_dir, precision="fp32")
    folder = tmp_path / "shards"
    plan_shards(corpus, releases, options, "r-20260101T000000Z-9a0c00", folder, 4)
    encode_shard(releases.data_dir, folder, 0, batch_size=8)
    on_cpu = np.load(vectors_path(folder, 0))["vectors"]
    vectors_path(folder, 0).unlink()
    encode_shard(releases.data_dir, folder, 0, batch_size=8, device="cuda")
    np.testing.assert_allclose(np.load(vectors_path(folder, 0))["vectors"], on_cpu, atol=1e-4)


@needs_cuda
def test_fine_tuning_runs_on_the_gpu(tmp_path, tiny_model_dir):
    from tests.training_data import synthetic_task
    from training.fine_tune import fine_tune
    from training.recipe import parse_recipe_text

    recipe = parse_recipe_text('[run]\nprecision = "auto"\n[[stage]]\nname = "mnr"\nepochs = 1\nlearning_rate = 1e-4\nbatch_size = 8\n')
    summary = fine_tune(tiny_model_dir, synthetic_task(48), recipe,
                        tmp_path / "model", tmp_path / "run", device="cuda")
    assert summary.stages and (tmp_path / "model" / "model.safetensors").exists()
