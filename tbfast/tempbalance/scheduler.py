"""TempBalance: layer-wise (or block-wise) learning rates from each layer's ESD.

`TempBalance` is a drop-in for the original ``Tempbalance`` scheduler (Zhou et al., NeurIPS
2023; SPEC section 6): same constructor arguments and defaults, same
``build_optimizer_param_group`` and ``step`` methods, same param groups and learning rates. It
adds the Model Balancing options (SPEC section 7): TB_Sigmoid, per-block scheduling, lr
normalisation, weight-decay balancing, a delayed start, and a ``metrics`` table.

Where tbfast deliberately differs from the original (docs/TEMPBALANCE.md gives the details):
optimizer groups are matched to layers by parameter identity (a group mixing keys is an error);
``tb_linear_map`` with all scores equal gives the middle of the range
(``linear_map_equal='reference'``: numpy's upper end); a tuned layer without a usable fit raises
a ValueError naming it instead of giving a NaN lr; param groups hold lists of parameters; a
layer with a flat fitted ESD tail (`tbfast.metrics.flat_tail`) gets a logged warning at every
ESD and is scheduled on its alpha unless ``flat_policy='untuned'``.

Structure: the options are `tbfast.tempbalance.options.TempBalanceOptions`, the planning (ESD
table columns -> factors) is `tbfast.tempbalance.plan`, the parameter layout `tbfast.tempbalance.layout`, the
asynchronous ESD `tbfast.tempbalance.background.AsyncESD`; this class holds the state and the optimizer
protocol.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import lr_frames as _lr
from .background import AsyncESD
from ..errors import STATUS_OK
from ..layers import BLOCK_PATTERN, block_index
# module functions named like the methods that call them
from .layout import group_keys as _group_keys, optimizer_groups, param_keys as _param_keys, param_layout
from .plan import check_rows, plan_schedule, select_rows, table_column
from .options import (ALPHA_SCORES, OPTION_NAMES, PL_FITTINGS, SCORE_METRICS, Option, TempBalanceOptions,
                      pick_fit_backend)

__all__ = ["TempBalance", "Tempbalance", "PL_FITTINGS", "SCORE_METRICS"]

logger = logging.getLogger(__name__)

_UNTUNED = None  # key of parameters at the untuned learning rate
_ASYNC_ON_GROUP = ("TempBalance: asynchronous=True is not supported on a process group yet; pass "
                   "process_group=False (every rank computes the whole ESD) or use the synchronous mode "
                   "(the layers are split over the ranks)")

# keys tbfast keeps inside optimizer param groups (so they travel with optimizer.state_dict());
# the lr bookkeeping keys are documented in tbfast.tempbalance.lr_frames
_WD0 = "tb_initial_weight_decay"


class TempBalance:
    """Drop-in TempBalance scheduler (original arguments first, Model Balancing options keyword-only).

    Original arguments (SPEC section 6), same defaults; Model Balancing options (SPEC section 7):
    ``tau``, ``s``, ``granularity``, ``lr_slope``, ``normalize``, ``balance``, ``start_step``,
    ``linear_map_equal``, ``block_pattern``, ``flat_policy``; ESD options ``xmin_bound``,
    ``dtype``, ``method``, ``fit_backend`` (alias ``backend``, not both), ``metrics_fn``,
    ``asynchronous``, ``process_group``. `tbfast.tempbalance.options.TempBalanceOptions`
    describes each one.

    Every option is an attribute (``tb.lr_min_ratio``, ...) backed by ``tb.options``, a frozen
    `TempBalanceOptions` validated when built; setting an attribute validates the new value.

    After each ESD, ``metrics`` holds the per-layer table of all analysed layers and
    ``layer_lrs`` / ``ratios`` the learning rates that were assigned.
    """

    # every option is an attribute read from self.options (a TempBalanceOptions) and validated when set
    EVALS_THRESH, bins, conv_norm, pl_fitting, xmin_pos, filter_zeros = Option(), Option(), Option(), Option(), Option(), Option()
    remove_first_layer, remove_last_layer, eigs_thresh, esd_metric_for_tb, assign_func = Option(), Option(), Option(), Option(), Option()
    lr_min_ratio, lr_max_ratio, batchnorm, batchnorm_type, layernorm = Option(), Option(), Option(), Option(), Option()
    tau, s, granularity, lr_slope, normalize, balance, start_step = Option(), Option(), Option(), Option(), Option(), Option(), Option()
    linear_map_equal, block_pattern, flat_policy = Option(), Option(), Option()
    xmin_bound, dtype, method, fit_backend, asynchronous, process_group, metrics_fn = Option(), Option(), Option(), Option(), Option(), Option(), Option()
    backend = Option("fit_backend")  #: the documented alias of ``fit_backend``
    farms = Option()  #: FARMS alpha (tbfast.options.FarmsOptions) instead of the whole matrix's

    def __init__(
        self,
        net: nn.Module,
        EVALS_THRESH: float = 0.00001,
        bins: int = 100,
        conv_norm: float = 0.5,
        pl_fitting: str = "median",
        xmin_pos: float = 2,
        filter_zeros: bool = False,
        remove_first_layer: bool = True,
        remove_last_layer: bool = True,
        eigs_thresh: int = 50,
        esd_metric_for_tb: str = "alpha",
        assign_func: Union[str, Callable[..., Any]] = "tb_linear_map",
        lr_min_ratio: float = 0.5,
        lr_max_ratio: float = 1.5,
        batchnorm: bool = True,
        batchnorm_type: str = "name",
        layernorm: bool = False,
        *,
        tau: float = 10.0,
        s: Union[float, Sequence[float]] = 1.0,
        granularity: str = "layer",
        lr_slope: Optional[float] = None,
        normalize: bool = False,
        balance: str = "lr",
        start_step: int = 0,
        linear_map_equal: str = "mid",
        block_pattern: str = BLOCK_PATTERN,
        xmin_bound: str = "reference",
        dtype: torch.dtype = torch.float32,
        method: str = "auto",
        backend: Optional[str] = None,
        fit_backend: Optional[str] = None,
        metrics_fn: Optional[Callable[[nn.Module], Any]] = None,
        asynchronous: bool = False,
        flat_policy: str = "keep",
        process_group: Any = None,
        farms: Any = None,
    ) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"TempBalance expects an nn.Module, got {type(net).__name__}")
        options = {k: v for k, v in locals().items() if k in OPTION_NAMES}
        options["fit_backend"] = pick_fit_backend(fit_backend, backend)
        self.options = TempBalanceOptions(**options)  #: the validated options (attributes read them)
        self.net = net
        #: optimizer step whose weights produced the current schedule (None before the first ESD)
        self.schedule_step: Optional[int] = None
        self._async = AsyncESD()  # asynchronous=True: the background worker, a restored pending ESD

        self.metrics: Any = None  #: last per-layer ESD table (all analysed layers)
        self.tuned_layers: list[str] = []  #: layers whose scores entered the schedule
        self.scores: "OrderedDict[str, float]" = OrderedDict()  #: score per layer, or per block key
        self.ratios: "OrderedDict[str, float]" = OrderedDict()  #: lr / untuned lr per schedule key
        self.layer_lrs: "OrderedDict[str, float]" = OrderedDict()  #: last lr per tuned layer
        self.flat_layers: list[str] = []  #: scheduled layers whose fitted tail was flat at the last ESD
        self.step_count = 0
        self._layer_ratio: "OrderedDict[str, float]" = OrderedDict()

    # ------------------------------------------------------------------ metrics -> ratios
    @property
    def active(self) -> bool:
        """Whether balancing is on (``step`` called at least ``start_step`` times)."""
        return self.step_count >= self.options.start_step

    def set_step(self, step_count: int, start_step: Optional[int] = None) -> None:
        """Align the step counter with an outer loop (e.g. a Trainer's global step); optionally move ``start_step``."""
        if int(step_count) < 0 or (start_step is not None and int(start_step) < 0):
            raise ValueError(f"step_count and start_step must be >= 0 (got {step_count}, {start_step})")
        self.step_count = int(step_count)
        if start_step is not None:
            self.start_step = int(start_step)

    def layer_values(self, column: str = "alpha") -> "OrderedDict[str, float]":
        """``layer name -> value`` of one column of the latest ESD table (empty before the first ESD)."""
        if self.metrics is None:
            return OrderedDict()
        return OrderedDict(zip(self.metrics.names, (float(v) for v in table_column(self.metrics, column))))

    def compute_metrics(self, layers: Optional[list] = None) -> Any:
        """ESD table of every analysed layer (nn.Conv2d and nn.Linear, module order). The model is not changed.

        ``layers``: `tbfast.layers.Layer` records to use instead of the live model (a snapshot).
        """
        if self.metrics_fn is not None:
            return self.metrics_fn(self.net)
        from ..distributed import active_group, model_layers, run as run_on_group
        from ..pipeline import run

        esd, fit = self.options.esd_options(), self.options.fit_options()
        group = active_group(self.process_group)
        with torch.no_grad():
            if group is None:
                return run(self.analysed_layers() if layers is None else layers, esd, fit).metrics
            if layers is not None:
                raise ValueError(_ASYNC_ON_GROUP)
            # each rank analyses its share of the layers (docs/DISTRIBUTED.md)
            mine = model_layers(self.net, group, types=("Linear", "Conv2d"), conv_norm=self.conv_norm)
            return run_on_group(mine, esd, fit, group=group).metrics

    def analysed_layers(self) -> list:
        """The `Layer` records TempBalance analyses: nn.Linear and nn.Conv2d, module order."""
        from ..layers import find_layers

        return find_layers(self.net, types=("Linear", "Conv2d"), conv_norm=self.conv_norm)

    # ------------------------------------------------------------------ asynchronous ESD
    @property
    def lag(self) -> Optional[int]:
        """Optimizer steps between the weights of the current schedule and now (0 when synchronous)."""
        return None if self.schedule_step is None else self.step_count - self.schedule_step

    def refresh(self) -> None:
        """Request a new ESD: computed now (synchronous) or started in the background (asynchronous)."""
        if self.asynchronous:
            self._promote()
        if not self.asynchronous or not self.ratios:  # the first schedule is always synchronous
            self.update()
            self.schedule_step = self.step_count
            return
        from ..distributed import active_group

        if active_group(self.process_group) is not None:
            raise ValueError(_ASYNC_ON_GROUP)
        self._async.submit(lambda layers: self.compute_metrics(layers), self.analysed_layers(), self.step_count)

    def synchronize(self) -> None:
        """Wait for the background ESD (if any) and make the newest finished one the schedule."""
        self._async.wait()
        self._promote()

    def close(self) -> None:
        """Stop the background worker (a running ESD finishes; its result is dropped)."""
        self._async.close()

    @property
    def _background(self) -> Any:
        """The `tbfast.tempbalance.background.BackgroundESD` worker (None until the first asynchronous request)."""
        return self._async.worker

    def _promote(self) -> bool:
        """Make the newest finished background ESD the schedule; True if there was one."""
        done = self._async.newest()
        if done is None:
            return False
        step, table = done
        self.update(table)
        self.schedule_step = step
        logger.debug("TempBalance: background ESD of step %d in use at step %d", step, self.step_count)
        return True

    def update(self, table: Any = None) -> "OrderedDict[str, float]":
        """Recompute the ESD (or use ``table``) and the lr ratio of every schedule key (`tbfast.tempbalance.plan`).

        Keys are layer names ('layer'), ``"block.<b>"`` ('block'), or both ('layer_in_block').
        Returns ``ratios``; the lr of a key is ``untuned_lr * ratio``.
        """
        table = self.compute_metrics() if table is None else table
        names = list(table.names)
        modules = dict(self.net.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"ESD table names layers that are not modules of the model: {missing[:5]}")
        rows = select_rows(table_column(table, "num_evals"), self.options)
        status = list(getattr(table, "status", [STATUS_OK] * len(names)))
        all_scores = table_column(table, self.esd_metric_for_tb)
        check_rows(names, all_scores, status, rows, self.esd_metric_for_tb)
        flat = self._flat(table, rows)
        plan = plan_schedule([names[i] for i in rows], all_scores[rows], flat, self.options)

        self.metrics = table
        self.tuned_layers = [names[i] for i in rows]
        self.flat_layers = [n for n, f in zip(self.tuned_layers, flat) if f]
        self.scores = plan.scores
        self.ratios = plan.ratios
        self._layer_ratio = plan.layer_ratio
        logger.debug("TempBalance: %d schedule keys, factors in [%.4g, %.4g]", len(plan.ratios),
                     min(plan.ratios.values()), max(plan.ratios.values()))
        return plan.ratios

    def _flat(self, table: Any, rows: list[int]) -> list[bool]:
        """Per row: whether its fitted tail is flat (only for alpha-based scores); logs one warning per ESD."""
        from ..metrics import FLAT_TAIL_SPREAD, flat_tail

        if self.esd_metric_for_tb not in ALPHA_SCORES:
            return [False] * len(rows)
        try:
            alpha = table_column(table, "alpha")
        except KeyError:  # a metrics_fn table without alpha
            return [False] * len(rows)
        flat = flat_tail(alpha[rows]).tolist()
        hit = [f"{table.names[i]} (alpha={alpha[i]:.4g})" for i, f in zip(rows, flat) if f]
        if hit:
            logger.warning(
                "TempBalance: flat ESD tail (alpha >= %g: the tail eigenvalues lie within %g%% of xmin on "
                "average, so alpha is not a power-law exponent) in %s; %s", 1 + 1 / FLAT_TAIL_SPREAD,
                100 * FLAT_TAIL_SPREAD, ", ".join(hit),
                "left at the untuned lr (flat_policy='untuned')" if self.flat_policy == "untuned"
                else "scheduled on it as the original does (flat_policy='untuned' leaves it at the untuned lr)")
        return flat

    # ------------------------------------------------------------------ parameters -> keys
    def layout(self) -> tuple[list[tuple[str, Any, list[nn.Parameter]]], list[nn.Parameter]]:
        """Tuned groups ``(label, key, params)`` in the original's order, and the untuned params
        (`tbfast.tempbalance.layout.param_layout` of the current schedule keys)."""
        if not self.ratios:
            raise RuntimeError("TempBalance: no schedule yet; call update() first")
        return param_layout(self.net, self.ratios, self.options)

    def param_keys(self) -> dict[int, Any]:
        """``id(param) -> schedule key`` (None for parameters at the untuned lr)."""
        return _param_keys(self.layout())

    def ratio(self, key: Any) -> float:
        """lr factor of a schedule key (1.0 for untuned parameters or before ``start_step``)."""
        if key is _UNTUNED or not self.active:
            return 1.0
        return self.ratios[key]

    # ------------------------------------------------------------------ original API
    def build_optimizer_param_group(self, untuned_lr: float = 0.1, initialize: bool = True):
        """Param groups for a fresh optimizer: ``(groups, layer_count)``.

        ``groups`` = one dict ``{'params': [...], 'lr': lr}`` per tuned module (or block), in
        module order, then one group with every other parameter at ``untuned_lr``;
        ``layer_count`` = the number of tuned groups. With ``initialize=False`` returns the
        list of the tuned groups' learning rates instead.
        """
        untuned_lr = float(untuned_lr)
        self.update()
        self.schedule_step = self.step_count
        groups, untuned = self.layout()
        lrs = [untuned_lr * self.ratio(key) for _, key, _ in groups]
        if not initialize:
            return lrs
        out = [{"params": params, "lr": lr} for (_, _, params), lr in zip(groups, lrs)]
        factors = [self.ratio(key) for _, key, _ in groups] + [1.0]
        if self.balance == "weight_decay":
            factors = [1.0] * len(factors)
            for g in out:
                g["lr"] = untuned_lr
        out.append({"params": untuned, "lr": untuned_lr})
        # lr bookkeeping (tbfast.tempbalance.lr_frames): an lr scheduler built on this optimizer captures the
        # untuned lr as its initial_lr, so an lr it writes before the first step is an untuned lr
        # (frame 1); a later tb.apply(optimizer) knows the untuned lr
        for g, f in zip(out, factors):
            g.update({_lr.UNTUNED: untuned_lr, _lr.WRITTEN: g["lr"], _lr.FRAME: 1.0, _lr.FACTOR: f,
                      _lr.FOLLOW: _lr.BUILD, "initial_lr": untuned_lr})
        _lr.install_hooks()
        self._record_layer_lrs(untuned_lr)
        return out, len(groups)

    def step(self, optimizer: Any, untuned_lr: Optional[float] = None) -> list[float]:
        """Recompute the ESD and write the balanced lrs into ``optimizer``'s param groups.

        Groups are matched to layers by parameter identity; returns the lrs written, per group.
        ``untuned_lr`` as in `apply`: omit it when an lr scheduler sets the lr (call ``step``
        after the scheduler's step; each group's lr becomes the scheduler's lr x its factor).
        """
        self.step_count += 1
        if self.active:
            self.refresh()
        return self.apply(optimizer, untuned_lr)

    # ------------------------------------------------------------------ writing into optimizers
    def group_keys(self, optimizer: Any) -> list[Any]:
        """The schedule key of every param group of ``optimizer`` (None = untuned)."""
        if not self.ratios:
            self.update()
        names = {id(p): n for n, p in self.net.named_parameters()}
        return _group_keys(optimizer_groups(optimizer), self.param_keys(), names)

    def apply(self, optimizer: Any, untuned_lr: Optional[float] = None) -> list[float]:
        """Write the latest factors into ``optimizer`` (no new ESD); returns the lrs written.

        With ``untuned_lr`` given, every group's lr is ``untuned_lr x factor`` (the original
        behaviour). With ``untuned_lr=None`` (call it after any lr scheduler's step) every group's
        lr is ``(the lr the scheduler gives an untuned group) x factor``: tbfast remembers the
        untuned lr and the factor it wrote per group and divides that factor out of whatever the
        scheduler wrote (see tbfast.tempbalance.lr_frames), so factors never compound with the schedule.
        """
        if self.asynchronous:
            self._promote()
        if untuned_lr is not None:
            untuned_lr = _lr.check_lr(untuned_lr, "untuned_lr")
        keys = self.group_keys(optimizer) if self.active else None
        written = []
        balance = self.balance
        if untuned_lr is None:
            _lr.frame_build_groups(optimizer_groups(optimizer))
        for gi, group in enumerate(optimizer_groups(optimizer)):
            base = untuned_lr if untuned_lr is not None else _lr.untuned_lr(group)
            factor = self.ratio(keys[gi]) if keys is not None else 1.0
            lr_factor = factor if balance in ("lr", "both") else 1.0
            if balance in ("weight_decay", "both"):
                if "weight_decay" not in group:
                    raise ValueError(f"optimizer param group {gi} has no 'weight_decay' to balance")
                wd0 = group.setdefault(_WD0, group["weight_decay"])
                group["weight_decay"] = wd0 * factor
            written.append(_lr.write(group, base, lr_factor, lr_factor, follow=untuned_lr is None))
        _lr.install_hooks()
        if untuned_lr is not None:
            self._record_layer_lrs(untuned_lr)
        return written

    def _record_layer_lrs(self, untuned_lr: float) -> None:
        factor = self._layer_ratio if self.active and self.balance != "weight_decay" else {}
        self.layer_lrs = OrderedDict((n, untuned_lr * factor.get(n, 1.0)) for n in self.tuned_layers)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to resume: step count and the latest schedule (factors, scores).

        Asynchronous mode: an ESD in flight is waited for (not made current) and saved as the
        finished result the next ``step`` / ``apply`` will use, so a resumed run continues
        exactly as the uninterrupted one. Only tensors, numbers, strings, lists and dicts: the
        state loads with ``torch.load(weights_only=True)``.
        """
        return {
            "schedule_step": self.schedule_step,
            "pending_esd": self._async.to_state(),
            "step_count": self.step_count,
            "ratios": dict(self.ratios),
            "scores": dict(self.scores),
            "tuned_layers": list(self.tuned_layers),
            "layer_ratio": dict(getattr(self, "_layer_ratio", {})),
            "granularity": self.granularity,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict`; the ESD table itself is recomputed on the next update."""
        if state.get("granularity", self.granularity) != self.granularity:
            raise ValueError(
                f"state was saved with granularity={state['granularity']!r}, this scheduler uses {self.granularity!r}"
            )
        self.step_count = int(state["step_count"])
        self.ratios = OrderedDict(state["ratios"])
        self.scores = OrderedDict(state["scores"])
        self.tuned_layers = list(state["tuned_layers"])
        self._layer_ratio = OrderedDict(state.get("layer_ratio", {}))
        self.schedule_step = state.get("schedule_step", self.step_count)
        self._async.load_state(state.get("pending_esd"))

    # ------------------------------------------------------------------ reporting
    def table(self):
        """Per-layer DataFrame of the last schedule: name, block, score, tuned, lr factor."""
        import pandas as pd

        if self.metrics is None:
            raise RuntimeError("TempBalance: no ESD computed yet")
        names = list(self.metrics.names)
        score = table_column(self.metrics, self.esd_metric_for_tb)
        lr_ratio = getattr(self, "_layer_ratio", {})
        return pd.DataFrame({
            "name": names,
            "block": [block_index(n, self.block_pattern) for n in names],
            self.esd_metric_for_tb: score,
            "tuned": [n in lr_ratio for n in names],
            "lr_factor": [lr_ratio.get(n, 1.0) for n in names],
        })

    def __repr__(self) -> str:
        return (f"TempBalance(assign_func={self.assign_func!r}, granularity={self.granularity!r}, "
                f"metric={self.esd_metric_for_tb!r}, pl_fitting={self.pl_fitting!r}, layers={len(self.tuned_layers)})")


#: The original's class name.
Tempbalance = TempBalance
