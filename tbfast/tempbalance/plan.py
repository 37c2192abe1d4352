"""TempBalance's planning: ESD table columns -> the lr factor of every schedule key (pure functions).

Nothing here touches a model or an optimizer. The inputs are the columns of an ESD table
(layer names, ``num_evals``, the score column, fit statuses, flat-tail flags) and the options
(a `tbfast.tempbalance.options.TempBalanceOptions`, or anything with the same attributes); the
output is a `Plan`: the factor (lr / untuned lr) per schedule key and per analysed layer.

Steps (SPEC sections 6-7):

1. `select_rows`: drop the first / last analysed layer (``remove_first_layer`` /
   ``remove_last_layer``), then every layer with fewer than ``eigs_thresh`` eigenvalues.
2. `check_rows`: every selected layer needs an "ok" fit status and a finite score.
3. `plan_schedule`: the assignment function (`tbfast.tempbalance.assign.assign_lrs`) on the scores at
   untuned lr 1, so its output is the factor:

   - ``granularity='layer'``: one factor per layer (key = layer name);
   - ``'block'``: one factor per block (key ``"block.<b>"``) from the block's mean score;
     every layer of the block gets the block factor;
   - ``'layer_in_block'``: block factors as for 'block', then each layer mapped inside its
     block onto ``[lr_min_ratio, lr_min_ratio + lr_slope]`` times the block factor
     (`tbfast.tempbalance.assign.within_block_lrs`); keys = blocks and layers.

   ``normalize`` rescales the layer (or block) factors to mean 1. With
   ``flat_policy='untuned'``, flat layers are left out of the scores and get factor 1.0 (a
   block whose layers are all flat too), keeping the keys of a plan without flat layers.
4. `plan_factors`: the lr plan and, when the weight decay has its own factor range
   (``wd_min_ratio`` / ``wd_max_ratio``), the weight-decay plan (the same steps on that range).

`flat_rows` flags the selected layers whose fitted tail is flat (`tbfast.metrics.flat_tail`);
`plan_table` runs steps 1-4 on an ESD table (what ``TempBalance.update`` does with each one).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import STATUS_OK
from ..layers import block_index
from .assign import assign_lrs, block_means, normalize_mean, scores_array, within_block_lrs
from .options import ALPHA_SCORES

__all__ = ["Plan", "table_column", "select_rows", "check_rows", "plan_schedule", "plan_factors", "flat_rows",
           "plan_table"]

logger = logging.getLogger(__name__)

@dataclass
class Plan:
    """The schedule of one ESD: ``ratios`` (factor per key), ``scores`` (score per key) and
    ``layer_ratio`` (factor per scheduled layer; for 'block' the layer's block factor; a layer
    outside every block has none and stays at the untuned lr)."""

    ratios: "OrderedDict[str, float]" = field(default_factory=OrderedDict)
    scores: "OrderedDict[str, float]" = field(default_factory=OrderedDict)
    layer_ratio: "OrderedDict[str, float]" = field(default_factory=OrderedDict)


def table_column(table: Any, key: str) -> np.ndarray:
    """Column ``key`` of an ESD table (``table[key]``: numpy, torch or a sequence) as float64 numpy."""
    try:
        col = table[key]
    except (KeyError, IndexError, TypeError) as exc:
        raise KeyError(f"ESD table has no column {key!r}") from exc
    return scores_array(col)


def select_rows(num_evals: Sequence[float], opts: Any) -> list[int]:
    """Rows entering the schedule: first/last removal, then ``num_evals >= eigs_thresh``."""
    idx = list(range(len(num_evals)))
    if opts.remove_first_layer:
        idx = idx[1:]
    if opts.remove_last_layer:
        idx = idx[:-1]
    rows = [i for i in idx if num_evals[i] >= opts.eigs_thresh]
    if not rows:
        raise ValueError(
            "TempBalance: no layer left to schedule after remove_first_layer/remove_last_layer and "
            f"eigs_thresh={opts.eigs_thresh} ({len(num_evals)} analysed layers)"
        )
    return rows


def check_rows(names: Sequence[str], scores: np.ndarray, status: Sequence[str], rows: Sequence[int],
               metric: str) -> None:
    """A selected layer must have an "ok" fit and a finite score; raises a ValueError naming it."""
    for i in rows:
        if status[i] != STATUS_OK:
            raise ValueError(f"TempBalance: layer {names[i]!r} has no usable ESD fit ({status[i]})")
        if not math.isfinite(scores[i]):
            raise ValueError(f"TempBalance: layer {names[i]!r} has a non-finite {metric} ({scores[i]})")


def _factors(scores: np.ndarray, keys: list[str], opts: Any) -> np.ndarray:
    """Assignment function at untuned lr 1 (so lrs are factors), then ``normalize``."""
    r = np.asarray(assign_lrs(opts.assign_func, scores, 1.0, names=keys, lr_min_ratio=opts.lr_min_ratio,
                              lr_max_ratio=opts.lr_max_ratio, tau=opts.tau, s=opts.s,
                              equal_scores=opts.linear_map_equal), dtype=np.float64)
    return normalize_mean(r, 1.0) if opts.normalize else r


def _plan_layers(names: list[str], scores: np.ndarray, opts: Any) -> Plan:
    plan = Plan()
    for n, v, sc in zip(names, _factors(scores, names, opts), scores):
        plan.ratios[n] = plan.layer_ratio[n] = float(v)
        plan.scores[n] = float(sc)
    return plan


def _plan_blocks(names: list[str], scores: np.ndarray, opts: Any) -> Plan:
    blocks = [block_index(n, opts.block_pattern) for n in names]
    order, means = block_means(scores, blocks)
    if not order:
        raise ValueError(
            f"TempBalance: granularity={opts.granularity!r} but no scheduled layer name matches the "
            f"block pattern {opts.block_pattern!r} (e.g. {names[0]!r})"
        )
    keys = [f"block.{b}" for b in order]
    block_r = {b: float(v) for b, v in zip(order, _factors(means, keys, opts))}
    plan = Plan()
    for k, b, m in zip(keys, order, means):
        plan.ratios[k] = block_r[b]
        plan.scores[k] = float(m)
    in_block = [j for j, b in enumerate(blocks) if b is not None]
    if opts.granularity == "block":
        for j in in_block:
            plan.layer_ratio[names[j]] = block_r[blocks[j]]
        return plan
    sub = within_block_lrs(scores[in_block], [blocks[j] for j in in_block], block_r, opts.lr_min_ratio,
                           opts.lr_slope)
    for v, j in zip(sub, in_block):
        plan.ratios[names[j]] = plan.layer_ratio[names[j]] = float(v)
        plan.scores[names[j]] = float(scores[j])
    return plan


def _with_flat_untuned(names: list[str], scores: np.ndarray, fitted: Plan, opts: Any) -> Plan:
    """flat_policy='untuned': the keys of a plan without flat layers, the left-out ones at factor 1.0."""
    plan = Plan()
    if opts.granularity == "layer":
        for n, sc in zip(names, scores):
            plan.ratios[n] = plan.layer_ratio[n] = fitted.ratios.get(n, 1.0)
            plan.scores[n] = fitted.scores.get(n, float(sc))
        return plan
    in_block: "OrderedDict[Any, list[int]]" = OrderedDict()
    for j, n in enumerate(names):
        b = block_index(n, opts.block_pattern)
        if b is not None:
            in_block.setdefault(b, []).append(j)
    for b, idx in in_block.items():  # a block whose layers are all flat: factor 1.0
        k = f"block.{b}"
        plan.ratios[k] = fitted.ratios.get(k, 1.0)
        plan.scores[k] = fitted.scores.get(k, float(np.mean(scores[idx])))
    for b, idx in in_block.items():
        for j in idx:
            n = names[j]
            if opts.granularity == "layer_in_block":
                plan.ratios[n] = plan.layer_ratio[n] = fitted.ratios.get(n, 1.0)
                plan.scores[n] = fitted.scores.get(n, float(scores[j]))
            else:  # 'block': every parameter of the block follows the block lr
                plan.layer_ratio[n] = plan.ratios[f"block.{b}"]
    return plan


def plan_schedule(names: Sequence[str], scores: Any, flat: Sequence[bool], opts: Any) -> Plan:
    """The `Plan` of the scheduled layers ``names`` with scores ``scores`` and flat-tail flags ``flat``.

    ``names`` / ``scores`` / ``flat`` hold the selected rows only (`select_rows`), in table order.
    Raises a ValueError when a factor is not a finite number >= 0.
    """
    names = list(names)
    scores = np.asarray(scores, dtype=np.float64)
    keep = [j for j in range(len(names)) if not (flat[j] and opts.flat_policy == "untuned")]
    fit_names = [names[j] for j in keep]
    fit_scores = scores[keep]
    if not fit_names:  # every scheduled layer is flat and flat_policy='untuned': all at factor 1.0 (below)
        plan = Plan()
    elif opts.granularity == "layer":
        plan = _plan_layers(fit_names, fit_scores, opts)
    else:
        plan = _plan_blocks(fit_names, fit_scores, opts)
    if len(keep) < len(names):
        plan = _with_flat_untuned(names, scores, plan, opts)
    bad = [k for k, v in plan.ratios.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"TempBalance: invalid learning-rate factor for {bad[:5]}: {[plan.ratios[k] for k in bad[:5]]}")
    return plan


def plan_factors(names: Sequence[str], scores: Any, flat: Sequence[bool], opts: Any) -> tuple[Plan, Plan]:
    """``(lr plan, weight-decay plan)``; the weight-decay plan is the lr plan itself unless
    ``opts.wd_options()`` gives a separate weight-decay range (`TempBalanceOptions.wd_options`)."""
    plan = plan_schedule(names, scores, flat, opts)
    wd_opts = opts.wd_options() if hasattr(opts, "wd_options") else None
    return plan, (plan if wd_opts is None else plan_schedule(names, scores, flat, wd_opts))


def flat_rows(table: Any, rows: Sequence[int], opts: Any) -> list[bool]:
    """Per selected row: whether its fitted tail is flat (only for alpha-based scores, see
    `tbfast.tempbalance.options.ALPHA_SCORES`); logs one warning per ESD naming the flat layers."""
    from ..metrics import FLAT_TAIL_SPREAD, flat_tail

    if opts.esd_metric_for_tb not in ALPHA_SCORES:
        return [False] * len(rows)
    try:
        alpha = table_column(table, "alpha")
    except KeyError:  # a metrics_fn table without alpha
        return [False] * len(rows)
    flat = flat_tail(alpha[list(rows)]).tolist()
    hit = [f"{table.names[i]} (alpha={alpha[i]:.4g})" for i, f in zip(rows, flat) if f]
    if hit:
        logger.warning(
            "TempBalance: flat ESD tail (alpha >= %g: the tail eigenvalues lie within %g%% of xmin on "
            "average, so alpha is not a power-law exponent) in %s; %s", 1 + 1 / FLAT_TAIL_SPREAD,
            100 * FLAT_TAIL_SPREAD, ", ".join(hit),
            "left at the untuned lr (flat_policy='untuned')" if opts.flat_policy == "untuned"
            else "scheduled on it as the original does (flat_policy='untuned' leaves it at the untuned lr)")
    return flat



def plan_table(table: Any, modules: Any, opts: Any) -> tuple[list[str], list[bool], Plan, Plan]:
    """Steps 1-4 on an ESD ``table`` whose layers must all be in ``modules`` (a model's module
    names): ``(scheduled layers, their flat-tail flags, lr plan, weight-decay plan)``."""
    names = list(table.names)
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"ESD table names layers that are not modules of the model: {missing[:5]}")
    rows = select_rows(table_column(table, "num_evals"), opts)
    status = list(getattr(table, "status", [STATUS_OK] * len(names)))
    scores = table_column(table, opts.esd_metric_for_tb)
    check_rows(names, scores, status, rows, opts.esd_metric_for_tb)
    flat = flat_rows(table, rows, opts)
    tuned = [names[i] for i in rows]
    plan, wd = plan_factors(tuned, scores[rows], flat, opts)
    return tuned, flat, plan, wd
