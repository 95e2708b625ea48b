"""Choosing a precision: `auto` per device, and a warning wherever a precision would run slowly on this CPU:
bf16 emulated without bf16 instructions, static int8 without int8 dot products."""

import logging

import pytest
import torch

from indexer.live_release import LiveRelease
from indexer.release_builder import BuildOptions, build_release
from tests.conftest import SAMPLE_DOCS
from training.precision import cpu_has_int8_dot, cpu_supports_bf16, resolve

EMULATED = not cpu_supports_bf16()


def _warnings(caplog) -> list[str]:
    """Warnings Lockstep logged (not those of the libraries it calls)."""
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and record.name.startswith(("training.", "indexer."))]


def test_asking_for_bf16_warns_exactly_where_the_cpu_would_emulate_it(caplog):
    """Guards against a build or training asked for bf16 on a CPU without bf16 instructions running several times
    slower than fp32 without a word, and against warning where bf16 is native or was not asked for."""
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert resolve("auto", cpu) == ("fp32" if EMULATED else "bf16")
        assert resolve("fp32", cpu) == "fp32" and resolve("int8", cpu) == "int8"
        assert resolve("bf16", torch.device("cuda")) == "bf16"
        assert _warnings(caplog) == []
        assert resolve("bf16", cpu) == "bf16"
    warned = _warnings(caplog)
    assert len(warned) == (1 if EMULATED else 0), warned
    if EMULATED:
        assert "without AMX or AVX512-BF16" in warned[0] and "use precision auto or fp32" in warned[0]


def test_loading_a_bf16_release_warns_where_queries_would_run_emulated(corpus, releases, tiny_model_dir, caplog):
    """Guards against a replica on a CPU without bf16 serving a release built in bf16 elsewhere at a fraction of its
    speed without saying why; an fp32 release loads without a warning."""
    corpus.upsert(SAMPLE_DOCS)
    bf16 = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="bf16"))
    fp32 = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="indexer.release_runtime"):
        assert LiveRelease.load(releases, fp32.release_id).encoder.precision == "fp32"
        assert _warnings(caplog) == []
        assert LiveRelease.load(releases, bf16.release_id).encoder.precision == "bf16"
    warned = _warnings(caplog)
    assert len(warned) == (1 if EMULATED else 0), warned
    if EMULATED:
        assert bf16.release_id in warned[0] and "build one in fp32" in warned[0]


def test_openvino_int8_builds_and_loads_warn_where_the_cpu_lacks_int8_dot_products(corpus, releases, tiny_model_dir,
                                                                                   caplog):
    """Guards against an int8 release on openvino built or served on a CPU without VNNI or AMX, where it runs slower
    than fp32 (0.78x openvino fp32 on an AVX2 machine), without a word; dynamic int8 on torch is not flagged."""
    pytest.importorskip("nncf", reason="int8 on openvino needs `pip install 'lockstep[openvino]'`")
    corpus.upsert(SAMPLE_DOCS)
    with caplog.at_level(logging.WARNING, logger="indexer.release_runtime"):
        build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="int8"))
        assert _warnings(caplog) == []
        built = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="int8",
                                                             runtime="openvino"))
        LiveRelease.load(releases, built.release_id)
    warned = _warnings(caplog)
    assert len(warned) == (0 if cpu_has_int8_dot() else 2), warned
    if warned:
        assert warned[0].startswith("an int8 build on openvino") and "VNNI or AMX" in warned[0]
        assert built.release_id in warned[1] and "int8 with runtime torch" in warned[1]
