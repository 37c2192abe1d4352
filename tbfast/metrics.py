"""Per-layer shape metrics of the ESD (SPEC section 2) as a small table of tensors.

Everything is computed on the spectra's device with segment reductions (no Python loop over
layers) and copied to the host in one transfer: one host synchronisation per call. The stages
are run by `tbfast.pipeline`; this module holds only the metric maths and the per-layer status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import torch

from ._transfer import to_device
from .errors import (STATUS_ALL_ZERO, STATUS_EMPTY_WINDOW, STATUS_NONFINITE, STATUS_OK, STATUS_XMIN_ZERO,
                     status_fit_failed, status_too_few)
from .options import either
from .powerlaw import PowerLawFit
from .spectra import Spectra

__all__ = ["ESDMetrics", "compute_metrics", "METRIC_COLUMNS", "flat_tail", "FLAT_TAIL_SPREAD", "FLAT_WARNING"]

METRIC_COLUMNS = (
    "num_evals", "spectral_norm", "norm", "log_norm", "log_spectral_norm", "alpha", "alphahat", "D",
    "xmin", "xmin_index", "xmax", "stable_rank", "norm_stable_rank", "eig_ratio", "log_alpha_norm",
    "entropy",
)
_LIST_COLUMNS = ("names", "kinds", "shapes", "blocks", "warning", "status")


def _select_rows(value: Any, idx: list[int], t: torch.Tensor, rows: int) -> Any:
    """``value`` at the rows ``idx`` when it holds one entry per row (a list, tuple or tensor of
    length ``rows``); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value[t]
    if isinstance(value, (list, tuple)) and len(value) == rows:
        return type(value)(value[i] for i in idx)
    return value


@dataclass
class ESDMetrics:
    """One row per layer. Numeric columns are host tensors (float64; ``num_evals`` and
    ``xmin_index`` int64); ``names``, ``kinds``, ``shapes``, ``blocks``, ``warning`` and ``status``
    are lists. ``status`` is ``"ok"`` (`tbfast.errors.STATUS_OK`) or the reason a layer's
    numbers are not usable (the other ``STATUS_*`` constants of `tbfast.errors`)."""

    names: list[str]
    kinds: list[str]
    shapes: list[tuple[int, ...]]
    blocks: list[int | None]
    num_evals: torch.Tensor
    spectral_norm: torch.Tensor
    norm: torch.Tensor
    log_norm: torch.Tensor
    log_spectral_norm: torch.Tensor
    alpha: torch.Tensor
    alphahat: torch.Tensor
    D: torch.Tensor
    xmin: torch.Tensor
    xmin_index: torch.Tensor
    xmax: torch.Tensor
    stable_rank: torch.Tensor
    norm_stable_rank: torch.Tensor
    eig_ratio: torch.Tensor
    log_alpha_norm: torch.Tensor
    entropy: torch.Tensor
    warning: list[str]
    status: list[str]
    fit: str = "median"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, column: str) -> Any:
        if column == "alpha_weighted":
            column = "alphahat"
        if column not in METRIC_COLUMNS and column not in _LIST_COLUMNS:
            raise KeyError(f"unknown metric {column!r}; available: {METRIC_COLUMNS + _LIST_COLUMNS}")
        return getattr(self, column)

    @property
    def ok(self) -> list[bool]:
        return [s == STATUS_OK for s in self.status]

    def select(self, indices: Sequence[int]) -> "ESDMetrics":
        """The rows ``indices`` (in that order) as a new table."""
        idx = list(indices)
        t = torch.as_tensor(idx, dtype=torch.int64)
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "extra":  # per-layer entries (one per row, e.g. esd_path) follow the rows
                kw[f.name] = {k: _select_rows(x, idx, t, len(self)) for k, x in v.items()}
            else:  # the columns; `fit` stays
                kw[f.name] = _select_rows(v, idx, t, len(self))
        return ESDMetrics(**kw)

    def to_dict(self) -> dict[str, list]:
        out: dict[str, list] = {"name": list(self.names), "type": list(self.kinds),
                                "shape": list(self.shapes), "block": list(self.blocks)}
        for c in METRIC_COLUMNS:
            out[c] = getattr(self, c).tolist()
        out["warning"] = list(self.warning)
        out["status"] = list(self.status)
        return out

    def to_state(self) -> dict[str, Any]:
        """The table as JSON-ready plain data (lists, numbers, strings); `from_state` inverts it exactly."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "extra":
                continue
            if isinstance(v, torch.Tensor):
                out[f.name] = {"values": v.tolist(), "dtype": str(v.dtype).replace("torch.", "")}
            elif f.name == "shapes":
                out[f.name] = [list(x) for x in v]
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ESDMetrics":
        """A table from `to_state` output (only float64 / float32 / int64 columns are accepted)."""
        kw: dict[str, Any] = {}
        for k, v in state.items():
            if isinstance(v, dict) and set(v) == {"values", "dtype"}:
                if v["dtype"] not in ("float64", "float32", "int64"):
                    raise ValueError(f"ESD table state: column {k!r} has unsupported dtype {v['dtype']!r}")
                kw[k] = torch.tensor(v["values"], dtype=getattr(torch, v["dtype"]))
            elif k == "shapes":
                kw[k] = [tuple(x) for x in v]
            else:
                kw[k] = v
        return cls(**kw)

    def to_pandas(self):
        """The table as a pandas DataFrame (pandas is optional)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover
            raise ImportError("ESDMetrics.to_pandas() needs pandas: pip install pandas") from exc
        return pd.DataFrame(self.to_dict())


