"""Which parameters of a model follow which TempBalance schedule key, and which optimizer group holds which key.

- `param_layout`: model + schedule keys + options -> tuned groups ``(label, key, params)`` in
  the original's order, and the untuned parameters (used by `TempBalance` and by
  `tbfast.integrations.hf.param_groups`);
- `param_keys`: ``id(param) -> key`` of a layout (``None`` = untuned);
- `optimizer_groups` / `group_keys`: the param groups of an optimizer (or of a wrapper around
  one) and the schedule key of each, matched by parameter identity.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Collection, Iterable, Mapping, Optional

from torch import nn

from ..layers import block_index

__all__ = ["param_layout", "param_keys", "optimizer_groups", "group_keys", "Layout"]

#: tuned groups ``(label, key, params)`` and the untuned parameters
Layout = "tuple[list[tuple[str, Any, list[nn.Parameter]]], list[nn.Parameter]]"


def _layer_groups(net: nn.Module, keys: Collection[str], opts: Any, seen: set[int]) -> list:
    """'layer': one group per tuned module in module order, plus its coupled BatchNorm2d / LayerNorm."""
    groups = []
    last_conv = last_linear = None
    for name, module in net.named_modules():
        key = None
        if name in keys:
            key = name
        elif opts.batchnorm and isinstance(module, nn.BatchNorm2d):
            partner = name.replace("bn", "conv") if opts.batchnorm_type == "name" else last_conv
            if partner in keys:
                key = partner
        elif opts.layernorm and isinstance(module, nn.LayerNorm):
            if last_linear in keys:
                key = last_linear
        if isinstance(module, nn.Conv2d):
            last_conv = name
        if isinstance(module, nn.Linear):
            last_linear = name
        if key is not None:
            params = []
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            if params:
                groups.append((name, key, params))
    return groups


def _block_groups(net: nn.Module, keys: Collection[str], opts: Any, seen: set[int]) -> list:
    """'block' / 'layer_in_block': one group per block (its parameters not owned by a separately
    tuned layer), plus one per tuned layer for 'layer_in_block', in parameter order."""
    by_key: "OrderedDict[str, list]" = OrderedDict()
    owner: dict[int, str] = {}
    if opts.granularity == "layer_in_block":
        modules = dict(net.named_modules())
        for name in keys:
            if not name.startswith("block."):
                for p in modules[name].parameters():
                    owner.setdefault(id(p), name)
    for pname, p in net.named_parameters():
        key = owner.get(id(p))
        if key is None:
            b = block_index(pname, opts.block_pattern)
            key = f"block.{b}" if b is not None and f"block.{b}" in keys else None
        if key is None or id(p) in seen:
            continue
        seen.add(id(p))
        by_key.setdefault(key, []).append(p)
    return [(key, key, params) for key, params in by_key.items()]


def param_layout(net: nn.Module, keys: Collection[str], opts: Any) -> Layout:
    """Tuned groups ``(label, key, params)`` in the original's order, and the untuned params.

    ``keys``: the schedule keys (layer names and/or ``"block.<b>"``); ``opts``: a
    `TempBalanceOptions` (``granularity``, ``batchnorm``, ``batchnorm_type``, ``layernorm``,
    ``block_pattern``). 'layer': one group per tuned module in ``named_modules()`` order, plus
    coupled BatchNorm2d (``batchnorm``) and LayerNorm (``layernorm``) modules with their layer's
    key. BN coupling 'name': the layer named like the BN with 'bn' replaced by 'conv'; 'order':
    the nearest nn.Conv2d before the BN in module order. LN coupling: the nearest nn.Linear
    before the LN. A parameter shared by two modules goes to the first group that claims it.
    """
    seen: set[int] = set()
    build = _layer_groups if opts.granularity == "layer" else _block_groups
    groups = build(net, keys, opts, seen)
    untuned = [p for p in net.parameters() if id(p) not in seen]
    return groups, untuned


def param_keys(layout: Layout) -> dict[int, Any]:
    """``id(param) -> schedule key`` of a `param_layout` result (None for untuned parameters)."""
    groups, untuned = layout
    keys: dict[int, Any] = {id(p): None for p in untuned}
    for _, key, params in groups:
        for p in params:
            keys[id(p)] = key
    return keys


def optimizer_groups(optimizer: Any) -> list[dict]:
    """``param_groups`` of an optimizer or of a wrapper exposing an inner optimizer's groups."""
    for obj in (optimizer, getattr(optimizer, "optimizer", None), getattr(optimizer, "base_optimizer", None)):
        groups = getattr(obj, "param_groups", None) if obj is not None else None
        if groups is not None:
            return groups
    raise TypeError(
        f"{type(optimizer).__name__} has no param_groups (nor an inner .optimizer / .base_optimizer with them)"
    )


def group_keys(param_groups: Iterable[Mapping], keys: Mapping[int, Any],
               names: Optional[Mapping[int, str]] = None) -> list[Any]:
    """The schedule key of every param group, from ``keys`` (`param_keys`); ``names`` (``id -> name``)
    labels the error of a group that mixes keys. A parameter of another model is an error too."""
    names = names or {}
    out = []
    for gi, group in enumerate(param_groups):
        found = set()
        for p in group["params"]:
            if id(p) not in keys:
                raise ValueError(
                    f"optimizer param group {gi} holds a parameter of shape {tuple(p.shape)} that is not "
                    "a parameter of the model TempBalance was built with"
                )
            found.add(keys[id(p)])
        if len(found) > 1:
            ex = {k if k is not None else "untuned": next(names.get(id(p), "?") for p in group["params"]
                                                       if keys[id(p)] == k) for k in found}
            raise ValueError(
                f"optimizer param group {gi} mixes parameters that TempBalance schedules separately "
                f"({ex}); build the optimizer from build_optimizer_param_group() or tbfast.integrations"
            )
        out.append(found.pop() if found else None)
    return out
