"""Layers from raw tensors (`layers_from_matrices`): no module, no file, the tensors as given."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .core import Layer, block_index, check_weight, tensor_layer

__all__ = ["layers_from_matrices"]


def layers_from_matrices(
    matrices: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    *, conv_norm: float = 0.5,
) -> list[Layer]:
    """Layers from raw tensors: a 2-D tensor is one matrix, a 3-D tensor ``(k, rows, cols)`` is
    ``k`` matrices pooled into one ESD (scale 1). A mapping gives names; a sequence is named by
    position. 4-D tensors are treated as Conv2d weights (scaled by ``sqrt(conv_norm)``)."""
    if isinstance(matrices, torch.Tensor):
        items: list[tuple[str, Any]] = [("0", matrices)]
    elif isinstance(matrices, Mapping):
        items = [(str(k), v) for k, v in matrices.items()]
    elif isinstance(matrices, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(matrices)]
    else:
        raise TypeError(f"expected a tensor, a sequence of tensors or a mapping, got {type(matrices).__name__}")
    layers = []
    for i, (name, t) in enumerate(items):
        t = check_weight(name, t)
        if t.dim() == 2:
            layers.append(tensor_layer(name, "matrix", t, index=i, conv_norm=conv_norm))
        elif t.dim() == 3:
            k, rows, cols = t.shape
            layers.append(Layer(name=name, kind="matrix", shape=tuple(t.shape), rows=rows, cols=cols, k=k,
                                block=block_index(name), index=i, loader=lambda t=t: t.detach()))
        elif t.dim() == 4:
            layers.append(tensor_layer(name, "Conv2d", t, index=i, conv_norm=conv_norm))
        else:
            raise ValueError(f"matrix {name!r}: expected 2-D, 3-D or 4-D tensor, got shape {tuple(t.shape)}")
        if layers[-1].rows == 0 or layers[-1].cols == 0 or layers[-1].k == 0:
            raise ValueError(f"matrix {name!r}: empty shape {tuple(t.shape)}")
    return layers
