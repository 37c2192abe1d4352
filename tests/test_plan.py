"""tbfast.tempbalance.plan: ESD table columns -> schedule factors, against the SPEC 6-7 formulas written here.

No model, no optimizer: the inputs are plain lists, the expected factors are computed in this
file with loops and the formulas (linear map, TB_Sigmoid, block means, within-block map,
normalisation to mean 1). The end-to-end oracle stays tests/test_tempbalance.py.
"""
import math

import numpy as np
import pytest
import torch

from tbfast.tempbalance.plan import check_rows, plan_schedule, select_rows, table_column
from tbfast.tempbalance.options import TempBalanceOptions


def lin(x, xs, lo=0.5, hi=1.5):
    """The linear map of x from [min xs, max xs] onto [lo, hi], written plainly."""
    a, b = min(xs), max(xs)
    return lo + (x - a) / (b - a) * (hi - lo)


def sigmoid_factor(x, xs, tau, s):
    d = x - sum(xs) / len(xs)
    sd = (s[0] if d <= 0 else s[1]) if isinstance(s, tuple) else s
    return 10 ** (sd * (1 / (1 + math.exp(-tau * d)) - 0.5))


def opts(**kw):
    return TempBalanceOptions(**kw)


def test_select_rows_removes_ends_and_small_layers():
    num_evals = [64, 10, 64, 64, 64]
    assert select_rows(num_evals, opts()) == [2, 3]  # first and last removed, row 1 below eigs_thresh=50
    assert select_rows(num_evals, opts(remove_first_layer=False, remove_last_layer=False, eigs_thresh=0)) == \
        [0, 1, 2, 3, 4]
    assert select_rows(num_evals, opts(remove_last_layer=False, eigs_thresh=11)) == [2, 3, 4]
    with pytest.raises(ValueError, match=r"no layer left to schedule .* eigs_thresh=100 \(5 analysed layers\)"):
        select_rows(num_evals, opts(eigs_thresh=100))


def test_check_rows_names_the_layer():
    names = ["a", "b", "c"]
    check_rows(names, np.array([2.0, 3.0, float("nan")]), ["ok", "ok", "ok"], [0, 1], "alpha")  # row 2 not selected
    with pytest.raises(ValueError, match=r"layer 'b' has no usable ESD fit \(all eigenvalues are zero\)"):
        check_rows(names, np.array([2.0, 3.0, 4.0]), ["ok", "all eigenvalues are zero", "ok"], [0, 1, 2], "alpha")
    with pytest.raises(ValueError, match=r"layer 'c' has a non-finite stable_rank \(inf\)"):
        check_rows(names, np.array([2.0, 3.0, float("inf")]), ["ok"] * 3, [0, 1, 2], "stable_rank")


def test_layer_linear_map_and_normalize():
    names = ["l0", "l1", "l2", "l3"]
    scores = [2.0, 4.0, 3.0, 2.5]
    plan = plan_schedule(names, scores, [False] * 4, opts())
    want = [lin(x, scores) for x in scores]
    assert list(plan.ratios) == names and list(plan.layer_ratio) == names
    assert list(plan.ratios.values()) == pytest.approx(want, rel=1e-12)
    assert plan.layer_ratio == plan.ratios
    assert list(plan.scores.values()) == scores
    normed = plan_schedule(names, scores, [False] * 4, opts(normalize=True))
    mean = sum(want) / len(want)
    assert list(normed.ratios.values()) == pytest.approx([w / mean for w in want], rel=1e-12)


def test_equal_scores_mid_or_reference():
    assert list(plan_schedule(["a", "b"], [3.0, 3.0], [False] * 2, opts()).ratios.values()) == [1.0, 1.0]
    ref = plan_schedule(["a", "b"], [3.0, 3.0], [False] * 2, opts(linear_map_equal="reference"))
    assert list(ref.ratios.values()) == [1.5, 1.5]  # numpy interp's upper end


def test_block_sigmoid_from_block_means():
    names = ["h.0.q", "h.0.k", "h.1.q", "h.1.k", "head"]
    scores = [2.0, 3.0, 4.0, 6.0, 100.0]  # 'head' is in no block: outside the block statistics
    plan = plan_schedule(names, scores, [False] * 5, opts(granularity="block", assign_func="tb_sigmoid",
                                                        tau=3.0, s=(2.0, 1.0)))
    means = [2.5, 5.0]
    want = {f"block.{b}": sigmoid_factor(m, means, 3.0, (2.0, 1.0)) for b, m in enumerate(means)}
    assert list(plan.ratios) == ["block.0", "block.1"]
    for k, v in want.items():
        assert plan.ratios[k] == pytest.approx(v, rel=1e-12)
    assert plan.scores == {"block.0": 2.5, "block.1": 5.0}
    assert plan.layer_ratio == {"h.0.q": want["block.0"], "h.0.k": want["block.0"],
                                "h.1.q": want["block.1"], "h.1.k": want["block.1"]}


