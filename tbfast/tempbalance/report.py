"""The per-layer table of a TempBalance schedule (``TempBalance.table``)."""
from __future__ import annotations

from typing import Any

from ..layers import block_index
from .plan import table_column

__all__ = ["schedule_table"]


def schedule_table(tb: Any) -> Any:
    """Per-layer DataFrame of the last schedule of ``tb``: name, block, score, tuned, lr factor."""
    import pandas as pd

    if tb.metrics is None:
        raise RuntimeError("TempBalance: no ESD computed yet")
    names = list(tb.metrics.names)
    lr_ratio = tb._layer_ratio
    return pd.DataFrame({
        "name": names,
        "block": [block_index(n, tb.block_pattern) for n in names],
        tb.esd_metric_for_tb: table_column(tb.metrics, tb.esd_metric_for_tb),
        "tuned": [n in lr_ratio for n in names],
        "lr_factor": [lr_ratio.get(n, 1.0) for n in names],
    })
