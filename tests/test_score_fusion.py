"""Fusing bi-encoder and cross-encoder scores: hand-computed values and the edges."""

import numpy as np
import pytest

from training.errors import InvalidInput
from training.score_fusion import RerankPolicy, fuse, standardise


def test_standardise_gives_zero_mean_unit_spread_and_zeros_for_a_flat_list():
    z = standardise(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert np.allclose(z[0], [-1.224745, 0.0, 1.224745])
    assert np.array_equal(z[1], [0.0, 0.0, 0.0])


def test_fused_scores_match_a_hand_computed_blend():
    # z(bi) = [1.2247, 0, -1.2247]; z(ce) = [-0.7071, -0.7071, 1.4142]
    bi, ce = np.array([0.9, 0.8, 0.7]), np.array([1.0, 1.0, 4.0])
    fused = fuse(bi, ce, 0.5)
    assert np.allclose(fused, [0.258819, -0.353553, 0.094734], atol=1e-6)
    assert list(np.argsort(-fused)) == [0, 2, 1]


def test_weight_one_keeps_the_cross_encoder_logits_and_zero_the_bi_encoder_order():
    bi, ce = np.array([0.9, 0.8, 0.7]), np.array([-2.0, 3.5, 0.25])
    assert np.array_equal(fuse(bi, ce, 1.0), ce)
    assert list(np.argsort(-fuse(bi, ce, 0.0))) == [0, 1, 2]


def test_bad_weights_shapes_and_candidate_counts_are_refused():
    with pytest.raises(InvalidInput, match="between 0 and 1"):
        fuse(np.zeros(2), np.zeros(2), 1.5)
    with pytest.raises(InvalidInput, match="one first-stage score per reranker score"):
        fuse(np.zeros(3), np.zeros(2), 0.5)
    with pytest.raises(InvalidInput, match="between 0 and 1"):
        RerankPolicy(weight=-0.1)
    with pytest.raises(InvalidInput, match="at least 1"):
        RerankPolicy(candidates=0)
