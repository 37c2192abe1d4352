"""pytest-benchmark runner: ESD + median fit + metrics per workload and method, and the KS scan.

Each timed call ends with a device synchronisation and returns a host-side result. Results are
checked against the labelled reference so a fast wrong answer cannot win.
"""
import numpy as np
import pytest
import torch

import tbfast
from tbfast.bench.esd_bench import sync, tbfast_metrics
from tbfast.bench.reference import reference_esd, reference_fit

TYPES = ["Linear", "Conv2d"]


def _run(benchmark, fn, device, rounds):
    def call():
        out = fn()
        sync(device)
        return out
    return benchmark.pedantic(call, rounds=rounds, iterations=1,
                              warmup_rounds=0 if device.type == "cpu" else 1)


@pytest.mark.parametrize("method", ["reference", "svd", "gram", "tbfast"])
def test_esd_median_fit(benchmark, model, workload, device, method):
    benchmark.group = f"esd+fit {workload} {device.type}"
    n_layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    benchmark.extra_info.update(workload=workload, method=method, layers=n_layers)
    if method == "reference":
        out = _run(benchmark, lambda: reference_esd(model), device, rounds=1)
        alpha = np.asarray(out["alpha"])
    else:
        tbfast_metrics(model, method)  # warm-up (JIT, handles)
        out = _run(benchmark, lambda: tbfast_metrics(model, method), device, rounds=3)
        alpha = out["alpha"].numpy()
        ref = np.asarray(reference_esd(model)["alpha"])
        np.testing.assert_allclose(alpha, ref, rtol=1e-3)
    assert len(alpha) == n_layers


@pytest.mark.parametrize("impl", ["reference-loop-4-layers", "tbfast-all-layers"])
def test_ks_scan(benchmark, model, workload, device, impl):
    """KS scan on the same eigenvalues. The reference loop is timed on 4 layers only (it is
    O(N^2) Python work per layer); extra_info['layers'] says how many layers each row covers."""
    benchmark.group = f"ks-scan {workload} {device.type}"
    spectra = tbfast.esd(model, types=TYPES)
    if impl.startswith("reference"):
        per_layer = spectra.to_list()[:4]
        benchmark.extra_info.update(layers=len(per_layer))
        _run(benchmark, lambda: [reference_fit(e, "goodness-of-fit") for e in per_layer], device, 1)
    else:
        benchmark.extra_info.update(layers=len(spectra))
        tbfast.fit_power_law(spectra, fit="ks")
        fit = _run(benchmark, lambda: tbfast.fit_power_law(spectra, fit="ks").xmin_index.cpu(),
                   device, 5)
        expect = [reference_fit(e, "goodness-of-fit")[2] for e in spectra.to_list()[:4]]
        assert fit[:4].tolist() == expect