def test_layer_in_block_maps_inside_each_block():
    names = ["h.0.q", "h.0.k", "h.0.v", "h.1.q", "h.1.k"]
    scores = [2.0, 4.0, 3.0, 5.0, 5.0]
    plan = plan_schedule(names, scores, [False] * 5, opts(granularity="layer_in_block", lr_slope=0.8))
    b0, b1 = lin(3.0, [3.0, 5.0]), lin(5.0, [3.0, 5.0])  # block means 3, 5 -> 0.5, 1.5
    assert plan.ratios["block.0"] == pytest.approx(b0) and plan.ratios["block.1"] == pytest.approx(b1)
    lo, hi = 0.5, 0.5 + 0.8
    for n, x in zip(names[:3], scores[:3]):
        assert plan.ratios[n] == pytest.approx(lin(x, scores[:3], lo, hi) * b0, rel=1e-12)
    for n in names[3:]:  # equal scores in a block: the middle of the range
        assert plan.ratios[n] == pytest.approx((lo + hi) / 2 * b1, rel=1e-12)
    assert {n: plan.layer_ratio[n] for n in names} == {n: plan.ratios[n] for n in names}


def test_block_pattern_without_match_is_an_error():
    with pytest.raises(ValueError, match="no scheduled layer name matches the block pattern"):
        plan_schedule(["fc1", "fc2"], [2.0, 3.0], [False, False], opts(granularity="block"))


def test_flat_untuned_layer_leaves_the_scores():
    names = ["a", "b", "c", "d"]
    scores = [2.0, 1e6, 3.0, 4.0]
    plan = plan_schedule(names, scores, [False, True, False, False], opts(flat_policy="untuned"))
    others = [2.0, 3.0, 4.0]
    assert plan.ratios == pytest.approx({"a": lin(2.0, others), "b": 1.0, "c": lin(3.0, others), "d": lin(4.0, others)})
    assert list(plan.ratios) == names and plan.scores["b"] == 1e6
    keep = plan_schedule(names, scores, [False, True, False, False], opts(flat_policy="keep"))
    assert keep.ratios["a"] == pytest.approx(lin(2.0, scores)) and keep.ratios["b"] == pytest.approx(1.5)


def test_flat_untuned_blocks():
    names = ["h.0.q", "h.0.k", "h.1.q", "h.1.k", "h.2.q"]
    scores = [2.0, 1e6, 1e6, 1e6, 4.0]
    flat = [False, True, True, True, False]
    plan = plan_schedule(names, scores, flat, opts(granularity="block", flat_policy="untuned"))
    # block 0 mean from h.0.q only (2), block 2 from h.2.q (4); block 1 all flat: factor 1, mean of its scores
    assert plan.ratios == pytest.approx({"block.0": 0.5, "block.1": 1.0, "block.2": 1.5})
    assert plan.scores["block.1"] == 1e6
    assert plan.layer_ratio == pytest.approx({"h.0.q": 0.5, "h.0.k": 0.5, "h.1.q": 1.0, "h.1.k": 1.0, "h.2.q": 1.5})
    every = plan_schedule(["a", "b"], [1e6, 1e6], [True, True], opts(flat_policy="untuned"))
    assert every.ratios == {"a": 1.0, "b": 1.0}


def test_bad_factor_is_an_error():
    with pytest.raises(ValueError, match=r"invalid learning-rate factor for \['b'\]"):
        plan_schedule(["a", "b"], [1.0, 2.0], [False] * 2, opts(assign_func=lambda s, lr: np.array([1.0, -1.0])))


def test_table_column_float64_from_tensors_and_lists():
    table = {"alpha": torch.tensor([2.5, 3.5], dtype=torch.float32), "num_evals": [3, 4]}
    col = table_column(table, "alpha")
    assert isinstance(col, np.ndarray) and col.dtype == np.float64 and col.tolist() == [2.5, 3.5]
    assert table_column(table, "num_evals").tolist() == [3.0, 4.0]
    with pytest.raises(KeyError, match="ESD table has no column 'entropy'"):
        table_column(table, "entropy")

