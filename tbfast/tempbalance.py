"""TempBalance: layer-wise (or block-wise) learning rates from each layer's ESD.

`TempBalance` is a drop-in for the original ``Tempbalance`` scheduler (Zhou et al., NeurIPS
2023; SPEC section 6): same constructor arguments and defaults, same
``build_optimizer_param_group`` and ``step`` methods, same param groups and learning rates. It
adds the Model Balancing options (SPEC section 7): TB_Sigmoid, per-block scheduling, lr
normalisation, weight-decay balancing, a delayed start, and a ``metrics`` table.

Where tbfast deliberately differs from the original:

- ``step`` matches optimizer param groups to layers by parameter identity, not by position.
  For the optimizer built from ``build_optimizer_param_group`` the result is the same; for any
  other layout it is still right, and a group that mixes parameters scheduled differently is an
  error instead of a silent mis-assignment.
- ``tb_linear_map`` with all scores equal (or one tuned layer) gives every layer the middle of
  ``[lr_min_ratio, lr_max_ratio] * lr`` instead of numpy's upper end
  (``linear_map_equal='reference'`` restores the upper end).
- A tuned layer whose ESD could not be fitted (metric status not "ok", or a non-finite score)
  raises a ValueError naming it instead of producing a NaN learning rate.
- Param groups hold lists of parameters (the original passes one-shot generators).
- A layer whose fitted ESD tail is flat (`tbfast.metrics.flat_tail`, e.g. an orthogonally
  initialised layer with alpha ~1e6) gets a logged warning naming it at every ESD; its alpha is
  used as is (the original's numbers) unless ``flat_policy='untuned'``.
"""
from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import _untuned_lr as _lr
from .schedule import (
    ASSIGN_FUNCS,
    BLOCK_PATTERN,
    assign_lrs,
    block_means,
    block_of,
    normalize_mean,
    within_block_lrs,
)

__all__ = ["TempBalance", "Tempbalance", "PL_FITTINGS", "SCORE_METRICS"]

logger = logging.getLogger(__name__)

PL_FITTINGS = ("median", "goodness-of-fit", "ks", "fix-finger")
#: ESDMetrics columns a schedule can balance on.
SCORE_METRICS = (
    "alpha", "alphahat", "spectral_norm", "log_spectral_norm", "norm", "log_norm", "stable_rank",
    "norm_stable_rank", "eig_ratio", "log_alpha_norm", "entropy", "D", "xmin", "xmax",
)
GRANULARITIES = ("layer", "block", "layer_in_block")
BALANCE = ("lr", "weight_decay", "both")
FLAT_POLICIES = ("keep", "untuned")
_ALPHA_SCORES = ("alpha", "alphahat", "log_alpha_norm")  # scores that a flat tail makes meaningless
_UNTUNED = None  # key of parameters at the untuned learning rate
_ASYNC_ON_GROUP = ("TempBalance: asynchronous=True is not supported on a process group yet; pass "
                   "process_group=False (every rank computes the whole ESD) or use the synchronous mode "
                   "(the layers are split over the ranks)")

# keys tbfast keeps inside optimizer param groups (so they travel with optimizer.state_dict());
# the lr bookkeeping keys are documented in tbfast._untuned_lr
_WD0 = "tb_initial_weight_decay"


def _groups_of(optimizer: Any) -> list[dict]:
    """``param_groups`` of an optimizer or of a wrapper exposing an inner optimizer's groups."""
    for obj in (optimizer, getattr(optimizer, "optimizer", None), getattr(optimizer, "base_optimizer", None)):
        groups = getattr(obj, "param_groups", None) if obj is not None else None
        if groups is not None:
            return groups
    raise TypeError(
        f"{type(optimizer).__name__} has no param_groups (nor an inner .optimizer / .base_optimizer with them)"
    )


