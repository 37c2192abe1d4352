"""Assignment functions: per-layer (or per-block) scores -> learning rates.

Every function here is pure: it takes the scores (a 1-D numpy array, torch tensor or sequence)
and the untuned learning rate, and returns one learning rate per score, of the same kind as the
input (a tensor in, a float64 tensor out on the same device; otherwise a float64 numpy array).
The arithmetic runs in float64 numpy: there are only as many scores as layers.

Formulas (SPEC sections 6-7, ``n`` scores ``s``, untuned learning rate ``lr``):

- ``tb_linear_map``: ``s`` mapped linearly from ``[min(s), max(s)]`` onto
  ``[lr_min_ratio*lr, lr_max_ratio*lr]`` (numpy ``interp``).
- ``tb_sqrt``: ``sqrt(s) / sum(sqrt(s)) * n * lr``.
- ``tb_log2``: ``log2(s) / sum(log2(s)) * n * lr``.
- ``tb_step``: the layer of rank ``r`` (0 = smallest) gets
  ``lr * (lr_min_ratio + (lr_max_ratio - lr_min_ratio) * r / n)``.
- ``tb_sigmoid`` (Model Balancing, TB_Sigmoid): ``d = s - mean(s)``,
  ``phi = s_d * (1 / (1 + exp(-tau * d)) - 0.5)``, ``lr * 10 ** phi`` where ``s_d`` is the
  scale ``s`` (or ``s_below`` for ``d <= 0`` and ``s_above`` for ``d > 0``).

Every function is homogeneous in ``lr`` (``f(s, c*lr) = c*f(s, lr)``), which is what lets a
scheduler store ratios and re-apply them under a changing base learning rate.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..layers import BLOCK_PATTERN
from ..layers import block_index as block_of  # the schedule's name for the layer core's rule

try:  # torch is a dependency of the package, but keep these pure functions importable alone
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

__all__ = [
    "ASSIGN_FUNCS",
    "assign_lrs",
    "tb_linear_map",
    "tb_sqrt",
    "tb_log2",
    "tb_step",
    "tb_sigmoid",
    "normalize_mean",
    "block_of",
    "block_means",
    "within_block_lrs",
    "BLOCK_PATTERN",
]

ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence[float]]



def scores_array(scores: ArrayLike) -> np.ndarray:
    """Scores as a 1-D float64 numpy array (a ValueError for any other shape)."""
    if torch is not None and isinstance(scores, torch.Tensor):
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per layer), got shape {arr.shape}")
    return arr


def _like(result: np.ndarray, scores: ArrayLike) -> ArrayLike:
    if torch is not None and isinstance(scores, torch.Tensor):
        return torch.from_numpy(result).to(scores.device)
    return result


def _label(names: Optional[Sequence[str]], i: int) -> str:
    return f"layer {names[i]!r}" if names is not None else f"score index {i}"


def _check_scores(arr: np.ndarray, names: Optional[Sequence[str]], func: str) -> None:
    if arr.size == 0:
        raise ValueError(f"{func}: no scores to assign learning rates to")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{func}: non-finite score {arr[i]} for {_label(names, i)}")


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"untuned learning rate must be a finite number >= 0, got {lr}")
    return lr


def _check_ratios(lr_min_ratio: float, lr_max_ratio: float) -> None:
    for label, v in (("lr_min_ratio", lr_min_ratio), ("lr_max_ratio", lr_max_ratio)):
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"{label} must be a finite number >= 0, got {v}")


def tb_linear_map(
    scores: ArrayLike,
    lr: float,
    lr_min_ratio: float = 0.5,
    lr_max_ratio: float = 1.5,
    *,
    equal_scores: str = "mid",
    names: Optional[Sequence[str]] = None,
) -> ArrayLike:
    """Map scores linearly from ``[min, max]`` onto ``[lr_min_ratio*lr, lr_max_ratio*lr]``.

    With all scores equal (or a single score) numpy's ``interp`` returns the upper end for every
    layer; tbfast returns the middle of the range (``equal_scores="mid"``, which is ``lr`` for
    the default symmetric ratios) because nothing distinguishes the layers. Pass
    ``equal_scores="reference"`` to get numpy's upper end.
    """
    arr = scores_array(scores)
    _check_scores(arr, names, "tb_linear_map")
    lr = _check_lr(lr)
    _check_ratios(lr_min_ratio, lr_max_ratio)
    lo, hi = lr_min_ratio * lr, lr_max_ratio * lr
    smin, smax = float(arr.min()), float(arr.max())
    if smin == smax:
        if equal_scores == "mid":
            out = np.full_like(arr, 0.5 * (lo + hi))
        elif equal_scores == "reference":
            out = np.full_like(arr, hi)
        else:
            raise ValueError(f"equal_scores must be 'mid' or 'reference', got {equal_scores!r}")
    else:
        out = np.interp(arr, [smin, smax], [lo, hi])
    return _like(out, scores)


def tb_sqrt(scores: ArrayLike, lr: float, *, names: Optional[Sequence[str]] = None, **_: Any) -> ArrayLike:
    """``sqrt(s) / sum(sqrt(s)) * n * lr``; scores must be >= 0 with a positive sum."""
    arr = scores_array(scores)
    _check_scores(arr, names, "tb_sqrt")
    lr = _check_lr(lr)
    neg = np.flatnonzero(arr < 0)
    if neg.size:
        i = int(neg[0])
        raise ValueError(f"tb_sqrt: negative score {arr[i]} for {_label(names, i)}")
    root = np.sqrt(arr)
    total = root.sum()
    if total <= 0:
        raise ValueError("tb_sqrt: all scores are zero, the normalisation sum(sqrt(s)) is 0")
    return _like(root / total * arr.size * lr, scores)


def tb_log2(scores: ArrayLike, lr: float, *, names: Optional[Sequence[str]] = None, **_: Any) -> ArrayLike:
    """``log2(s) / sum(log2(s)) * n * lr``; every score must be > 1 (so every lr is positive)."""
    arr = scores_array(scores)
    _check_scores(arr, names, "tb_log2")
    lr = _check_lr(lr)
    low = np.flatnonzero(arr <= 1.0)
    if low.size:
        i = int(low[0])
        raise ValueError(
            f"tb_log2: score {arr[i]} <= 1 for {_label(names, i)} gives a learning rate <= 0 or "
            "an undefined normalisation"
        )
    lg = np.log2(arr)
    return _like(lg / lg.sum() * arr.size * lr, scores)


def tb_step(
    scores: ArrayLike,
    lr: float,
    lr_min_ratio: float = 0.5,
    lr_max_ratio: float = 1.5,
    *,
    names: Optional[Sequence[str]] = None,
    **_: Any,
) -> ArrayLike:
    """Rank-based steps: rank ``r`` (0 = smallest score, ties by position) gets
    ``lr * (lr_min_ratio + (lr_max_ratio - lr_min_ratio) * r / n)``."""
    arr = scores_array(scores)
    _check_scores(arr, names, "tb_step")
    lr = _check_lr(lr)
    _check_ratios(lr_min_ratio, lr_max_ratio)
    n = arr.size
    order = np.argsort(arr, kind="stable")
    rank = np.empty(n, dtype=np.float64)
    rank[order] = np.arange(n, dtype=np.float64)
    out = lr * (lr_min_ratio + (lr_max_ratio - lr_min_ratio) * rank / n)
    return _like(out, scores)


def _split_s(s: Union[float, Sequence[float]]) -> tuple[float, float]:
    if isinstance(s, (tuple, list)):
        if len(s) != 2:
            raise ValueError(f"s must be a number or a pair (s_below, s_above), got {s!r}")
        below, above = float(s[0]), float(s[1])
    else:
        below = above = float(s)
    for v in (below, above):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"s must be finite and >= 0, got {s!r}")
    return below, above


def tb_sigmoid(
    scores: ArrayLike,
    lr: float,
    tau: float = 10.0,
    s: Union[float, Sequence[float]] = 1.0,
    *,
    names: Optional[Sequence[str]] = None,
    **_: Any,
) -> ArrayLike:
    """TB_Sigmoid (Model Balancing, eq. 3-4): ``lr * 10 ** (s * (sigmoid(tau * (a - mean(a))) - 0.5))``.

    ``s`` is a scale or a pair ``(s_below, s_above)``: ``s_below`` for scores at or below the
    mean, ``s_above`` for those above (the paper's ``(s1, s2)``, often ``(2, 1)``).
    """
    arr = scores_array(scores)
    _check_scores(arr, names, "tb_sigmoid")
    lr = _check_lr(lr)
    tau = float(tau)
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tb_sigmoid: tau must be finite and > 0, got {tau}")
    below, above = _split_s(s)
    diff = arr - arr.mean()
    scale = np.where(diff <= 0, below, above)
    # 1 / (1 + exp(-x)) written so it never overflows: exp of a non-positive number only
    x = tau * diff
    sig = np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))
    phi = scale * (sig - 0.5)
    return _like(lr * np.power(10.0, phi), scores)


#: name -> assignment function; every one takes ``(scores, lr, **options)``.
ASSIGN_FUNCS: dict[str, Callable[..., ArrayLike]] = {
    "tb_linear_map": tb_linear_map,
    "tb_sqrt": tb_sqrt,
    "tb_log2": tb_log2,
    "tb_step": tb_step,
    "tb_sigmoid": tb_sigmoid,
}


def assign_lrs(
    assign_func: Union[str, Callable[..., ArrayLike]],
    scores: ArrayLike,
    lr: float,
    *,
    lr_min_ratio: float = 0.5,
    lr_max_ratio: float = 1.5,
    tau: float = 10.0,
    s: Union[float, Sequence[float]] = 1.0,
    equal_scores: str = "mid",
    names: Optional[Sequence[str]] = None,
) -> ArrayLike:
    """Run the named assignment function with the options it uses.

    A callable ``assign_func`` is called as ``assign_func(scores, lr)`` and must return one
    learning rate per score.
    """
    if callable(assign_func):
        out = assign_func(scores, lr)
        arr = scores_array(out)
        if arr.shape != scores_array(scores).shape:
            raise ValueError(f"custom assign_func returned shape {arr.shape} for {len(arr)} scores")
        return out
    if assign_func not in ASSIGN_FUNCS:
        raise ValueError(f"unknown assign_func {assign_func!r}; expected one of {sorted(ASSIGN_FUNCS)}")
    if assign_func == "tb_linear_map":
        return tb_linear_map(scores, lr, lr_min_ratio, lr_max_ratio, equal_scores=equal_scores, names=names)
    if assign_func == "tb_step":
        return tb_step(scores, lr, lr_min_ratio, lr_max_ratio, names=names)
    if assign_func == "tb_sigmoid":
        return tb_sigmoid(scores, lr, tau, s, names=names)
    return ASSIGN_FUNCS[assign_func](scores, lr, names=names)


def normalize_mean(lrs: ArrayLike, lr: float) -> ArrayLike:
    """Rescale ``lrs`` so that their mean equals ``lr`` (the paper's lr normalisation)."""
    arr = scores_array(lrs)
    mean = arr.mean() if arr.size else 0.0
    if not mean > 0:
        raise ValueError(f"cannot normalise learning rates with mean {mean}")
    return _like(arr * (float(lr) / mean), lrs)


def block_means(scores: ArrayLike, blocks: Sequence[Optional[int]]) -> tuple[list[int], np.ndarray]:
    """Mean score per block, blocks in order of first appearance; ``None`` blocks are skipped."""
    arr = scores_array(scores)
    if len(blocks) != arr.size:
        raise ValueError(f"{len(blocks)} block labels for {arr.size} scores")
    order: list[int] = []
    sums: dict[int, list[float]] = {}
    for b, v in zip(blocks, arr):
        if b is None:
            continue
        if b not in sums:
            order.append(b)
            sums[b] = []
        sums[b].append(float(v))
    return order, np.array([np.mean(sums[b]) for b in order], dtype=np.float64)


def within_block_lrs(
    scores: ArrayLike,
    blocks: Sequence[Optional[int]],
    block_lr: dict[int, float],
    lr_min_ratio: float = 0.5,
    lr_slope: float = 1.0,
) -> np.ndarray:
    """Per-layer-within-block variant: inside each block, scores map linearly from the block's
    ``[min, max]`` onto ``[lr_min_ratio, lr_min_ratio + lr_slope]`` times the block lr (the
    middle of that range when the block's scores are all equal). Layers with block ``None``
    get NaN here and must be handled by the caller."""
    arr = scores_array(scores)
    _check_ratios(lr_min_ratio, lr_min_ratio + lr_slope)
    out = np.full(arr.size, np.nan)
    for b in {b for b in blocks if b is not None}:
        idx = np.array([i for i, bb in enumerate(blocks) if bb == b])
        lo = lr_min_ratio * block_lr[b]
        hi = (lr_min_ratio + lr_slope) * block_lr[b]
        sub = arr[idx]
        if sub.min() == sub.max():
            out[idx] = 0.5 * (lo + hi)
        else:
            out[idx] = np.interp(sub, [sub.min(), sub.max()], [lo, hi])
    return out
