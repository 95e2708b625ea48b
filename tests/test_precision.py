"""Choosing a precision: `auto` per device, and a warning wherever a precision would run slowly on this CPU:
bf16 or fp16 emulated without instructions for them, static int8 without int8 dot products."""

import logging
from pathlib import Path

import pytest
import torch

from indexer.live_release import LiveRelease
from indexer.release_builder import BuildOptions, build_release
from tests.conftest import SAMPLE_DOCS
from training.errors import InvalidInput
from training.precision import (
    cpu_has_int8_dot,
    cpu_supports_bf16,
    resolve,
    resolve_training,
)

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


FP16_EMULATED = not any(f" {flag}" in Path("/proc/cpuinfo").read_text() for flag in ("avx512_fp16", "amx_fp16"))


def test_auto_encodes_in_fp16_on_a_gpu_without_bf16_and_trains_there_in_fp32(monkeypatch, caplog):
    """Guards against a T4 or V100 encoding in fp32 when its tensor cores run fp16, and against training in fp16,
    whose gradients underflow without loss scaling. Which format the GPU has is the only thing set here."""
    cuda = torch.device("cuda")
    for has_bf16, encodes, trains in ((False, "fp16", "fp32"), (True, "bf16", "bf16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda has_bf16=has_bf16: has_bf16)
        assert resolve("auto", cuda) == encodes and resolve_training("auto", cuda) == trains
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert resolve("fp16", cuda) == "fp16"
    assert _warnings(caplog) == []
    for precision in ("fp16", "int8"):
        with pytest.raises(InvalidInput, match=f"training runs in fp32 or bf16; {precision} is an encoding precision"):
            resolve_training(precision, cuda)
    with pytest.raises(InvalidInput, match="precision must be one of auto, fp32, bf16, fp16, int8, got 'half'"):
        resolve("half", cuda)


def test_asking_for_fp16_on_a_cpu_without_it_warns(caplog):
    """Guards against fp16 on a CPU that emulates it (about a hundred times slower than fp32) without a word."""
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert resolve("fp16", torch.device("cpu")) == "fp16"
        assert resolve("auto", torch.device("cpu")) != "fp16"
    warned = _warnings(caplog)
    assert len(warned) == (1 if FP16_EMULATED else 0), warned
    if FP16_EMULATED:
        assert "AMX-FP16 or AVX512-FP16" in warned[0] and "use precision auto or fp32" in warned[0]


def test_an_fp16_release_records_its_precision_and_encodes_its_queries_in_it(corpus, releases, tiny_model_dir, caplog):
    """Guards against an fp16 build whose queries run in another precision than its corpus, and against fp16 on
    openvino, which has no fp16 path on the CPU, being accepted and then failing at load time."""
    corpus.upsert(SAMPLE_DOCS)
    fp32 = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp32"))
    fp16 = build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp16"))
    assert fp16.precision == "fp16" and fp16.runtime == "torch"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="indexer.release_runtime"):
        served = LiveRelease.load(releases, fp16.release_id)
    assert served.encoder.precision == "fp16"
    warned = _warnings(caplog)
    assert len(warned) == (1 if FP16_EMULATED else 0), warned
    if FP16_EMULATED:
        assert fp16.release_id in warned[0] and "serve it from GPUs" in warned[0]
    reference = LiveRelease.load(releases, fp32.release_id)
    for query in ("protein cells", "quick brown fox"):
        hits = served.search(corpus, query, 3).hits
        assert [h.document.id for h in hits] == [h.document.id for h in reference.search(corpus, query, 3).hits]
    pytest.importorskip("openvino", reason="the openvino runtime needs `pip install 'lockstep[openvino]'`")
    with pytest.raises(InvalidInput, match="fp16 is for GPUs, on the torch runtime; on openvino use precision bf16"):
        build_release(corpus, releases, BuildOptions(model_path=tiny_model_dir, precision="fp16", runtime="openvino"))
    assert {m.release_id for m in releases.list()} == {fp32.release_id, fp16.release_id}
