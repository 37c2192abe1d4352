"""Untuned-lr bookkeeping inside optimizer param groups, so TempBalance factors sit on top of lr schedulers.

A param group that TempBalance writes carries one key, ``"tempbalance"`` (`KEY`), a small dict
of plain numbers that travels with ``optimizer.state_dict()`` (so a resumed run continues
exactly) and is removed when TempBalance lets go of the optimizer (`tbfast.tempbalance.binding`):

- ``untuned`` ``U``: the lr this group would have without TempBalance (the scheduler's lr);
- ``written`` ``W``: the value tbfast last left in ``group['lr']``;
- ``frame`` ``g``: the factor inside ``W`` (``W == U * g``; 1 when ``W`` is the untuned lr);
- ``factor`` ``f``: the group's TempBalance factor (the lr the optimizer steps with is ``U * f``);
- ``follow``: True after ``tb.apply(optimizer)`` (follow lr schedulers), ``"build"`` in groups
  fresh from ``build_optimizer_param_group``, False after ``tb.apply(optimizer, untuned_lr)``;
- ``shared``: True in groups built by ``build_optimizer_param_group`` (they share one untuned lr);
- ``weight_decay``: the untuned weight decay (``balance='weight_decay'`` / ``'both'`` only).

The dict is replaced, never changed in place: ``optimizer.state_dict()`` shares it.

When ``group['lr']`` differs from ``W`` something else (an lr scheduler) wrote it. The new
untuned lr is ``group['lr'] / g`` (`untuned_lr`): exact for schedulers that multiply the lr
they find and for schedulers that compute from an untuned base while ``g == 1``. Groups that
share one untuned lr (`resolve_shared`) are read more generally: one scheduler maps the lr
``x_i`` it found in group ``i`` to ``a + b * x_i`` with the same ``a, b`` for every group (true
of every torch and Hugging Face schedule: ``b = 0`` for closed forms such as LambdaLR and
OneCycleLR, ``a = 0`` for multiplicative ones, both for CosineAnnealingLR with ``eta_min``), so
two groups with different factors give ``a`` and ``b``, and the untuned lr is ``a + b * U``.
Groups without the key (optimizers TempBalance never wrote) are not touched.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch

__all__ = ["KEY", "BUILD", "record", "unchanged", "untuned_lr", "write", "resolve_shared", "check_lr",
           "balanced_lrs", "write_factors", "pre_step", "post_step", "strip"]

KEY = "tempbalance"
BUILD = "build"  # ``follow`` of groups fresh from build_optimizer_param_group


def record(group: dict) -> Optional[dict]:
    """The TempBalance bookkeeping of ``group`` (None if TempBalance never wrote it)."""
    rec = group.get(KEY)
    return rec if isinstance(rec, dict) else None


def _update(group: dict, **changes: Any) -> None:
    group[KEY] = {**(record(group) or {}), **changes}  # a new dict: optimizer.state_dict() shares the old one


def check_lr(value: Any, what: str) -> float:
    """``value`` as a float; ValueError naming ``what`` unless it is a finite number >= 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")
    return value


def unchanged(group: dict) -> bool:
    """Whether ``group['lr']`` is still the value tbfast wrote (a tensor lr: up to its dtype's rounding)."""
    rec = record(group)
    if rec is None or "written" not in rec:
        return False
    lr, written = group["lr"], rec["written"]
    if isinstance(lr, torch.Tensor):
        return math.isclose(float(lr), written, rel_tol=2 * torch.finfo(lr.dtype).eps)
    return float(lr) == written


def untuned_lr(group: dict) -> float:
    """The untuned lr of ``group`` now: ``U`` if ``group['lr']`` is still ``W``, else ``group['lr'] / g``."""
    lr = float(group["lr"])
    rec = record(group)
    if rec is None or "untuned" not in rec:
        return lr
    if unchanged(group):
        return float(rec["untuned"])
    frame = float(rec.get("frame", 1.0))
    if frame == 0.0:  # a factor of 0 left no information to divide out; take the new lr as untuned
        return lr
    return lr / frame


def write(group: dict, untuned: float, factor: float, frame: float, follow: Any) -> float:
    """Set ``group['lr'] = untuned * frame`` and record the bookkeeping; returns the lr written."""
    lr = untuned * frame
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
        lr_now = float(group["lr"])
    else:
        group["lr"] = lr_now = lr
    _update(group, untuned=float(untuned), written=lr_now, frame=float(frame), factor=float(factor), follow=follow)
    return lr


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= 1e-9 * scale


