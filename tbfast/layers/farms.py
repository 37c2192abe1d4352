"""FARMS windows: a layer's matrices cut into fixed-aspect-ratio submatrices (Hu et al., ICML 2025).

FARMS ("Fixed-Aspect-Ratio Matrix Subsampling") estimates alpha from the ESD pooled over many
submatrices of one shape, which removes the bias that a matrix's aspect ratio puts on alpha.
`farms_layers` turns each `Layer` into a `Layer` whose ``k`` matrices are those windows (all of
one ``r x c`` shape), so the ESD stage pools them like a convolution's kernel positions, groups
every window of every layer by Gram size and solves them in as few batched eigensolver calls as
the memory budget allows. The geometry (`window_shape`, `grid_starts`) follows the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..options import FarmsOptions
from .core import Layer

__all__ = ["window_shape", "grid_starts", "farms_layer", "farms_layers", "extract_windows"]


def window_shape(rows: int, cols: int, options: FarmsOptions) -> tuple[int, int]:
    """The window ``(r, c)`` for a ``rows x cols`` matrix: ``(window_rows, int(window_rows *
    aspect_ratio))``, both sides multiplied by one factor ``f = min(1, rows / r, cols / c)``
    (floored, at least 1) when the matrix is smaller than the window."""
    r = options.window_rows
    c = max(1, int(options.window_rows * options.aspect_ratio))
    f = min(1.0, rows / r, cols / c)
    if f < 1.0:
        r, c = max(1, min(rows, int(r * f))), max(1, min(cols, int(c * f)))
    return r, c


def grid_starts(size: int, w: int, per_dim: int) -> list[int]:
    """Start offsets of windows of width ``w`` along a side of ``size`` (``w <= size``): step
    ``max(1, (size - w) // (per_dim - 1))``, ``min(per_dim, (size - w) // step + 1)`` windows,
    start ``min(i * step, size - w)``; one window at 0 when ``per_dim == 1`` or ``w == size``."""
    span = size - w
    if span < 0:
        raise ValueError(f"window {w} larger than side {size}")
    if per_dim <= 1 or span == 0:
        return [0]
    step = max(1, span // (per_dim - 1))
    count = min(per_dim, span // step + 1)
    return [min(i * step, span) for i in range(count)]


def extract_windows(mats: torch.Tensor, row_starts: Sequence[int], col_starts: Sequence[int], r: int,
                    c: int) -> torch.Tensor:
    """The windows of a ``(k, rows, cols)`` batch as a contiguous ``(k * nr * nc, r, c)`` tensor,
    ordered by matrix, then row start, then column start."""
    dev = mats.device
    ri = (torch.as_tensor(list(row_starts), device=dev).unsqueeze(1) + torch.arange(r, device=dev)).reshape(-1)
    ci = (torch.as_tensor(list(col_starts), device=dev).unsqueeze(1) + torch.arange(c, device=dev)).reshape(-1)
    k, nr, nc = mats.shape[0], len(row_starts), len(col_starts)
    win = mats.index_select(1, ri).index_select(2, ci)  # (k, nr*r, nc*c)
    win = win.reshape(k, nr, r, nc, c).permute(0, 1, 3, 2, 4)
    return win.reshape(k * nr * nc, r, c)


def farms_layer(layer: Layer, options: FarmsOptions) -> Layer:
    """``layer`` with its matrices replaced by their FARMS windows (same name, kind, shape,
    block, index, scale and module; ``rows x cols`` the window, ``k`` the number of windows)."""
    r, c = window_shape(layer.rows, layer.cols, options)
    rs = grid_starts(layer.rows, r, options.windows_per_dim)
    cs = grid_starts(layer.cols, c, options.windows_per_dim)

    def loader(layer=layer, rs=rs, cs=cs, r=r, c=c) -> torch.Tensor:
        return extract_windows(layer.matrices(), rs, cs, r, c)

    return Layer(name=layer.name, kind=layer.kind, shape=layer.shape, rows=r, cols=c,
                 k=layer.k * len(rs) * len(cs), scale=layer.scale, block=layer.block, index=layer.index,
                 loader=loader, module=layer.module)


def farms_layers(layers: Sequence[Layer], options: FarmsOptions) -> list[Layer]:
    """`farms_layer` of every layer, in order (nothing is read here)."""
    return [farms_layer(l, options) for l in layers]
