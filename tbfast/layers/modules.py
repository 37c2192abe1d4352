"""Layers of an ``nn.Module``: the module walk (`find_layers`), PEFT LoRA modules included.

`find_layers` walks ``named_modules()`` in order and returns one `Layer` per analysable module:
``nn.Linear``, ``nn.Conv2d`` / ``nn.Conv1d`` (one matrix per kernel position, scaled by
``sqrt(conv_norm)``), optionally ``nn.Embedding``, and PEFT LoRA layers (merged ``W + s * B @ A``).
The matrix rules are those of `tbfast.layers.core`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .experts import EXPERT_KIND, module_expert_layers
from .core import (LAYER_KINDS, Layer, check_weight, evals_in_range, kind_of_module, merge_lora, name_filter,
                   tensor_layer, wanted_kinds, weight_layer)

__all__ = ["find_layers", "lora_parts", "is_lora_module"]


def is_lora_module(module: nn.Module) -> bool:
    """True for a PEFT LoRA layer (``lora_A`` / ``lora_B`` ModuleDicts and ``scaling``)."""
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "scaling")) and isinstance(
        getattr(module, "lora_A"), nn.ModuleDict)


def lora_parts(name: str, module: nn.Module, lora_scaling: bool = True
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, float, bool]]] | None:
    """The base weight of a PEFT LoRA module and its active adapters' updates ``(A, B, s,
    transpose)`` (as `merge_lora` takes them, detached); None for LoRA on convolutions or
    embeddings (analysed through the base layer only)."""
    base = getattr(module, "base_layer", module)
    w = getattr(base, "weight", None)
    if w is None:
        return None
    w = check_weight(name, w)
    if w.dim() != 2:
        return None
    adapters = [a for a in module.lora_A.keys() if a in module.lora_B]
    active = getattr(module, "active_adapters", adapters)
    if isinstance(active, str):
        active = [active]
    adapters = [a for a in adapters if a in active]
    fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
    updates = [(module.lora_A[a].weight.detach(), module.lora_B[a].weight.detach(),
                float(module.scaling[a]) if lora_scaling else 1.0, fan_in_fan_out) for a in adapters]
    return w.detach(), updates


def _lora_layer(name: str, module: nn.Module, index: int, lora_scaling: bool) -> Layer | None:
    """The merged layer of a PEFT LoRA module (its active adapters, PEFT's own ``scaling``);
    None for LoRA on convolutions/embeddings (analysed through the base layer only)."""
    parts = lora_parts(name, module, lora_scaling)
    if parts is None:
        return None
    w = parts[0]

    def loader():
        w0, updates = lora_parts(name, module, lora_scaling)  # read when the ESD needs it
        return merge_lora(name, w0, updates).unsqueeze(0)

    layer = weight_layer(name, "LoRA", w.shape, index=index, loader=loader, module=module)
    layer.lora = lambda: lora_parts(name, module, lora_scaling)
    return layer


def _base_lookup(base: nn.Module | Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
    if base is None:
        return None
    if isinstance(base, nn.Module):
        return {k: v for k, v in base.state_dict().items()}
    if isinstance(base, Mapping):
        return base
    raise TypeError(f"base must be an nn.Module or a state dict, got {type(base).__name__}")


def find_layers(
    model: nn.Module,
    *,
    types: Iterable[str] | None = None,
    include_embedding: bool = False,
    conv_norm: float = 0.5,
    include: str | None = None,
    exclude: str | None = None,
    base: nn.Module | Mapping[str, torch.Tensor] | None = None,
    lora_scaling: bool = True,
    min_evals: int = 0,
) -> list[Layer]:
    """Analysable layers of ``model`` in ``named_modules()`` order.

    ``types`` restricts the kinds (default: Linear, Conv2d, Conv1d, LoRA, Expert (one row per
    expert of a fused 3-D MoE parameter, `tbfast.layers.experts`), plus Embedding when
    ``include_embedding``). ``include`` / ``exclude`` are regular expressions searched in the layer
    name. ``base`` (a model or state dict) turns each layer into the delta ``W - W_base``.
    ``lora_scaling=False`` reproduces the reference quirk that forgets ``lora_alpha / r``.
    Layers with fewer than ``min_evals`` eigenvalues are dropped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_layers expects an nn.Module, got {type(model).__name__}")
    if conv_norm <= 0:
        raise ValueError(f"conv_norm must be positive, got {conv_norm}")
    wanted = wanted_kinds(types, include_embedding, default=("Linear", "Conv2d", "Conv1d", "LoRA", EXPERT_KIND))
    unknown = wanted - set(LAYER_KINDS)
    if unknown:
        raise ValueError(f"unknown layer types {sorted(unknown)}; choose from {LAYER_KINDS}")
    if "Linear" in wanted:
        wanted.add("LoRA")  # a LoRA-wrapped Linear is still a Linear layer
    selected = name_filter(include, exclude)
    base_sd = _base_lookup(base)

    layers: list[Layer] = []
    skip_prefixes: list[str] = []
    for index, (name, module) in enumerate(model.named_modules()):
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if is_lora_module(module):
            skip_prefixes.append(name + ".")  # base_layer, lora_A.x, lora_B.x belong to this layer
            kind: str | None = "LoRA"
        else:
            kind = kind_of_module(module)
        if kind is None and EXPERT_KIND in wanted:  # fused MoE experts: one row per expert
            layers += [l for l in module_expert_layers(name, module, index, base=base_sd)
                       if selected(l.name) and evals_in_range(l.num_evals, min_evals)]
            continue
        if kind is None or kind not in wanted or not selected(name):
            continue
        if kind == "LoRA":
            layer = _lora_layer(name, module, index, lora_scaling)
            if layer is None:
                continue
            if base_sd is not None:
                raise ValueError(f"layer {name!r}: base= deltas are not supported together with LoRA layers")
        else:
            delta = None
            if base_sd is not None:
                key = f"{name}.weight"
                delta = base_sd.get(key, base_sd.get(f"{name}.base_layer.weight"))
                if delta is None:
                    raise KeyError(f"layer {name!r}: no {key!r} in the base model / state dict")
            layer = tensor_layer(name, kind, module.weight, index=index, conv_norm=conv_norm, module=module,
                                 base=delta)
        if not evals_in_range(layer.num_evals, min_evals):
            continue
        layers.append(layer)
    return layers
