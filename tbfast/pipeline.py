"""The analysis pipeline: layers -> spectra -> power-law fits -> metrics, in one batched pass.

`run` takes a list of `Layer` and the frozen stage options (`ESDOptions`, `FitOptions`) and
returns a `PipelineResult`. It owns the two cross-stage rules:

- **one host synchronisation**: the ESD stage leaves the GPU eigensolver's failure flags on the
  device (``failure_flags``) and `compute_metrics` copies them to the host together with the
  metrics;
- **the retry**: if the batched eigensolver flagged a matrix, the whole pass is redone once with
  ``torch.linalg.eigvalsh`` (``eig_backend="torch"``).

`layer_metrics` is the public entry point (`tbfast.layer_metrics`): keyword options in, an
`ESDMetrics` table out. The process-group variant is `tbfast.distributed.run`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._transfer import to_device
from .errors import STATUS_NONFINITE, NonFiniteWeightsError
from .layers import Layer
from .metrics import ESDMetrics, compute_metrics
from .options import ESDOptions, FitOptions, take_options
from .powerlaw import PowerLawFit, fit_power_law
from .spectra import Spectra, layer_spectra, esd_layers

__all__ = ["PipelineResult", "run", "layer_metrics", "check_on_invalid", "raise_nonfinite"]

log = logging.getLogger(__name__)

ON_INVALID = ("raise", "mark")


@dataclass
class PipelineResult:
    """What one pass produced: the eigenvalues, the power-law fits and the metrics table
    (``spectra`` and ``fit`` are None from `tbfast.distributed.run` without ``with_spectra``)."""

    spectra: Spectra | None
    fit: PowerLawFit | None
    metrics: ESDMetrics


def check_on_invalid(on_invalid: str) -> None:
    """One-line error for an ``on_invalid`` other than ``'raise'`` / ``'mark'``."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be 'raise' or 'mark', got {on_invalid!r}")


def raise_nonfinite(m: ESDMetrics) -> None:
    """Raise `NonFiniteWeightsError` naming the layers of ``m`` whose weights hold NaN or Inf."""
    bad = [n for n, s in zip(m.names, m.status) if s == STATUS_NONFINITE]
    if bad:
        raise NonFiniteWeightsError(bad)


def _fit_safe(spectra: Spectra) -> Spectra:
    """The spectra with every layer that holds a NaN/Inf replaced by zeros, so the fit kernels
    get finite, non-negative, ascending input (zeroing single values could break the order).
    Those layers get a status from `compute_metrics`, which reads the original values; no host sync."""
    bad = ~torch.isfinite(spectra.values)
    L = len(spectra)
    seg = to_device(np.repeat(np.arange(L), spectra.counts.numpy()), spectra.values.device)
    bad_layer = torch.zeros(L, dtype=torch.int64, device=bad.device).index_add_(0, seg, bad.to(torch.int64)) > 0
    values = torch.where(bad_layer[seg], torch.zeros_like(spectra.values), spectra.values)
    return Spectra(values=values, offsets=spectra.offsets, layers=spectra.layers, eig_scale=spectra.eig_scale)


def run(layers: list[Layer], esd_options: ESDOptions = ESDOptions(), fit_options: FitOptions = FitOptions(),
        *, on_invalid: str = "raise", lora_cache: Any = None, lora_min_ratio: float = 0.0,
        lora_cpu_only: bool = False) -> PipelineResult:
    """ESD, power-law fit and shape metrics of ``layers`` in one batched pass (one host sync).

    Layers whose weights hold NaN/Inf raise `NonFiniteWeightsError` naming them
    (``on_invalid='raise'``) or get a status (``'mark'``); other layers that cannot be fitted
    (all-zero, too few eigenvalues) always get a status with the reason. ``lora_cache`` (and
    ``lora_min_ratio``, ``lora_cpu_only``): LoRA layers take the exact update path
    (`tbfast.spectra.layer_spectra`); ``metrics.extra["esd_path"]`` then says each layer's path.
    """
    check_on_invalid(on_invalid)
    failure_flags: list = []
    lora = {"lora_cache": lora_cache, "lora_min_ratio": lora_min_ratio, "lora_cpu_only": lora_cpu_only}
    spectra = layer_spectra(layers, esd_options, failure_flags=failure_flags, **lora)
    pl = fit_power_law(_fit_safe(spectra), fit_options)
    m = compute_metrics(spectra, pl, sr_mid_pos=fit_options.sr_mid_pos, failure_flags=failure_flags)
    if m.extra.get("eig_failed"):
        # rare: the batched GPU solver flagged a matrix; redo the whole pass with torch's solver
        log.warning("batched eigensolver did not converge on some matrix; recomputing with torch.linalg.eigvalsh")
        return run(layers, dataclasses.replace(esd_options, eig_backend="torch"), fit_options, on_invalid=on_invalid,
                   **lora)
    if spectra.esd_path is not None:
        m.extra["esd_path"] = list(spectra.esd_path)
    if on_invalid == "raise":
        raise_nonfinite(m)
    return PipelineResult(spectra=spectra, fit=pl, metrics=m)


def layer_metrics(source: Any, *, on_invalid: str = "raise", **options: Any) -> ESDMetrics:
    """ESD, power-law fit and shape metrics of every layer of ``source`` in one batched pass.

    ``source`` and the layer options (``types``, ``include_embedding``, ``conv_norm``, ...) as
    for `tbfast.esd`. ESD options (`tbfast.options.ESDOptions`): ``method="auto"``,
    ``dtype=torch.float32``, ``device``, ``memory_budget``, ``progress``, ``eig_backend="auto"``,
    ``allow_tf32``. Fit options (`tbfast.options.FitOptions`, as for `tbfast.fit_power_law`):
    ``fit="median"``, ``xmin_pos=2.0``, ``filter_zeros=False``, ``evals_thresh=1e-5``,
    ``bins=100``, ``xmin_bound="reference"``, ``sr_mid_pos=None``, ``fit_backend="auto"``
    (alias ``backend``), ``refine_lower_edge=True``. ``on_invalid`` as for `run`.
    ``lora_cache``: a `tbfast.lora.BaseSpectrumCache`: LoRA layers take the exact update path
    (as for `tbfast.esd`) and ``metrics.extra["esd_path"]`` says which did.
    """
    check_on_invalid(on_invalid)
    lora_cache = options.pop("lora_cache", None)
    opts, layer_options = take_options(options, where="tbfast.layer_metrics")
    layers = esd_layers(source, **layer_options)
    return run(layers, opts[ESDOptions], opts[FitOptions], on_invalid=on_invalid, lora_cache=lora_cache).metrics
