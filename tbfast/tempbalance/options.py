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
from ..options import ESDOptions, FitOptions, either
from .assign import ASSIGN_FUNCS, assign_lrs

__all__ = ["TempBalanceOptions", "PL_FITTINGS", "SCORE_METRICS", "GRANULARITIES", "BALANCE", "FLAT_POLICIES",
           "ALPHA_SCORES", "pick_fit_backend",
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
      waiting; the newest finished ESD becomes the schedule at the next ``step`` / ``apply``
      (``lag`` steps old), `synchronize` waits for it. The first schedule (from
      ``build_optimizer_param_group`` or the first active ``step``) is computed synchronously.
    - ``flat_policy``: what to do with a scheduled layer whose fitted tail is flat
      (`tbfast.metrics.flat_tail`, checked when the score is alpha, alphahat or log_alpha_norm):
      'keep' (default: schedule it on its alpha, as the original does; a warning is logged) or
      'untuned' (factor 1.0 for the layer, or for a block whose layers are all flat; the layer is
      left out of the scores that the assignment function and ``normalize`` see).
    - ``process_group``: with torch.distributed initialised (DDP, FSDP2 ``fully_shard``), the
      layers are split over the ranks of this group (default: the world group; ``False``: every
      rank computes everything alone); every rank gets the same table and lrs (docs/DISTRIBUTED.md).
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
    process_group: Any = None
    metrics_fn: Optional[Callable[[Any], Any]] = None
    farms: Any = None  # FARMS ESD (tbfast.options.FarmsOptions, True: defaults), passed to ESDOptions

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
