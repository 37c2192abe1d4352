"""Power-law fits of every layer's ESD at once (SPEC sections 2-5).

- ``median`` (TempBalance ``pl_fitting='median'``, Model Balancing ``xmin_mid``): the Hill
  estimator with ``xmin`` at position ``int(N / xmin_pos)``.
- ``goodness-of-fit`` (alias ``ks``; Model Balancing ``fix_fingers=None``): every eigenvalue but
  the last is an xmin candidate; the one with the smallest KS distance D wins (first on ties).
- ``fix-finger`` (``xmin_peak``): the same scan restricted to a window around the peak of the
  histogram of ``log10`` eigenvalues. ``xmin_bound='reference'`` keeps the references' lower
  bound ``log10(0.95 * xmin2)`` (a log-scale number compared with eigenvalues); ``'corrected'``
  uses ``0.95 * xmin2``.

The fits run as the ops of `tbfast.ops.fit` (C++ on CPU, Triton on CUDA, the torch reference where
neither is available; ``backend`` picks one explicitly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._transfer import to_device
from .kernels import ref
from .lower_edge import lower_edge
from .ops.fit import fit_kernels
from .options import FIT_METHODS, FitOptions, canonical_fit, split_options
from .spectra import Spectra

__all__ = ["PowerLawFit", "fit_power_law", "FIT_METHODS", "canonical_fit", "zero_filtered_starts",
           "fix_finger_window"]


@dataclass
class PowerLawFit:
    """Per-layer fit results (float64 / int64 tensors on the spectra's device).

    ``xmin_index`` is relative to ``starts`` (the first eigenvalue kept after zero filtering);
    ``starts``/``ends`` delimit the fitted eigenvalues of each layer in ``Spectra.values``.
    """

    alpha: torch.Tensor
    D: torch.Tensor
    xmin: torch.Tensor
    xmin_index: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    fit: str


def zero_filtered_starts(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                         evals_thresh: float | torch.Tensor) -> torch.Tensor:
    """First index of each layer with eigenvalue > ``evals_thresh`` (a number, or one per layer
    in the values' units); where no eigenvalue passes, the layer keeps all of them (reference
    behaviour). No host sync."""
    seg, inside = ref.segment_ids(starts, ends, values.numel())
    if isinstance(evals_thresh, torch.Tensor):
        evals_thresh = evals_thresh.to(values.dtype)[seg.clamp(min=0)]
    small = inside & (values <= evals_thresh)
    counts = torch.zeros(len(starts), dtype=torch.int64, device=values.device)
    counts.index_add_(0, seg.clamp(min=0), small.to(torch.int64))
    new = starts + counts
    return torch.where(new >= ends, starts, new)


def fix_finger_window(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, bins: int,
                      xmin_bound: str = "reference", *, lower: torch.Tensor | None = None,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate window ``(lo, hi)`` of the fix-finger scan for every layer (SPEC section 5):
    histogram ``log10`` eigenvalues in ``bins`` equal bins over ``[min, max]``; the first fullest
    bin's left edge gives ``xmin2``; ``hi = 1.5 xmin2``; ``lo`` per ``xmin_bound``.

    ``lower`` (float64, one per layer, optional): a more accurate value of each layer's first
    eigenvalue (``values[starts]``), used for the range's lower end; see `lower_edge`. Without
    it, or where it is not positive, the range starts at the smallest positive eigenvalue; values
    below the range (exact zeros, which have no logarithm) count in the first bin. A layer without
    a positive eigenvalue gets the window of the range ``[-1, 1]``. ``scale`` (float64, one per
    layer): eigenvalues are ``values * scale`` (see `Spectra.eig_scale`); only the reference's
    lower bound ``log10(0.95 xmin2)`` depends on it, as it mixes log and linear units.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if xmin_bound not in ("reference", "corrected"):
        raise ValueError(f"xmin_bound must be 'reference' or 'corrected', got {xmin_bound!r}")
    L = len(starts)
    x = torch.log10(values.double())  # -inf for exact zeros
    seg, inside = ref.segment_ids(starts, ends, values.numel())
    segc = seg.clamp(min=0)
    inf = torch.full((L,), math.inf, dtype=torch.float64, device=values.device)
    positive = inside & (values > 0)
    mn = inf.scatter_reduce(0, segc, torch.where(positive, x, math.inf), reduce="amin")
    if lower is not None:
        lower = lower.to(device=values.device, dtype=torch.float64)
        mn = torch.where(lower > 0, torch.log10(lower.clamp(min=0)), mn)
    last = (ends - 1).clamp(min=0)
    mx = x[last]
    empty = ~torch.isfinite(mn) | ~torch.isfinite(mx)  # no positive eigenvalue
    mn = torch.where(empty, torch.zeros_like(mn), mn)
    mx = torch.where(empty, torch.zeros_like(mx), torch.maximum(mx, mn))
    same = mx == mn  # torch.histc widens an empty range by 1 on each side
    mn = torch.where(same, mn - 1, mn)
    mx = torch.where(same, mx + 1, mx)
    b = torch.floor((x - mn[segc]) / (mx - mn)[segc] * bins).clamp(0, bins - 1)
    b = torch.nan_to_num(b, nan=0.0).to(torch.int64)
    counts = torch.zeros(L * bins, dtype=torch.int64, device=values.device)
    counts.index_add_(0, segc * bins + torch.where(inside, b, 0), inside.to(torch.int64))
    ih = torch.argmax(counts.view(L, bins), dim=1)  # first fullest bin
    edge = mn + ih.double() * (mx - mn) / bins
    xmin2 = torch.pow(10.0, edge)
    if xmin_bound == "corrected":
        lo = 0.95 * xmin2
    elif scale is None:
        lo = torch.log10(0.95 * xmin2)
    else:  # log10 of the bound in absolute units, compared with absolute eigenvalues
        lo = torch.log10(0.95 * xmin2 * scale) / scale
    return lo, 1.5 * xmin2


def fit_power_law(spectra: Spectra | tuple[torch.Tensor, torch.Tensor], options: FitOptions | None = None,
                  **kw: Any) -> PowerLawFit:
    """Fit a power law to every layer's ESD in one pass (no Python loop over layers on the fast
    paths). ``spectra``: a `Spectra` or a ``(values, offsets)`` pair of a ragged batch.

    ``options``: a `tbfast.options.FitOptions`, or its fields as keywords (``fit="median"``,
    ``xmin_pos=2.0``, ``filter_zeros=False``, ``evals_thresh=1e-5``, ``bins=100``,
    ``xmin_bound="reference"``, ``fit_backend="auto"`` (alias ``backend``),
    ``refine_lower_edge=True``); not both.

    Fix-finger on float32 `Spectra`: the histogram's lower end is each layer's first eigenvalue,
    which the float32 Gram path only knows to about ``eps * lambda_max``; with
    ``refine_lower_edge`` (default) it is recomputed in float64 (`tbfast.lower_edge.lower_edge`, one more
    float64 Gram eigensolve per layer), so the window matches an fp64 SVD's. ``xmin`` is in
    absolute units (``Spectra.eig_scale`` applied)."""
    if options is None:
        options = split_options(kw, allowed=(FitOptions,), where="tbfast.fit_power_law")[FitOptions]
    elif not isinstance(options, FitOptions) or kw:
        raise TypeError("tbfast.fit_power_law: pass a FitOptions or keyword options, not both"
                        if kw else f"tbfast.fit_power_law: options must be a FitOptions, got {type(options).__name__}")
    method = options.fit
    scale = None
    if isinstance(spectra, Spectra):
        values, off = spectra.values, spectra.device_offsets()
        scale = spectra.eig_scale
    else:
        values, offsets = spectra
        off = None
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError("values must be a 1-D tensor of concatenated ascending eigenvalues")
    if values.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"eigenvalues must be float32 or float64, got {values.dtype}")
    if off is None:
        off = to_device(offsets, values.device)
    starts, ends = off[:-1].contiguous(), off[1:].contiguous()
    if options.filter_zeros:
        thresh = options.evals_thresh if scale is None else options.evals_thresh / scale
        starts = zero_filtered_starts(values, starts, ends, thresh)
    hill, scan = fit_kernels(values, options.fit_backend)
    values = values.contiguous()
    if method == "median":
        alpha, D, index = hill(values, starts, ends, float(options.xmin_pos))
    else:
        L = len(starts)
        if method == "ks":
            lo = torch.full((L,), -math.inf, dtype=torch.float64, device=values.device)
            hi = torch.full((L,), math.inf, dtype=torch.float64, device=values.device)
        else:
            lower = None
            if isinstance(spectra, Spectra) and values.dtype != torch.float64 and options.refine_lower_edge:
                lower = lower_edge(spectra, starts)
            lo, hi = fix_finger_window(values, starts, ends, options.bins, options.xmin_bound, lower=lower,
                                       scale=scale)
        alpha, D, index = scan(values, starts, ends, lo.contiguous(), hi.contiguous())
    pos = (starts + index.clamp(min=0)).clamp(max=max(values.numel() - 1, 0))
    xmin = torch.where(index >= 0, values[pos].double(), torch.full_like(alpha, math.nan))
    if scale is not None:
        xmin = xmin * scale  # absolute units
    return PowerLawFit(alpha=alpha, D=D, xmin=xmin, xmin_index=index, starts=starts, ends=ends, fit=method)
