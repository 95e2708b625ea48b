"""Pooling modes and the sentence-transformers pooling config they read and write."""

import json

import pytest
import torch

from training.pooling import Pooling, pool, read_pooling, write_pooling


def test_mean_ignores_padding():
    """Guards against padding tokens leaking into the mean (vectors would depend on batch-mates)."""
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool(tokens, mask, Pooling.MEAN), torch.tensor([[2.0, 3.0]]))


def test_max_ignores_padding_and_cls_takes_first():
    tokens = torch.tensor([[[1.0, -5.0], [3.0, -4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool(tokens, mask, Pooling.MAX), torch.tensor([[3.0, -4.0]]))
    assert torch.allclose(pool(tokens, mask, Pooling.CLS), torch.tensor([[1.0, -5.0]]))


@pytest.mark.parametrize("mode", list(Pooling))
def test_config_round_trip(tmp_path, mode):
    write_pooling(tmp_path, mode, 8)
    assert read_pooling(tmp_path) is mode
    assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 8


def test_ambiguous_or_unsupported_config_is_refused(tmp_path):
    """Guards against silently picking one mode when the folder asks for something else."""
    folder = tmp_path / "1_Pooling"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="exactly one"):
        read_pooling(tmp_path)


def test_missing_config_means_undeclared(tmp_path):
    assert read_pooling(tmp_path) is None


@pytest.mark.parametrize(("value", "mode"), [("mean", Pooling.MEAN), ("cls", Pooling.CLS), ("max", Pooling.MAX)])
def test_sentence_transformers_v6_pooling_format(tmp_path, value, mode):
    """Guards against refusing (or misreading) folders saved by sentence-transformers 6."""
    folder = tmp_path / "1_Pooling"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"embedding_dimension": 8, "pooling_mode": value}))
    assert read_pooling(tmp_path) is mode


def test_unsupported_v6_pooling_mode_is_refused(tmp_path):
    folder = tmp_path / "1_Pooling"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    with pytest.raises(ValueError, match="not supported"):
        read_pooling(tmp_path)
