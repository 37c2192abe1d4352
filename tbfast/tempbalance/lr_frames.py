"""Untuned-lr bookkeeping inside optimizer param groups, so TempBalance factors sit on top of lr schedulers.

A param group that TempBalance writes carries four keys (they travel with
``optimizer.state_dict()``, so a resumed run continues exactly):

- ``tb_untuned_lr`` ``U``: the lr this group would have without TempBalance (the scheduler's lr);
- ``tb_written_lr`` ``W``: the value tbfast last left in ``group['lr']``;
- ``tb_lr_frame`` ``g``: the factor inside ``W`` (``W == U * g``; 1 when ``W`` is the untuned lr);
- ``tb_lr_factor`` ``f``: the group's TempBalance factor (the lr the optimizer steps with is ``U * f``);

and ``tb_follow``: True after ``tb.apply(optimizer)`` (follow lr schedulers), "build" in groups
fresh from ``build_optimizer_param_group``, False after ``tb.apply(optimizer, untuned_lr)``. When ``group['lr']`` differs from ``W``, something else
(an lr scheduler) wrote it, and the new untuned lr is ``group['lr'] / g``: exact for schedulers
that multiply the current lr (ExponentialLR, StepLR, ReduceLROnPlateau, ...) and for schedulers
that compute from the untuned ``initial_lr`` / ``base_lrs`` while ``g == 1``.

To make ``g == 1`` whenever a torch ``LRScheduler`` steps, two process-wide optimizer hooks run
around every ``optimizer.step()`` of a group that carries these keys:

- before the step, the group's lr is set to ``U * f`` (so the step always uses the balanced lr,
  also when nothing re-applied the factors after a scheduler step);
- after the step, in a following group (and in a "build" group once a torch ``LRScheduler`` is
  attached to the optimizer), the lr is set back to ``U``, so the scheduler, stepped next,
  computes from the untuned lr and ``scheduler.get_last_lr()`` is the untuned lr.
  ``TempBalance.apply`` writes ``U * f`` again.

A scheduler built on groups fresh from ``build_optimizer_param_group`` (``initial_lr`` = the
untuned lr, ``lr`` balanced) may write either frame before the first step; `frame_build_groups`
picks it. Groups without these keys (optimizers TempBalance never wrote) are not touched.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["UNTUNED", "WRITTEN", "FRAME", "FACTOR", "FOLLOW", "BUILD", "unchanged", "untuned_lr", "frame_build_groups",
           "write", "install_hooks"]

UNTUNED = "tb_untuned_lr"
WRITTEN = "tb_written_lr"
FRAME = "tb_lr_frame"
FACTOR = "tb_lr_factor"
FOLLOW = "tb_follow"
BUILD = "build"  # FOLLOW value of groups fresh from build_optimizer_param_group

_handles: list = []


def unchanged(group: dict) -> bool:
    """Whether ``group['lr']`` is still the value tbfast wrote (a tensor lr: up to its dtype's rounding)."""
    if WRITTEN not in group:
        return False
    lr, written = group["lr"], group[WRITTEN]
    if isinstance(lr, torch.Tensor):
        return math.isclose(float(lr), written, rel_tol=2 * torch.finfo(lr.dtype).eps)
    return float(lr) == written


def untuned_lr(group: dict) -> float:
    """The untuned lr of ``group`` now: ``U`` if ``group['lr']`` is still ``W``, else ``group['lr'] / g``."""
    lr = float(group["lr"])
    if UNTUNED not in group or WRITTEN not in group:
        return lr
    if unchanged(group):
        return float(group[UNTUNED])
    frame = float(group.get(FRAME, 1.0))
    if frame == 0.0:  # a factor of 0 left no information to divide out; take the new lr as untuned
        return lr
    return lr / frame


def write(group: dict, untuned: float, factor: float, frame: float, follow: Any) -> float:
    """Set ``group['lr'] = untuned * frame`` and record the bookkeeping keys; returns the lr written."""
    lr = untuned * frame
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr
    group[UNTUNED] = float(untuned)
    group[WRITTEN] = float(group["lr"]) if isinstance(group["lr"], torch.Tensor) else lr
    group[FRAME] = float(frame)
    group[FACTOR] = float(factor)
    group[FOLLOW] = follow
    return lr


def _uniform(values: list[float]) -> bool:
    return max(values) - min(values) <= 1e-12 * max(abs(v) for v in values)


def frame_build_groups(groups: list) -> None:
    """Frame of an lr a scheduler wrote into groups fresh from ``build_optimizer_param_group``.

    All such groups share one untuned lr. A scheduler built on them either computes from their
    untuned ``initial_lr`` (LambdaLR, OneCycleLR, SequentialLR: frame 1) or multiplies the balanced
    lr it finds (LinearLR, ConstantLR: frame = factor). Only one of the two leaves the groups
    sharing one untuned lr when their factors differ; that one is taken (frame 1 if neither).
    """
    changed = [g for g in groups if g.get(FOLLOW) == BUILD and FACTOR in g and not unchanged(g)
               and g.get(FRAME) == 1.0]
    if len(changed) < 2 or any(float(g[FACTOR]) <= 0 for g in changed):
        return
    as_untuned = [float(g["lr"]) for g in changed]
    as_balanced = [float(g["lr"]) / float(g[FACTOR]) for g in changed]
    if _uniform(as_balanced) and not _uniform(as_untuned):
        for g in changed:
            g[FRAME] = float(g[FACTOR])


def _scheduler_attached(optimizer: Any) -> bool:
    # every torch LRScheduler (not ReduceLROnPlateau) wraps optimizer.step and marks the wrapper
    return bool(getattr(getattr(optimizer, "step", None), "_wrapped_by_lr_sched", False))


def _pre_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    frame_build_groups(optimizer.param_groups)
    for group in optimizer.param_groups:
        if FACTOR not in group:
            continue
        f = float(group[FACTOR])
        if float(group.get(FRAME, 1.0)) == f:  # already balanced: keep the lr as it is, only re-read U
            if not unchanged(group):
                group[UNTUNED] = untuned_lr(group)
                group[WRITTEN] = float(group["lr"])
            continue
        write(group, untuned_lr(group), f, f, group.get(FOLLOW, False))


def _post_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    attached = None
    for group in optimizer.param_groups:
        follow = group.get(FOLLOW)
        if not follow or FACTOR not in group or not unchanged(group):
            continue
        if follow == BUILD:  # not yet re-applied: restore only once an LRScheduler is attached
            attached = _scheduler_attached(optimizer) if attached is None else attached
            if not attached:
                continue
        write(group, float(group[UNTUNED]), float(group[FACTOR]), 1.0, follow)


def install_hooks() -> None:
    """Register the two global optimizer-step hooks (once per process)."""
    if _handles:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    _handles.append(register_optimizer_step_pre_hook(_pre_step))
    _handles.append(register_optimizer_step_post_hook(_post_step))


def check_lr(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")
    return value
