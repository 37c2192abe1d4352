"""Replicated weights that should agree across ranks: one cheap checksum per layer, gathered with
the table's rows, so that ranks holding different weights (a bug in the caller's setup) or a
NaN / Inf weight on a rank that does not analyse the layer stop the run on every rank.

The checksum of a layer is the float64 sum and the float64 2-norm of its weight, computed where
the weight lives (one pass over the weights, one host copy per device). Two replicas that are
bit-identical give identical checksums; any ordinary divergence (a missed broadcast, a different
seed, a rank that skipped a step) changes them. It is a check, not a cryptographic hash.
Layers whose weight is not held whole on every rank (read from a checkpoint by their owner only,
FSDP shards, DTensors) are not checked.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from ..layers import Layer

__all__ = ["ReplicaMismatchError", "CHECK_WIDTH", "replica_checks", "raise_on_disagreement"]

CHECK_WIDTH = 3  # checked (0/1), sum, 2-norm


class ReplicaMismatchError(RuntimeError):
    """The ranks' copies of some layer differ, or one holds NaN/Inf where another does not."""


def _whole_weight(layer: Layer) -> torch.Tensor | None:
    w = getattr(layer.module, "weight", None) if layer.module is not None else None
    if not isinstance(w, torch.Tensor) or type(w).__name__ == "DTensor" or w.is_meta:
        return None
    if w.dim() < 2 or w.numel() != layer.rows * layer.cols * layer.k:  # e.g. an FSDP1 shard view
        return None
    return w


def replica_checks(layers: Sequence[Layer]) -> np.ndarray:
    """``(len(layers), CHECK_WIDTH)`` float64: for each layer whose weight this rank holds
    whole, ``(1, sum, 2-norm)`` of that weight; zeros otherwise."""
    out = np.zeros((len(layers), CHECK_WIDTH), dtype=np.float64)
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    with torch.no_grad():
        for i, l in enumerate(layers):
            w = _whole_weight(l)
            if w is not None:
                w = w.detach()
                by_device[w.device].append(
                    (i, torch.stack([w.sum(dtype=torch.float64), torch.linalg.vector_norm(w, dtype=torch.float64)])))
        for items in by_device.values():
            vals = torch.stack([v for _, v in items]).cpu().numpy()  # one host copy per device
            for (i, _), v in zip(items, vals):
                out[i] = (1.0, v[0], v[1])
    return out


def raise_on_disagreement(checks: np.ndarray, owner: Sequence[int], names: Sequence[str]) -> None:
    """``checks``: every rank's `replica_checks`, ``(world, L, CHECK_WIDTH)``, the same on every
    rank, so every rank raises the same `ReplicaMismatchError` (naming the layers and ranks) or
    none. A layer is fine when every rank that checked it agrees with its owner bit for bit, or
    when all of them hold NaN/Inf (the owner's table reports that layer as usual)."""
    problems = []
    for i, name in enumerate(names):
        ranks = [r for r in range(checks.shape[0]) if checks[r, i, 0]]
        if len(ranks) < 2:
            continue
        vals = {r: checks[r, i, 1:] for r in ranks}
        finite = {r: bool(np.isfinite(v).all()) for r, v in vals.items()}
        bad = [r for r in ranks if not finite[r]]
        if bad and len(bad) < len(ranks):
            problems.append(f"layer {name!r}: weights hold NaN or Inf on rank(s) {bad} but not on rank(s) "
                            f"{[r for r in ranks if finite[r]]}")
            continue
        if bad:
            continue
        ref = owner[i] if owner[i] in vals else ranks[0]
        differ = [r for r in ranks if r != ref and vals[r].tobytes() != vals[ref].tobytes()]
        if differ:
            problems.append(f"layer {name!r}: weights differ between rank {ref} (which analyses it) and rank(s) "
                            f"{differ} (sum {vals[ref][0]!r} vs {[vals[r][0] for r in differ]!r})")
    if problems:
        more = f" (and {len(problems) - 1} more layer(s))" if len(problems) > 1 else ""
        raise ReplicaMismatchError("ranks hold different copies of replicated weights: " + problems[0] + more
                                   + "; every rank must hold the same weights (a missed broadcast or seed?)")
