"""`WeightWatcher`: WeightWatcher's API (constructor, ``analyze``, ``describe``, ``get_details``,
``get_summary``, ``get_ESD``) over tbfast's batched pipeline.

A thin adapter: layers come from `tbfast.analyze`'s resolution, eigenvalues, fits and metrics
from `tbfast.analyze.analyze_spectra`; this module only renames columns to WeightWatcher's and
adds the ones tbfast does not report (``lambda_max``, ``sv_max``, ``sv_min``, ``matrix_rank``,
``rank_loss``, ``weak_rank_loss``, ``num_pl_spikes``, ``sigma``, ``Q``, ...), computed from the
eigenvalues with segment reductions. Column meanings follow weightwatcher 0.7.7; every
difference is listed in docs/WEIGHTWATCHER.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._transfer import to_device
from .analyze import Analysis, analyze_spectra
from .layers import Layer
from .options import LayerOptions
from .sources import build_layers
from .spectra import esd

__all__ = ["WeightWatcher", "WW_DEFAULT_MIN_EVALS", "WW_DEFAULT_MAX_EVALS", "WW_DEFAULT_MAX_N"]

logger = logging.getLogger(__name__)

# weightwatcher 0.7.7 defaults (weightwatcher/constants.py)
WW_DEFAULT_MIN_EVALS = 8
WW_DEFAULT_MAX_EVALS = 15000
WW_DEFAULT_MAX_N = 50000
WW_EVALS_THRESH = 1e-5          # eigenvalues at or below this are dropped before the power-law fit
WW_WEAK_RANK_TOLERANCE = 1e-6   # weak_rank_loss counts eigenvalues below this
WW_SMALL_N = 20                 # fewer non-zero eigenvalues: WeightWatcher's small-N fit
WW_LAYER_TYPES = ("dense", "conv1d", "conv2d", "embedding", "norm")

_KIND_TO_TYPE = {"Linear": "dense", "Conv1d": "conv1d", "Conv2d": "conv2d", "Embedding": "embedding",
                 "LoRA": "dense", "matrix": "dense"}

# WeightWatcher options tbfast does not implement, with the default that is accepted
_UNSUPPORTED = {
    "glorot_fix": False, "randomize": False, "mp_fit": False, "ww2x": False, "pool": True,
    "conv2d_fft": False, "fft": False, "deltas": False, "intra": False, "vectors": False,
    "channels": None, "stacked": False, "xmin_max": None, "max_fingers": 10, "finger_thresh": 1.0,
    "detX": False, "ERG": False, "pl_package": "ww", "xmax": None, "peft": False, "inverse": False,
}
# accepted and ignored, as WeightWatcher itself does
_IGNORED = {"min_size": None, "max_size": None, "sparsify": True}


def _unsupported(option: str, value: Any) -> ValueError:
    return ValueError(f"tbfast.WeightWatcher does not support {option}={value!r} "
                      f"(WeightWatcher option; see docs/WEIGHTWATCHER.md)")


def _check_options(options: dict[str, Any], allowed: Sequence[str]) -> None:
    for k, v in options.items():
        if k not in allowed:
            raise TypeError(f"unexpected keyword argument {k!r}")
        if k in _UNSUPPORTED:
            default = _UNSUPPORTED[k]
            if not (v is default or v == default):
                raise _unsupported(k, v)
        elif k in ("min_size", "max_size") and v:
            logger.warning("min_size and max_size are ignored (use min_evals, max_evals), as in WeightWatcher")


def _unwrap(model: Any) -> Any:
    if isinstance(model, Mapping) and "state_dict" in model and isinstance(model["state_dict"], Mapping):
        return model["state_dict"]
    return model


def _segments(spectra) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment id of every eigenvalue and the device offsets."""
    off = spectra.device_offsets()
    counts = spectra.counts
    seg = to_device(np.repeat(np.arange(len(spectra)), counts.numpy()), spectra.values.device)
    return seg, off


def _seg_count(mask: torch.Tensor, seg: torch.Tensor, L: int) -> torch.Tensor:
    out = torch.zeros(L, dtype=torch.int64, device=mask.device)
    return out.index_add_(0, seg, mask.to(torch.int64))


