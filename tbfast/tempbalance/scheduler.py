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
table columns -> lr and weight-decay factors) is `tbfast.tempbalance.plan`, the parameter layout
`tbfast.tempbalance.layout`, the ramp `tbfast.tempbalance.ramp`, the ESD source (``esd_of``)
`tbfast.tempbalance.esd_source`, the optimizer hooks `tbfast.tempbalance.binding`, the checkpoint
`tbfast.tempbalance.state`, the asynchronous ESD `tbfast.tempbalance.background.AsyncESD`; this
class holds the state and the optimizer protocol.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import lr_frames as _lr
from . import state as _state
from .background import ASYNC_ON_GROUP as _ASYNC_ON_GROUP, AsyncESD
from .binding import Hold
from .esd_source import source_layers
from .lora_path import LoRAPath
from .history import History, refresh_record
from .ramp import Ramp
from .report import schedule_table
from ..layers import BLOCK_PATTERN
# module functions named like the methods that call them
from .layout import group_keys as _group_keys, optimizer_groups, param_keys as _param_keys, param_layout
from .plan import plan_table, table_column
from .options import OPTION_NAMES, PL_FITTINGS, SCORE_METRICS, Option, TempBalanceOptions, pick_fit_backend

__all__ = ["TempBalance", "Tempbalance", "PL_FITTINGS", "SCORE_METRICS"]

logger = logging.getLogger(__name__)

_UNTUNED = None  # key of parameters at the untuned learning rate