def _segment_sum(x: torch.Tensor, seg: torch.Tensor, L: int) -> torch.Tensor:
    out = torch.zeros(L, dtype=x.dtype, device=x.device)
    return out.index_add_(0, seg, x)


#: Largest mean log-spread ``mean_i ln(lambda_i / xmin)`` of the fitted tail that counts as flat.
FLAT_TAIL_SPREAD = 1e-3
#: ``warning`` of a layer whose fitted tail is flat (instead of WeightWatcher's "under-trained").
FLAT_WARNING = "flat-spectrum"


def flat_tail(alpha: Any) -> np.ndarray:
    """Which layers have a flat (degenerate) fitted ESD tail, from their alpha: a bool array.

    Every tbfast fit (median, KS, fix-finger) reports the Hill / maximum-likelihood exponent of
    its tail, ``alpha = 1 + n / sum_i ln(lambda_i / xmin)``, so ``1 / (alpha - 1)`` is the tail's
    mean log-spread. The tail is flat when that spread is at most `FLAT_TAIL_SPREAD` (the tail
    eigenvalues lie within 0.1% of xmin on average), i.e. ``alpha >= 1 + 1 / FLAT_TAIL_SPREAD``
    (1001). Such an alpha measures round-off, not a power law: an orthogonal or scaled-identity
    matrix has all eigenvalues equal and gets alpha ~1e6 in float32. Real layers stay far below
    (heavy-tailed ~2-6, very rectangular random ones below 100, see docs/ANALYZE.md). Non-finite
    alphas are not flagged here (they already carry a fit-failure status).
    """
    a = np.asarray(alpha.tolist() if isinstance(alpha, torch.Tensor) else alpha, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(a) & (a - 1.0 >= 1.0 / FLAT_TAIL_SPREAD)


def _warning(alpha: float) -> str:
    if alpha < 2:
        return "over-trained"
    if alpha > 6:
        return "under-trained"
    return ""


def compute_metrics(spectra: Spectra, fit: PowerLawFit, *, sr_mid_pos: float | None = None,
                    failure_flags: list | None = None, eig_checks: list | None = None) -> ESDMetrics:
    """Shape metrics of every layer from its eigenvalues and power-law fit (SPEC section 2).

    ``failure_flags`` (device bool tensors from a deferred GPU eigensolve, see
    `tbfast.spectra.layer_spectra`) ride along in the single device -> host copy;
    ``extra["eig_failed"]`` says whether any matrix failed. ``eig_checks=``: its former name.
    """
    failure_flags = either("failure_flags", failure_flags, "eig_checks", eig_checks)
    values = spectra.values
    L = len(spectra)
    dev = values.device
    e = values.double()
    counts = spectra.counts
    seg = to_device(np.repeat(np.arange(L), counts.numpy()), dev)
    off = spectra.device_offsets()
    ends = off[1:]
    last = (ends - 1).clamp(min=0)
    lam_max = e[last]
    norm = _segment_sum(e, seg, L)
    alpha = fit.alpha
    e_alpha = torch.where(e > 0, e.pow(alpha[seg]), torch.zeros_like(e))
    alpha_norm = _segment_sum(e_alpha, seg, L)

    # stable rank family: s = zero-filtered eigenvalues, optionally from int(len/sr_mid_pos)
    s_start = fit.starts
    if sr_mid_pos is not None:
        n_nz = fit.ends - fit.starts
        s_start = fit.starts + torch.floor(n_nz.double() / sr_mid_pos).to(torch.int64)
    pos = torch.arange(e.numel(), device=dev)
    in_s = (pos >= s_start[seg]) & (pos < fit.ends[seg])
    s_sum = _segment_sum(torch.where(in_s, e, torch.zeros_like(e)), seg, L)
    s_len = (fit.ends - s_start).double()
    s_mid = e[(s_start + torch.div(fit.ends - s_start, 2, rounding_mode="floor")).clamp(max=max(e.numel() - 1, 0))]

    # matrix entropy (WeightWatcher): rank from singular values, p = e / sum(e) + 1e-10
    sv = e.clamp(min=0).sqrt()
    big = to_device(np.array([max(l.rows, l.cols) for l in spectra.layers], dtype=np.float64), dev)
    tol = sv[last] * big * torch.finfo(values.dtype).eps
    rank = _segment_sum((sv > tol[seg]).double(), seg, L)
    p = e / norm[seg] + 1e-10
    ent = -_segment_sum(p * torch.log(p), seg, L) / torch.log(rank + 1e-10)

    finite = _segment_sum((~torch.isfinite(e)).double(), seg, L) == 0
    cols = torch.stack([
        lam_max, norm, alpha, fit.D, fit.xmin, s_sum, s_len, s_mid, alpha_norm, ent,
        fit.xmin_index.double(), (fit.ends - fit.starts).double(), finite.double(), spectra.scales(),
    ])
    if failure_flags:
        failed = torch.stack([c.any() for c in failure_flags]).any()
        cols = torch.cat([cols, failed.double().expand(1, L)])
    host = cols.cpu()  # the single host synchronisation
    eig_failed = bool(host[14, 0]) if failure_flags and L else False
    (lam_max, norm, alpha, D, xmin, s_sum, s_len, s_mid, alpha_norm, ent, xidx, n_fit, finite,
     scale) = host[:14]
    # values are in units of `scale` (1 but for extreme weights, Spectra.eig_scale): sums and
    # lambda_max to absolute units; ratios, entropy and alpha do not depend on it
    stable_rank = s_sum / lam_max  # max(s) = lambda_max: zero filtering only drops small ones
    eig_ratio = lam_max / s_mid
    lam_max, norm, s_sum = lam_max * scale, norm * scale, s_sum * scale
    log_norm = torch.log10(norm)
    log_spec = torch.log10(lam_max)
    norm_stable_rank = s_sum / s_len
    log_scale = torch.log10(scale)  # sum(e^alpha) = scale^alpha sum(values^alpha)
    log_alpha_norm = torch.where(log_scale == 0, torch.log10(alpha_norm), torch.log10(alpha_norm) + alpha * log_scale)
    alphahat = alpha * log_spec

    status = []
    a_list, xmin_list, n_list, fin = alpha.tolist(), xmin.tolist(), n_fit.tolist(), finite.tolist()
    lam_list = lam_max.tolist()
    for l, layer in enumerate(spectra.layers):
        if not fin[l]:
            status.append(STATUS_NONFINITE)
        elif lam_list[l] == 0:
            status.append(STATUS_ALL_ZERO)
        elif n_list[l] < 2:
            status.append(status_too_few(n_list[l]))
        elif xmin_list[l] == 0:
            status.append(STATUS_XMIN_ZERO)
        elif not math.isfinite(a_list[l]):
            status.append(status_fit_failed(a_list[l]))
        elif a_list[l] == 0:
            status.append(STATUS_EMPTY_WINDOW)
        else:
            status.append(STATUS_OK)
    flat = flat_tail(a_list).tolist()
    warning = [("" if st != STATUS_OK else FLAT_WARNING if fl else _warning(a))
               for a, st, fl in zip(a_list, status, flat)]
    return ESDMetrics(
        names=[l.name for l in spectra.layers], kinds=[l.kind for l in spectra.layers],
        shapes=[l.shape for l in spectra.layers], blocks=[l.block for l in spectra.layers],
        num_evals=counts.clone(), spectral_norm=lam_max, norm=norm, log_norm=log_norm,
        log_spectral_norm=log_spec, alpha=alpha, alphahat=alphahat, D=D, xmin=xmin,
        xmin_index=xidx.to(torch.int64), xmax=lam_max.clone(), stable_rank=stable_rank,
        norm_stable_rank=norm_stable_rank, eig_ratio=eig_ratio, log_alpha_norm=log_alpha_norm,
        entropy=ent, warning=warning, status=status, fit=fit.fit, extra={"eig_failed": eig_failed},
    )