def _small_n_fit(x: np.ndarray, k_min: int = 8) -> tuple[float, float, float, float, int]:
    """WeightWatcher 0.7.7's power-law fit for fewer than 20 non-zero eigenvalues (``x`` sorted):
    bias-corrected Hill ``alpha = 1 + (n - 1) / sum log(x / xmin)`` over tails of at least
    ``k_min`` values with ``alpha > 1``; xmin minimises ``D - 0.868 / sqrt(n)``. Returns
    ``(alpha, D, xmin, sigma, tail size)``."""
    N = len(x)
    logx = np.log(x)
    best, best_j = math.inf, -1
    alphas = np.zeros(max(N - 1, 0))
    Ds = np.ones(max(N - 1, 0))
    for i in range(N - 1):
        n = N - i
        if n < k_min:
            continue
        s = float(logx[i:].sum() - n * logx[i])
        if s <= 1e-12:
            continue
        a = 1.0 + (n - 1.0) / s
        alphas[i] = a
        if a <= 1.0:
            continue
        F_fit = 1.0 - (x[i:] / x[i]) ** (1.0 - a)
        d = float(np.max(np.abs(np.arange(n) / n - F_fit)))
        Ds[i] = d
        J = d - 0.868 / math.sqrt(n)
        if J < best:
            best, best_j = J, i
    if best_j < 0:  # no admissible tail: the whole spectrum
        s = float(logx.sum() - N * logx[0])
        if s <= 1e-12:
            return 1.0, 1.0, float(x[0]), 0.0, N
        a = 1.0 + (N - 1.0) / s
        d = float(np.max(np.abs(np.arange(N) / N - (1.0 - (x / x[0]) ** (1.0 - a)))))
        return a, d, float(x[0]), (a - 1.0) / math.sqrt(N), N
    return float(alphas[best_j]), float(Ds[best_j]), float(x[best_j]), \
        (alphas[best_j] - 1.0) / math.sqrt(N - best_j), N - best_j


