"""The exact LoRA ESD inside the ESD stage: which layers take the update path, and their eigenvalues.

`tbfast.spectra.layer_spectra` (and through it `tbfast.esd`, `layer_metrics`, `analyze`, the CLI
and `TempBalance`) calls `update_path_values` when a `BaseSpectrumCache` is given. A layer is
eligible when it carries its LoRA factors (``Layer.lora``: PEFT LoRA modules of a model, and
the layers of an adapter directory with ``base=``) and, with ``min_ratio``, when its Gram side
``n`` is at least ``min_ratio`` times its total adapter rank ``R`` (below that the full
eigensolve is the faster one: `BREAK_EVEN_N_OVER_R`) and, with ``cpu_only``, when its base
weight lives on the CPU (the op's fast kernel is the CPU one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layers import Layer
from .cache import BaseSpectrumCache
from .update import DEFAULT_CANCEL_LIMIT, LoRAItem, lora_eigenvalues

__all__ = ["BREAK_EVEN_N_OVER_R", "UpdateValues", "lora_item", "update_path_values"]

#: The ratio n / r from which the update path (warm cache) beats the full eigensolve of the merged
#: Gram, by the full path's precision. Measured (benchmarks/lora_break_even.py, r = 8, one thread,
#: process CPU time, 2-core Intel Xeon with AVX-512, 2026-12-06 07:50 UTC, chained root model; results
#: in benchmarks/results/2026-12-06_cpu1_lora_break_even_r6.json): against float64 0.58x at
#: n/r = 32, 1.27x at 64; against the default float32 path 0.84x at n/r = 64, 1.16x at 96, 1.75x at
#: 128, 3.1x at 256.
BREAK_EVEN_N_OVER_R = {torch.float64: 64.0, torch.float32: 96.0}


@dataclass
class UpdateValues:
    """Float64 CPU eigenvalues (ascending, times ``scale**2``) of the layers at ``positions``
    and each one's ``esd_path`` (``update``, or ``full`` where the update was not exact)."""

    positions: list[int]
    values: list[torch.Tensor]
    paths: list[str]


def lora_item(layer: Layer, *, min_ratio: float = 0.0, cpu_only: bool = False) -> LoRAItem | None:
    """``layer`` as a `LoRAItem` when it may take the update path, else None."""
    if layer.lora is None or layer.k != 1:
        return None
    parts = layer.lora()
    if parts is None:
        return None
    w0, updates = parts
    if w0.dim() != 2 or (cpu_only and w0.device.type != "cpu"):
        return None
    rank = sum(int(A.shape[0]) for A, _, _, _ in updates)  # lora_A is (r, in)
    if min_ratio > 0 and min(w0.shape) < min_ratio * max(rank, 1):
        return None
    return LoRAItem(layer.name, w0, updates)


def update_path_values(layers: list[Layer], cache: BaseSpectrumCache, *, min_ratio: float = 0.0,
                       cpu_only: bool = False, backend: str = "auto",
                       cancel_limit: float = DEFAULT_CANCEL_LIMIT) -> UpdateValues:
    """The eligible layers' eigenvalues through ``cache`` and ``tbfast::eigvalsh_update`` (see
    `tbfast.lora.update.lora_eigenvalues`); the other layers are left to the caller."""
    pos, items = [], []
    for i, layer in enumerate(layers):
        item = lora_item(layer, min_ratio=min_ratio, cpu_only=cpu_only)
        if item is not None:
            pos.append(i)
            items.append(item)
    results = lora_eigenvalues(items, cache, backend=backend, cancel_limit=cancel_limit) if items else []
    values = [v * layers[i].scale ** 2 for i, (v, _) in zip(pos, results)]
    return UpdateValues(pos, values, [p for _, p in results])
