"""`lora_esd`: the ESD of a PEFT LoRA model with its LoRA layers on the exact update path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..layers import Layer
from ..metrics import ESDMetrics, compute_metrics
from ..powerlaw import fit_power_law
from ..layers.modules import is_lora_module, lora_parts
from ..options import ESDOptions
from ..spectra import Spectra, esd_layers, layer_spectra, raise_on_nonfinite
from .cache import BaseSpectrumCache
from .stage import lora_item
from .update import DEFAULT_CANCEL_LIMIT, LoRAItem, lora_eigenvalues

__all__ = ["LoRASpectra", "lora_esd", "lora_metrics", "LoRAMetrics"]


@dataclass
class LoRASpectra:
    """`Spectra` (float64) of every layer and each layer's ``esd_path``: ``"update"`` (cached
    base spectrum + secular update), ``"full"`` (float64 eigensolve of the merged Gram) or
    ``"dense"`` (not a LoRA layer: float64 eigensolve of its weight)."""

    spectra: Spectra
    esd_path: list[str]
    cache: BaseSpectrumCache


def _lora_item(layer: Layer, lora_scaling: bool) -> LoRAItem | None:
    if layer.lora is not None:  # PEFT modules and adapter directories with base= (tbfast.lora.stage)
        return lora_item(layer)
    if layer.kind != "LoRA" or layer.module is None or not is_lora_module(layer.module):
        return None
    parts = lora_parts(layer.name, layer.module, lora_scaling)
    if parts is None:
        return None
    return LoRAItem(layer.name, parts[0], parts[1])


def lora_esd(model: torch.nn.Module, *, cache: BaseSpectrumCache | None = None, backend: str = "auto",
             cancel_limit: float = DEFAULT_CANCEL_LIMIT, check_finite: bool = True,
             **layer_options: Any) -> LoRASpectra:
    """Float64 ESD of every layer of ``model`` (layers as `tbfast.find_layers` picks them with
    ``layer_options``); PEFT LoRA layers use ``cache`` (a `BaseSpectrumCache`; a new one, with
    the default 2 GiB budget, when None) and ``tbfast::eigvalsh_update`` (``backend``: ``auto``,
    ``cpp``, ``torch``), the other layers a float64 eigensolve. Eigenvalues agree with a float64
    eigensolve of the merged weight's Gram to float64 rounding (``1e-12 * lambda_max``; see
    docs/ARCHITECTURE.md); a layer where that is not assured takes the full path."""
    if cache is None:
        cache = BaseSpectrumCache()
    elif not isinstance(cache, BaseSpectrumCache):
        raise TypeError(f"lora_esd: cache must be a tbfast.lora.BaseSpectrumCache (a file: "
                        f"BaseSpectrumCache.load(path)), got {type(cache).__name__}")
    layers = esd_layers(model, **layer_options)
    lora_scaling = bool(layer_options.get("lora_scaling", True))
    items = [_lora_item(l, lora_scaling) for l in layers]
    lora_pos = [i for i, it in enumerate(items) if it is not None]
    dense_pos = [i for i, it in enumerate(items) if it is None]
    results = lora_eigenvalues([items[i] for i in lora_pos], cache, backend=backend, cancel_limit=cancel_limit)
    per_layer: list[torch.Tensor | None] = [None] * len(layers)
    paths = ["dense"] * len(layers)
    for i, (vals, path) in zip(lora_pos, results):
        per_layer[i] = vals * layers[i].scale ** 2
        paths[i] = path
    if dense_pos:
        sp = layer_spectra([layers[i] for i in dense_pos], ESDOptions(dtype=torch.float64))
        for j, i in enumerate(dense_pos):
            per_layer[i] = sp.eigenvalues(j).cpu()
    values = torch.cat([v.cpu() for v in per_layer]) if per_layer else torch.zeros(0, dtype=torch.float64)
    offsets = torch.zeros(len(layers) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([v.numel() for v in per_layer], dtype=torch.int64), 0)
    spectra = Spectra(values=values, offsets=offsets, layers=layers)
    if check_finite:
        raise_on_nonfinite(spectra)
    return LoRASpectra(spectra, paths, cache)


def lora_metrics(model: torch.nn.Module, *, cache: BaseSpectrumCache | None = None, backend: str = "auto",
                 cancel_limit: float = DEFAULT_CANCEL_LIMIT, fit: str = "median", **options: Any) -> ESDMetrics:
    """`tbfast.layer_metrics` of ``model`` on `lora_esd`'s float64 spectra: the same table, with
    ``metrics.extra["esd_path"]`` (per layer: ``update``, ``full`` or ``dense``). ``options``:
    layer options (as for `tbfast.find_layers`) and fit options (as for `tbfast.fit_power_law`)."""
    fit_keys = ("xmin_pos", "filter_zeros", "evals_thresh", "bins", "xmin_bound", "fit_backend", "refine_lower_edge")
    fit_options = {k: options.pop(k) for k in list(options) if k in fit_keys}
    sr_mid_pos = options.pop("sr_mid_pos", None)
    res = lora_esd(model, cache=cache, backend=backend, cancel_limit=cancel_limit, **options)
    pl = fit_power_law(res.spectra, fit=fit, **fit_options)
    m = compute_metrics(res.spectra, pl, sr_mid_pos=sr_mid_pos)
    m.extra["esd_path"] = list(res.esd_path)
    return m


class LoRAMetrics:
    """A ``metrics_fn`` for `tbfast.TempBalance` on a PEFT LoRA model: every ESD refresh is
    `lora_metrics` with one `BaseSpectrumCache` kept across refreshes (the frozen base weights'
    eigendecompositions are computed once). ``options`` as for `lora_metrics`."""

    def __init__(self, cache: BaseSpectrumCache | None = None, **options: Any) -> None:
        self.cache = cache if cache is not None else BaseSpectrumCache()
        self.options = options

    def __call__(self, model: torch.nn.Module) -> ESDMetrics:
        with torch.no_grad():
            return lora_metrics(model, cache=self.cache, **self.options)
