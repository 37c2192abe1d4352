"""A bounded record of TempBalance's refreshes: per refresh, its step, per-layer alpha, scores and factors.

Each record is a plain dict::

    {"refresh": n,            # 1 for the first refresh of this scheduler, counting dropped records
     "step": step_count,      # TempBalance.step_count when the schedule became current
     "schedule_step": s,      # the step whose weights (or esd_of tensors) gave it (asynchronous: older)
     "esd_of": "weight", "active": True,   # active False: before start_step (factors not applied)
     "metric": "alpha",
     "alpha": {layer: alpha},           # every analysed layer with a finite alpha
     "tuned": [layer, ...],             # the layers whose scores entered the schedule
     "score": {key: score},             # the scores the assignment function saw
     "lr_factor": {key: factor},        # TempBalance.ratios (target factors, before any ramp);
                                        # not with balance='weight_decay' (the lr is not balanced)
     "wd_factor": {key: factor}}        # only when balance is 'weight_decay' or 'both'

`History` keeps the newest ``history_size`` records (a list; ``count`` = refreshes so far).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from .plan import Plan, table_column

__all__ = ["History", "refresh_record"]


class History(list):
    """The newest refresh records, oldest first; ``count`` is the number of refreshes ever recorded."""

    count: int = 0

    def add(self, record: dict, size: int) -> None:
        """Append ``record`` (its ``refresh`` number set) and keep the newest ``size``."""
        self.count += 1
        record["refresh"] = self.count
        self.append(record)
        if len(self) > size:
            del self[: len(self) - size]

    def since(self, refresh: int) -> list[dict]:
        """Records with a refresh number above ``refresh`` (those still kept)."""
        return [r for r in self if r["refresh"] > refresh]


def refresh_record(step: int, table: Any, tuned: list[str], opts: Any, plan: Plan, wd_factor: Mapping[str, float],
                   active: bool = True) -> dict:
    """The record of a refresh at step count ``step`` from ESD ``table`` and its ``plan`` (module
    docstring; ``tuned``: the scheduled layers); ``schedule_step`` is ``step`` (the asynchronous scheduler corrects it). Before
    ``start_step`` (``active`` False) the ESD is of the weights whatever ``esd_of`` says."""
    try:
        alpha = dict(zip(table.names, (float(a) for a in table_column(table, "alpha"))))
    except KeyError:  # a metrics_fn table without alpha
        alpha = {}
    record = {"step": int(step), "schedule_step": int(step), "esd_of": opts.esd_of if active else "weight",
              "active": bool(active), "metric": opts.esd_metric_for_tb,
              "alpha": {n: a for n, a in alpha.items() if math.isfinite(a)}, "tuned": list(tuned),
              "score": {k: float(v) for k, v in plan.scores.items()}}
    if opts.balance != "weight_decay":
        record["lr_factor"] = {k: float(v) for k, v in plan.ratios.items()}
    if opts.balance != "lr":
        record["wd_factor"] = {k: float(v) for k, v in wd_factor.items()}
    return record
