"""The options of `tbfast.TempBalance` as one frozen dataclass, validated once when built.

`TempBalanceOptions` holds every constructor argument of `TempBalance` except the model; its
checks (``__post_init__``) are the only place an option is validated. `TempBalance` keeps the
original's keyword arguments and exposes every option as an attribute (``tb.lr_min_ratio``...);
setting one builds a new, re-validated options object.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..layers import BLOCK_PATTERN
from ..options import ESDOptions, FitOptions, as_farms, either
from .assign import ASSIGN_FUNCS, assign_lrs

__all__ = ["TempBalanceOptions", "PL_FITTINGS", "SCORE_METRICS", "GRANULARITIES", "BALANCE", "FLAT_POLICIES",
           "ALPHA_SCORES", "ESD_SOURCES", "pick_fit_backend",
           "OPTION_NAMES", "Option"]

PL_FITTINGS = ("median", "goodness-of-fit", "ks", "fix-finger")
#: ESDMetrics columns a schedule can balance on.
SCORE_METRICS = (
    "alpha", "alphahat", "spectral_norm", "log_spectral_norm", "norm", "log_norm", "stable_rank",
    "norm_stable_rank", "eig_ratio", "log_alpha_norm", "entropy", "D", "xmin", "xmax",
)
GRANULARITIES = ("layer", "block", "layer_in_block")
BALANCE = ("lr", "weight_decay", "both")
FLAT_POLICIES = ("keep", "untuned")
#: what a layer's ESD is taken of: its weight, its gradient, or an optimizer state tensor of the weight
ESD_SOURCES = ("weight", "grad", "exp_avg", "exp_avg_sq", "momentum_buffer")
#: scores that a flat ESD tail makes meaningless (checked with `tbfast.metrics.flat_tail`)
ALPHA_SCORES = ("alpha", "alphahat", "log_alpha_norm")


def pick_fit_backend(fit_backend: Optional[str], backend: Optional[str]) -> str:
    """The fit backend from the canonical ``fit_backend`` or its documented alias ``backend`` (not both)."""
    chosen = either("fit_backend", fit_backend, "backend", backend, where="TempBalance")
    return "auto" if chosen is None else chosen


@dataclass(frozen=True)
class TempBalanceOptions:
    """Every `TempBalance` option except the model, validated when built (messages name the option).

    Original arguments (SPEC section 6), same defaults: ``EVALS_THRESH``, ``bins``, ``conv_norm``,
    ``pl_fitting`` ('median' | 'goodness-of-fit' | 'fix-finger'), ``xmin_pos``, ``filter_zeros``,
    ``remove_first_layer``, ``remove_last_layer``, ``eigs_thresh``, ``esd_metric_for_tb``,
    ``assign_func`` ('tb_linear_map' | 'tb_sqrt' | 'tb_log2' | 'tb_step', plus 'tb_sigmoid'),
    ``lr_min_ratio``, ``lr_max_ratio``, ``batchnorm``, ``batchnorm_type`` ('name' | 'order'),
    ``layernorm``.
    ``lr_slope=None`` is stored resolved (``lr_max_ratio - lr_min_ratio``).

    Model Balancing options (SPEC section 7):

    - ``tau``, ``s``: TB_Sigmoid parameters; ``s`` a number or a pair ``(s_below, s_above)``.
    - ``granularity``: 'layer' (original), 'block' (one lr per transformer block, block score =
      mean of its layers' scores, every parameter whose name is in the block gets it, others the
      untuned lr) or 'layer_in_block' (block lr as for 'block', then each analysed layer is
      mapped inside its block onto ``[lr_min_ratio, lr_min_ratio + lr_slope]`` times the block
      lr; ``lr_slope`` defaults to ``lr_max_ratio - lr_min_ratio``).
    - ``normalize``: rescale the tuned lrs (per layer, or per block) so their mean is the untuned lr.
    - ``balance``: 'lr', 'weight_decay' (each group's weight decay times the layer's factor,
      lr left untuned) or 'both'.
    - ``start_step``: balancing starts once ``step`` has been called this many times; until
      then every group gets the untuned lr and no ESD is computed.
    - ``linear_map_equal``: 'mid' (tbfast) or 'reference' (numpy's upper end), see module docs.
    - ``xmin_bound``, ``dtype``, ``method``, ``fit_backend`` (`TempBalance` also takes it as
      ``backend``, the documented alias), ``farms`` (FARMS alpha: True or a
      `tbfast.options.FarmsOptions`): passed to `tbfast.layer_metrics`.
    - ``metrics_fn``: optional ``callable(net) -> table`` replacing `tbfast.layer_metrics`
      (anything with ``names``, optional ``status``, and columns by ``table[name]``).
    - ``asynchronous``: compute the ESD in the background. ``step`` snapshots the analysed
      weights, starts their ESD on a worker thread (a side stream on CUDA) and returns without
      waiting; `synchronize` waits for it. The first schedule (from
      ``build_optimizer_param_group`` or the first active ``step``) is computed synchronously.
    - ``async_lag`` (asynchronous mode): the ESD of the weights snapshotted at step k becomes the
      schedule at exactly step k + ``async_lag`` (default 1), waiting for it then if it is not
      finished, so runs are reproducible; up to ``async_lag`` snapshots are in flight. ``None``:
      each ``step`` / ``apply`` uses the newest *finished* ESD and never waits (which one depends
      on thread timing: not reproducible).
    - ``flat_policy``: what to do with a scheduled layer whose fitted tail is flat
      (`tbfast.metrics.flat_tail`, checked when the score is alpha, alphahat or log_alpha_norm):
      'keep' (default: schedule it on its alpha, as the original does; a warning is logged) or
      'untuned' (factor 1.0 for the layer, or for a block whose layers are all flat; the layer is
      left out of the scores that the assignment function and ``normalize`` see).
    - ``process_group``: a torch.distributed group (DDP: e.g. ``torch.distributed.group.WORLD``):
      the layers are split over its ranks and every rank gets the same table and lrs (every rank
      must call ``step``). Default None: each rank computes everything alone and never waits for
      the others, except for sharded weights (FSDP1, FSDP2 ``fully_shard``), which use the
      default group; ``False``: never distributed (docs/DISTRIBUTED.md).

    Balancing schedules beyond TB (LLR / AlphaDecay style; docs/TEMPBALANCE.md):

    - ``refresh_every``: `TempBalance.step` computes a new ESD only when ``step_count`` is a
      multiple of it (and at the first active step); the other calls re-apply the factors.
    - ``ramp_steps``: after a refresh at step count ``r``, the factor written at step count ``c``
      is ``old + (new - old) * min(1, (c - r + 1) / ramp_steps)`` (``old``: the factor in force
      at step count ``r - 1``); 0 or 1 = the new factors at once (the original).
    - ``wd_min_ratio``, ``wd_max_ratio``: the factor range of the weight decay (``balance`` 'weight_decay'
      or 'both'); None = the lr range.
    - ``esd_of``: 'weight' (default), 'grad' (``param.grad``) or an optimizer state tensor of
      the weight ('exp_avg', 'exp_avg_sq', 'momentum_buffer'; read from the optimizer given to
      ``step`` / ``apply``).
    - ``history_size``: how many refresh records `TempBalance.history` keeps.
    - ``lora_cache``: the exact LoRA ESD on PEFT LoRA layers (`tbfast.tempbalance.lora_path`):
      True (default: an owned cache, used where it is faster), False, or a `BaseSpectrumCache`.
    """

    # the original's options (SPEC section 6)
    EVALS_THRESH: float = 0.00001
    bins: int = 100
    conv_norm: float = 0.5
    pl_fitting: str = "median"
    xmin_pos: float = 2
    filter_zeros: bool = False
    remove_first_layer: bool = True
    remove_last_layer: bool = True
    eigs_thresh: int = 50
    esd_metric_for_tb: str = "alpha"
    assign_func: Union[str, Callable[..., Any]] = "tb_linear_map"
    lr_min_ratio: float = 0.5
    lr_max_ratio: float = 1.5
    batchnorm: bool = True
    batchnorm_type: str = "name"
    layernorm: bool = False
    # Model Balancing (SPEC section 7) and tbfast's additions
    tau: float = 10.0
    s: Union[float, Sequence[float]] = 1.0
    granularity: str = "layer"
    lr_slope: Optional[float] = None
    normalize: bool = False
    balance: str = "lr"
    start_step: int = 0
    linear_map_equal: str = "mid"
    block_pattern: str = BLOCK_PATTERN
    flat_policy: str = "keep"
    # how the ESD is computed
    xmin_bound: str = "reference"
    dtype: torch.dtype = torch.float32
    method: str = "auto"
    fit_backend: str = "auto"
    asynchronous: bool = False
    async_lag: Optional[int] = 1
    process_group: Any = None
    metrics_fn: Optional[Callable[[Any], Any]] = None
    # balancing schedules beyond TB (LLR, AlphaDecay)
    refresh_every: int = 1
    ramp_steps: int = 0
    wd_min_ratio: Optional[float] = None
    wd_max_ratio: Optional[float] = None
    esd_of: str = "weight"
    history_size: int = 100
    farms: Any = None  # FARMS ESD (tbfast.options.FarmsOptions, True: defaults), passed to ESDOptions
    lora_cache: Any = True  # not a schedule option: the update path gives the float64 eigenvalues

    def __post_init__(self) -> None:
        if self.pl_fitting not in PL_FITTINGS:
            raise ValueError(f"unknown pl_fitting {self.pl_fitting!r}; expected one of {PL_FITTINGS}")
        if not callable(self.assign_func) and self.assign_func not in ASSIGN_FUNCS:
            raise ValueError(f"unknown assign_func {self.assign_func!r}; expected one of {sorted(ASSIGN_FUNCS)}")
        for label, v in (("lr_min_ratio", self.lr_min_ratio), ("lr_max_ratio", self.lr_max_ratio)):
            if not math.isfinite(float(v)) or float(v) < 0:
                raise ValueError(f"{label} must be a finite number >= 0, got {v}")
        self._check_choices()
        if self.xmin_pos <= 0 or self.conv_norm <= 0 or self.bins < 1:
            raise ValueError(f"xmin_pos and conv_norm must be > 0 and bins >= 1 (got {self.xmin_pos}, "
                             f"{self.conv_norm}, {self.bins})")
        if self.eigs_thresh < 0 or self.start_step < 0:
            raise ValueError(f"eigs_thresh and start_step must be >= 0 (got {self.eigs_thresh}, {self.start_step})")
        if self.linear_map_equal not in ("mid", "reference"):
            raise ValueError(f"linear_map_equal must be 'mid' or 'reference', got {self.linear_map_equal!r}")
        if self.asynchronous and self.metrics_fn is not None:
            raise ValueError("asynchronous=True computes the ESD of a weight snapshot with tbfast's own pipeline; "
                             "it cannot be combined with metrics_fn")
        if self.async_lag is not None and (isinstance(self.async_lag, bool) or int(self.async_lag) != self.async_lag
                                           or self.async_lag < 1):
            raise ValueError(f"async_lag must be an integer >= 1 or None, got {self.async_lag!r}")
        if self.flat_policy not in FLAT_POLICIES:
            raise ValueError(f"flat_policy must be one of {FLAT_POLICIES}, got {self.flat_policy!r}")
        slope = float(self.lr_max_ratio) - float(self.lr_min_ratio) if self.lr_slope is None else self.lr_slope
        if float(self.lr_min_ratio) + float(slope) < 0:
            raise ValueError(f"lr_min_ratio + lr_slope must be >= 0, got {self.lr_min_ratio} + {slope}")
        object.__setattr__(self, "lr_slope", float(slope))
        object.__setattr__(self, "start_step", int(self.start_step))
        object.__setattr__(self, "asynchronous", bool(self.asynchronous))
        if self.assign_func == "tb_sigmoid":  # tau / s checked by the function itself, on dummy scores
            assign_lrs("tb_sigmoid", np.array([1.0, 2.0]), 1.0, tau=self.tau, s=self.s)
        self._check_balancing()
        as_farms(self.farms)  # a bad farms= is refused here (ESDOptions normalises it when the ESD runs)

    def _check_balancing(self) -> None:
        for label in ("refresh_every", "ramp_steps", "history_size"):
            v = getattr(self, label)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (label == "refresh_every"):
                raise ValueError(f"{label} must be an integer >= {int(label == 'refresh_every')}, got {v!r}")
            object.__setattr__(self, label, int(v))
        for label in ("wd_min_ratio", "wd_max_ratio"):
            v = getattr(self, label)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer))
                                  or not math.isfinite(float(v)) or float(v) < 0):
                raise ValueError(f"{label} must be None or a finite number >= 0, got {v!r}")
            if v is not None and self.balance == "lr":
                raise ValueError(f"{label} sets the weight-decay factor range; it needs balance='weight_decay' "
                                 f"or 'both', not 'lr'")
        lo, hi = self.wd_range()
        if (self.wd_min_ratio is not None or self.wd_max_ratio is not None) and lo > hi:
            raise ValueError(f"wd_min_ratio must be <= wd_max_ratio, got {lo} > {hi}")
        from ..lora.cache import BaseSpectrumCache
        if not isinstance(self.lora_cache, (bool, BaseSpectrumCache)):
            raise TypeError(f"lora_cache must be True, False or a tbfast.lora.BaseSpectrumCache, "
                            f"got {type(self.lora_cache).__name__}")
        if self.esd_of not in ESD_SOURCES:
            raise ValueError(f"esd_of must be one of {ESD_SOURCES}, got {self.esd_of!r}")
        if self.esd_of != "weight" and (self.asynchronous or self.metrics_fn is not None):
            raise ValueError(f"esd_of={self.esd_of!r} cannot be combined with "
                             f"{'asynchronous=True' if self.asynchronous else 'metrics_fn'} (weights only)")

    def wd_range(self) -> tuple[float, float]:
        """The weight-decay factor range ``(wd_min_ratio, wd_max_ratio)``; a None end is the lr range's."""
        lo = self.lr_min_ratio if self.wd_min_ratio is None else self.wd_min_ratio
        hi = self.lr_max_ratio if self.wd_max_ratio is None else self.wd_max_ratio
        return float(lo), float(hi)

    def wd_options(self) -> Optional["TempBalanceOptions"]:
        """Options whose lr range is the weight-decay range (``lr_slope`` = its width), or None
        when the weight-decay factors are the lr factors (no separate range, or ``balance='lr'``)."""
        if self.balance == "lr" or (self.wd_min_ratio is None and self.wd_max_ratio is None):
            return None
        lo, hi = self.wd_range()
        return self.replace(lr_min_ratio=lo, lr_max_ratio=hi, lr_slope=hi - lo, wd_min_ratio=None, wd_max_ratio=None)

    def _check_choices(self) -> None:
        if self.batchnorm_type not in ("name", "order"):
            raise ValueError(f"batchnorm_type must be 'name' or 'order', got {self.batchnorm_type!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.balance not in BALANCE:
            raise ValueError(f"balance must be one of {BALANCE}, got {self.balance!r}")
        if self.metrics_fn is None and self.esd_metric_for_tb not in SCORE_METRICS:
            raise ValueError(f"unknown esd_metric_for_tb {self.esd_metric_for_tb!r}; expected one of {SCORE_METRICS}")

    def replace(self, **changes: Any) -> "TempBalanceOptions":
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    def esd_options(self) -> ESDOptions:
        """How the ESD is computed (`tbfast.options.ESDOptions`)."""
        return ESDOptions(method=self.method, dtype=self.dtype, farms=self.farms)

    def fit_options(self) -> FitOptions:
        """The power-law fit (`tbfast.options.FitOptions`; validated when the ESD runs)."""
        return FitOptions(fit=self.pl_fitting, xmin_pos=self.xmin_pos, filter_zeros=self.filter_zeros,
                          evals_thresh=self.EVALS_THRESH, bins=self.bins, xmin_bound=self.xmin_bound,
                          fit_backend=self.fit_backend)


#: names of the option fields, in declaration order
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(TempBalanceOptions))


class Option:
    """A `TempBalance` attribute backed by ``self.options`` (a `TempBalanceOptions`): reading it reads
    the option, setting it builds a new options object, validated again. ``Option("fit_backend")``
    under another name is an alias."""

    def __init__(self, field: Optional[str] = None) -> None:
        self.field = field

    def __set_name__(self, owner: type, name: str) -> None:
        if self.field is None:
            self.field = name
        if self.field not in OPTION_NAMES:
            raise TypeError(f"{owner.__name__}.{name}: {self.field!r} is not a TempBalanceOptions field")
        self.__doc__ = f"The ``{self.field}`` option (`TempBalanceOptions`; setting it validates it)."

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.options, self.field)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.options = obj.options.replace(**{self.field: value})
