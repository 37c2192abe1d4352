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

#: The ratio n / r above which the update path (warm cache) beats the full eigensolve of the
#: merged Gram, by the full path's precision: near n = 120 r against float64 (issue 23's
#: prototype); against float32, between 256 (n = 2048, r = 8: 0.85x, slower) and 512 (n = 4096,
#: r = 8: 2.2x, BENCHMARKS.md), measured on this busy 2-core CPU.
BREAK_EVEN_N_OVER_R = {torch.float64: 128.0, torch.float32: 384.0}


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
