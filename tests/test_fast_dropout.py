"""Dropout with masks drawn by numpy: its rate and scaling, its attention against the eager formula with the same
mask, reproducibility from torch's seed, and the swap in and out of a tiny model."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from training.bi_encoder import BiEncoder
from training.fast_dropout import (
    ATTENTION_NAME,
    NUMPY_MASK_MIN,
    CpuDropout,
    attention,
    cpu_dropout,
    keep_mask,
    masked_dropout,
)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert float(mask.float().mean()) == pytest.approx(1 - p, abs=0.002)
    rows = mask.float().mean(dim=1)
    assert float(rows.std()) == pytest.approx((p * (1 - p) / 1000) ** 0.5, rel=0.15), "draws are independent"


def test_masks_follow_torch_seed_so_a_replayed_random_state_redraws_them():
    """Guards against masks seeded elsewhere: GradCache replays torch's random state to embed again with the same
    dropout, and a different mask there gives wrong gradients."""
    torch.manual_seed(7)
    first, second = keep_mask((64, 64), 0.1), keep_mask((64, 64), 0.1)
    torch.manual_seed(7)
    assert torch.equal(keep_mask((64, 64), 0.1), first)
    assert not torch.equal(first, second)


def test_dropout_zeroes_dropped_elements_and_scales_the_rest_as_torch_does():
    x = torch.randn(300, 300, requires_grad=True)
    assert x.numel() >= NUMPY_MASK_MIN
    torch.manual_seed(1)
    out = masked_dropout(x, 0.25, True)
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / 0.75)
    out.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    assert masked_dropout(x, 0.25, False) is x and masked_dropout(x, 0.0, True) is x
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        masked_dropout(x, 1.0, True)
    assert CpuDropout(0.25).eval()(x) is x


def test_small_tensors_keep_torch_dropout_where_seeding_numpy_would_cost_more():
    x = torch.randn(10, 30)
    torch.manual_seed(2)
    ours = masked_dropout(x, 0.1, True)
    torch.manual_seed(2)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.1, True))


def _module(training: bool) -> torch.nn.Module:
    module = torch.nn.Module()
    module.is_causal = False
    return module.train(training)


def test_attention_with_dropout_is_the_eager_formula_with_that_mask():
    batch, heads, tokens, dim = 2, 4, 128, 4
    q, k, v = (torch.randn(batch, heads, tokens, dim) for _ in range(3))
    attend = torch.ones(batch, 1, tokens, tokens, dtype=torch.bool)
    attend[1, :, :, 100:] = False
    torch.manual_seed(3)
    out, _ = attention(_module(True), q, k, v, attend, dropout=0.2, scaling=0.5)
    torch.manual_seed(3)
    keep = keep_mask((batch, heads, tokens, tokens), 0.2)
    scores = (q @ k.transpose(2, 3) * 0.5).masked_fill(~attend, float("-inf"))
    expected = (torch.softmax(scores, dim=-1) * keep / 0.8) @ v
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)


def test_attention_without_dropout_is_transformers_sdpa():
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    attend = torch.rand(2, 1, 5, 5) > 0.3
    attend[..., 0] = True
    for module in (_module(False), _module(True)):
        ours, _ = attention(module, q, k, v, attend, dropout=0.0)
        theirs, _ = sdpa_attention_forward(module, q, k, v, attend, dropout=0.0)
        assert torch.equal(ours, theirs)


def test_the_swap_changes_only_training_and_is_undone(tiny_model_dir):
    """Guards against a swap that changes inference, leaks past training (into a saved model's attention setting)
    or survives an error inside the block."""
    encoder = BiEncoder.load(tiny_model_dir)
    model = encoder.model
    ids, mask = encoder.token_batch(["alpha beta gamma delta", "beta"], "document")
    with torch.no_grad():
        reference = encoder.embed(ids, mask)
        with cpu_dropout(model):
            assert model.config._attn_implementation == ATTENTION_NAME
            dropouts = [m for m in model.modules() if isinstance(m, CpuDropout)]
            assert dropouts and not any(type(m) is torch.nn.Dropout for m in model.modules())
            assert torch.equal(encoder.embed(ids, mask), reference), "eval mode computes exactly as before"
            model.train()
            torch.manual_seed(5)
            first = encoder.embed(ids, mask)
            torch.manual_seed(5)
            assert torch.equal(encoder.embed(ids, mask), first), "the same seed gives the same masks"
            assert not torch.allclose(first, reference), "dropout is applied in training"
            model.eval()
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, CpuDropout) for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"), cpu_dropout(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa" and not any(isinstance(m, CpuDropout) for m in model.modules())
