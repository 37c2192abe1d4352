"""`tbfast.WeightWatcher` against weightwatcher 0.7.7 itself (the oracle) on all-MiniLM-L6-v2.

Switching is one import line, so the same call is made on both classes and every column,
the summary, ``describe()`` and ``get_ESD()`` are compared. WeightWatcher's ``analyze`` runs once
per module (a few seconds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

ww = pytest.importorskip("weightwatcher")
pd = pytest.importorskip("pandas")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tbfast import WeightWatcher  # noqa: E402

pytestmark = pytest.mark.slow

REL_1E4 = ["alpha", "D", "xmin", "xmax", "lambda_max", "spectral_norm", "log_spectral_norm", "norm", "log_norm",
           "stable_rank", "alpha_weighted", "log_alpha_norm", "num_evals", "N", "M", "num_pl_spikes",
           "matrix_rank", "rank_loss", "sv_max", "sigma", "Q", "rf", "weak_rank_loss"]


@pytest.fixture(scope="module")
def ww_run(minilm_state_dict):
    watcher = ww.WeightWatcher(model=minilm_state_dict)
    return watcher, watcher.analyze()


@pytest.fixture(scope="module")
def tb_run(minilm_state_dict):
    watcher = WeightWatcher(model=minilm_state_dict)
    return watcher, watcher.analyze()


@pytest.fixture(scope="module")
def merged(ww_run, tb_run):
    return tb_run[1].merge(ww_run[1], on="longname", suffixes=("", "_ww"))


def test_same_layers_ids_and_names(ww_run, tb_run):
    w, t = ww_run[1], tb_run[1]
    assert len(w) == 39
    assert list(t["longname"]) == list(w["longname"])
    for c in ("layer_id", "name", "layer_type", "has_esd", "status"):
        assert list(t[c]) == list(w[c]), c


def test_every_ww_column_present(ww_run, tb_run):
    assert set(ww_run[1].columns) <= set(tb_run[1].columns)
    assert list(tb_run[1].columns[:2]) == ["layer_id", "name"]


@pytest.mark.parametrize("column", REL_1E4)
def test_column_agrees(merged, column):
    assert len(merged) == 39
    for row in merged.itertuples(index=False):
        ours, theirs = getattr(row, column), getattr(row, column + "_ww")
        assert ours == pytest.approx(theirs, rel=1e-4, abs=0), f"{row.longname}: {column} {ours} vs {theirs}"


def test_entropy_and_sv_min_agree(merged):
    for row in merged.itertuples(index=False):
        assert row.entropy == pytest.approx(row.entropy_ww, rel=1e-3), row.longname
        # the smallest singular value from float64 Gram eigenvalues: sqrt(eps) * sv_max absolute
        assert row.sv_min == pytest.approx(row.sv_min_ww, rel=1e-3, abs=1e-7 * row.sv_max_ww), row.longname


def test_same_warnings(merged):
    assert list(merged["warning"]) == list(merged["warning_ww"])
    assert set(merged["warning"]) >= {"", "over-trained", "under-trained"}  # MiniLM has all three


def test_summary_means(ww_run, tb_run):
    theirs, ours = ww_run[0].get_summary(), tb_run[0].get_summary()
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k] == pytest.approx(float(theirs[k]), rel=1e-6), k
    assert tb_run[0].get_details() is tb_run[1]


def test_describe_matches(ww_run, tb_run):
    pd.testing.assert_frame_equal(tb_run[0].describe(), ww_run[0].describe(), check_dtype=False)
    assert len(tb_run[0].describe(min_evals=0)) == len(ww_run[0].describe(min_evals=0)) == 40


def test_describe_module_route(minilm_model):
    ours = WeightWatcher(model=minilm_model).describe(start_ids=1)
    theirs = ww.WeightWatcher(model=minilm_model).describe(start_ids=1)
    pd.testing.assert_frame_equal(ours, theirs, check_dtype=False)
    kept = WeightWatcher(model=minilm_model).describe(layers=["embedding"])
    assert list(kept["longname"]) == ["embeddings.word_embeddings", "embeddings.position_embeddings"]


def test_get_esd_matches(ww_run, tb_run, minilm_state_dict):
    """By WeightWatcher layer id and by name: the fp64 SVD eigenvalues of that weight (oracle)."""
    from oracle import svd_eigs

    name = ww_run[1].set_index("layer_id").loc[7, "longname"]  # WeightWatcher's id 7
    expected = svd_eigs(minilm_state_dict[name + ".weight"])
    ours = tb_run[0].get_ESD(layer=7)
    assert ours.shape == (384,)
    np.testing.assert_allclose(ours, expected, rtol=1e-8, atol=1e-12 * expected.max())
    by_name = tb_run[0].get_ESD(layer="encoder.layer.3.output.dense")
    expected = svd_eigs(minilm_state_dict["encoder.layer.3.output.dense.weight"])
    np.testing.assert_allclose(by_name, expected, rtol=1e-8, atol=1e-12 * expected.max())
    with pytest.raises(ValueError, match="no layer 9999"):
        tb_run[0].get_ESD(layer=9999)


def test_layers_filter_selects_ww_rows(ww_run, minilm_state_dict):
    w = ww_run[1]
    t = WeightWatcher(model=minilm_state_dict).analyze(layers=[7, 41, 53])
    assert list(t["layer_id"]) == [7, 41, 53]
    exp = w.set_index("layer_id").loc[[7, 41, 53]]
    np.testing.assert_allclose(t["alpha"], exp["alpha"], rtol=1e-9)
    skipped = WeightWatcher(model=minilm_state_dict).describe(layers=[-7, -41])
    assert set(skipped["layer_id"]) == set(w["layer_id"]) - {7, 41}


def test_small_n_fit_matches_ww():
    """Layers with 8..19 eigenvalues: WeightWatcher's small-N power-law fit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 15), nn.ReLU(), nn.Linear(15, 64))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p) ** 3 * 4)  # heavier tails than the default init
    theirs = ww.WeightWatcher(model=model).analyze()
    ours = WeightWatcher(model=model).analyze()
    assert list(ours["layer_id"]) == list(theirs["layer_id"]) and len(ours) == 3
    for c in ("alpha", "D", "xmin", "sigma", "num_pl_spikes", "alpha_weighted", "log_alpha_norm"):
        np.testing.assert_allclose(ours[c], theirs[c], rtol=1e-9, err_msg=c)
    assert list(ours["warning"]) == list(theirs["warning"])


