"""Sharded weights materialised on the rank that analyses them, never on every rank.

- FSDP2 (``fully_shard``: DTensor weights): for a 1-D mesh sharded on dim 0 (FSDP2's layout)
  the shards are sent to the owner with one ``gather`` per layer, layer by layer in the same
  global order on every rank (a collective must be entered by all ranks in the same order); any
  other DTensor layout falls back to ``full_tensor()`` on every rank, kept only by the owner.
- FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``): layers are built from the
  modules' attributes and gathered one FSDP unit at a time with ``summon_full_params``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..layers import Layer
from ..layers.core import as_matrices
from .gather import check_same_layers, sync_error
from .planning import layer_cost, plan

__all__ = ["materialise", "fsdp1_units", "fsdp1_layers"]


# ---------------------------------------------------------------------------------------------- DTensor
def _dtensor_type() -> Optional[type]:
    """DTensor, if its module is loaded (no DTensor can exist otherwise; the import is slow)."""
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _sharded_weight(layer: Layer) -> Optional[torch.Tensor]:
    DT = _dtensor_type()
    w = getattr(layer.module, "weight", None) if layer.module is not None else None
    if DT is not None and isinstance(w, DT):
        return w
    return None


def _gather_to_owner_ok(w: Any, group: Any) -> bool:
    """Whether ``w`` is laid out as FSDP2 does (1-D mesh over ``group``'s ranks, Shard(0), chunked
    like torch.chunk), so the owner can receive the shards with one ``gather``."""
    from torch.distributed.tensor import Shard

    mesh = w.device_mesh
    if mesh.ndim != 1 or len(w.placements) != 1 or not isinstance(w.placements[0], Shard) \
            or w.placements[0].dim != 0:
        return False
    if dist.get_process_group_ranks(mesh.get_group()) != dist.get_process_group_ranks(group):
        return False
    ws, r = dist.get_world_size(group), dist.get_rank(group)
    rows = w.shape[0]
    c = -(-rows // ws)
    expect = min(c, max(0, rows - r * c))
    local = w.to_local()
    return tuple(local.shape) == (expect, *w.shape[1:])


def materialise(layers: list[Layer], owner: list[int], group: Any, stats: dict) -> list[Layer]:
    """Replace the loaders of DTensor layers: the owner gets the full weight, the others nothing."""
    sharded = [(i, w) for i, l in enumerate(layers) if (w := _sharded_weight(l)) is not None]
    for l in layers:
        if l.kind == "LoRA" and l.module is not None:
            base = getattr(l.module, "base_layer", l.module)
            if _dtensor_type() is not None and isinstance(getattr(base, "weight", None), _dtensor_type()):
                raise TypeError(f"layer {l.name!r}: LoRA layers with sharded (DTensor) weights are not supported")
    fast = all(_gather_to_owner_ok(w, group) for _, w in sharded)
    fast = check_same_layers(layers, group, fast)
    if not sharded:
        return layers
    me, ws = dist.get_rank(group), dist.get_world_size(group)
    out = list(layers)
    held = 0
    for i, w in sharded:  # global layer order: the same sequence of collectives on every rank
        with torch.no_grad():
            if fast:
                rows = w.shape[0]
                c = -(-rows // ws)
                local = w.to_local().detach()
                buf = local.new_zeros((c, *w.shape[1:]))
                buf[:local.shape[0]] = local
                dst = dist.get_global_rank(group, owner[i])
                # the owner receives straight into one buffer (no second copy from concatenating)
                whole = local.new_empty((c * ws, *w.shape[1:])) if me == owner[i] else None
                bufs = list(whole.chunk(ws)) if whole is not None else None
                dist.gather(buf, bufs, dst=dst, group=group)
                full = whole[:rows] if whole is not None else None
            else:
                full = w.full_tensor().detach()
        if me != owner[i]:
            del full
            continue
        held += full.untyped_storage().nbytes()
        stats["materialized"].append(layers[i].name)
        out[i] = _full_layer(layers[i], full)
    stats["materialized_bytes"] = held
    return out


def _full_layer(layer: Layer, full: torch.Tensor) -> Layer:
    return dataclasses.replace(layer, loader=lambda: as_matrices(full))


# ---------------------------------------------------------------------------------------------- FSDP1
def fsdp1_units(model: Any) -> list:
    """FSDP1 (``FullyShardedDataParallel``) units of ``model`` in module order; [] if none."""
    if not isinstance(model, torch.nn.Module):
        return []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDP)]


def _weight_shape(module: torch.nn.Module, kind: str) -> tuple[int, ...]:
    if kind == "Linear":
        return (module.out_features, module.in_features)
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def fsdp1_layers(model: torch.nn.Module, group: Any, costs: Optional[dict[int, float]], *,
                  types: Any = None, conv_norm: float = 0.5, include: Optional[str] = None,
                  exclude: Optional[str] = None, min_evals: int = 0, **unsupported: Any) -> list[Layer]:
    """Layers of an FSDP1 model (``use_orig_params=True``): shapes from the modules' attributes,
    full weights only on the owning rank, gathered one FSDP unit at a time with
    ``summon_full_params(unit, recurse=False, writeback=False)``."""
    import re

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from ..layers import block_index

    if unsupported:
        raise TypeError(f"options {sorted(unsupported)} are not supported for FSDP1 models")
    wanted = set(types) if types is not None else {"Linear", "Conv1d", "Conv2d"}
    classes = {"Linear": torch.nn.Linear, "Conv1d": torch.nn.Conv1d, "Conv2d": torch.nn.Conv2d}
    inc, exc = (re.compile(include) if include else None), (re.compile(exclude) if exclude else None)
    unit_of: dict[int, Any] = {}

    def walk(module: torch.nn.Module, unit: Any) -> None:
        for child in module.children():
            walk(child, child if isinstance(child, FSDP) else unit)
        unit_of[id(module)] = unit

    walk(model, model if isinstance(model, FSDP) else None)
    layers: list[Layer] = []
    for index, (name, module) in enumerate(model.named_modules()):
        kind = next((k for k, c in classes.items() if k in wanted and isinstance(module, c)), None)
        if kind is None or (inc is not None and not inc.search(name)) or (exc is not None and exc.search(name)):
            continue
        shape = _weight_shape(module, kind)
        k = int(math.prod(shape[2:])) if len(shape) > 2 else 1
        layer = Layer(name=name, kind=kind, shape=shape, rows=shape[0], cols=shape[1], k=k,
                      scale=math.sqrt(conv_norm) if kind != "Linear" else 1.0, block=block_index(name),
                      index=index, loader=None, module=module)
        if layer.num_evals >= min_evals:
            layers.append(layer)
    owner = plan(layers, dist.get_world_size(group), cost=lambda l: layer_cost(l, costs))
    me = dist.get_rank(group)
    error: Optional[BaseException] = None
    by_unit: dict[int, list[int]] = {}
    for i, l in enumerate(layers):
        u = unit_of.get(id(l.module))
        if u is None:
            raise TypeError(f"layer {l.name!r} is not inside an FSDP unit")
        by_unit.setdefault(id(u), []).append(i)
    for u, unit in enumerate(fsdp1_units(model)):  # module order: the same collectives on every rank
        idx = by_unit.get(id(unit), [])
        if not idx and u > 0:  # the outermost unit goes first even without layers: it must be the root
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False), torch.no_grad():
            for i in idx:
                w = layers[i].module.weight
                if owner[i] != me or error is not None:
                    continue
                if tuple(w.shape) != layers[i].shape:  # kept until every rank is past its collectives
                    error = ValueError(f"layer {layers[i].name!r}: full weight has shape {tuple(w.shape)}, "
                                       f"expected {layers[i].shape} (FSDP1 needs use_orig_params=True)")
                    continue
                layers[i] = _full_layer(layers[i], w.detach().clone())
    sync_error(error, group)
    return layers
