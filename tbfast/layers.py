"""Which matrices make a layer's ESD (SPEC section 1).

`find_layers` walks a model's ``named_modules()`` in order and returns one `Layer` per analysable
module: ``nn.Linear``, ``nn.Conv2d`` / ``nn.Conv1d`` (one matrix per kernel position, scaled by
``sqrt(conv_norm)``), optionally ``nn.Embedding``, and PEFT LoRA layers (merged ``W + s * B @ A``).
A `Layer` is a small record; its matrices are produced on demand by `Layer.matrices()`, so nothing
is copied until the spectra stage needs it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["Layer", "find_layers", "block_index", "layers_from_matrices", "LAYER_KINDS", "BLOCK_PATTERN"]

LAYER_KINDS = ("Linear", "Conv2d", "Conv1d", "Embedding", "LoRA", "matrix")
#: A name belongs to block ``b`` when it matches this pattern, ``b`` being its first integer
#: component (``roberta.encoder.layer.7.attention.self.query`` -> 7).
BLOCK_PATTERN = r"(.*?)\.(\d+)\.(.*)"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def block_index(name: str, pattern: str = BLOCK_PATTERN) -> int | None:
    """Transformer block of a layer or parameter name (SPEC section 7): group 2 of ``pattern``
    matched at the start of the name (by default the first integer component), else None."""
    m = re.match(pattern, name)
    return int(m.group(2)) if m else None


@dataclass
class Layer:
    """One layer's ESD input: ``k`` matrices of ``rows x cols`` whose spectra are pooled.

    ``scale`` multiplies every matrix (``sqrt(conv_norm)`` for convolutions), so eigenvalues are
    multiplied by ``scale**2``. ``loader`` returns the unscaled ``(k, rows, cols)`` tensor.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rows: int
    cols: int
    k: int = 1
    scale: float = 1.0
    block: int | None = None
    index: int = 0
    loader: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def num_evals(self) -> int:
        """Number of eigenvalues in the pooled ESD: ``k * min(rows, cols)``."""
        return self.k * min(self.rows, self.cols)

    @property
    def gram_size(self) -> int:
        """Side of the smaller Gram matrix."""
        return min(self.rows, self.cols)

    def matrices(self) -> torch.Tensor:
        """The layer's unscaled ``(k, rows, cols)`` matrices (a view where possible)."""
        if self.loader is None:
            raise ValueError(f"layer {self.name!r} has no matrix loader")
        mats = self.loader()
        if not isinstance(mats, torch.Tensor):
            raise TypeError(f"layer {self.name!r}: loader returned {type(mats).__name__}, not a tensor")
        if mats.dim() == 2:
            mats = mats.unsqueeze(0)
        if tuple(mats.shape) != (self.k, self.rows, self.cols):
            raise ValueError(
                f"layer {self.name!r}: expected matrices of shape {(self.k, self.rows, self.cols)}, "
                f"got {tuple(mats.shape)}"
            )
        return mats


def _check_weight(name: str, w: Any) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"layer {name!r}: weight is {type(w).__name__}, not a tensor")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"layer {name!r}: unsupported weight dtype {w.dtype} (expected fp16, bf16, fp32 or fp64)")
    return w


def _conv_matrices(w: torch.Tensor) -> torch.Tensor:
    """Conv weight (out, in, *kernel) -> (k, out, in): one matrix per kernel position."""
    out_c, in_c = w.shape[0], w.shape[1]
    return w.reshape(out_c, in_c, -1).permute(2, 0, 1)


def _weight_layer(name: str, kind: str, w: torch.Tensor, index: int, module: nn.Module | None,
                  conv_norm: float, delta: torch.Tensor | None) -> Layer:
    w = _check_weight(name, w)
    shape = tuple(w.shape)
    if kind in ("Conv1d", "Conv2d"):
        if w.dim() < 3:
            raise ValueError(f"layer {name!r}: {kind} weight must have >= 3 dims, got shape {shape}")
        k = int(math.prod(shape[2:]))
        rows, cols, scale = shape[0], shape[1], math.sqrt(conv_norm)

        def loader(w=w, delta=delta):
            src = w if delta is None else w - delta.to(w.device, w.dtype)
            return _conv_matrices(src.detach())
    else:
        if w.dim() != 2:
            raise ValueError(f"layer {name!r}: {kind} weight must be 2-D, got shape {shape}")
        k, (rows, cols), scale = 1, shape, 1.0

        def loader(w=w, delta=delta):
            src = w if delta is None else w - delta.to(w.device, w.dtype)
            return src.detach().unsqueeze(0)

    if delta is not None and tuple(delta.shape) != shape:
        raise ValueError(f"layer {name!r}: base weight shape {tuple(delta.shape)} != weight shape {shape}")
    return Layer(name=name, kind=kind, shape=shape, rows=rows, cols=cols, k=k, scale=scale,
                 block=block_index(name), index=index, loader=loader, module=module)


