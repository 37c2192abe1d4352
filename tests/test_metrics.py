"""Shape metrics (SPEC section 2) against the formulas written plainly on fp64 SVD eigenvalues."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import tbfast
from oracle import filter_zeros, heavy_tailed, ks_fit, median_fit, svd_eigs


def _expected(W, fit="median", xmin_pos=2.0, filter=False, sr_mid_pos=None):
    e = svd_eigs(W)
    nz = filter_zeros(e) if filter else e
    a, d, i = median_fit(nz, xmin_pos) if fit == "median" else ks_fit(nz)
    s = nz if sr_mid_pos is None else nz[int(len(nz) / sr_mid_pos):]
    sv = np.sqrt(e)
    rank = np.sum(sv > sv.max() * max(W.shape) * np.finfo(np.float64).eps)
    p = e / e.sum() + 1e-10
    return {
        "num_evals": len(e), "spectral_norm": e[-1], "norm": e.sum(), "log_norm": math.log10(e.sum()),
        "log_spectral_norm": math.log10(e[-1]), "alpha": a, "D": d, "xmin": nz[i],
        "alphahat": a * math.log10(e[-1]), "stable_rank": s.sum() / s.max(),
        "norm_stable_rank": s.sum() / len(s), "eig_ratio": s.max() / s[len(s) // 2],
        "log_alpha_norm": math.log10(np.sum(e ** a)), "entropy": -np.sum(p * np.log(p)) / math.log(rank + 1e-10),
        "xmax": e[-1],
    }


@pytest.mark.parametrize("fit,filter,sr_mid_pos", [("median", False, None), ("ks", True, 2.0), ("median", True, 4.0)])
def test_every_metric_matches_formula(fit, filter, sr_mid_pos):
    mats = [heavy_tailed(70, 40, 1), heavy_tailed(33, 90, 2), heavy_tailed(64, 64, 3, df=50)]
    m = tbfast.layer_metrics(mats, fit=fit, filter_zeros=filter, sr_mid_pos=sr_mid_pos, dtype=torch.float64)
    for l, W in enumerate(mats):
        exp = _expected(W, fit=fit, filter=filter, sr_mid_pos=sr_mid_pos)
        for col, v in exp.items():
            assert float(m[col][l]) == pytest.approx(v, rel=1e-8), col
        assert m.status[l] == "ok"
        a = exp["alpha"]
        assert m.warning[l] == ("over-trained" if a < 2 else "under-trained" if a > 6 else "")
    df = m.to_pandas()
    assert list(df["name"]) == ["0", "1", "2"]
    assert df["alpha"].tolist() == pytest.approx(m.alpha.tolist())
    assert m["alpha_weighted"] is m.alphahat
    sub = m.select([2, 0])
    assert sub.names == ["2", "0"] and float(sub.alpha[1]) == float(m.alpha[0])


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 40), cols=st.integers(2, 40), seed=st.integers(0, 10_000),
       xmin_pos=st.sampled_from([1.5, 2.0, 3.0]))
def test_median_fit_property_any_shape(rows, cols, seed, xmin_pos):
    W = heavy_tailed(rows, cols, seed)
    m = tbfast.layer_metrics([W], xmin_pos=xmin_pos, dtype=torch.float64)
    e = svd_eigs(W)
    a, d, i = median_fit(e, xmin_pos)
    if math.isfinite(a):
        assert m.status[0] == "ok"
        assert float(m.alpha[0]) == pytest.approx(a, rel=1e-7)
        assert int(m.xmin_index[0]) == i
    else:
        assert m.status[0] != "ok"  # never a silent inf/NaN


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(2, 30), cols=st.integers(2, 30), seed=st.integers(0, 10_000))
def test_ks_fit_property_any_shape(rows, cols, seed):
    W = heavy_tailed(rows, cols, seed)
    sp = tbfast.esd([W], dtype=torch.float64)
    got = tbfast.fit_power_law(sp, fit="ks")
    a, d, k = ks_fit(sp[0].numpy())
    assert int(got.xmin_index[0]) == k
    assert float(got.D[0]) == pytest.approx(d, rel=1e-9, abs=1e-12)


def test_select_reindexes_per_layer_extra_entries():
    """`ESDMetrics.select` takes each per-layer entry of ``extra`` (e.g. a LoRA table's esd_path)
    at the selected rows, in their order; entries that are not per layer are kept as they are."""
    g = torch.Generator().manual_seed(0)
    layers = {f"l{i}": torch.randn(40 + 8 * i, 32, generator=g) for i in range(4)}
    m = tbfast.layer_metrics(layers)
    paths = ["update", "full", "update", "full"]
    m.extra["esd_path"] = list(paths)
    m.extra["marker"] = torch.arange(len(m)) * 10
    m.extra["note"] = "kept"
    sub = m.select([2, 0, 3])
    assert sub.names == ["l2", "l0", "l3"]
    assert sub.extra["esd_path"] == [paths[2], paths[0], paths[3]]
    assert sub.extra["marker"].tolist() == [20, 0, 30]
    assert sub.extra["note"] == "kept"
    assert m.extra["esd_path"] == paths  # the source table is unchanged
