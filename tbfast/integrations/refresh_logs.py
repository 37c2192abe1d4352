"""TempBalance refresh records (`TempBalance.history`) as flat trainer-logger metrics.

Keys: ``tempbalance/alpha/<layer>`` (every analysed layer with a finite alpha),
``tempbalance/alpha_mean`` / ``alpha_std`` (over the scheduled layers), ``tempbalance/lr_factor/<key>``,
``tempbalance/wd_factor/<key>`` (balance 'weight_decay' / 'both') and ``tempbalance/esd_step``
(the step whose weights gave the schedule; older than the logging step with ``asynchronous=True``).
Used by the Hugging Face and Lightning callbacks.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["refresh_logs", "unlogged"]


def refresh_logs(record: dict) -> dict[str, float]:
    """The metrics of one refresh record (`tbfast.tempbalance.history`)."""
    logs = {f"tempbalance/alpha/{n}": float(a) for n, a in record["alpha"].items()}
    tuned = [record["alpha"][n] for n in record.get("tuned", ()) if n in record["alpha"]]
    if tuned:
        logs["tempbalance/alpha_mean"] = float(np.mean(tuned))
        logs["tempbalance/alpha_std"] = float(np.std(tuned))
    for channel in ("lr_factor", "wd_factor"):
        for k, f in record.get(channel, {}).items():
            logs[f"tempbalance/{channel}/{k}"] = float(f)
    if record.get("schedule_step") is not None:
        logs["tempbalance/esd_step"] = float(record["schedule_step"])
    return logs


def unlogged(tb: Any, seen: int) -> tuple[list[dict], int]:
    """The active refresh records of ``tb`` numbered above ``seen``, and the new ``seen``."""
    records = [r for r in tb.history.since(seen) if r.get("active", True)]
    return records, tb.history.count
