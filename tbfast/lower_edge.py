"""Each layer's first fitted eigenvalue recomputed in float64 (the fix-finger histogram's lower end).

The fix-finger window (SPEC section 5) histograms ``log10`` of the eigenvalues over
``[min, max]``, so the whole bin grid hangs on the smallest eigenvalue. A float32 Gram
eigensolve knows every eigenvalue only to about ``eps32 * lambda_max`` in absolute terms: the
smallest ones of a near-singular layer are rounding noise (or exactly 0 after clamping), while
the references' SVD gives them to high relative accuracy. A different lower end shifts every bin
edge and can move the window. This module recomputes each layer's spectrum from a float64 Gram
(absolute error about ``eps64 * lambda_max``) and returns the value at the fit's first index.
"""

from __future__ import annotations

import torch

from ._transfer import to_device
from .options import ESDOptions
from .spectra import Spectra, layer_spectra

__all__ = ["lower_edge"]


def lower_edge(spectra: Spectra, starts: torch.Tensor, *, memory_budget: int | None = None) -> torch.Tensor:
    """Float64 value of eigenvalue ``starts[l]`` of every layer (an index into ``spectra.values``,
    e.g. after zero filtering), from a float64 Gram eigensolve of the layer's matrices, in the
    units of ``spectra.values`` (``Spectra.eig_scale`` applied). Shape ``(L,)`` on the values'
    device. A layer whose float64 spectrum is not finite gets NaN."""
    dev = spectra.values.device
    fp64 = layer_spectra(spectra.layers, ESDOptions(method="gram", dtype=torch.float64, device=dev,
                                                    memory_budget=memory_budget or None))
    values64, offsets64, scale64 = fp64.values, fp64.offsets, fp64.eig_scale
    off = spectra.device_offsets()
    rel = (starts - off[:-1]).clamp(min=0)
    pos = to_device(offsets64[:-1], dev) + rel
    pos = pos.clamp(max=max(values64.numel() - 1, 0))
    return values64[pos] * scale64 / spectra.scales()
