"""The plot of a checkpoint series: alpha of every layer against the training step (PNG)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import STATUS_OK
from ..io.output import FileId, write_output
from ..plot import new_figure

__all__ = ["plot_alpha_series"]

_LEGEND_MAX = 12  # up to this many layers get a legend entry each; more are coloured by depth


def plot_alpha_series(table: Any, path: str | os.PathLike | None = None, *, column: str = "alpha",
                      title: str | None = None, inputs: Iterable[FileId] = ()):
    """``column`` (default alpha) of every layer against ``step`` from an `analyze_series` table:
    one line per layer (a legend up to 12 layers, else coloured from first to last layer with a
    colour bar), the mean over the layers in black, WeightWatcher's 2 <= alpha <= 6 band shaded.
    Rows whose status is not ``ok`` are gaps. Written to ``path`` (PNG) when given, by
    `tbfast.io.write_output`'s rules (atomic; never over one of ``inputs``, the ``(st_dev,
    st_ino)`` of the files the analysis read); returns the matplotlib Figure."""
    from matplotlib import cm, colormaps
    from matplotlib.colors import Normalize

    t = table.copy()
    if "status" in t:
        t.loc[t["status"] != STATUS_OK, column] = np.nan
    names = list(dict.fromkeys(t["name"]))
    piv = t.pivot_table(index="step", columns="name", values=column, aggfunc="first", dropna=False)
    piv = piv.reindex(columns=names).sort_index()
    x = piv.index.to_numpy(dtype=float)
    fig = new_figure(10, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    if column == "alpha":
        ax.axhspan(2, 6, color="tab:green", alpha=0.08, label="2 <= alpha <= 6")
    many = len(names) > _LEGEND_MAX
    cmap, norm = colormaps["viridis"], Normalize(0, max(1, len(names) - 1))
    for j, name in enumerate(names):
        y = piv[name].to_numpy(dtype=float)
        ax.plot(x, y, marker="o", markersize=3, linewidth=1.0, alpha=0.55 if many else 0.9,
                color=cmap(norm(j)) if many else None, label=None if many else name)
    mean = np.nanmean(piv.to_numpy(dtype=float), axis=1) if len(names) else np.full(len(x), np.nan)
    ax.plot(x, mean, color="black", linewidth=2.5, marker="s", markersize=5, label=f"mean {column}")
    ax.set_xlabel("step")
    ax.set_ylabel(column)
    ax.set_title(title or f"{column} per layer over {len(x)} checkpoints ({len(names)} layers)")
    ax.grid(True, alpha=0.3)
    if many:
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=ax, label="layer (model order)")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    fig.tight_layout()
    if path is not None:
        write_output(path, lambda f: fig.savefig(f, format="png"), inputs, what="plot")
    return fig