def resolve_shared(groups: Sequence[dict]) -> None:
    """Read the untuned lr of groups that share one (built by ``build_optimizer_param_group``) after a
    scheduler wrote them, by the affine rule of the module docstring; records it as observed.

    Nothing happens unless some group changed; all equal new lrs are the untuned lr itself; groups
    whose previous lrs were all equal (or lrs that fit no common ``a + b * x``) keep `untuned_lr`.
    """
    shared = [g for g in groups if (record(g) or {}).get("shared") and "written" in record(g)
              and record(g).get("follow") is not False]  # an explicit untuned_lr is not read back
    if len(shared) < 2 or all(unchanged(g) for g in shared):
        return
    x = [float(record(g)["written"]) for g in shared]
    y = [float(g["lr"]) for g in shared]
    u = [float(record(g)["untuned"]) for g in shared]
    if not all(math.isfinite(v) for v in x + y + u):
        return  # a non-finite lr is refused by balanced_lrs, not read
    scale = max(max(abs(v) for v in y), max(abs(v) for v in x), 1e-300)
    lo, hi = x.index(min(x)), x.index(max(x))
    one_x = x[hi] == x[lo] or _close(x[lo], x[hi], scale)
    if one_x and not (x[hi] == 0.0 and all(v == y[0] for v in y)):
        return  # one lr seen by the scheduler (not 0): a closed form and a product read alike only in frame 1
    if all(v == y[0] for v in y):
        new = [y[0]] * len(shared)  # a closed form of the untuned base (LambdaLR, OneCycleLR, ...)
    else:
        b = (y[hi] - y[lo]) / (x[hi] - x[lo])
        a = y[lo] - b * x[lo]
        if not all(_close(a + b * xi, yi, scale) for xi, yi in zip(x, y)):
            return
        new = [a + b * ui for ui in u]
    for g, lr, un in zip(shared, y, new):
        frame = lr / un if un != 0 else float(record(g).get("frame", 1.0))
        _update(g, untuned=float(un), written=lr, frame=float(frame))


def balanced_lrs(groups: Sequence[dict], factors: Sequence[float], untuned: Optional[float]) -> list[float]:
    """The untuned lr of every group (``untuned`` when given, else read from the group), validated.

    Raises a ValueError naming the group before anything is written when one is not finite or negative.
    """
    if untuned is None:
        resolve_shared(groups)
    bases = [untuned if untuned is not None else untuned_lr(g) for g in groups]
    for gi, (base, f) in enumerate(zip(bases, factors)):
        if not (math.isfinite(base) and base >= 0):
            raise ValueError(f"optimizer param group {gi} has lr {float(groups[gi]['lr'])!r} (untuned lr {base!r}): "
                             "an lr must be a finite number >= 0; TempBalance wrote nothing")
        if not (math.isfinite(f) and f >= 0):
            raise ValueError(f"TempBalance factor of optimizer param group {gi} is {f!r}; wrote nothing")
    return bases


def write_factors(groups: Sequence[dict], lr_factors: Sequence[float], wd_factors: Optional[Sequence[float]],
                  untuned: Optional[float]) -> list[float]:
    """Write ``untuned lr x lr factor`` (and ``untuned weight decay x wd factor``) into every group."""
    if wd_factors is not None:
        for gi, g in enumerate(groups):
            if "weight_decay" not in g:
                raise ValueError(f"optimizer param group {gi} has no 'weight_decay' to balance")
    bases = balanced_lrs(groups, lr_factors, untuned)
    written = []
    for gi, (g, base, f) in enumerate(zip(groups, bases, lr_factors)):
        if wd_factors is not None:
            wd0 = (record(g) or {}).get("weight_decay", g["weight_decay"])
            g["weight_decay"] = wd0 * wd_factors[gi]
            _update(g, weight_decay=wd0)
        written.append(write(g, base, f, f, follow=untuned is None))
    return written


def pre_step(groups: Sequence[dict]) -> None:
    """Before ``optimizer.step()``: every group TempBalance wrote steps with ``untuned lr x factor``."""
    resolve_shared(groups)
    for group in groups:
        rec = record(group)
        if rec is None or "factor" not in rec:
            continue
        f = float(rec["factor"])
        if float(rec.get("frame", 1.0)) == f:  # already balanced: keep the lr as it is, only re-read U
            if not unchanged(group):
                _update(group, untuned=untuned_lr(group), written=float(group["lr"]))
            continue
        write(group, untuned_lr(group), f, f, rec.get("follow", False))


def post_step(groups: Sequence[dict]) -> None:
    """After ``optimizer.step()``: groups that follow an lr scheduler go back to the untuned lr, so
    the scheduler, stepped next, computes from it (``scheduler.get_last_lr()`` is the untuned lr)."""
    for group in groups:
        rec = record(group)
        if rec is None or rec.get("follow") is not True or "factor" not in rec or not unchanged(group):
            continue
        write(group, float(rec["untuned"]), float(rec["factor"]), 1.0, True)


def strip(groups: Sequence[dict]) -> None:
    """Leave every group at the lr its next step would have had and remove the bookkeeping key."""
    pre_step(groups)
    for group in groups:
        group.pop(KEY, None)
