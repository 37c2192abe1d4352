"""TempBalance checkpoints: what ``state_dict()`` holds and what ``load_state_dict`` accepts.

A state is a dict of plain values (numbers, strings, lists, dicts, None: JSON and
``torch.load(weights_only=True)`` safe). Its ``fingerprint`` records what was analysed: every
analysed layer (nn.Linear / nn.Conv2d) as ``[name, weight shape]`` in module order, and the
options that change the schedule (`SCHEDULE_OPTIONS`; ``async_lag`` too when ``asynchronous``).
Optional entries: ``wd_ratios`` (the weight-decay factors, only when they have their own range,
``wd_min_ratio`` / ``wd_max_ratio``) and ``ramp`` (the ramp in progress, only with
``ramp_steps > 1``; `tbfast.tempbalance.ramp`). `load` checks a state completely before
changing anything:

- not a dict: TypeError; missing entries, wrong types, non-finite or negative factors: ValueError
  naming the entry;
- ``strict=True`` (default): a fingerprint that differs from this scheduler's is a ValueError naming
  the first differing layer (or option); a schedule key that is no layer / block of the model too;
- ``strict=False``: the schedule keys whose layers match (same name and shape; a block key when
  every analysed layer of the block matches) are loaded, the others are dropped with one
  warning and their parameters stay at the untuned lr until the next ESD; differing options
  are a warning; a pending asynchronous ESD is dropped unless everything matched;
- a state without a fingerprint (saved by tbfast before it had one) loads with a warning, its
  keys still checked against the model.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..layers import block_index
from ..options import as_farms

__all__ = ["SCHEDULE_OPTIONS", "fingerprint", "to_state", "load"]

logger = logging.getLogger("tbfast.tempbalance")

#: options whose value changes which layers are scheduled or their factors (kept in the fingerprint)
SCHEDULE_OPTIONS = (
    "EVALS_THRESH", "bins", "conv_norm", "pl_fitting", "xmin_pos", "filter_zeros", "remove_first_layer",
    "remove_last_layer", "eigs_thresh", "esd_metric_for_tb", "assign_func", "lr_min_ratio", "lr_max_ratio",
    "batchnorm", "batchnorm_type", "layernorm", "tau", "s", "granularity", "lr_slope", "normalize", "balance",
    "linear_map_equal", "block_pattern", "flat_policy", "xmin_bound",
    "refresh_every", "ramp_steps", "wd_min_ratio", "wd_max_ratio", "esd_of", "farms",
)
_REQUIRED = ("step_count", "ratios", "scores", "tuned_layers")


def _plain(value: Any) -> Any:
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return value
    return str(value)


def fingerprint(tb: Any) -> dict:
    """``{"layers": [[name, shape], ...], "options": {...}}`` of a TempBalance (no ESD needed)."""
    layers = [[n, list(m.weight.shape)] for n, m in tb.net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    options = {k: _plain(getattr(tb.options, k)) for k in SCHEDULE_OPTIONS if hasattr(tb.options, k)}
    farms = as_farms(tb.options.farms)  # True and FarmsOptions() are the same windows: one value
    options["farms"] = None if farms is None else dataclasses.asdict(farms)
    if tb.options.asynchronous:  # which step's ESD is in use at each step (tbfast.tempbalance.background)
        options["async_lag"] = _plain(tb.options.async_lag)
    return {"layers": layers, "options": options}


def to_state(tb: Any) -> dict:
    """The state of ``tb`` (see `TempBalance.state_dict`)."""
    return {
        "fingerprint": fingerprint(tb),
        "schedule_step": tb.schedule_step,
        "pending_esd": tb._async.to_state(),
        "step_count": tb.step_count,
        "ratios": dict(tb.ratios),
        "scores": dict(tb.scores),
        "tuned_layers": list(tb.tuned_layers),
        "layer_ratio": dict(tb._layer_ratio),
        "granularity": tb.granularity,
        # only with ramp_steps > 1 / a separate weight-decay range (the keys of older states otherwise)
        **({"ramp": tb._ramp.to_state()} if tb.ramp_steps > 1 else {}),
        **({"wd_ratios": dict(tb.wd_ratios)} if tb.wd_ratios is not tb.ratios else {}),
    }


def _numbers(state: Mapping, entry: str, nonneg: bool, label: str = "") -> "OrderedDict[str, float]":
    values, entry = state.get(entry, {}), label or entry
    if not isinstance(values, Mapping):
        raise ValueError(f"TempBalance state: {entry!r} must be a dict, got {type(values).__name__}")
    out: "OrderedDict[str, float]" = OrderedDict()
    for k, v in values.items():
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= 0 or not nonneg)
        if not isinstance(k, str) or not ok:
            what = "finite numbers >= 0" if nonneg else "finite numbers"
            raise ValueError(f"TempBalance state: {entry}[{k!r}] is {v!r}; expected {what}")
        out[k] = float(v)
    return out


def _ramp(state: Mapping) -> dict:
    """The checked ``ramp`` entry (`tbfast.tempbalance.ramp.Ramp.to_state`; empty when absent)."""
    ramp = state.get("ramp")
    if ramp is None:
        return {}
    start = ramp.get("start") if isinstance(ramp, Mapping) else None
    if not isinstance(ramp, Mapping) or not isinstance(ramp.get("old", {}), Mapping) or not (
            start is None or (isinstance(start, int) and not isinstance(start, bool))):
        raise ValueError("TempBalance state: 'ramp' is malformed (expected start and old factors per channel)")
    old = {c: _numbers(ramp["old"], c, True, f"ramp['old'][{c!r}]") for c in ramp.get("old", {})}
    bad = [c for c in old if c not in ("lr", "layer", "wd")]
    if bad:
        raise ValueError(f"TempBalance state: 'ramp' has an unknown channel {bad[0]!r}")
    return {"start": start, "old": old}


def _first_difference(saved: list, now: list) -> str:
    for i in range(max(len(saved), len(now))):
        s = saved[i] if i < len(saved) else None
        m = now[i] if i < len(now) else None
        if s != m:
            if s is None:
                return f"{m[0]!r} {tuple(m[1])} of this model is not in the saved state"
            if m is None:
                return f"saved {s[0]!r} {tuple(s[1])} is not in this model"
            return f"saved {s[0]!r} {tuple(s[1])}, this model {m[0]!r} {tuple(m[1])} (analysed layer {i})"
    return ""


def _check_fingerprint(saved: Any) -> tuple[list, dict]:
    if not isinstance(saved, Mapping) or not isinstance(saved.get("layers"), list) \
            or not isinstance(saved.get("options", {}), Mapping):
        raise ValueError("TempBalance state: 'fingerprint' is malformed (expected layers and options)")
    layers = []
    for item in saved["layers"]:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (list, tuple))):
            raise ValueError(f"TempBalance state: 'fingerprint' layer entry {item!r} is malformed")
        layers.append([item[0], [int(d) for d in item[1]]])
    return layers, dict(saved.get("options", {}))


def load(tb: Any, state: Any, strict: bool = True) -> None:
    """Check ``state`` and restore it into ``tb`` (nothing is changed when a check fails)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"TempBalance.load_state_dict expects the dict from state_dict(), got {type(state).__name__}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"TempBalance state is missing {missing} (truncated, or not from TempBalance.state_dict())")
    step = state["step_count"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"TempBalance state: 'step_count' is {step!r}; expected an integer >= 0")
    sched_step = state.get("schedule_step", step)
    if sched_step is not None and (not isinstance(sched_step, int) or isinstance(sched_step, bool)):
        raise ValueError(f"TempBalance state: 'schedule_step' is {sched_step!r}; expected an integer or None")
    ratios, scores = _numbers(state, "ratios", True), _numbers(state, "scores", False)
    layer_ratio = _numbers(state, "layer_ratio", True)
    wd_ratios = _numbers(state, "wd_ratios", True) if "wd_ratios" in state else None
    ramp = _ramp(state)
    if wd_ratios is not None and set(wd_ratios) != set(ratios):
        raise ValueError(f"TempBalance state is inconsistent (truncated?): 'wd_ratios' and 'ratios' differ in "
                         f"{sorted(set(wd_ratios) ^ set(ratios))[:3]}")
    tuned = state["tuned_layers"]
    if not isinstance(tuned, list) or not all(isinstance(n, str) for n in tuned):
        raise ValueError("TempBalance state: 'tuned_layers' must be a list of layer names")
    # 'layer': one factor per tuned layer; otherwise layer_ratio covers the tuned layers inside blocks
    if (tb.granularity == "layer" and set(ratios) != set(tuned)) or not set(layer_ratio) <= set(tuned):
        gap = sorted(set(tuned) ^ set(ratios) if tb.granularity == "layer" else set(layer_ratio) - set(tuned))
        raise ValueError(f"TempBalance state is inconsistent (truncated?): the factors and 'tuned_layers' differ in "
                         f"{gap[:3]}")
    if state.get("granularity", tb.granularity) != tb.granularity:
        raise ValueError(f"state was saved with granularity={state['granularity']!r}, this scheduler uses "
                         f"{tb.granularity!r}")

    now = fingerprint(tb)
    model = {n: shape for n, shape in now["layers"]}
    if "fingerprint" in state:
        saved_layers, saved_opts = _check_fingerprint(state["fingerprint"])
        diff = _first_difference(saved_layers, now["layers"])
        opt_diff = [f"{k}: saved {saved_opts[k]!r}, now {v!r}" for k, v in now["options"].items()
                    if k in saved_opts and saved_opts[k] != v]
        if strict and diff:
            raise ValueError(f"TempBalance state does not match this model (first differing layer: {diff}); "
                             "load_state_dict(state, strict=False) loads the layers that match")
        if strict and opt_diff:
            raise ValueError(f"TempBalance state was saved with other schedule options ({opt_diff[0]}); "
                             "load_state_dict(state, strict=False) loads it anyway")
        if opt_diff:
            logger.warning("TempBalance: loading a state saved with other schedule options: %s", "; ".join(opt_diff))
        matching = {n for n, shape in saved_layers if model.get(n) == shape}
    else:
        logger.warning("TempBalance: the state has no fingerprint (saved by an older tbfast); loading it "
                       "without checking that it was saved for this model and these options")
        matching, diff = set(model), ""

    def key_ok(key: str) -> bool:
        if key.startswith("block.") and key[6:].lstrip("-").isdigit():
            in_block = [n for n in model if block_index(n, tb.block_pattern) == int(key[6:])]
            return bool(in_block) and all(n in matching for n in in_block)
        return key in matching

    bad = [k for k in list(ratios) + list(layer_ratio) + tuned if not key_ok(k)]
    if bad and strict:
        raise ValueError(f"TempBalance state does not match this model: schedule key {bad[0]!r} is no analysed "
                         "layer (or block) of it; load_state_dict(state, strict=False) loads the keys that match")
    if bad:
        logger.warning("TempBalance: load_state_dict(strict=False) left out %d schedule keys that do not match this "
                       "model (%s); their parameters stay at the untuned lr until the next ESD",
                       len(set(bad)), ", ".join(sorted(set(bad))[:5]))
    pending = state.get("pending_esd")
    if pending is not None and (bad or diff):
        logger.warning("TempBalance: load_state_dict(strict=False) dropped the pending asynchronous ESD "
                       "(it was computed on other layers)")
        pending = None

    try:  # the last check; it changes nothing when it fails
        tb._async.load_state(pending)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"TempBalance state: 'pending_esd' is malformed ({exc})") from None

    tb.step_count = step
    tb.ratios = OrderedDict((k, v) for k, v in ratios.items() if key_ok(k))
    tb.scores = OrderedDict((k, v) for k, v in scores.items() if key_ok(k) or not bad)
    tb.tuned_layers = [n for n in tuned if key_ok(n)]
    tb._layer_ratio = OrderedDict((k, v) for k, v in layer_ratio.items() if key_ok(k))
    tb.wd_ratios = tb.ratios if wd_ratios is None else OrderedDict((k, v) for k, v in wd_ratios.items() if key_ok(k))
    tb._ramp.load_state({"start": ramp.get("start"),
                         "old": {c: {k: v for k, v in f.items() if key_ok(k)} for c, f in ramp.get("old", {}).items()}})
    tb.schedule_step = sched_step