class TempBalance:
    """Drop-in TempBalance scheduler (original arguments first, Model Balancing options keyword-only).

    Original arguments (SPEC section 6), same defaults; Model Balancing options (SPEC section 7):
    ``tau``, ``s``, ``granularity``, ``lr_slope``, ``normalize``, ``balance``, ``start_step``,
    ``linear_map_equal``, ``block_pattern``, ``flat_policy``; ESD options ``xmin_bound``,
    ``dtype``, ``method``, ``fit_backend`` (alias ``backend``, not both), ``metrics_fn``,
    ``asynchronous``, ``async_lag``, ``process_group``; LLR / AlphaDecay-style ``refresh_every``,
    ``ramp_steps``, ``wd_min_ratio``, ``wd_max_ratio``, ``esd_of``, ``history_size``; ``lora_cache``
    (exact LoRA ESD, `tbfast.tempbalance.lora_path`).
    `tbfast.tempbalance.options.TempBalanceOptions` describes each one.

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
    lora_cache = Option()
    async_lag = Option()
    refresh_every, ramp_steps, wd_min_ratio, wd_max_ratio, esd_of, history_size = Option(), Option(), Option(), Option(), Option(), Option()
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
        async_lag: Optional[int] = 1,
        flat_policy: str = "keep",
        process_group: Any = None,
        refresh_every: int = 1, ramp_steps: int = 0, wd_min_ratio: Optional[float] = None,
        wd_max_ratio: Optional[float] = None, esd_of: str = "weight", history_size: int = 100,
        farms: Any = None,
        lora_cache: Any = True,
    ) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"TempBalance expects an nn.Module, got {type(net).__name__}")
        options = {k: v for k, v in locals().items() if k in OPTION_NAMES}
        options["fit_backend"] = pick_fit_backend(fit_backend, backend)
        self.options = TempBalanceOptions(**options)  #: the validated options (attributes read them)
        self.net = net
        self.lora = LoRAPath()  #: exact LoRA ESD: its owned BaseSpectrumCache (tempbalance/lora_path.py)
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
        self.wd_ratios: "OrderedDict[str, float]" = self.ratios  #: weight-decay factor per key (= ratios: one range)
        self.history = History()  #: the newest ``history_size`` refresh records (tbfast.tempbalance.history)
        self._ramp = Ramp()  # ramp_steps: the factors in force at the last refresh
        # the optimizers it writes (tbfast.tempbalance.binding; esd_of reads the last one's state);
        # closing or collecting self lets go of them
        self._hold = Hold.for_owner(self)

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
        group = active_group(self.process_group, self.net)
        # weights, grads or an optimizer state; before start_step (layout only) always the weights
        src = (self.esd_of if self.active else "weight", self._hold.last(), self.conv_norm)
        with torch.no_grad():
            if group is None:
                lst = source_layers(self.analysed_layers(), *src) if layers is None else layers
                return run(lst, esd, fit, **self.lora.run_options(lst, self.lora_cache, self.dtype)).metrics
            if layers is not None:
                raise ValueError(_ASYNC_ON_GROUP)
            # each rank analyses its share of the layers (docs/DISTRIBUTED.md)
            mine = model_layers(self.net, group, types=("Linear", "Conv2d"), conv_norm=self.conv_norm)
            return run_on_group(source_layers(mine, *src), esd, fit, group=group).metrics

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
        """Request a new ESD: computed now (synchronous) or snapshotted for the background worker
        (asynchronous: its result is applied ``async_lag`` steps later, see `tbfast.tempbalance.background`)."""
        if self.asynchronous:
            self._promote()
        if not self.asynchronous or not self.ratios:  # the first schedule is always synchronous
            self.update()
            self.schedule_step = self.step_count
            return
        self._async.submit(self.options, self.analysed_layers(), self.step_count)  # holds no reference to self

    def synchronize(self) -> None:
        """Wait for every background ESD in flight and make the newest the schedule (lag 0)."""
        self._promote(self._async.newest())

    def close(self) -> None:
        """Stop the background worker and wait for its thread to end (a running ESD finishes, its
        result is dropped; queued ones are dropped) and let go of every optimizer (`bind`): hooks
        removed, each group left at the lr its next step would have had. Also done by ``with``, ``del``
        and at exit."""
        self._async.close()
        self._hold.release()

    def __enter__(self) -> "TempBalance":
        return self

    def __exit__(self, *exc: Any) -> None:  # ``with TempBalance(...) as tb:`` closes it at the end
        self.close()

    def _promote(self, done: Any = None) -> bool:
        """Make the background ESD due at this step (`AsyncESD.due`) the schedule; True if there was one."""
        done = self._async.due(self.step_count, self.async_lag) if done is None else done
        if done is None:
            return False
        step, table = done
        self.update(table)
        self.schedule_step = step
        if self.history:
            self.history[-1]["schedule_step"] = step
        logger.debug("TempBalance: background ESD of step %d in use at step %d", step, self.step_count)
        return True

    def update(self, table: Any = None) -> "OrderedDict[str, float]":
        """Recompute the ESD (or use ``table``) and the lr ratio of every schedule key (`tbfast.tempbalance.plan`).

        Keys are layer names ('layer'), ``"block.<b>"`` ('block'), or both ('layer_in_block').
        Returns ``ratios``; the lr of a key is ``untuned_lr * ratio``.
        """
        table = self.compute_metrics() if table is None else table
        tuned, flat, plan, wd = plan_table(table, dict(self.net.named_modules()), self.options)
        # ramp_steps: written factors move from those in force to the new ones (tbfast.tempbalance.ramp)
        self._ramp.begin(self.step_count, self.ramp_steps, {"lr": self.ratios, "layer": self._layer_ratio,
                         "wd": self.wd_ratios}, {"lr": plan.ratios, "layer": plan.layer_ratio, "wd": wd.ratios},
                         self.step_count - 1 >= self.start_step)
        self.metrics = table
        self.tuned_layers = tuned
        self.flat_layers = [n for n, f in zip(self.tuned_layers, flat) if f]
        self.scores, self.ratios, self._layer_ratio, self.wd_ratios = plan.scores, plan.ratios, plan.layer_ratio, wd.ratios
        record = refresh_record(self.step_count, table, self.tuned_layers, self.options, plan, wd.ratios, self.active)
        self.history.add(record, self.history_size)
        logger.debug("TempBalance: %d schedule keys, factors in [%.4g, %.4g]", len(plan.ratios),
                     min(plan.ratios.values()), max(plan.ratios.values()))
        return plan.ratios

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

    def ratio(self, key: Any, channel: str = "lr") -> float:
        """Factor of a schedule key now (channel 'lr' or 'wd'; 1.0 for untuned parameters or before
        ``start_step``; during a ramp, on its way to the target in ``ratios`` / ``wd_ratios``)."""
        if key is _UNTUNED or not self.active:
            return 1.0
        target = (self.wd_ratios if channel == "wd" else self.ratios)[key]
        return self._ramp.factor(channel, key, target, self.step_count, self.ramp_steps)

    # ------------------------------------------------------------------ original API
    def build_optimizer_param_group(self, untuned_lr: float = 0.1, initialize: bool = True):
        """Param groups for a fresh optimizer: ``(groups, layer_count)``.

        ``groups`` = one dict ``{'params': [...], 'lr': lr}`` per tuned module (or block), in
        module order, then one group with every other parameter at ``untuned_lr``;
        ``layer_count`` = the number of tuned groups. With ``initialize=False`` returns the
        list of the tuned groups' learning rates instead.
        """
        untuned_lr = _lr.check_lr(untuned_lr, "build_optimizer_param_group: untuned_lr")
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
        # untuned lr as its initial_lr; the groups share it, which lets tbfast read any scheduler's lr back
        for g, f in zip(out, factors):
            g.update({_lr.KEY: {"untuned": untuned_lr, "written": g["lr"], "frame": 1.0, "factor": f,
                                "follow": _lr.BUILD, "shared": True}, "initial_lr": untuned_lr})
        self._hold.built(out)  # until TempBalance sees their optimizer (tbfast.tempbalance.binding)
        self._record_layer_lrs(untuned_lr)
        return out, len(groups)

    def step(self, optimizer: Any, untuned_lr: Optional[float] = None) -> list[float]:
        """Recompute the ESD and write the balanced lrs into ``optimizer``'s param groups.

        Groups are matched to layers by parameter identity; returns the lrs written, per group.
        ``untuned_lr`` as in `apply`: omit it when an lr scheduler sets the lr (call ``step``
        after the scheduler's step; each group's lr becomes the scheduler's lr x its factor).
        """
        if untuned_lr is not None:
            untuned_lr = _lr.check_lr(untuned_lr, "step: untuned_lr")
        self.bind(optimizer)  # before the ESD: esd_of may read this optimizer's state
        self.step_count += 1
        if self.active and (not self.ratios or self.step_count % self.refresh_every == 0
                            or self.step_count == self.start_step):
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
        if untuned_lr is not None:
            untuned_lr = _lr.check_lr(untuned_lr, "apply: untuned_lr")
        self.bind(optimizer)  # before a first ESD (group_keys): esd_of may read this optimizer's state
        if self.asynchronous:
            self._promote()
        groups = optimizer_groups(optimizer)
        keys = self.group_keys(optimizer) if self.active else [None] * len(groups)
        # the factors now (on their ramp, tbfast.tempbalance.ramp); weight decay from its own range
        lr_factors = [self.ratio(k) if self.balance != "weight_decay" else 1.0 for k in keys]
        wd_factors = [self.ratio(k, "wd") for k in keys] if self.balance != "lr" else None
        written = _lr.write_factors(groups, lr_factors, wd_factors, untuned_lr)
        if untuned_lr is not None:
            self._record_layer_lrs(untuned_lr)
        return written

    def bind(self, optimizer: Any) -> "TempBalance":
        """Attach to ``optimizer`` (as an lr scheduler is bound to one): its own step hooks keep every
        group at ``scheduler lr x factor`` when it steps. ``step`` / ``apply`` bind on first use;
        call it right after building the optimizer so that its first step is balanced too.
        `close` (or garbage collection of this object) detaches (`tbfast.tempbalance.binding`)."""
        self._hold.bind(optimizer)
        return self

    def get_last_lr(self, optimizer: Any = None) -> list[float]:
        """The lr each param group of ``optimizer`` (default: the one bound) steps with now."""
        if optimizer is None:
            bound = self._hold.optimizers()
            if len(bound) != 1:
                raise ValueError(f"TempBalance is bound to {len(bound)} optimizers; pass the one to read")
            optimizer = bound[0]
        groups = optimizer_groups(optimizer)
        _lr.balanced_lrs(groups, [1.0] * len(groups), None)
        return [_lr.untuned_lr(g) * float((_lr.record(g) or {}).get("factor", 1.0)) for g in groups]

    def _record_layer_lrs(self, untuned_lr: float) -> None:
        factor = self._layer_ratio if self.active and self.balance != "weight_decay" else {}
        ramped = {n: self._ramp.factor("layer", n, f, self.step_count, self.ramp_steps) for n, f in factor.items()}
        self.layer_lrs = OrderedDict((n, untuned_lr * ramped.get(n, 1.0)) for n in self.tuned_layers)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to resume: step count, the latest schedule (factors, scores; the
        weight-decay factors and the ramp in progress when used) and a ``fingerprint`` of what
        was analysed (layer names and shapes, schedule options; see `tbfast.tempbalance.state`).

        Asynchronous mode: an ESD in flight is waited for (not made current) and saved as the
        finished result the next ``step`` / ``apply`` will use, so a resumed run continues
        exactly as the uninterrupted one. Only tensors, numbers, strings, lists and dicts: the
        state loads with ``torch.load(weights_only=True)``.
        """
        return _state.to_state(self)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore a `state_dict` (the ESD table itself is recomputed on the next update).

        Checked first (TypeError / ValueError naming what is wrong, nothing changed): a state
        whose fingerprint differs from this model names the first differing layer;
        ``strict=False`` loads the schedule keys whose layers match and leaves the others at
        the untuned lr until the next ESD (`tbfast.tempbalance.state`).
        """
        _state.load(self, state, strict=strict)

    # ------------------------------------------------------------------ reporting
    def table(self):
        """Per-layer DataFrame of the last schedule: name, block, score, tuned, lr factor."""
        return schedule_table(self)

    def __getstate__(self) -> dict:  # the hold on optimizers stays in this process
        return {k: v for k, v in self.__dict__.items() if k != "_hold"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._hold = Hold.for_owner(self)

    def __repr__(self) -> str:
        return (f"TempBalance(assign_func={self.assign_func!r}, granularity={self.granularity!r}, "
                f"metric={self.esd_metric_for_tb!r}, pl_fitting={self.pl_fitting!r}, layers={len(self.tuned_layers)})")


#: The original's class name.
Tempbalance = TempBalance
