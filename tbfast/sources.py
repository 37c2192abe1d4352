"""Any source -> layers: the one entry point every stage uses (`build_layers`).

A source is an ``nn.Module`` (`tbfast.layers.find_layers`), a `tbfast.Layer` or a list of them
(used as given), a checkpoint path, a ``TensorStore`` or a PEFT adapter directory
(`tbfast.checkpoint.checkpoint_layers` / `lora_layers`), or raw matrices
(`tbfast.layers.layers_from_matrices`). A ``Mapping`` of tensors is ambiguous, so the caller
says what it is: ``mapping="state_dict"`` (`tbfast.analyze`: the file rule names the layers)
or ``mapping="matrices"`` (`tbfast.esd`: every tensor is a matrix). The eigenvalue-count and
size filters of `LayerOptions` are applied last, to every source.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from .checkpoint import checkpoint_layers, open_checkpoint
from .errors import NoLayersError
from .layers import Layer, find_layers, layers_from_matrices
from .layers.core import keep_layers
from .options import LayerOptions

__all__ = ["build_layers", "MAPPING_KINDS"]

MAPPING_KINDS = ("state_dict", "matrices")
_DEFAULTS = LayerOptions()


def build_layers(source: Any, options: LayerOptions | None = None, *, mapping: str = "state_dict",
                 require: bool = False) -> list[Layer]:
    """The layers of ``source`` selected by ``options`` (see the module doc for the sources).

    ``mapping``: what a ``Mapping`` source is, ``"state_dict"`` or ``"matrices"``. Raw matrices
    take ``conv_norm`` only (another option set is a TypeError). ``require``: raise
    `NoLayersError` (naming the eigenvalue bounds) instead of returning no layer.
    """
    o = _DEFAULTS if options is None else options
    if mapping not in MAPPING_KINDS:
        raise ValueError(f"mapping must be one of {MAPPING_KINDS}, got {mapping!r}")
    if isinstance(source, Layer):
        source = [source]
    if isinstance(source, (list, tuple)) and source and all(isinstance(x, Layer) for x in source):
        layers = list(source)
    elif isinstance(source, nn.Module):
        layers = find_layers(source, types=o.types, include_embedding=o.include_embedding, conv_norm=o.conv_norm,
                             include=o.include, exclude=o.exclude, base=_module_base(o.base),
                             lora_scaling=o.lora_scaling, min_evals=o.min_evals)
    elif (isinstance(source, (str, os.PathLike)) or hasattr(source, "infos")
          or (mapping == "state_dict" and isinstance(source, Mapping))):
        layers = checkpoint_layers(source, base=o.base, include_embedding=o.include_embedding, types=o.types,
                                   conv_norm=o.conv_norm, include=o.include, exclude=o.exclude,
                                   min_evals=o.min_evals, max_evals=o.max_evals, lora_scaling=o.lora_scaling)
    elif mapping == "matrices":
        given = sorted(f.name for f in dataclasses.fields(o)
                       if f.name != "conv_norm" and getattr(o, f.name) != getattr(_DEFAULTS, f.name))
        if given:
            raise TypeError(f"options {given} only apply to nn.Module sources")
        layers = layers_from_matrices(source, conv_norm=o.conv_norm)
    else:
        raise TypeError(f"cannot analyse a {type(source).__name__}: pass an nn.Module, a state dict, "
                        f"a checkpoint path or a list of tbfast.Layer")
    layers = keep_layers(layers, o.min_evals, o.max_evals, o.max_n)
    if require and not layers:
        raise NoLayersError(f"no layer with {o.min_evals} to {o.max_evals} eigenvalues"
                            + (f" and at most {o.max_n} rows/columns" if o.max_n is not None else "")
                            + " matched the selection")
    return layers


def _module_base(base: Any) -> nn.Module | Mapping | None:
    """A model's ``base`` as a model or state dict: a checkpoint path is read into memory."""
    if base is None or isinstance(base, (nn.Module, Mapping)):
        return base
    store = open_checkpoint(base)
    return {i.name: store.load(i.name) for i in store.infos()}
