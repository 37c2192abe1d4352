"""Mixture-of-experts weights stored fused: one row (one `Layer`) per expert of a 3-D parameter.

Current Hugging Face MoE modules (Mixtral, Qwen2/3-MoE, DeepSeek-V3, GPT-OSS, Llama-4) keep all
experts of a block in 3-D parameters such as ``mlp.experts.gate_up_proj`` ``[experts, 2 *
intermediate, hidden]`` and ``mlp.experts.down_proj`` ``[experts, hidden, intermediate]``
(some models store the transpose, ``[experts, in, out]``; the ESD of a matrix and of its
transpose are the same). Each expert ``e`` becomes a layer named ``<parameter>[e]`` of kind
``"Expert"`` holding the ``[out, in]`` matrix ``W[e]``: the ESD stage batches all same-shape
experts together and reads them chunk by chunk within the memory budget (from a file, one
expert's slice at a time). Experts kept as a ``ModuleList`` of ``nn.Linear`` are ordinary Linear
layers (``...experts.3.w1``), one row each, batched the same way.

The rule (the same for modules and files): a floating-point tensor with 3 dims whose name has
a component containing ``expert`` and whose last component is not a bias (``bias``, ``*_bias``).
A fused ``gate_up_proj`` is analysed as stored (one ``2I x H`` matrix per expert): how gate and
up are interleaved differs between models.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .core import Layer, block_index, check_weight, weight_delta

__all__ = ["EXPERT_KIND", "is_expert_tensor", "expert_row_name", "expert_layers", "module_expert_layers"]

EXPERT_KIND = "Expert"
_EXPERT_RE = re.compile(r"expert", re.IGNORECASE)


def is_expert_tensor(name: str, shape: Sequence[int]) -> bool:
    """Whether a parameter/tensor ``name`` of ``shape`` holds fused experts (see the module doc)."""
    if len(shape) != 3:
        return False
    parts = name.split(".")
    last = parts[-1].lower()
    if last == "bias" or last.endswith("_bias"):
        return False
    return any(_EXPERT_RE.search(p) for p in parts)


def expert_row_name(name: str, e: int) -> str:
    """Row name of expert ``e`` of tensor ``name``: ``name[e]`` (a trailing ``.weight`` dropped)."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return f"{base}[{e}]"


def expert_layers(name: str, shape: Sequence[int], load_expert: Callable[[int], torch.Tensor], *,
                  index: int = 0, module: nn.Module | None = None) -> list[Layer]:
    """One `Layer` per expert of a fused ``[experts, out, in]`` tensor ``name``; ``load_expert(e)``
    returns expert ``e``'s ``(out, in)`` matrix (a view or a slice read from a file)."""
    E, rows, cols = (int(s) for s in shape)
    block = block_index(name)
    out = []
    for e in range(E):
        out.append(Layer(name=expert_row_name(name, e), kind=EXPERT_KIND, shape=(rows, cols), rows=rows, cols=cols,
                         block=block, index=index, module=module,
                         loader=lambda e=e: load_expert(e).unsqueeze(0)))
    return out


def module_expert_layers(name: str, module: nn.Module, index: int, *,
                         base: dict | None = None) -> list[Layer]:
    """Expert rows of the 3-D parameters held directly by ``module`` (named ``name``); with
    ``base`` (a state dict), of ``W - W_base``."""
    layers: list[Layer] = []
    for pname, p in module.named_parameters(recurse=False):
        full = f"{name}.{pname}" if name else pname
        if not is_expert_tensor(full, p.shape) or not p.is_floating_point():
            continue
        w = check_weight(full, p)
        b = None
        if base is not None:
            b = base.get(full)
            if b is None:
                raise KeyError(f"layer {full!r}: no {full!r} in the base model / state dict")
            if tuple(b.shape) != tuple(w.shape):
                raise ValueError(f"layer {full!r}: base shape {tuple(b.shape)} != weight shape {tuple(w.shape)}")

        def load(e: int, w=w, b=b) -> torch.Tensor:
            return w[e].detach() if b is None else weight_delta(w[e].detach(), b[e])

        layers += expert_layers(full, w.shape, load, index=index, module=module)
    return layers
