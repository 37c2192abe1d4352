"""The layer record and every rule that turns weights into ESD matrices (SPEC section 1).

One place for: the `Layer` record and its public constructor `weight_layer`; the kind rules
(module types, and tensor names/dims for files); the conv reshape (one ``out x in`` matrix per
kernel position) and its ``sqrt(conv_norm)`` scale; the delta ``W - W_base``; the LoRA merge
``W + s * B @ A`` and its scaling; the block index; the selection by kind, name and eigenvalue
count. The front ends (`tbfast.layers.modules`, `tbfast.layers.matrices`, the checkpoint
readers in `tbfast.checkpoint`) only walk their source and call these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Layer", "weight_layer", "tensor_layer", "block_index", "LAYER_KINDS", "BLOCK_PATTERN", "FLOAT_DTYPES",
           "check_weight", "as_matrices", "weight_delta", "delta_dtype", "merge_lora", "lora_scale",
           "kind_of_module", "kind_from_name", "wanted_kinds", "name_filter", "evals_in_range", "keep_layers"]

LAYER_KINDS = ("Linear", "Conv2d", "Conv1d", "Embedding", "LoRA", "matrix", "Expert")
CONV_KINDS = ("Conv1d", "Conv2d")
#: A name belongs to block ``b`` when it matches this pattern, ``b`` being its first integer
#: component (``roberta.encoder.layer.7.attention.self.query`` -> 7).
BLOCK_PATTERN = r"(.*?)\.(\d+)\.(.*)"
#: Weight dtypes analysed as stored (file readers upcast float8 to float32 on load).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    #: a LoRA layer's factors, read when needed: ``() -> (W0, [(A, B, s, transpose), ...])`` (the
    #: base weight and the updates as `merge_lora` takes them); None for other layers. The exact
    #: LoRA ESD (`tbfast.lora.stage`) reads it instead of the merged matrix.
    lora: Callable[[], tuple[torch.Tensor, list]] | None = field(default=None, repr=False, compare=False)

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


# ------------------------------------------------------------------------------------------------
# matrices of one weight


def weight_layer(name: str, kind: str, shape: Sequence[int], *, index: int = 0, conv_norm: float = 0.5,
                 loader: Callable[[], torch.Tensor] | None = None, module: nn.Module | None = None) -> Layer:
    """The `Layer` record of one weight of ``shape``: a convolution kind (``Conv1d``/``Conv2d``,
    shape ``(out, in, *kernel)``) is ``prod(kernel)`` matrices ``out x in`` scaled by
    ``sqrt(conv_norm)``; any other kind is one ``shape[0] x shape[1]`` matrix. ``loader`` returns
    the unscaled matrices (see `as_matrices`); the block comes from the name."""
    shape = tuple(int(s) for s in shape)
    conv = kind in CONV_KINDS
    k = int(math.prod(shape[2:])) if conv else 1
    return Layer(name=name, kind=kind, shape=shape, rows=shape[0], cols=shape[1], k=k,
                 scale=math.sqrt(conv_norm) if conv else 1.0, block=block_index(name), index=index,
                 loader=loader, module=module)


def check_weight(name: str, w: Any) -> torch.Tensor:
    """``w`` if it is a tensor of an analysable dtype, else a one-line TypeError naming the layer."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"layer {name!r}: weight is {type(w).__name__}, not a tensor")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"layer {name!r}: unsupported weight dtype {w.dtype} (expected fp16, bf16, fp32 or fp64)")
    return w