class WeightWatcher:
    """Drop-in for ``weightwatcher.WeightWatcher`` backed by tbfast's batched ESD and fits.

    ``model``: an ``nn.Module``, a state dict (``{'state_dict': ...}`` is unwrapped), or (tbfast
    extra) a checkpoint path. ``framework`` is accepted and ignored (inferred); ``log_level`` sets
    the level of tbfast's logger.
    """

    def __init__(self, model: Any = None, framework: str | None = None, base_model: Any = None,
                 log_level: int | str | None = None) -> None:
        self.model = _unwrap(model)
        self.framework = framework
        self.base_model = _unwrap(base_model)
        self.details = None
        self.analysis: Analysis | None = None
        if log_level is not None:
            logging.getLogger("tbfast").setLevel(log_level)

    # -- layers -------------------------------------------------------------------------------
    def _model(self, model: Any) -> Any:
        if model is not None:
            self.model = _unwrap(model)
        if self.model is None:
            raise ValueError("no model: pass model= to WeightWatcher(...) or to this method")
        return self.model

    def _layers(self, model: Any, *, layers: Any, min_evals: int | None, max_evals: int | None,
                max_N: int | None, conv2d_norm: bool, base_model: Any, start_ids: int
                ) -> tuple[list[Layer], dict[str, tuple[int, str, str]]]:
        """Selected layers and, per layer name, WeightWatcher's ``(layer_id, name, layer_type)``."""
        source = self._model(model)
        base = _unwrap(base_model) if base_model is not None else self.base_model
        options = LayerOptions(base=base, include_embedding=True, conv_norm=0.5 if conv2d_norm else 1.0,
                               min_evals=min_evals or 0, max_evals=max_evals or None, max_n=max_N or None)
        found = build_layers(source, options, mapping="state_dict", require=True)
        ids = self._ww_ids(source, found, start_ids)
        module = isinstance(source, nn.Module)
        info: dict[str, tuple[int, str, str]] = {}
        for l in found:
            if module:
                short, kind = l.name.rsplit(".", 1)[-1], _KIND_TO_TYPE.get(l.kind, "dense")
            else:  # WeightWatcher types a state dict's tensors by rank only (it skips 3-D ones)
                short, kind = l.name, {3: "conv1d", 4: "conv2d"}.get(len(l.shape), "dense")
            info[l.name] = (ids[l.name], short, kind)
        kept = [l for l in found if self._keep(info[l.name], layers)]
        if not kept:
            raise ValueError(f"no layer matched layers={layers!r} (with min_evals={min_evals}, "
                             f"max_evals={max_evals}, max_N={max_N})")
        return kept, info

    @staticmethod
    def _ww_ids(source: Any, layers: list[Layer], start_ids: int) -> dict[str, int]:
        if isinstance(source, nn.Module):
            return {l.name: l.index + start_ids for l in layers}
        if isinstance(source, Mapping):
            # WeightWatcher numbers a state dict's '<name>.weight' keys from 1, in key order
            order = {k[:-len(".weight")]: i for i, k in enumerate(
                (k for k in source if isinstance(k, str) and k.endswith(".weight")), start=1)}
            return {l.name: order.get(l.name, l.index) for l in layers}
        return {l.name: l.index for l in layers}

    @staticmethod
    def _keep(info: tuple[int, str, str], layers: Any) -> bool:
        """WeightWatcher's ``layers=`` filter: types, then ids (negative: skip), then names
        (``'-name'``: skip); a later kind of filter decides over an earlier one, as there."""
        filters = layers if isinstance(layers, (list, tuple)) else [layers]
        if not filters:
            return True
        layer_id, name, kind = info
        types = [f for f in filters if isinstance(f, str) and f in WW_LAYER_TYPES]
        ids = [int(f) for f in filters if isinstance(f, (int, np.integer)) and not isinstance(f, bool)]
        names = [f for f in filters if isinstance(f, str) and f not in WW_LAYER_TYPES]
        bad = [f for f in filters if not isinstance(f, (str, int, np.integer)) or isinstance(f, bool)]
        if bad:
            raise TypeError(f"layers= takes layer ids, names or types, got {bad[0]!r}")
        keep = True
        if types:
            keep = kind in types
        if ids:
            if min(ids) >= 0:
                keep = layer_id in ids
            elif max(ids) < 0:
                keep = -layer_id not in ids
            else:
                raise ValueError(f"layers= ids must be all >= 0 (keep) or all < 0 (skip), got {ids}")
        if names:
            skip = [n.startswith("-") for n in names]
            if all(skip):
                keep = f"-{name}" not in names
            elif not any(skip):
                keep = name in names
            else:
                raise ValueError(f"layers= names must all be kept or all be skipped ('-name'), got {names}")
        return keep

    # -- public API ---------------------------------------------------------------------------
    def describe(self, model: Any = None, layers: Any = (), min_evals: int = WW_DEFAULT_MIN_EVALS,
                 max_evals: int = WW_DEFAULT_MAX_EVALS, max_N: int = WW_DEFAULT_MAX_N,
                 conv2d_norm: bool = True, start_ids: int = 0, base_model: Any = None, **options: Any):
        """The layers ``analyze`` would read, without eigenvalues: layer_id, name, M, N, Q,
        layer_type, longname, num_evals, rf."""
        import pandas as pd

        _check_options(options, list(_UNSUPPORTED) + list(_IGNORED) + ["savefig"])
        found, info = self._layers(model, layers=list(layers), min_evals=min_evals, max_evals=max_evals,
                                   max_N=max_N, conv2d_norm=conv2d_norm, base_model=base_model,
                                   start_ids=start_ids)
        rows = []
        for l in found:
            lid, name, kind = info[l.name]
            N, M = max(l.rows, l.cols), min(l.rows, l.cols)
            rows.append({"layer_id": lid, "name": name, "M": M, "N": N, "Q": N / M, "layer_type": kind,
                         "longname": l.name, "num_evals": l.num_evals, "rf": l.k})
        return pd.DataFrame(rows, columns=["layer_id", "name", "M", "N", "Q", "layer_type", "longname",
                                           "num_evals", "rf"])

    def analyze(self, model: Any = None, layers: Any = (), min_evals: int = WW_DEFAULT_MIN_EVALS,
                max_evals: int = WW_DEFAULT_MAX_EVALS, max_N: int = WW_DEFAULT_MAX_N,
                plot: bool = False, savefig: str | bool = "ww-img", conv2d_norm: bool = True,
                fix_fingers: str | bool | None = False, fit: str = "PL", svd_method: str = "fast",
                tolerance: float = WW_WEAK_RANK_TOLERANCE, start_ids: int = 0, base_model: Any = None,
                *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                progress: bool = False, **options: Any):
        """WeightWatcher's ``analyze()``: one row per layer with its column names and meanings.

        Supported: ``layers`` (ids, names, types; negative ids / ``'-name'`` skip),
        ``min_evals=8``, ``max_evals=15000``, ``max_N=50000``, ``plot`` + ``savefig`` (files in
        that folder), ``conv2d_norm``, ``fix_fingers`` (False or ``'xmin_peak'``), ``fit='PL'``,
        ``svd_method`` (``'fast'``: float32 Gram eigenvalues, tbfast's default; ``'accurate'``:
        float64 SVD), ``tolerance``, ``start_ids``, ``base_model``. Any other WeightWatcher option
        set away from its default raises a ValueError naming it. tbfast extras: ``dtype``,
        ``device``, ``progress``.
        """
        _check_options(options, list(_UNSUPPORTED) + list(_IGNORED))
        if fix_fingers in (False, None):
            tb_fit = "ks"
        elif fix_fingers == "xmin_peak":
            tb_fit = "fix-finger"
        else:
            raise _unsupported("fix_fingers", fix_fingers)
        if fit not in ("PL", "power_law"):
            raise _unsupported("fit", fit)
        if svd_method not in ("fast", "accurate"):
            raise ValueError(f"svd_method must be 'fast' or 'accurate', got {svd_method!r}")
        if plot and not savefig:
            raise _unsupported("savefig", savefig)  # tbfast writes plots to files, never shows them
        method = "svd" if svd_method == "accurate" else "auto"
        if dtype is None:
            dtype = torch.float64  # WeightWatcher's precision: rank, sv_min need it (docs)

        found, info = self._layers(model, layers=layers, min_evals=min_evals, max_evals=max_evals,
                                   max_N=max_N, conv2d_norm=conv2d_norm, base_model=base_model,
                                   start_ids=start_ids)
        result = analyze_spectra(found, fit=tb_fit, filter_zeros=True, evals_thresh=WW_EVALS_THRESH,
                                 min_evals=0, max_evals=None, method=method, dtype=dtype, device=device,
                                 progress=progress)
        self.analysis = result
        details = self._frame(result, info, tolerance=tolerance, small_n=(tb_fit == "ks"), gram=(method != "svd"))
        if plot:
            from .plot import plot_analysis

            plot_analysis(result, "ww-img" if savefig is True else savefig)
        self.details = details
        return details

    def get_details(self):
        """The DataFrame of the last ``analyze()``."""
        return self.details

    def get_summary(self, details=None) -> dict[str, float]:
        """Means over the rows of ``details`` (default: the last ``analyze()``) of log_norm,
        alpha, alpha_weighted, log_alpha_norm, log_spectral_norm, stable_rank, as WeightWatcher."""
        if details is None:
            details = self.details
        if details is None:
            return {}
        return {c: float(details[c].mean()) for c in
                ("log_norm", "alpha", "alpha_weighted", "log_alpha_norm", "log_spectral_norm", "stable_rank",
                 "mp_softrank") if c in details.columns}

    def get_ESD(self, model: Any = None, layer: int | str | None = None, random: bool = False,
                params: dict | None = None) -> np.ndarray:
        """Ascending eigenvalues (float64 numpy) of one layer, by WeightWatcher layer id or name
        (``name`` or ``longname``); computed in float64."""
        if random:
            raise _unsupported("random", random)
        if params:
            raise _unsupported("params", params)
        if layer is None:
            raise ValueError("get_ESD needs layer= (a layer id or name)")
        found, info = self._layers(model, layers=[], min_evals=WW_DEFAULT_MIN_EVALS,
                                   max_evals=WW_DEFAULT_MAX_EVALS, max_N=WW_DEFAULT_MAX_N,
                                   conv2d_norm=True, base_model=None, start_ids=0)
        if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
            match = [l for l in found if info[l.name][0] == int(layer)]
        elif isinstance(layer, str):
            match = [l for l in found if l.name == layer] or [l for l in found if info[l.name][1] == layer]
        else:
            raise TypeError(f"layer must be a layer id or name, got {type(layer).__name__}")
        if not match:
            raise ValueError(f"no layer {layer!r}; layer ids: {[info[l.name][0] for l in found]}")
        spectra = esd([match[0]], dtype=torch.float64)
        return spectra[0].cpu().numpy()

    # -- columns ------------------------------------------------------------------------------
    @staticmethod
    def _frame(result: Analysis, info: dict[str, tuple[int, str, str]], *, tolerance: float, small_n: bool,
               gram: bool):
        import pandas as pd

        spectra, pl, m = result.spectra, result.fit, result.metrics
        layers = spectra.layers
        L = len(layers)
        e = spectra.values.double()
        seg, off = _segments(spectra)
        lam_max = m.spectral_norm.double()
        N = torch.tensor([max(l.rows, l.cols) for l in layers], dtype=torch.float64)
        M = torch.tensor([min(l.rows, l.cols) for l in layers], dtype=torch.float64)
        dev = e.device
        # WeightWatcher's numerical rank: singular values above sv_max * N * eps; from Gram
        # eigenvalues also above the eigensolver's noise floor lambda_max * M * eps
        eps = torch.finfo(spectra.values.dtype).eps
        lam_d = to_device(lam_max, dev).clamp(min=0)
        tol = (lam_d.sqrt() * to_device(N, dev) * eps) ** 2
        if gram:
            tol = torch.maximum(tol, lam_d * to_device(M, dev) * eps)
        rank = _seg_count(e > tol[seg], seg, L)
        weak = _seg_count(e < tolerance, seg, L)
        xmin_d = to_device(m.xmin.double(), dev)
        spikes = _seg_count(e >= xmin_d[seg], seg, L)
        first = e[off[:-1].clamp(max=max(e.numel() - 1, 0))]
        tail = pl.ends - (pl.starts + pl.xmin_index.clamp(min=0))
        host = torch.stack([rank.double(), weak.double(), spikes.double(), first.clamp(min=0).sqrt(),
                            tail.double()]).cpu()  # one host transfer
        rank, weak, spikes, sv_min, tail = host
        alpha = m.alpha.clone()
        D, xmin = m.D.clone(), m.xmin.clone()
        sigma = (alpha - 1) / tail.clamp(min=1).sqrt()
        spikes = spikes.to(torch.int64)
        alpha_weighted, log_alpha_norm = m.alphahat.clone(), m.log_alpha_norm.clone()
        warning = list(m.warning)
        ok = m.ok
        if small_n:
            # WeightWatcher fits layers with < 20 non-zero eigenvalues by its small-N rule
            nz = (pl.ends - pl.starts).cpu()
            for i in range(L):
                if ok[i] and int(nz[i]) < WW_SMALL_N:
                    x = spectra[i].double().cpu().numpy()
                    x = x[x > WW_EVALS_THRESH]
                    a, d, xm, sg, _ = _small_n_fit(x)
                    alpha[i], D[i], xmin[i], sigma[i] = a, d, xm, sg
                    full = spectra[i].double().cpu()
                    spikes[i] = int((full >= xm).sum())
                    alpha_weighted[i] = a * m.log_spectral_norm[i]
                    pos = full[full > 0]
                    log_alpha_norm[i] = math.log10(float(pos.pow(a).sum()))
                    warning[i] = "over-trained" if a < 2 else "under-trained" if a > 6 else ""
        failed = torch.tensor([not o for o in ok], dtype=torch.bool)
        for t in (alpha, D, xmin, sigma):
            t[failed] = -1.0
        spikes[failed] = -1
        alpha_weighted[failed] = math.nan
        log_alpha_norm[failed] = math.nan
        data = {
            "layer_id": [info[l.name][0] for l in layers],
            "name": [info[l.name][1] for l in layers],
            "D": D.tolist(),
            "M": M.to(torch.int64).tolist(),
            "N": N.to(torch.int64).tolist(),
            "Q": (N / M).tolist(),
            "alpha": alpha.tolist(),
            "alpha_weighted": alpha_weighted.tolist(),
            "entropy": m.entropy.tolist(),
            "has_esd": [True] * L,
            "lambda_max": lam_max.tolist(),
            "layer_type": [info[l.name][2] for l in layers],
            "log_alpha_norm": log_alpha_norm.tolist(),
            "log_norm": m.log_norm.tolist(),
            "log_spectral_norm": m.log_spectral_norm.tolist(),
            "longname": [l.name for l in layers],
            "matrix_rank": rank.to(torch.int64).tolist(),
            "norm": m.norm.tolist(),
            "num_evals": m.num_evals.tolist(),
            "num_pl_spikes": spikes.tolist(),
            "rank_loss": (m.num_evals - rank.to(torch.int64)).tolist(),
            "rf": [l.k for l in layers],
            "sigma": sigma.tolist(),
            "spectral_norm": lam_max.tolist(),
            "stable_rank": (m.norm / lam_max).tolist(),
            "status": ["success" if o else "failed" for o in ok],
            "sv_max": lam_max.clamp(min=0).sqrt().tolist(),
            "sv_min": sv_min.tolist(),
            "warning": [w if o else "" for w, o in zip(warning, ok)],
            "weak_rank_loss": weak.to(torch.int64).tolist(),
            "xmax": m.xmax.tolist(),
            "xmin": xmin.tolist(),
            "status_detail": list(m.status),
        }
        return pd.DataFrame(data)
