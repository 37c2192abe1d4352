"""Assignment functions (tbfast.tempbalance.assign) against hand-computed values and SPEC 6-7 formulas."""
import math

import numpy as np
import pytest
import torch

from tbfast.tempbalance import assign as S


def test_linear_map_hand_values():
    # scores 1..3 onto [0.5, 1.5] * 0.2: 1 -> 0.1, 2 -> 0.2, 3 -> 0.3, 2.5 -> 0.25
    out = S.tb_linear_map(np.array([3.0, 1.0, 2.0, 2.5]), 0.2)
    np.testing.assert_allclose(out, [0.3, 0.1, 0.2, 0.25], rtol=1e-12)


def test_linear_map_equal_scores():
    # numpy interp returns the upper end; tbfast's default is the middle of the range
    assert np.allclose(S.tb_linear_map([2.0, 2.0], 0.1, 0.5, 1.5, equal_scores="reference"), [0.15, 0.15])
    assert np.allclose(S.tb_linear_map([2.0, 2.0], 0.1, 0.6, 1.0), [0.08, 0.08])
    assert np.allclose(S.tb_linear_map([7.0], 0.1), [0.1])


def test_sqrt_log2_hand_values():
    # sqrt: [1, 4, 9] -> [1, 2, 3] / 6 * 3 * lr
    np.testing.assert_allclose(S.tb_sqrt([1.0, 4.0, 9.0], 0.6), [0.3, 0.6, 0.9], rtol=1e-12)
    # log2: [2, 4, 8] -> [1, 2, 3] / 6 * 3 * lr
    np.testing.assert_allclose(S.tb_log2([2.0, 4.0, 8.0], 0.6), [0.3, 0.6, 0.9], rtol=1e-12)


def test_step_ranks():
    # ranks of [5, 1, 3, 3] (ties by position): [3, 0, 1, 2]; lr * (0.5 + r / 4)
    out = S.tb_step([5.0, 1.0, 3.0, 3.0], 1.0)
    np.testing.assert_allclose(out, [1.25, 0.5, 0.75, 1.0], rtol=1e-12)


def test_sigmoid_hand_values():
    # scores [1, 2, 6], mean 3, tau 2, s 0.5 (values computed by hand with math.exp)
    out = S.tb_sigmoid([1.0, 2.0, 6.0], 0.1, tau=2.0, s=0.5)
    np.testing.assert_allclose(out, [0.05741073473955344, 0.06450620033357406, 0.17732243581710186], rtol=1e-12)


def test_sigmoid_pair_uses_below_and_above():
    # diffs -1, 0, +1 with tau 10, s = (2, 1): 1e-3 * 10 ** (s_d * (sigmoid(10 d) - 0.5))
    out = S.tb_sigmoid([2.0, 3.0, 4.0], 1e-3, tau=10, s=(2, 1))
    np.testing.assert_allclose(out, [0.00010002090867670476, 0.001, 0.003161947116795425], rtol=1e-12)


def test_sigmoid_no_overflow():
    out = S.tb_sigmoid([0.0, 1e6], 1.0, tau=10.0, s=1.0)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [10 ** -0.5, 10 ** 0.5], rtol=1e-12)


def test_homogeneous_in_lr():
    sc = np.array([2.1, 3.7, 2.9, 5.0])
    for name in S.ASSIGN_FUNCS:
        a = np.asarray(S.assign_lrs(name, sc, 1.0))
        b = np.asarray(S.assign_lrs(name, sc, 0.37))
        np.testing.assert_allclose(b, 0.37 * a, rtol=1e-12, err_msg=name)


def test_tensor_in_tensor_out():
    t = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float32)
    out = S.tb_linear_map(t, 1.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert torch.allclose(out, torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))


def test_normalize_mean():
    out = S.normalize_mean(np.array([1.0, 2.0, 3.0]), 0.5)
    assert math.isclose(float(np.mean(out)), 0.5, rel_tol=1e-12)
    np.testing.assert_allclose(out, [0.25, 0.5, 0.75])


def test_blocks():
    assert S.block_of("roberta.encoder.layer.7.attention.self.query") == 7
    assert S.block_of("encoder.layer.11.output.LayerNorm.weight") == 11
    assert S.block_of("h.3.mlp.experts.5.fc") == 3
    assert S.block_of("classifier.dense") is None
    assert S.block_of("0.weight") is None
    order, means = S.block_means([1.0, 3.0, 5.0, 9.0], [2, 2, None, 0])
    assert order == [2, 0]
    np.testing.assert_allclose(means, [2.0, 9.0])


def test_within_block():
    # block 0 lr 1.0: scores 1, 3 -> [0.5, 1.5]; block 1 single layer -> middle (1.0 * 2.0)
    out = S.within_block_lrs([1.0, 3.0, 4.0], [0, 0, 1], {0: 1.0, 1: 2.0}, 0.5, 1.0)
    np.testing.assert_allclose(out, [0.5, 1.5, 2.0])


@pytest.mark.parametrize("bad, match", [
    (lambda: S.assign_lrs("tb_cubic", [1.0, 2.0], 1.0), "unknown assign_func"),
    (lambda: S.tb_linear_map([1.0, 2.0], 1.0, -0.5, 1.5), "lr_min_ratio"),
    (lambda: S.tb_linear_map([1.0, float("nan")], 1.0, names=["a", "b"]), "layer 'b'"),
    (lambda: S.tb_sqrt([1.0, -2.0], 1.0), "negative score"),
    (lambda: S.tb_log2([1.0, 2.0], 1.0), "<= 1"),
    (lambda: S.tb_sigmoid([1.0, 2.0], 1.0, s=(1, 2, 3)), "pair"),
    (lambda: S.tb_sigmoid([1.0, 2.0], 1.0, tau=0), "tau"),
    (lambda: S.tb_linear_map([], 1.0), "no scores"),
    (lambda: S.tb_step([1.0], -1.0), "learning rate"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