def as_matrices(w: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (1, out, in); conv (out, in, *kernel) -> (k, out, in), one matrix per kernel
    position in row-major order (a view)."""
    if w.dim() == 2:
        return w.unsqueeze(0)
    return w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)


def delta_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Dtype of a delta read from files: float64 if either side is, else float32."""
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def weight_delta(w: torch.Tensor, base: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W - W_base`` in ``dtype`` (default: ``w``'s dtype), on ``w``'s device."""
    if dtype is None:
        return w - base.to(w.device, w.dtype)
    return w.to(dtype) - base.to(w.device, dtype)


def tensor_layer(name: str, kind: str, w: Any, *, index: int = 0, conv_norm: float = 0.5,
                 module: nn.Module | None = None, base: torch.Tensor | None = None) -> Layer:
    """The layer of an in-memory weight tensor (a view, read when the ESD needs it); with
    ``base``, of ``W - W_base``. Convolutions need >= 3 dims, every other kind 2."""
    w = check_weight(name, w)
    shape = tuple(w.shape)
    if kind in CONV_KINDS:
        if w.dim() < 3:
            raise ValueError(f"layer {name!r}: {kind} weight must have >= 3 dims, got shape {shape}")
    elif w.dim() != 2:
        raise ValueError(f"layer {name!r}: {kind} weight must be 2-D, got shape {shape}")
    if base is not None and tuple(base.shape) != shape:
        raise ValueError(f"layer {name!r}: base weight shape {tuple(base.shape)} != weight shape {shape}")

    def loader(w=w, base=base):
        return as_matrices((w if base is None else weight_delta(w, base)).detach())

    return weight_layer(name, kind, shape, index=index, conv_norm=conv_norm, loader=loader, module=module)


# ------------------------------------------------------------------------------------------------
# LoRA


def lora_scale(alpha: float, r: int, *, rslora: bool = False, enabled: bool = True) -> float:
    """PEFT's LoRA scaling ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA); 1 when not
    ``enabled`` (the reference quirk that forgets it, SPEC section 1)."""
    if not enabled:
        return 1.0
    return alpha / math.sqrt(r) if rslora else alpha / r


def merge_lora(name: str, w: torch.Tensor, updates: Iterable[tuple[torch.Tensor, torch.Tensor, float, bool]],
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W + sum s * B @ A`` in ``dtype`` (default ``w``'s) for ``updates`` of ``(A, B, s,
    transpose)`` (``transpose``: the update is ``(B @ A).T``, for fan-in-fan-out weights and
    embeddings). A copy: ``w`` is not changed."""
    dt = w.dtype if dtype is None else dtype
    merged = w.to(dt, copy=True)
    for A, B, s, transpose in updates:
        d = (B.to(dt) @ A.to(dt)) * s
        if transpose:
            d = d.T
        if tuple(d.shape) != tuple(merged.shape):
            raise ValueError(f"LoRA module {name!r}: B @ A has shape {tuple(d.shape)}, "
                             f"base weight {tuple(merged.shape)}")
        merged += d
    return merged


# ------------------------------------------------------------------------------------------------
# kind rules

_MODULE_KINDS = ((nn.Linear, "Linear"), (nn.Conv2d, "Conv2d"), (nn.Conv1d, "Conv1d"), (nn.Embedding, "Embedding"))
_EMBED_RE = re.compile(r"(^|_)emb")


def kind_of_module(module: nn.Module) -> str | None:
    """The layer kind of a module (``Linear``, ``Conv2d``, ``Conv1d``, ``Embedding``) or None."""
    return next((kind for cls, kind in _MODULE_KINDS if isinstance(module, cls)), None)


def kind_from_name(name: str, ndim: int) -> str | None:
    """The layer kind the file rule gives a ``name`` (without ``.weight``) of ``ndim`` dims."""
    if ndim == 2:
        parts = name.lower().split(".")
        if any(_EMBED_RE.search(p) for p in parts) or parts[-1] in ("wte", "wpe"):
            return "Embedding"
        return "Linear"
    if ndim == 3:
        return "Conv1d"
    if ndim == 4:
        return "Conv2d"
    return None


# ------------------------------------------------------------------------------------------------
# selection


def wanted_kinds(types: Iterable[str] | None, include_embedding: bool,
                 default: Iterable[str] = ("Linear", "Conv2d", "Conv1d")) -> set[str]:
    """The kinds to keep: ``types``, else ``default`` plus ``Embedding`` when ``include_embedding``."""
    if types is not None:
        return set(types)
    return set(default) | ({"Embedding"} if include_embedding else set())


def name_filter(include: str | None, exclude: str | None) -> Callable[[str], bool]:
    """A predicate on layer names: ``include`` / ``exclude`` are regular expressions searched in it."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    return lambda name: (inc is None or inc.search(name) is not None) and (exc is None or exc.search(name) is None)


def evals_in_range(num_evals: int, min_evals: int = 0, max_evals: int | None = None) -> bool:
    """``min_evals <= num_evals <= max_evals`` (no upper bound when ``max_evals`` is None)."""
    return num_evals >= min_evals and (max_evals is None or num_evals <= max_evals)


def keep_layers(layers: Iterable[Layer], min_evals: int = 0, max_evals: int | None = None,
                max_n: int | None = None) -> list[Layer]:
    """The layers with ``min_evals`` to ``max_evals`` eigenvalues and at most ``max_n`` rows/columns."""
    return [l for l in layers if evals_in_range(l.num_evals, min_evals, max_evals)
            and (max_n is None or max(l.rows, l.cols) <= max_n)]
