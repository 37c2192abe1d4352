"""ESD benchmarks: latency of ESD + fit per workload, method and device; the KS scan alone;
accuracy against an fp64 SVD oracle.

Timing: every timed call starts and ends with a device synchronisation (``torch.cuda.synchronize``
on CUDA) and is measured with ``time.perf_counter``; the tbfast methods return a host-side table
(``tbfast.layer_metrics`` -> float64 CPU tensors), so the device->host copy is inside the time.
On CUDA every method gets one untimed warm-up call (Triton JIT, cuSOLVER handles, caching
allocator); on the CPU only ``tbfast`` does (loading the extension's ops), the others have
nothing to warm.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .reference import layer_matrices, reference_esd, reference_fit
from .workloads import get_workload

log = logging.getLogger(__name__)

__all__ = ["METHODS", "QUICK_METHODS", "sync", "time_call", "oracle_fp64", "run_esd_benchmark",
           "run_ks_benchmark", "WorkloadResult", "tbfast_metrics"]

#: Methods raced in the ESD benchmark. "reference" is the baseline (tbfast.bench.reference).
METHODS = ("reference", "svd", "gram", "tbfast")
QUICK_METHODS = ("reference", "gram", "tbfast")
METHOD_HELP = {
    "reference": "baseline: per-layer svdvals, sort, .item() syncs, per-layer fit (SPEC sec. 1-3)",
    "svd": "tbfast.layer_metrics(method='svd'): batched svdvals per shape, batched fits",
    "gram": "tbfast.layer_metrics(method='gram', eig_backend='torch', backend='torch'): "
            "Gram + torch.linalg.eigvalsh, torch fits",
    "tbfast": "tbfast.layer_metrics() defaults: Gram + batched eigensolver (C++/cuSOLVER), "
              "compiled fits (C++/Triton)",
}
_TYPES = (nn.Linear, nn.Conv2d)


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1
              ) -> tuple[list[float], Any]:
    """Run ``fn`` ``warmup`` times untimed then ``repeats`` times; returns (seconds, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


# ------------------------------------------------------------------------------- fp64 oracle

def _median_alpha64(e: np.ndarray, xmin_pos: float) -> float:
    N = len(e)
    i = int(N / xmin_pos)
    n = N - i
    return 1.0 + n / (np.sum(np.log(e[i:])) - n * np.log(e[i]))


def _ks_index64(e: np.ndarray) -> int:
    """SPEC section 4 in fp64: candidate k minimising D (first on ties)."""
    N = len(e)
    log_e = np.log(e)
    suffix = np.cumsum(log_e[::-1])[::-1]            # suffix[i] = sum(log e[i:])
    best_k, best_d = 0, math.inf
    for i in range(N - 1):
        n = N - i
        alpha = 1.0 + n / (suffix[i] - n * log_e[i])
        if alpha > 1:
            d = np.max(np.abs(1.0 - (e[i:] / e[i]) ** (1.0 - alpha) - np.arange(n) / n))
        else:
            d = 1.0
        if d < best_d:
            best_k, best_d = i, d
    return best_k


@dataclass
class Oracle:
    """fp64 SVD oracle of a workload: names, eigenvalues, median-fit alpha and KS xmin index."""
    names: list[str]
    eigs: list[np.ndarray]
    alpha: np.ndarray
    ks_index: np.ndarray | None


def oracle_fp64(model: nn.Module, xmin_pos: float = 2.0, ks: bool = True,
                only: set[str] | None = None) -> Oracle:
    """Eigenvalues by fp64 ``svdvals`` on the CPU; fits by the SPEC formulas in numpy fp64.
    ``only``: restrict to these layer names (a labelled subset, to save time)."""
    names, eigs = [], []
    for name, m in model.named_modules():
        if isinstance(m, _TYPES) and (only is None or name in only):
            mats = layer_matrices(m).detach().to("cpu", torch.float64)
            e = np.sort((torch.linalg.svdvals(mats).flatten() ** 2).numpy())
            names.append(name)
            eigs.append(e)
    alpha = np.array([_median_alpha64(e, xmin_pos) for e in eigs])
    ks_index = np.array([_ks_index64(e) for e in eigs]) if ks else None
    return Oracle(names, eigs, alpha, ks_index)


# ------------------------------------------------------------------------------- ESD methods

def tbfast_metrics(model: nn.Module, method: str, xmin_pos: float = 2.0):
    """ESD + median fit + all metrics with tbfast, to a host-side table (ESDMetrics)."""
    import tbfast

    opts: dict[str, Any] = {"types": ["Linear", "Conv2d"]}
    if method == "svd":
        return tbfast.layer_metrics(model, method="svd", xmin_pos=xmin_pos, **opts)
    if method == "gram":
        return tbfast.layer_metrics(model, method="gram", eig_backend="torch", backend="torch",
                                    xmin_pos=xmin_pos, **opts)
    if method == "tbfast":
        return tbfast.layer_metrics(model, xmin_pos=xmin_pos, **opts)
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def _alpha_of(method: str, out: Any) -> tuple[list[str], np.ndarray]:
    if method == "reference":
        return list(out["name"]), np.asarray(out["alpha"], dtype=np.float64)
    return list(out.names), out["alpha"].double().cpu().numpy()


@dataclass
class MethodResult:
    method: str
    seconds: float                     # median of repeats
    repeats: list[float]
    layers_per_s: float
    ratio_vs_reference: float | None = None   # reference seconds / this method's seconds
    max_alpha_rel_err: float | None = None    # vs the fp64 SVD oracle (median fit)
    oracle_layers: int | None = None          # layers the oracle checked
    ks_index_agreement: float | None = None   # fraction of layers with the oracle's KS xmin index
    ks_index_layers: int | None = None        # layers the agreement was measured on


@dataclass
class KSResult:
    reference_seconds: float           # full 'layers' layers (extrapolated if flagged)
    reference_measured_layers: int
    reference_extrapolated: bool
    tbfast_seconds: float
    ratio_vs_reference: float
    layers: int


@dataclass
class WorkloadResult:
    workload: str
    device: str
    layers: int
    num_evals: int
    methods: dict[str, MethodResult] = field(default_factory=dict)
    ks: KSResult | None = None
    notes: list[str] = field(default_factory=list)


def _subset(n: int, k: int | None) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)`` (all when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max(1, k)).round().astype(int).tolist()))