@pytest.mark.parametrize("option,value", [("randomize", True), ("mp_fit", True), ("fix_fingers", "clip_xmax"),
                                          ("fit", "TPL"), ("glorot_fix", True), ("pool", False),
                                          ("intra", True), ("xmax", "force"), ("peft", True)])
def test_unsupported_option_names_itself(minilm_state_dict, option, value):
    with pytest.raises(ValueError, match=rf"{option}="):
        WeightWatcher(model=minilm_state_dict).analyze(layers=[7], **{option: value})


def test_unknown_keyword_and_missing_model():
    with pytest.raises(TypeError, match="no_such_option"):
        WeightWatcher(model={"a.weight": torch.ones(20, 20)}).analyze(no_such_option=1)
    with pytest.raises(ValueError, match="no model"):
        WeightWatcher().analyze()


def test_failed_fit_reports_ww_sentinels():
    """An all-zero layer cannot be fitted: WeightWatcher's -1 sentinels and status 'failed'."""
    sd = {"zero.weight": torch.zeros(30, 20), "ok.weight": torch.randn(60, 40, generator=torch.Generator().manual_seed(1))}
    d = WeightWatcher(model=sd).analyze()
    z = d.set_index("longname").loc["zero"]
    assert z["status"] == "failed" and z["alpha"] == -1 and z["num_pl_spikes"] == -1
    assert "zero" in z["status_detail"]
    assert math.isnan(z["alpha_weighted"])
    assert d.set_index("longname").loc["ok", "status"] == "success"
