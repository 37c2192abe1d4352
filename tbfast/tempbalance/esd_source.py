"""What TempBalance takes the ESD of: the weights (default), their gradients, or an optimizer state tensor.

``esd_of='grad'`` reads ``module.weight.grad``; ``esd_of='exp_avg'`` (Adam's first moment),
``'exp_avg_sq'`` or ``'momentum_buffer'`` (SGD) read ``optimizer.state[module.weight][esd_of]``
of the optimizer last given to ``TempBalance.bind`` / ``step`` / ``apply`` (``Hold.last`` in
`tbfast.tempbalance.binding`: a weak reference, let go by ``close()``).
Each layer keeps its weight's matrix rules (conv kernel positions, ``conv_norm``). A missing
gradient or state is a ValueError naming the layer.
"""
from __future__ import annotations

from typing import Any, Optional

from ..layers import Layer
from ..layers.core import tensor_layer

__all__ = ["source_layers", "optimizer_state"]


def optimizer_state(optimizer: Any, param: Any) -> Optional[dict]:
    """``optimizer.state[param]`` of the optimizer or the one it wraps (``.optimizer`` /
    ``.base_optimizer``, SAM-style); None when no state is kept for ``param``."""
    for opt in (optimizer, getattr(optimizer, "optimizer", None), getattr(optimizer, "base_optimizer", None)):
        state = getattr(opt, "state", None)
        if state is not None and hasattr(state, "get") and param in state:
            return state[param]
    return None


def _checked(layer: Layer, esd_of: str, t: Any) -> Any:
    if type(t).__name__ == "DTensor" or tuple(t.shape) != tuple(layer.shape):
        raise ValueError(f"TempBalance: layer {layer.name!r}: the {esd_of} tensor has shape {tuple(t.shape)}, not the "
                         f"weight's {tuple(layer.shape)} (sharded parameters, e.g. FSDP, are not supported with esd_of)")
    return t


def _tensor(layer: Layer, esd_of: str, optimizer: Any) -> Any:
    w = getattr(layer.module, "weight", None)
    if layer.kind not in ("Linear", "Conv2d") or w is None:
        raise ValueError(f"TempBalance: layer {layer.name!r} ({layer.kind}): esd_of={esd_of!r} needs an "
                         "nn.Linear / nn.Conv2d weight parameter")
    if esd_of == "grad":
        if w.grad is None:
            raise ValueError(f"TempBalance: layer {layer.name!r} has no gradient for esd_of='grad' (run backward() "
                             "before the ESD and zero the gradients after tb.step, or use start_step >= 1)")
        return _checked(layer, esd_of, w.grad)
    if optimizer is None:
        raise ValueError(f"TempBalance: esd_of={esd_of!r} reads the optimizer's state, but no optimizer was "
                         "given yet (pass it to tb.step(optimizer) / tb.apply(optimizer); use start_step >= 1)")
    state = optimizer_state(optimizer, w) or {}
    if esd_of not in state:
        raise ValueError(f"TempBalance: layer {layer.name!r} has no optimizer state {esd_of!r} yet "
                         f"({type(optimizer).__name__} holds {sorted(state) or 'nothing'} for it; the optimizer must "
                         "have stepped before the ESD: use start_step >= 1)")
    return _checked(layer, esd_of, state[esd_of])


def source_layers(layers: list[Layer], esd_of: str, optimizer: Any = None, conv_norm: float = 0.5) -> list[Layer]:
    """``layers`` (TempBalance's analysed layers) with their matrices read from ``esd_of``."""
    if esd_of == "weight":
        return layers
    return [tensor_layer(L.name, L.kind, _tensor(L, esd_of, optimizer), index=L.index, conv_norm=conv_norm,
                         module=L.module) for L in layers]