def run_esd_benchmark(workload: str, device: torch.device, methods=METHODS, repeats: int = 3,
                      xmin_pos: float = 2.0, oracle: bool = True, ks: bool = True,
                      ks_reference_layers: int | None = None, oracle_layers: int | None = None,
                      seed: int = 0) -> WorkloadResult:
    """Time every method on ``workload`` (weights moved to ``device``); accuracy vs fp64 oracle.

    ``ks_reference_layers``: time the reference KS loop on only this many layers and extrapolate
    linearly to all layers (flagged in the result); None = measure all layers.
    ``oracle_layers``: check accuracy on this many evenly spaced layers (None = all; flagged).
    """
    import tbfast

    model = get_workload(workload).build(seed)
    layers = [n for n, m in model.named_modules() if isinstance(m, _TYPES)]
    sub = _subset(len(layers), oracle_layers)
    orc = oracle_fp64(model, xmin_pos=xmin_pos, ks=ks, only={layers[i] for i in sub}) \
        if oracle else None
    model = model.to(device)
    n_evals = sum(int(layer_matrices(m).shape[0]) * min(m.weight.shape[0], m.weight.shape[1])
                  for m in model.modules() if isinstance(m, _TYPES))
    res = WorkloadResult(workload, str(device), len(layers), n_evals)
    for method in methods:
        if method == "reference":
            fn = lambda: reference_esd(model, xmin_pos=xmin_pos)  # noqa: E731
            warm = 1 if device.type == "cuda" else 0
        else:
            fn = lambda m=method: tbfast_metrics(model, m, xmin_pos)  # noqa: E731
            warm = 1 if device.type == "cuda" or method == "tbfast" else 0
        times, out = time_call(fn, device, repeats, warmup=warm)
        med = statistics.median(times)
        mr = MethodResult(method, med, times, len(layers) / med)
        names, alpha = _alpha_of(method, out)
        if names != layers:
            raise RuntimeError(f"{workload}/{method}: layer list differs from the model's "
                               f"Linear/Conv2d modules ({len(names)} vs {len(layers)})")
        if orc is not None:
            a = alpha[sub]
            mr.max_alpha_rel_err = float(np.max(np.abs(a - orc.alpha) / np.abs(orc.alpha)))
            mr.oracle_layers = len(sub)
        res.methods[method] = mr
    if "reference" in res.methods:
        ref_s = res.methods["reference"].seconds
        for mr in res.methods.values():
            mr.ratio_vs_reference = ref_s / mr.seconds
    if orc is not None and len(sub) < len(layers):
        res.notes.append(f"accuracy checked on {len(sub)} of {len(layers)} layers (evenly spaced)")
    if ks:
        spectra = tbfast.esd(model, types=["Linear", "Conv2d"])
        res.ks = run_ks_benchmark(spectra, device, repeats, ks_reference_layers)
        if orc is not None:
            _ks_accuracy(res, model, spectra, orc, methods, sub)
        if res.ks.reference_extrapolated:
            res.notes.append(f"reference KS time extrapolated from {res.ks.reference_measured_layers}"
                             f" of {res.ks.layers} layers")
    return res


