"""The HT-SR report: one row per layer, WeightWatcher-style column names.

`analyze` takes a model, a state dict, a checkpoint file or directory (safetensors, ``.pt``/``.bin``,
sharded), or a PEFT LoRA adapter directory, and returns a pandas DataFrame. Checkpoint tensors are
read lazily, a few at a time, within ``memory_budget`` (the ESD stage chunks layers by Gram size).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import STATUS_OK
from .layers import Layer
from .metrics import ESDMetrics
from .options import ESDOptions, FitOptions, LayerOptions, split_options
from .pipeline import run
from .powerlaw import PowerLawFit
from .sources import build_layers
from .spectra import Spectra

__all__ = ["analyze", "analyze_spectra", "summary", "Analysis", "COLUMNS", "SUMMARY_COLUMNS",
           "WW_MIN_EVALS", "WW_MAX_EVALS"]

logger = logging.getLogger(__name__)

WW_MIN_EVALS = 10
WW_MAX_EVALS = 15000

COLUMNS = (
    "layer_id", "name", "type", "N", "M", "rf", "num_evals", "alpha", "alpha_weighted", "D", "xmin",
    "xmax", "spectral_norm", "log_spectral_norm", "norm", "log_norm", "stable_rank", "entropy",
    "log_alpha_norm", "block", "warning", "status",
)
SUMMARY_COLUMNS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm",
                   "stable_rank", "entropy", "D")
_DEFAULTS = {FitOptions: {"fit": "ks"},  # WeightWatcher's power-law fit and layer selection
             LayerOptions: {"min_evals": WW_MIN_EVALS, "max_evals": WW_MAX_EVALS, "include_embedding": True}}


@dataclass
class Analysis:
    """Everything one analysis produced: the table, the eigenvalues and the fits."""

    details: Any  # pandas.DataFrame
    spectra: Spectra
    fit: PowerLawFit
    metrics: ESDMetrics


def _check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device, or a one-line error: ValueError for a name torch does not
    know, RuntimeError for CUDA requested where torch has none (or fewer devices) and for any
    other device type (``mps``, ``xpu``...) that cannot hold a tensor here."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"invalid device {device!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available "
                               f"(this torch build or machine has no usable GPU); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} "
                               f"CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but MPS is not available (this torch build or "
                           f"machine has no Apple GPU); use device='cpu'")
    elif dev.type != "cpu":  # xpu, meta...: one line, not the dispatcher's page-long error
        try:
            torch.empty(1, device=dev) + 1
        except Exception as e:  # noqa: BLE001 (each backend raises its own type)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeError(f"device {str(device)!r} requested but it is not usable here ({first[:200]}); "
                               f"use device='cpu' or 'cuda'") from None
        if dev.type == "meta":
            raise ValueError("device 'meta' holds no data; use device='cpu' or 'cuda'")
    return dev


def _frame(layers: list[Layer], m: ESDMetrics):
    import pandas as pd

    def col(t: torch.Tensor) -> list:
        return t.tolist()

    data = {
        "layer_id": [l.index for l in layers],
        "name": list(m.names),
        "type": list(m.kinds),
        "N": [max(l.rows, l.cols) for l in layers],
        "M": [min(l.rows, l.cols) for l in layers],
        "rf": [l.k for l in layers],
        "num_evals": col(m.num_evals),
        "alpha": col(m.alpha),
        "alpha_weighted": col(m.alphahat),
        "D": col(m.D),
        "xmin": col(m.xmin),
        "xmax": col(m.xmax),
        "spectral_norm": col(m.spectral_norm),
        "log_spectral_norm": col(m.log_spectral_norm),
        "norm": col(m.norm),
        "log_norm": col(m.log_norm),
        "stable_rank": col(m.stable_rank),
        "entropy": col(m.entropy),
        "log_alpha_norm": col(m.log_alpha_norm),
        "block": pd.array(list(m.blocks), dtype="Int64"),
        "warning": list(m.warning),
        "status": list(m.status),
    }
    cols = list(COLUMNS)
    if "esd_path" in m.extra:  # with a LoRA cache: which layers took the exact update path
        data["esd_path"] = list(m.extra["esd_path"])
        cols.append("esd_path")
    return pd.DataFrame(data, columns=cols)


def analyze_spectra(source: Any, *, process_group: Any = None, **options: Any) -> Analysis:
    """`analyze`, also returning the eigenvalues and fits (for plots). Same arguments: the layer,
    ESD and fit ``options`` become a `LayerOptions`, an `ESDOptions` and a `FitOptions`
    (WeightWatcher's defaults: ``fit="ks"``, ``min_evals=10``, ``max_evals=15000``,
    ``include_embedding=True``)."""
    _check_device(options.get("device"))
    lora_cache = options.pop("lora_cache", None)
    opts = split_options(options, defaults=_DEFAULTS, where="tbfast.analyze")  # validated before any work
    esd_options, fit_options = opts[ESDOptions], opts[FitOptions]
    layers = build_layers(source, opts[LayerOptions], mapping="state_dict", require=True)
    logger.info("analysing %d layers (fit=%s, dtype=%s)", len(layers), fit_options.fit, esd_options.dtype)
    from .distributed import active_group, run as run_distributed

    group = active_group(process_group, source)  # None: this rank alone unless the weights are sharded
    if group is None:
        result = run(layers, esd_options, fit_options, lora_cache=lora_cache)
    elif lora_cache is not None:
        raise ValueError("lora_cache is not supported together with a process group (analyse on one rank)")
    else:  # each rank reads and analyses its share; every rank gets the whole table
        result = run_distributed(layers, esd_options, fit_options, group=group, with_spectra=True)
    return Analysis(details=_frame(result.spectra.layers, result.metrics), spectra=result.spectra,
                    fit=result.fit, metrics=result.metrics)


def analyze(source: Any, *, plot_dir: str | os.PathLike | None = None, **options: Any):
    """HT-SR analysis of every layer: a pandas DataFrame, one row per layer.

    ``source``: an ``nn.Module``, a state dict, a ``.safetensors`` file, a directory of shards,
    a ``.pt``/``.bin`` checkpoint, a PEFT LoRA adapter directory (with ``base=``), or a list of
    `tbfast.Layer`. Files need no model class and are read lazily within ``memory_budget`` bytes.

    Options (defaults follow WeightWatcher's ``analyze()``):

    - ``fit``: ``"ks"`` / ``"goodness-of-fit"`` (default; WeightWatcher's power-law fit),
      ``"median"`` (TempBalance's Hill estimator at ``xmin_pos``), ``"fix-finger"``;
    - ``min_evals=10``, ``max_evals=15000``: WeightWatcher's default layer selection (eigenvalue
      counts); ``min_evals=0, max_evals=None`` (or ``max_evals=0``) keeps every layer; ``max_n``
      (default None; 0 also means no limit) drops layers whose larger side exceeds it
      (WeightWatcher's ``max_N=50000``); ``include`` / ``exclude`` that are not regular
      expressions are a ValueError naming the option;
    - ``include_embedding=True``, ``types``, ``include`` / ``exclude`` (regexes on layer names),
      ``conv_norm=0.5``;
    - ``base``: a model, state dict or checkpoint; each layer becomes ``W - W_base``; for a LoRA
      adapter directory, the base the adapter is merged onto;
    - ``dtype=torch.float32`` (as everywhere in tbfast; ``torch.float64`` for agreement with
      WeightWatcher to round-off, about 2.5x slower on a CPU), ``device``,
      ``memory_budget`` (bytes), ``progress`` (a progress bar over layers);
    - ``backend`` (alias of ``fit_backend``: the fit kernels, ``auto``/``cpp``/``triton``/``torch``),
      ``eig_backend`` (the eigensolver, ``auto``/``cpp``/``cusolver``/``torch``); every field of
      `tbfast.options.ESDOptions` and `tbfast.options.FitOptions` is accepted;
    - ``lora_cache``: a `tbfast.lora.BaseSpectrumCache`: PEFT LoRA layers (of a model, or of an
      adapter directory with ``base=``) take the exact update path (float64; docs/ANALYZE.md) and
      the table gets an ``esd_path`` column (``update`` / ``full``). Without it every layer takes
      the full path: building a cache costs one eigendecomposition with vectors per base weight,
      more than one eigensolve, so it pays off only when the cache is reused;
    - ``plot_dir``: also write per-layer ESD plots and an alpha overview there (needs matplotlib;
      never over a file the analysis reads: `tbfast.io.OutputRefusedError`);
    - ``process_group``: a torch.distributed group (e.g. ``torch.distributed.group.WORLD`` under
      ``torchrun``): the layers are split over its ranks, each rank reads only its tensors, and
      every rank gets the full table (every rank of the group must call); plots are written by
      rank 0. Default None: this rank alone, never waiting for other ranks, except for sharded
      (FSDP / DTensor) weights, where every rank must take part anyway (docs/DISTRIBUTED.md).

    Columns: layer_id, name, type, N, M (N >= M), rf (matrices pooled, the kernel size of a
    convolution), num_evals, alpha, alpha_weighted, D, xmin, xmax, spectral_norm (lambda_max),
    log_spectral_norm, norm, log_norm, stable_rank, entropy, log_alpha_norm, block, warning, status.
    A row whose ``status`` is not ``"ok"`` says why its fit is not usable.
    """
    result = analyze_spectra(source, **options)
    from .distributed import is_main_process

    if plot_dir is not None and is_main_process(options.get("process_group"), source):
        from .checkpoint import checkpoint_files
        from .io import file_ids
        from .plot import plot_analysis

        inputs = file_ids(checkpoint_files(source) + checkpoint_files(options.get("base")))  # never overwritten
        plot_analysis(result, plot_dir, progress=bool(options.get("progress", False)), inputs=inputs)
    return result.details


def summary(details) -> dict[str, float]:
    """Averages over the layers whose status is ``"ok"`` (WeightWatcher's ``get_summary``):
    alpha, alpha_weighted, log_norm, log_spectral_norm, log_alpha_norm, stable_rank, entropy, D;
    plus ``num_layers`` (rows averaged)."""
    ok = details[details["status"] == STATUS_OK] if "status" in details else details
    out: dict[str, float] = {}
    for c in SUMMARY_COLUMNS:
        if c in ok:
            out[c] = float(ok[c].mean()) if len(ok) else math.nan
    out["num_layers"] = int(len(ok))
    return out