class TempBalance:
    """Drop-in TempBalance scheduler (original arguments first, Model Balancing options keyword-only).

    Original arguments (SPEC section 6), same defaults: ``EVALS_THRESH``, ``bins``, ``conv_norm``,
    ``pl_fitting`` ('median' | 'goodness-of-fit' | 'fix-finger'), ``xmin_pos``, ``filter_zeros``,
    ``remove_first_layer``, ``remove_last_layer``, ``eigs_thresh``, ``esd_metric_for_tb``,
    ``assign_func`` ('tb_linear_map' | 'tb_sqrt' | 'tb_log2' | 'tb_step', plus 'tb_sigmoid'),
    ``lr_min_ratio``, ``lr_max_ratio``, ``batchnorm``, ``batchnorm_type`` ('name' | 'order'),
    ``layernorm``.

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
    - ``xmin_bound``, ``dtype``, ``method``, ``backend``: passed to `tbfast.layer_metrics`.
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

    After each ESD, ``metrics`` holds the per-layer table of all analysed layers and
    ``layer_lrs`` / ``ratios`` the learning rates that were assigned.
    """

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
        backend: str = "auto",
        metrics_fn: Optional[Callable[[nn.Module], Any]] = None,
        asynchronous: bool = False,
        flat_policy: str = "keep",
        process_group: Any = None,
    ) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"TempBalance expects an nn.Module, got {type(net).__name__}")
        if pl_fitting not in PL_FITTINGS:
            raise ValueError(f"unknown pl_fitting {pl_fitting!r}; expected one of {PL_FITTINGS}")
        if not callable(assign_func) and assign_func not in ASSIGN_FUNCS:
            raise ValueError(f"unknown assign_func {assign_func!r}; expected one of {sorted(ASSIGN_FUNCS)}")
        for label, v in (("lr_min_ratio", lr_min_ratio), ("lr_max_ratio", lr_max_ratio)):
            if not math.isfinite(float(v)) or float(v) < 0:
                raise ValueError(f"{label} must be a finite number >= 0, got {v}")
        if batchnorm_type not in ("name", "order"):
            raise ValueError(f"batchnorm_type must be 'name' or 'order', got {batchnorm_type!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if balance not in BALANCE:
            raise ValueError(f"balance must be one of {BALANCE}, got {balance!r}")
        if metrics_fn is None and esd_metric_for_tb not in SCORE_METRICS:
            raise ValueError(f"unknown esd_metric_for_tb {esd_metric_for_tb!r}; expected one of {SCORE_METRICS}")
        if xmin_pos <= 0 or conv_norm <= 0 or bins < 1:
            raise ValueError(f"xmin_pos and conv_norm must be > 0 and bins >= 1 (got {xmin_pos}, {conv_norm}, {bins})")
        if eigs_thresh < 0 or start_step < 0:
            raise ValueError(f"eigs_thresh and start_step must be >= 0 (got {eigs_thresh}, {start_step})")
        if linear_map_equal not in ("mid", "reference"):
            raise ValueError(f"linear_map_equal must be 'mid' or 'reference', got {linear_map_equal!r}")
        if asynchronous and metrics_fn is not None:
            raise ValueError("asynchronous=True computes the ESD of a weight snapshot with tbfast's own pipeline; "
                             "it cannot be combined with metrics_fn")
        if flat_policy not in FLAT_POLICIES:
            raise ValueError(f"flat_policy must be one of {FLAT_POLICIES}, got {flat_policy!r}")
        if lr_slope is None:
            lr_slope = float(lr_max_ratio) - float(lr_min_ratio)
        if float(lr_min_ratio) + float(lr_slope) < 0:
            raise ValueError(f"lr_min_ratio + lr_slope must be >= 0, got {lr_min_ratio} + {lr_slope}")
        # validate tau / s early with a dummy call
        if assign_func == "tb_sigmoid":
            assign_lrs("tb_sigmoid", np.array([1.0, 2.0]), 1.0, tau=tau, s=s)

        self.net = net
        self.EVALS_THRESH = EVALS_THRESH
        self.bins = bins
        self.conv_norm = conv_norm
        self.pl_fitting = pl_fitting
        self.xmin_pos = xmin_pos
        self.filter_zeros = filter_zeros
        self.remove_first_layer = remove_first_layer
        self.remove_last_layer = remove_last_layer
        self.eigs_thresh = eigs_thresh
        self.esd_metric_for_tb = esd_metric_for_tb
        self.assign_func = assign_func
        self.lr_min_ratio = lr_min_ratio
        self.lr_max_ratio = lr_max_ratio
        self.batchnorm = batchnorm
        self.batchnorm_type = batchnorm_type
        self.layernorm = layernorm
        self.tau = tau
        self.s = s
        self.granularity = granularity
        self.lr_slope = float(lr_slope)
        self.normalize = normalize
        self.balance = balance
        self.start_step = int(start_step)
        self.linear_map_equal = linear_map_equal
        self.block_pattern = block_pattern
        self.xmin_bound = xmin_bound
        self.dtype = dtype
        self.method = method
        self.backend = backend
        self.metrics_fn = metrics_fn
        self.asynchronous = bool(asynchronous)
        #: optimizer step whose weights produced the current schedule (None before the first ESD)
        self.schedule_step: Optional[int] = None
        self._background: Any = None  # BackgroundESD, created on the first asynchronous request
        self._side_streams: dict = {}
        self._restored: Optional[tuple[int, Any]] = None  # finished ESD restored from a state_dict
        self.flat_policy = flat_policy
        self.process_group = process_group

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
        return self.step_count >= self.start_step

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
        return OrderedDict(zip(self.metrics.names, (float(v) for v in self._column(self.metrics, column))))

    def compute_metrics(self, layers: Optional[list] = None) -> Any:
        """ESD table of every analysed layer (nn.Conv2d and nn.Linear, module order). The model is not changed.

        ``layers``: `tbfast.layers.Layer` records to use instead of the live model (a snapshot).
        """
        if self.metrics_fn is not None:
            return self.metrics_fn(self.net)
        from .pipeline import layer_metrics

        fit = "goodness-of-fit" if self.pl_fitting == "ks" else self.pl_fitting
        from .distributed import active_group, layer_metrics as distributed_layer_metrics

        group = active_group(self.process_group)
        if group is not None:
            if layers is not None:
                raise ValueError(_ASYNC_ON_GROUP)
            # each rank analyses its share of the layers (docs/DISTRIBUTED.md)
            layer_metrics = functools.partial(distributed_layer_metrics, group=group,
                                              types=("Linear", "Conv2d"), conv_norm=self.conv_norm)
            source: Any = self.net
        else:
            source = self.analysed_layers() if layers is None else layers
        with torch.no_grad():
            return layer_metrics(
                source, fit=fit, xmin_pos=self.xmin_pos, filter_zeros=self.filter_zeros,
                evals_thresh=self.EVALS_THRESH, bins=self.bins, xmin_bound=self.xmin_bound,
                method=self.method, dtype=self.dtype, backend=self.backend,
            )

    def analysed_layers(self) -> list:
        """The `Layer` records TempBalance analyses: nn.Linear and nn.Conv2d, module order."""
        from .layers import find_layers

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
        from .background import BackgroundESD, snapshot_layers
        from .distributed import active_group

        if active_group(self.process_group) is not None:
            raise ValueError(_ASYNC_ON_GROUP)
        if self._background is None:
            self._background = BackgroundESD(lambda layers: self.compute_metrics(layers))
        self._background.submit(snapshot_layers(self.analysed_layers(), self.step_count, self._side_streams))

    def synchronize(self) -> None:
        """Wait for the background ESD (if any) and make the newest finished one the schedule."""
        if self._background is not None:
            self._background.wait()
        self._promote()

    def close(self) -> None:
        """Stop the background worker (a running ESD finishes; its result is dropped)."""
        if self._background is not None:
            self._background.close()
            self._background = None

    def _promote(self) -> bool:
        """Make the newest finished background ESD the schedule; True if there was one."""
        done = self._restored
        self._restored = None
        if self._background is not None:
            newer = self._background.take()
            if newer is not None:
                done = newer
        if done is None:
            return False
        step, table = done
        self.update(table)
        self.schedule_step = step
        logger.debug("TempBalance: background ESD of step %d in use at step %d", step, self.step_count)
        return True

    @staticmethod
    def _column(table: Any, key: str) -> np.ndarray:
        try:
            col = table[key]
        except (KeyError, IndexError, TypeError) as exc:
            raise KeyError(f"ESD table has no column {key!r}") from exc
        if isinstance(col, torch.Tensor):
            return col.detach().to("cpu", torch.float64).numpy()
        return np.asarray(col, dtype=np.float64)

    def _selected(self, table: Any) -> list[int]:
        """Rows entering the schedule: first/last removal, then ``num_evals >= eigs_thresh``."""
        idx = list(range(len(table.names)))
        if self.remove_first_layer:
            idx = idx[1:]
        if self.remove_last_layer:
            idx = idx[:-1]
        num_evals = self._column(table, "num_evals")
        return [i for i in idx if num_evals[i] >= self.eigs_thresh]

    def update(self, table: Any = None) -> "OrderedDict[str, float]":
        """Recompute the ESD (or use ``table``) and the lr ratio of every schedule key.

        Keys are layer names ('layer'), ``"block.<b>"`` ('block'), or both ('layer_in_block').
        Returns ``ratios``; the lr of a key is ``untuned_lr * ratio``.
        """
        table = self.compute_metrics() if table is None else table
        names = list(table.names)
        modules = dict(self.net.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"ESD table names layers that are not modules of the model: {missing[:5]}")
        rows = self._selected(table)
        if not rows:
            raise ValueError(
                "TempBalance: no layer left to schedule after remove_first_layer/remove_last_layer and "
                f"eigs_thresh={self.eigs_thresh} ({len(names)} analysed layers)"
            )
        status = list(getattr(table, "status", ["ok"] * len(names)))
        all_scores = self._column(table, self.esd_metric_for_tb)
        for i in rows:
            if status[i] != "ok":
                raise ValueError(f"TempBalance: layer {names[i]!r} has no usable ESD fit ({status[i]})")
            if not math.isfinite(all_scores[i]):
                raise ValueError(f"TempBalance: layer {names[i]!r} has a non-finite {self.esd_metric_for_tb} ({all_scores[i]})")
        flat = self._flat(table, rows)
        fit_rows = [i for i in rows if not (flat[i] and self.flat_policy == "untuned")]
        sel_names = [names[i] for i in fit_rows]
        sel_scores = all_scores[fit_rows]
        opts = dict(lr_min_ratio=self.lr_min_ratio, lr_max_ratio=self.lr_max_ratio, tau=self.tau, s=self.s,
                    equal_scores=self.linear_map_equal)

        ratios: "OrderedDict[str, float]" = OrderedDict()
        scores: "OrderedDict[str, float]" = OrderedDict()
        layer_ratio: "OrderedDict[str, float]" = OrderedDict()
        if not sel_names:
            pass  # every scheduled layer is flat and flat_policy='untuned': all at factor 1.0 (below)
        elif self.granularity == "layer":
            r = np.asarray(assign_lrs(self.assign_func, sel_scores, 1.0, names=sel_names, **opts), dtype=np.float64)
            if self.normalize:
                r = normalize_mean(r, 1.0)
            for n, v, sc in zip(sel_names, r, sel_scores):
                ratios[n] = layer_ratio[n] = float(v)
                scores[n] = float(sc)
        else:
            blocks = [block_of(n, self.block_pattern) for n in sel_names]
            order, means = block_means(sel_scores, blocks)
            if not order:
                raise ValueError(
                    f"TempBalance: granularity={self.granularity!r} but no scheduled layer name matches the "
                    f"block pattern {self.block_pattern!r} (e.g. {sel_names[0]!r})"
                )
            keys = [f"block.{b}" for b in order]
            r = np.asarray(assign_lrs(self.assign_func, means, 1.0, names=keys, **opts), dtype=np.float64)
            if self.normalize:
                r = normalize_mean(r, 1.0)
            block_r = {b: float(v) for b, v in zip(order, r)}
            for k, b, m in zip(keys, order, means):
                ratios[k] = block_r[b]
                scores[k] = float(m)
            in_block = [j for j, b in enumerate(blocks) if b is not None]
            if self.granularity == "block":
                for j in in_block:
                    layer_ratio[sel_names[j]] = block_r[blocks[j]]
            else:
                sub_names = [sel_names[j] for j in in_block]
                sub = within_block_lrs(sel_scores[in_block], [blocks[j] for j in in_block], block_r,
                                       self.lr_min_ratio, self.lr_slope)
                for n, v, j in zip(sub_names, sub, in_block):
                    ratios[n] = layer_ratio[n] = float(v)
                    scores[n] = float(sel_scores[j])
        if len(fit_rows) < len(rows):
            ratios, scores, layer_ratio = self._flat_untuned(names, all_scores, rows, ratios, scores, layer_ratio)
        bad = [k for k, v in ratios.items() if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ValueError(f"TempBalance: invalid learning-rate factor for {bad[:5]}: {[ratios[k] for k in bad[:5]]}")

        self.metrics = table
        self.tuned_layers = [names[i] for i in rows]
        self.flat_layers = [names[i] for i in rows if flat[i]]
        self.scores = scores
        self.ratios = ratios
        self._layer_ratio = layer_ratio
        logger.debug("TempBalance: %d schedule keys, factors in [%.4g, %.4g]", len(ratios),
                     min(ratios.values()), max(ratios.values()))
        return ratios

    def _flat(self, table: Any, rows: list[int]) -> dict[int, bool]:
        """Row -> whether its fitted tail is flat (only for alpha-based scores); logs one warning per ESD."""
        from .metrics import FLAT_TAIL_SPREAD, flat_tail

        names = list(table.names)
        if self.esd_metric_for_tb not in _ALPHA_SCORES:
            return {i: False for i in rows}
        try:
            alpha = self._column(table, "alpha")
        except KeyError:  # a metrics_fn table without alpha
            return {i: False for i in rows}
        is_flat = flat_tail(alpha[rows]).tolist()
        flat = dict(zip(rows, is_flat))
        hit = [f"{names[i]} (alpha={alpha[i]:.4g})" for i in rows if flat[i]]
        if hit:
            logger.warning(
                "TempBalance: flat ESD tail (alpha >= %g: the tail eigenvalues lie within %g%% of xmin on "
                "average, so alpha is not a power-law exponent) in %s; %s", 1 + 1 / FLAT_TAIL_SPREAD,
                100 * FLAT_TAIL_SPREAD, ", ".join(hit),
                "left at the untuned lr (flat_policy='untuned')" if self.flat_policy == "untuned"
                else "scheduled on it as the original does (flat_policy='untuned' leaves it at the untuned lr)")
        return flat

    def _flat_untuned(self, names: list[str], all_scores: np.ndarray, rows: list[int], ratios: "OrderedDict",
                      scores: "OrderedDict", layer_ratio: "OrderedDict") -> tuple["OrderedDict", "OrderedDict", "OrderedDict"]:
        """flat_policy='untuned': the same keys as without flat layers, the left-out ones at factor 1.0."""
        new_r: "OrderedDict[str, float]" = OrderedDict()
        new_s: "OrderedDict[str, float]" = OrderedDict()
        new_l: "OrderedDict[str, float]" = OrderedDict()
        if self.granularity == "layer":
            for i in rows:
                n = names[i]
                new_r[n] = new_l[n] = ratios.get(n, 1.0)
                new_s[n] = scores.get(n, float(all_scores[i]))
            return new_r, new_s, new_l
        in_block: "OrderedDict[Any, list[int]]" = OrderedDict()
        for i in rows:
            b = block_of(names[i], self.block_pattern)
            if b is not None:
                in_block.setdefault(b, []).append(i)
        for b, idx in in_block.items():  # a block whose layers are all flat: factor 1.0
            k = f"block.{b}"
            new_r[k] = ratios.get(k, 1.0)
            new_s[k] = scores.get(k, float(np.mean(all_scores[idx])))
        for b, idx in in_block.items():
            for i in idx:
                n = names[i]
                if self.granularity == "layer_in_block":
                    new_r[n] = new_l[n] = ratios.get(n, 1.0)
                    new_s[n] = scores.get(n, float(all_scores[i]))
                else:  # 'block': every parameter of the block follows the block lr
                    new_l[n] = new_r[f"block.{b}"]
        return new_r, new_s, new_l

    # ------------------------------------------------------------------ parameters -> keys
    def layout(self) -> tuple[list[tuple[str, Any, list[nn.Parameter]]], list[nn.Parameter]]:
        """Tuned groups ``(label, key, params)`` in the original's order, and the untuned params.

        'layer': one group per tuned module in ``named_modules()`` order, plus coupled
        BatchNorm2d (``batchnorm``) and LayerNorm (``layernorm``) modules with their layer's key.
        BN coupling 'name': the layer named like the BN with 'bn' replaced by 'conv'; 'order':
        the nearest nn.Conv2d before the BN in module order. LN coupling: the nearest nn.Linear
        before the LN. 'block' / 'layer_in_block': one group per block (its parameters not owned
        by a separately tuned layer), plus one per tuned layer for 'layer_in_block'.
        """
        if not self.ratios:
            raise RuntimeError("TempBalance: no schedule yet; call update() first")
        seen: set[int] = set()
        groups: list[tuple[str, Any, list[nn.Parameter]]] = []

        def take(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
            out = []
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
            return out

        if self.granularity == "layer":
            last_conv = last_linear = None
            for name, module in self.net.named_modules():
                key = None
                if name in self.ratios:
                    key = name
                elif self.batchnorm and isinstance(module, nn.BatchNorm2d):
                    partner = name.replace("bn", "conv") if self.batchnorm_type == "name" else last_conv
                    if partner in self.ratios:
                        key = partner
                elif self.layernorm and isinstance(module, nn.LayerNorm):
                    if last_linear in self.ratios:
                        key = last_linear
                if isinstance(module, nn.Conv2d):
                    last_conv = name
                if isinstance(module, nn.Linear):
                    last_linear = name
                if key is not None:
                    params = take(module.parameters())
                    if params:
                        groups.append((name, key, params))
        else:
            by_label: "OrderedDict[str, tuple[Any, list]]" = OrderedDict()
            owner: dict[int, str] = {}
            if self.granularity == "layer_in_block":
                modules = dict(self.net.named_modules())
                for name in self.ratios:
                    if not name.startswith("block."):
                        for p in modules[name].parameters():
                            owner.setdefault(id(p), name)
            for pname, p in self.net.named_parameters():
                key = owner.get(id(p))
                if key is None:
                    b = block_of(pname, self.block_pattern)
                    key = f"block.{b}" if b is not None and f"block.{b}" in self.ratios else None
                if key is None or id(p) in seen:
                    continue
                seen.add(id(p))
                by_label.setdefault(key, (key, []))[1].append(p)
            groups = [(label, key, params) for label, (key, params) in by_label.items()]
        untuned = [p for p in self.net.parameters() if id(p) not in seen]
        return groups, untuned

    def param_keys(self) -> dict[int, Any]:
        """``id(param) -> schedule key`` (None for parameters at the untuned lr)."""
        groups, untuned = self.layout()
        keys: dict[int, Any] = {id(p): _UNTUNED for p in untuned}
        for _, key, params in groups:
            for p in params:
                keys[id(p)] = key
        return keys

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
        # lr bookkeeping (tbfast._untuned_lr): an lr scheduler built on this optimizer captures the
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
        keys = self.param_keys()
        names = {id(p): n for n, p in self.net.named_parameters()}
        out = []
        for gi, group in enumerate(_groups_of(optimizer)):
            found = set()
            for p in group["params"]:
                if id(p) not in keys:
                    raise ValueError(
                        f"optimizer param group {gi} holds a parameter of shape {tuple(p.shape)} that is not "
                        "a parameter of the model TempBalance was built with"
                    )
                found.add(keys[id(p)])
            if len(found) > 1:
                ex = {k if k is not None else "untuned": next(names.get(id(p), "?") for p in group["params"]
                                                           if keys[id(p)] == k) for k in found}
                raise ValueError(
                    f"optimizer param group {gi} mixes parameters that TempBalance schedules separately "
                    f"({ex}); build the optimizer from build_optimizer_param_group() or tbfast.integrations"
                )
            out.append(found.pop() if found else _UNTUNED)
        return out

    def apply(self, optimizer: Any, untuned_lr: Optional[float] = None) -> list[float]:
        """Write the latest factors into ``optimizer`` (no new ESD); returns the lrs written.

        With ``untuned_lr`` given, every group's lr is ``untuned_lr x factor`` (the original
        behaviour). With ``untuned_lr=None`` (call it after any lr scheduler's step) every group's
        lr is ``(the lr the scheduler gives an untuned group) x factor``: tbfast remembers the
        untuned lr and the factor it wrote per group and divides that factor out of whatever the
        scheduler wrote (see tbfast._untuned_lr), so factors never compound with the schedule.
        """
        if self.asynchronous:
            self._promote()
        if untuned_lr is not None:
            untuned_lr = _lr.check_lr(untuned_lr, "untuned_lr")
        keys = self.group_keys(optimizer) if self.active else None
        written = []
        if untuned_lr is None:
            _lr.resolve_build(_groups_of(optimizer))
        for gi, group in enumerate(_groups_of(optimizer)):
            base = untuned_lr if untuned_lr is not None else _lr.untuned_lr(group)
            factor = self.ratio(keys[gi]) if keys is not None else 1.0
            lr_factor = factor if self.balance in ("lr", "both") else 1.0
            if self.balance in ("weight_decay", "both"):
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
        pending = None
        if self._background is not None:
            self._background.wait()
            ready = self._background.take()
            if ready is not None:
                self._restored = ready  # still to be promoted here too
        if self._restored is not None:
            pending = {"step": self._restored[0], "table": self._restored[1].to_state()}
        return {
            "schedule_step": self.schedule_step,
            "pending_esd": pending,
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
        pending = state.get("pending_esd")
        if pending is None:
            self._restored = None
        else:
            from .metrics import ESDMetrics

            self._restored = (int(pending["step"]), ESDMetrics.from_state(pending["table"]))

    # ------------------------------------------------------------------ reporting
    def table(self):
        """Per-layer DataFrame of the last schedule: name, block, score, tuned, lr factor."""
        import pandas as pd

        if self.metrics is None:
            raise RuntimeError("TempBalance: no ESD computed yet")
        names = list(self.metrics.names)
        score = self._column(self.metrics, self.esd_metric_for_tb)
        lr_ratio = getattr(self, "_layer_ratio", {})
        return pd.DataFrame({
            "name": names,
            "block": [block_of(n, self.block_pattern) for n in names],
            self.esd_metric_for_tb: score,
            "tuned": [n in lr_ratio for n in names],
            "lr_factor": [lr_ratio.get(n, 1.0) for n in names],
        })

    def __repr__(self) -> str:
        return (f"TempBalance(assign_func={self.assign_func!r}, granularity={self.granularity!r}, "
                f"metric={self.esd_metric_for_tb!r}, pl_fitting={self.pl_fitting!r}, layers={len(self.tuned_layers)})")


#: The original's class name.
Tempbalance = TempBalance