def _ks_accuracy(res: WorkloadResult, model: nn.Module, spectra, orc: Oracle, methods,
                 sub: list[int]) -> None:
    """KS xmin index agreement with the oracle on layers ``sub``, per method (each method on its
    own eigenvalues)."""
    import tbfast

    for method in methods:
        mr = res.methods.get(method)
        if mr is None:
            continue
        if method == "reference":
            out = reference_esd(model, pl_fitting="goodness-of-fit", only=set(orc.names))
            idx = np.asarray(out["xmin_index"])
            mr.ks_index_agreement = float(np.mean(idx == orc.ks_index))
            mr.ks_index_layers = len(idx)
            continue
        if method == "tbfast":
            sp = spectra
        elif method == "svd":
            sp = tbfast.esd(model, method="svd", types=["Linear", "Conv2d"])
        else:
            sp = tbfast.esd(model, method="gram", eig_backend="torch", types=["Linear", "Conv2d"])
        fit = tbfast.fit_power_law(sp, fit="ks")
        idx = fit.xmin_index.cpu().numpy()[sub]
        mr.ks_index_agreement = float(np.mean(idx == orc.ks_index))
        mr.ks_index_layers = len(sub)


def run_ks_benchmark(spectra, device: torch.device, repeats: int = 3,
                     reference_layers: int | None = None) -> KSResult:
    """The KS scan alone (SPEC section 4) on the same eigenvalues: the reference's per-candidate
    Python loop (one layer after another) against ``tbfast.fit_power_law(fit='ks')``."""
    import tbfast

    L = len(spectra)
    per_layer = spectra.to_list()
    k = L if reference_layers is None else max(1, min(L, reference_layers))

    def ref_loop():
        return [reference_fit(per_layer[l], "goodness-of-fit") for l in range(k)]

    if device.type == "cuda":  # warm up on one layer only: the loop is long and has no JIT
        reference_fit(per_layer[0], "goodness-of-fit")
    ref_times, _ = time_call(ref_loop, device, 1, warmup=0)
    ref_s = ref_times[0] * L / k

    def fast():
        fit = tbfast.fit_power_law(spectra, fit="ks")
        return fit.alpha.cpu(), fit.xmin_index.cpu()

    times, _ = time_call(fast, device, max(repeats, 3), warmup=1)
    med = statistics.median(times)
    return KSResult(ref_s, k, k < L, med, ref_s / med, L)
