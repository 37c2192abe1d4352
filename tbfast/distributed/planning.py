"""Which rank analyses which layer: a cost model of one layer's ESD and a longest-processing-
time-first plan over the ranks (deterministic, so every rank computes the same plan)."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

from ..layers import Layer

__all__ = ["EIG_FLOP_WEIGHT", "layer_cost", "plan", "plan_loads"]

#: relative cost of one eigensolver flop against one Gram (GEMM) flop; the eigenvalue-only
#: solvers (tridiagonal reduction) run far below GEMM speed. Calibrated on the 2-core CPU
#: (see BENCHMARKS.md, "Distributed"); override with ``costs=`` for a measured table.
EIG_FLOP_WEIGHT = 6.0


def layer_cost(layer: Layer, costs: Optional[dict[int, float]] = None) -> float:
    """Estimated cost of one layer's ESD.

    Without ``costs``: flops of the Gram matrices (``2 * k * N * n^2`` for ``k`` matrices of
    ``N x n``, ``n`` the smaller side) plus ``EIG_FLOP_WEIGHT * k * (4/3) n^3`` for the
    eigenvalue-only solve. With ``costs`` (measured seconds per matrix for some Gram sizes
    ``n``, e.g. from ``tbfast bench``'s scale benchmark): ``k * costs[n]`` scaled by the
    ``N / n`` aspect ratio's Gram share, the nearest measured size scaled by ``n^3`` otherwise.
    """
    n = layer.gram_size
    big = max(layer.rows, layer.cols)
    if costs:
        if n in costs:
            base = costs[n]
        else:
            ref_n = min(costs, key=lambda m: abs(math.log(m) - math.log(max(n, 1))))
            base = costs[ref_n] * (n / ref_n) ** 3
        gram_share = 2.0 / (2.0 + EIG_FLOP_WEIGHT * 4.0 / 3.0)
        return layer.k * base * (1.0 + gram_share * (big / n - 1.0))
    return layer.k * (2.0 * big * n * n + EIG_FLOP_WEIGHT * (4.0 / 3.0) * n ** 3)


def plan(layers: Sequence[Layer], world_size: int,
         cost: Callable[[Layer], float] = layer_cost) -> list[int]:
    """Owner rank of every layer: longest-processing-time-first greedy on ``cost``.

    Layers are taken in decreasing cost (ties: layer order) and each goes to the rank with the
    least load so far (ties: lowest rank). Deterministic, so every rank computes the same plan.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    costs = [float(cost(l)) for l in layers]
    order = sorted(range(len(layers)), key=lambda i: (-costs[i], i))
    load = [0.0] * world_size
    owner = [0] * len(layers)
    for i in order:
        r = min(range(world_size), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += costs[i]
    return owner


def plan_loads(layers: Sequence[Layer], owner: Sequence[int], world_size: int,
               cost: Callable[[Layer], float] = layer_cost) -> list[float]:
    """Total estimated cost per rank of a plan (the maximum is the critical path)."""
    load = [0.0] * world_size
    for l, r in zip(layers, owner):
        load[r] += float(cost(l))
    return load