def _is_lora(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("lora_A", "lora_B", "scaling")) and isinstance(
        getattr(module, "lora_A"), nn.ModuleDict)


def _lora_layer(name: str, module: nn.Module, index: int, lora_scaling: bool) -> Layer | None:
    base = getattr(module, "base_layer", module)
    w = getattr(base, "weight", None)
    if w is None:
        return None
    w = _check_weight(name, w)
    if w.dim() != 2:
        return None  # LoRA on convolutions/embeddings: analysed through the base layer only
    adapters = [a for a in module.lora_A.keys() if a in module.lora_B]
    active = getattr(module, "active_adapters", adapters)
    if isinstance(active, str):
        active = [active]
    adapters = [a for a in adapters if a in active]
    fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))

    def loader():
        merged = w.detach().clone()
        for a in adapters:
            A = module.lora_A[a].weight.detach()
            B = module.lora_B[a].weight.detach()
            s = float(module.scaling[a]) if lora_scaling else 1.0
            d = (B.to(merged.dtype) @ A.to(merged.dtype)) * s
            merged += d.T if fan_in_fan_out else d
        return merged.unsqueeze(0)

    rows, cols = w.shape
    return Layer(name=name, kind="LoRA", shape=tuple(w.shape), rows=rows, cols=cols, k=1, scale=1.0,
                 block=block_index(name), index=index, loader=loader, module=module)


def _base_lookup(base: nn.Module | Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor] | None:
    if base is None:
        return None
    if isinstance(base, nn.Module):
        return {k: v for k, v in base.state_dict().items()}
    if isinstance(base, Mapping):
        return base
    raise TypeError(f"base must be an nn.Module or a state dict, got {type(base).__name__}")


def _kind_of(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if isinstance(module, nn.Conv1d):
        return "Conv1d"
    if isinstance(module, nn.Embedding):
        return "Embedding"
    return None


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

    ``types`` restricts the kinds (default: Linear, Conv2d, Conv1d, LoRA, plus Embedding when
    ``include_embedding``). ``include`` / ``exclude`` are regular expressions searched in the layer
    name. ``base`` (a model or state dict) turns each layer into the delta ``W - W_base``.
    ``lora_scaling=False`` reproduces the reference quirk that forgets ``lora_alpha / r``.
    Layers with fewer than ``min_evals`` eigenvalues are dropped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_layers expects an nn.Module, got {type(model).__name__}")
    if conv_norm <= 0:
        raise ValueError(f"conv_norm must be positive, got {conv_norm}")
    wanted = set(types) if types is not None else {"Linear", "Conv2d", "Conv1d", "LoRA"}
    if types is None and include_embedding:
        wanted.add("Embedding")
    unknown = wanted - set(LAYER_KINDS)
    if unknown:
        raise ValueError(f"unknown layer types {sorted(unknown)}; choose from {LAYER_KINDS}")
    if "Linear" in wanted:
        wanted.add("LoRA")  # a LoRA-wrapped Linear is still a Linear layer
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    base_sd = _base_lookup(base)

    layers: list[Layer] = []
    skip_prefixes: list[str] = []
    for index, (name, module) in enumerate(model.named_modules()):
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if _is_lora(module):
            skip_prefixes.append(name + ".")  # base_layer, lora_A.x, lora_B.x belong to this layer
            kind: str | None = "LoRA"
        else:
            kind = _kind_of(module)
        if kind is None or kind not in wanted:
            continue
        if inc is not None and not inc.search(name):
            continue
        if exc is not None and exc.search(name):
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
            layer = _weight_layer(name, kind, module.weight, index, module, conv_norm, delta)
        if layer.num_evals < min_evals:
            continue
        layers.append(layer)
    return layers


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
        t = _check_weight(name, t)
        if t.dim() == 2:
            layers.append(_weight_layer(name, "matrix", t, i, None, conv_norm, None))
        elif t.dim() == 3:
            k, rows, cols = t.shape
            layers.append(Layer(name=name, kind="matrix", shape=tuple(t.shape), rows=rows, cols=cols, k=k,
                                block=block_index(name), index=i, loader=lambda t=t: t.detach()))
        elif t.dim() == 4:
            layers.append(_weight_layer(name, "Conv2d", t, i, None, conv_norm, None))
        else:
            raise ValueError(f"matrix {name!r}: expected 2-D, 3-D or 4-D tensor, got shape {tuple(t.shape)}")
        if layers[-1].rows == 0 or layers[-1].cols == 0 or layers[-1].k == 0:
            raise ValueError(f"matrix {name!r}: empty shape {tuple(t.shape)}")
    return layers
