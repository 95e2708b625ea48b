"""Serving on the GPU when CUDA is present: the same answers as the CPU; on machines without one, the CPU is chosen.

The index test moves the index to the GPU where this FAISS build can, and otherwise
checks that it keeps answering from the CPU; either way it must save as a CPU index.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexer.live_release import LiveRelease
from indexer.release_builder import BuildOptions, build_release
from indexer.serving_device import resolve_device
from indexer.vector_index import VectorIndex
from tests.conftest import SAMPLE_DOCS
from training.errors import InvalidInput

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")


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
