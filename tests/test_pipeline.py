"""The pipeline module and its option objects: `tbfast.pipeline.run` against an fp64 SVD oracle,
the frozen `ESDOptions` / `FitOptions` (one-line errors naming the option, before any work), the
``backend`` / ``fit_backend`` alias and `NonFiniteWeightsError`."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import tbfast
from oracle import fix_finger_fit, heavy_tailed, ks_fit, median_fit, svd_eigs
from tbfast.errors import STATUS_NONFINITE, STATUS_OK, NonFiniteWeightsError
from tbfast.options import ESDOptions, FitOptions, split_options
from tbfast.pipeline import PipelineResult, run


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 50))


@pytest.mark.parametrize("fit", ["median", "ks", "fix-finger"])
def test_run_matches_fp64_svd_oracle_on_a_small_model(fit):
    model = _small_model()
    layers = tbfast.find_layers(model)
    res = run(layers, ESDOptions(dtype=torch.float64), FitOptions(fit=fit))
    assert isinstance(res, PipelineResult)
    assert res.metrics.names == ["0", "2", "4"]
    for l, mod in enumerate([model[0], model[2], model[4]]):
        e = svd_eigs(mod.weight.detach())
        np.testing.assert_allclose(res.spectra.eigenvalues(l).numpy(), e, rtol=1e-9, atol=1e-12 * e[-1])
        a, d, i = {"median": median_fit, "ks": ks_fit, "fix-finger": fix_finger_fit}[fit](e)
        assert float(res.fit.alpha[l]) == pytest.approx(a, rel=1e-8)
        assert float(res.fit.D[l]) == pytest.approx(d, rel=1e-8, abs=1e-12)
        assert float(res.metrics.alpha[l]) == pytest.approx(a, rel=1e-8)
        assert float(res.metrics.xmin[l]) == pytest.approx(e[i], rel=1e-8)
        assert float(res.metrics.spectral_norm[l]) == pytest.approx(e[-1], rel=1e-9)
        assert float(res.metrics.log_norm[l]) == pytest.approx(math.log10(e.sum()), rel=1e-9)
        assert float(res.metrics.alphahat[l]) == pytest.approx(a * math.log10(e[-1]), rel=1e-8)
        assert res.metrics.status[l] == STATUS_OK


@pytest.mark.parametrize("make, needle", [
    (lambda: FitOptions(fit="hill"), "unknown fit 'hill'"),
    (lambda: FitOptions(xmin_pos=1.0), "xmin_pos"),
    (lambda: FitOptions(bins=0), "bins"),
    (lambda: FitOptions(xmin_bound="lower"), "xmin_bound"),
    (lambda: FitOptions(fit_backend="cuda"), "fit backend 'cuda'"),
    (lambda: ESDOptions(method="qr"), "ESD method 'qr'"),
    (lambda: ESDOptions(dtype=torch.float16), "dtype"),
    (lambda: ESDOptions(memory_budget=0), "memory_budget"),
    (lambda: ESDOptions(eig_backend="lapack"), "eigensolver backend 'lapack'"),
])
def test_bad_option_values_give_one_line_error_naming_the_option(make, needle):
    with pytest.raises(ValueError) as e:
        make()
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("entry", ["layer_metrics", "analyze"])
def test_bad_option_fails_before_any_eigensolve(monkeypatch, entry):
    import tbfast.spectra as spectra_mod
    calls = []
    monkeypatch.setattr(spectra_mod, "eigvalsh_batched", lambda *a, **k: calls.append(1))
    fn = tbfast.layer_metrics if entry == "layer_metrics" else tbfast.analyze
    with pytest.raises(ValueError, match="bins must be >= 1, got 0"):
        fn([heavy_tailed(30, 20, 1)], bins=0)
    with pytest.raises(TypeError, match=f"tbfast.{entry}: unexpected option"):
        fn(tbfast.layers_from_matrices([heavy_tailed(30, 20, 1)]), bogus=1)
    assert calls == []


def test_options_are_frozen_and_canonical():
    f = FitOptions(fit="goodness-of-fit")
    assert f.fit == "ks"
    with pytest.raises(AttributeError):
        f.bins = 3  # type: ignore[misc]
    assert ESDOptions(memory_budget=2.0**20).memory_budget == 1 << 20


def test_backend_is_the_alias_of_fit_backend():
    mats = [heavy_tailed(60, 40, 1), heavy_tailed(45, 45, 2, df=4)]
    by_alias = tbfast.layer_metrics(mats, fit="ks", backend="torch", dtype=torch.float64)
    by_name = tbfast.layer_metrics(mats, fit="ks", fit_backend="torch", dtype=torch.float64)
    for l, W in enumerate(mats):
        a = ks_fit(svd_eigs(W))[0]
        assert float(by_alias.alpha[l]) == pytest.approx(a, rel=1e-8)
        assert float(by_name.alpha[l]) == pytest.approx(a, rel=1e-8)
    # the alias reaches the fit backend: an unknown name is rejected as a fit backend
    with pytest.raises(ValueError, match="unknown fit backend 'nope'"):
        tbfast.layer_metrics(mats, backend="nope")
    with pytest.raises(ValueError, match="unknown fit backend 'nope'"):
        tbfast.analyze(mats, backend="nope")
    assert split_options({"backend": "torch"}, allowed=(FitOptions,))[FitOptions].fit_backend == "torch"
    for fn in (tbfast.layer_metrics, tbfast.analyze):
        with pytest.raises(TypeError, match="not both"):
            fn(mats, backend="torch", fit_backend="cpp")


def test_fit_power_law_takes_fit_options_or_keywords():
    mats = [heavy_tailed(64, 48, 3), heavy_tailed(40, 70, 4)]
    sp = tbfast.esd(mats, dtype=torch.float64)
    by_obj = tbfast.fit_power_law(sp, FitOptions(fit="median", xmin_pos=1.5))
    by_kw = tbfast.fit_power_law(sp, fit="median", xmin_pos=1.5)
    for l, W in enumerate(mats):
        a = median_fit(svd_eigs(W), 1.5)[0]
        assert float(by_obj.alpha[l]) == pytest.approx(a, rel=1e-9)
        assert float(by_kw.alpha[l]) == pytest.approx(a, rel=1e-9)
    with pytest.raises(TypeError, match="not both"):
        tbfast.fit_power_law(sp, FitOptions(), fit="ks")


def test_nonfinite_weights_error_type_message_and_mark():
    good = heavy_tailed(40, 30, 5)
    bad1, bad2 = heavy_tailed(40, 30, 6), heavy_tailed(20, 30, 7)
    bad1[3, 4] = float("nan")
    bad2[0, 0] = float("inf")
    mats = {"a": bad1, "b": good, "c": bad2}
    for call in (lambda: tbfast.layer_metrics(mats), lambda: tbfast.esd(mats),
                 lambda: tbfast.analyze(tbfast.layers_from_matrices(mats), min_evals=0)):
        with pytest.raises(NonFiniteWeightsError) as e:
            call()
        assert isinstance(e.value, ValueError)
        assert str(e.value) == "weights contain NaN or Inf in layer(s): a, c"
        assert e.value.layers == ["a", "c"]
    m = tbfast.layer_metrics(mats, on_invalid="mark", dtype=torch.float64)
    assert m.status == [STATUS_NONFINITE, STATUS_OK, STATUS_NONFINITE]
    assert float(m.alpha[1]) == pytest.approx(median_fit(svd_eigs(good))[0], rel=1e-8)


def test_failure_flags_keyword_and_its_former_name():
    mats = [heavy_tailed(30, 20, 8)]
    flags: list = []
    new = tbfast.esd(mats, dtype=torch.float64, failure_flags=flags)
    old = tbfast.esd(mats, dtype=torch.float64, eig_checks=[])
    np.testing.assert_allclose(new[0].numpy(), svd_eigs(mats[0]), rtol=1e-9)
    np.testing.assert_allclose(old[0].numpy(), svd_eigs(mats[0]), rtol=1e-9)
    assert flags == []  # the CPU solver checks convergence itself: nothing deferred
    with pytest.raises(TypeError, match="not both"):
        tbfast.esd(mats, failure_flags=[], eig_checks=[])
