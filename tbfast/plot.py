"""Plots of an analysis (matplotlib, the optional ``plot`` extra), written as PNG files.

- `plot_esd`: one layer's ESD on log-log axes: the eigenvalue density (log-spaced bins) with the
  fitted power law ``p(x) = (alpha - 1) / xmin * (x / xmin) ** -alpha`` over the tail and ``xmin``
  marked; beside it the tail's empirical complementary CDF against the fitted
  ``(x / xmin) ** (1 - alpha)``.
- `plot_alpha_overview`: alpha of every layer in model order (the paper's Figure 1, bottom left),
  with WeightWatcher's 2 <= alpha <= 6 band.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, so the pyplot state and
the user's backend are left alone.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._progress import progress_bar
from .errors import STATUS_OK
from .io.output import FileId, check_output, output_dir, write_output

__all__ = ["plot_esd", "plot_alpha_overview", "plot_analysis", "plot_paths", "esd_filename"]

logger = logging.getLogger(__name__)

_TYPE_COLORS = {"Linear": "tab:blue", "Embedding": "tab:green", "Conv2d": "tab:orange",
                "Conv1d": "tab:purple", "LoRA": "tab:red", "matrix": "tab:gray"}


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global state); one-line ImportError without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("tbfast plots need matplotlib: pip install 'tbfast[plot]'") from exc
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def esd_filename(index: int, name: str) -> str:
    """File name of layer ``index``'s ESD plot: ``esd_007_encoder.layer.0.attention.self.query.png``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "layer"
    return f"esd_{index:03d}_{safe[:120]}.png"


class _ESDFigure:
    """One ESD figure whose artists are updated for each layer.

    Building a matplotlib figure (axes, log-scale tick objects, text layout) costs far more than
    drawing it, so `plot_analysis` draws every layer into one `_ESDFigure`; margins are fixed
    instead of ``tight_layout`` (which draws the whole figure once more to measure it).
    """

    def __init__(self) -> None:
        fig = new_figure(11, 4.2)
        ax, ax2 = fig.subplots(1, 2)
        fig.subplots_adjust(left=0.08, right=0.985, bottom=0.13, top=0.92, wspace=0.28)
        for a in (ax, ax2):
            a.set_xscale("log")
            a.set_yscale("log")
        ax.set_xlabel("eigenvalue $\\lambda$ of $W^T W$")
        ax.set_ylabel("density")
        ax2.set_xlabel("eigenvalue $\\lambda$")
        ax2.set_ylabel("$P(\\Lambda \\geq \\lambda)$")
        self.fig, self.ax, self.ax2 = fig, ax, ax2
        self.hist = ax.stairs([1.0], [1.0, 2.0], fill=True, color="tab:blue", alpha=0.55)
        (self.pdf,) = ax.plot([], [], "r--", lw=2)
        self.xmin_line = ax.axvline(1.0, color="k", ls=":", lw=1.5)
        (self.tail,) = ax2.plot([], [], "o", ms=3, color="tab:blue")
        (self.tail_fit,) = ax2.plot([], [], "r--", lw=2)
        self.xmin_line2 = ax2.axvline(1.0, color="k", ls=":", lw=1.5)
        self.no_fit = ax2.text(0.5, 0.5, "", ha="center", va="center", transform=ax2.transAxes, wrap=True)

    def draw(self, e: np.ndarray, *, alpha: float, xmin: float, name: str, D: float | None, status: str,
             bins: int):
        """Show the sorted eigenvalues ``e`` (float64) and their fit; returns the Figure."""
        ax, ax2 = self.ax, self.ax2
        pos = e[e > 0]
        if pos.size == 0:
            raise ValueError(f"layer {name!r}: no positive eigenvalue to plot")
        fitted = status == STATUS_OK and math.isfinite(alpha) and math.isfinite(xmin) and xmin > 0 and alpha > 1

        lo, hi = pos[0], pos[-1]
        if hi <= lo:
            hi = lo * 1.01
        edges = np.logspace(math.log10(lo), math.log10(hi), bins + 1)
        counts, _ = np.histogram(pos, bins=edges)
        density = counts / (e.size * np.diff(edges))
        self.hist.set_data(density, edges)
        self.hist.set_label(f"ESD ({e.size} eigenvalues)")
        title = f"{name}" if name else "ESD"
        for artist in (self.pdf, self.xmin_line, self.tail, self.tail_fit, self.xmin_line2):
            artist.set_visible(fitted)
        if fitted:
            ax2.set_axis_on()
        else:
            ax2.set_axis_off()
        self.no_fit.set_visible(not fitted)
        if fitted:
            tail = e[e >= xmin]
            frac = tail.size / e.size
            x = np.logspace(math.log10(xmin), math.log10(hi), 200)
            pdf = frac * (alpha - 1.0) / xmin * (x / xmin) ** (-alpha)
            self.pdf.set_data(x, pdf)
            self.pdf.set_label(f"power law, $\\alpha$ = {alpha:.3f}")
            self.xmin_line.set_xdata([xmin, xmin])
            self.xmin_line.set_label(f"$x_{{min}}$ = {xmin:.4g}")
            ccdf = 1.0 - np.arange(tail.size) / tail.size  # P(X >= x) over the tail
            self.tail.set_data(tail, ccdf)
            self.tail.set_label("tail, empirical")
            self.tail_fit.set_data(x, (x / xmin) ** (1.0 - alpha))
            self.tail_fit.set_label("fitted $(x/x_{min})^{1-\\alpha}$")
            self.xmin_line2.set_xdata([xmin, xmin])
            ax2.set_title(f"tail: {tail.size} eigenvalues >= $x_{{min}}$" + (f", KS D = {D:.4f}" if D is not None else ""),
                          fontsize=10, y=1.0)  # a fixed y: no overlap search on every draw
            ax2.relim()
            ax2.autoscale(enable=True)
            ax2.set_ylim(bottom=min(ccdf[-1], float(((hi / xmin) ** (1.0 - alpha)))) * 0.5, top=1.5)
            ax2.legend(fontsize=8, loc="lower left")
            title += f"   $\\alpha$ = {alpha:.3f}"
        else:
            for artist in (self.pdf, self.xmin_line, self.tail, self.tail_fit):
                artist.set_label("_hidden")  # not in legends, not taken for a fit
            self.pdf.set_data([], [])
            self.no_fit.set_text(f"no power-law fit:\n{status}")
            ax2.set_title("", y=1.0)
            if ax2.get_legend() is not None:
                ax2.get_legend().remove()
        ax.relim(visible_only=True)
        ax.autoscale(enable=True)
        if fitted:
            ax.set_ylim(bottom=max(density[density > 0].min() * 0.3, 1e-300))
        ax.legend(fontsize=8, loc="lower left")
        ax.set_title(title, fontsize=10, y=1.0)
        return self.fig


def plot_esd(
    eigenvalues: torch.Tensor | np.ndarray | Sequence[float],
    *,
    alpha: float,
    xmin: float,
    name: str = "",
    D: float | None = None,
    status: str = STATUS_OK,
    path: str | os.PathLike | None = None,
    bins: int = 100,
):
    """Figure of one layer's ESD with its power-law fit; saved as PNG when ``path`` is given.

    Returns the matplotlib Figure.
    """
    return _plot_esd(_ESDFigure(), eigenvalues, alpha=alpha, xmin=xmin, name=name, D=D, status=status,
                     path=path, bins=bins)


def _plot_esd(canvas: _ESDFigure, eigenvalues, *, alpha: float, xmin: float, name: str, D: float | None,
              status: str, path: str | os.PathLike | None, bins: int, inputs: Iterable[FileId] = ()):
    e = np.sort(np.asarray(eigenvalues.detach().cpu() if isinstance(eigenvalues, torch.Tensor) else eigenvalues,
                           dtype=np.float64).ravel())
    fig = canvas.draw(e, alpha=alpha, xmin=xmin, name=name, D=D, status=status, bins=bins)
    if path is not None:
        _save(fig, path, inputs)
    return fig


def _save(fig, path: str | os.PathLike, inputs: Iterable[FileId] = ()) -> None:
    """Save ``fig`` as PNG by `tbfast.io.write_output`'s rules: complete or not at all, never
    over one of ``inputs`` (the files the analysis read)."""
    write_output(path, lambda f: fig.savefig(f, format="png", pil_kwargs={"compress_level": 1}), inputs,
                 what="plot")


def plot_alpha_overview(details: Any, path: str | os.PathLike | None = None, *, title: str | None = None):
    """Bar chart of alpha per layer, in model order (the paper's Figure 1 style).

    ``details`` is the DataFrame from `tbfast.analyze`; rows whose status is not ``"ok"`` are
    drawn as gaps. Returns the matplotlib Figure (saved as PNG when ``path`` is given).
    """
    n = len(details)
    if n == 0:
        raise ValueError("no layers to plot")
    fig = new_figure(max(8.0, min(0.22 * n + 2, 40.0)), 4.8)
    ax = fig.subplots()
    alpha = np.asarray(details["alpha"], dtype=np.float64)
    ok = np.asarray(details["status"] == STATUS_OK) if "status" in details else np.isfinite(alpha)
    kinds = list(details["type"]) if "type" in details else ["matrix"] * n
    colors = [_TYPE_COLORS.get(k, "tab:gray") for k in kinds]
    x = np.arange(n)
    ax.bar(x[ok], alpha[ok], color=[c for c, o in zip(colors, ok) if o], width=0.8)
    ax.axhspan(2.0, 6.0, color="tab:green", alpha=0.08, zorder=0)
    ax.axhline(2.0, color="tab:green", ls="--", lw=1, label="$\\alpha$ = 2 (below: over-trained)")
    ax.axhline(6.0, color="tab:red", ls="--", lw=1, label="$\\alpha$ = 6 (above: under-trained)")
    if ok.any():
        mean = float(alpha[ok].mean())
        ax.axhline(mean, color="k", lw=1, label=f"mean $\\alpha$ = {mean:.2f}")
    if "block" in details:
        import pandas as pd

        blocks = [None if pd.isna(b) else int(b) for b in details["block"]]
        for i in range(1, n):
            if blocks[i] != blocks[i - 1]:
                ax.axvline(i - 0.5, color="0.75", lw=0.8, zorder=0)
    names = list(details["name"])
    if n <= 80:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    else:
        ax.set_xlabel("layer (model order)")
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylabel("$\\alpha$ (power-law exponent of the ESD tail)")
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    for k in dict.fromkeys(kinds):
        handles.append(Patch(color=_TYPE_COLORS.get(k, "tab:gray")))
        labels.append(k)
    ax.legend(handles, labels, fontsize=7, loc="upper left", ncol=2)
    ax.set_title(title or f"alpha per layer ({int(ok.sum())} of {n} layers fitted)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        _save(fig, path)
    return fig


def _save_alpha_overview(details: Any, path: str | os.PathLike, inputs: Iterable[FileId] = ()) -> None:
    """Write `plot_alpha_overview` to ``path``, never over one of ``inputs``."""
    _save(plot_alpha_overview(details), path, inputs)


def plot_paths(analysis: Any, out_dir: str | os.PathLike, *, esd_plots: bool = True) -> list[Path]:
    """The files `plot_analysis` writes for ``analysis`` into ``out_dir``, in order."""
    out = Path(out_dir)
    paths = [out / "alpha_overview.png"]
    if esd_plots:
        for i, row in enumerate(analysis.details.itertuples(index=False)):
            if bool((_eigenvalues(analysis.spectra, i) > 0).any()):
                paths.append(out / esd_filename(int(row.layer_id), str(row.name)))
    return paths


def _eigenvalues(spectra: Any, i: int):
    # absolute units (a Spectra may hold a power-of-two scaled copy); plain lists as they are
    return spectra.eigenvalues(i) if hasattr(spectra, "eigenvalues") else spectra[i]


def plot_analysis(analysis: Any, out_dir: str | os.PathLike, *, esd_plots: bool = True,
                  progress: bool = False, inputs: Iterable[FileId] = ()) -> list[Path]:
    """Write ``alpha_overview.png`` and one ``esd_<layer_id>_<name>.png`` per layer into
    ``out_dir`` (created if missing) for an `tbfast.analyze.Analysis`. Returns the paths.

    Every file is written by `tbfast.io.write_output`'s rules; when one of them is one of
    ``inputs`` (``(st_dev, st_ino)`` of the files the analysis read), nothing is written and
    `tbfast.io.OutputRefusedError` is raised. ``progress``: a progress bar over the layers
    (tqdm, on stderr)."""
    inputs = frozenset(inputs)
    out = output_dir(out_dir, what="plot directory")
    planned = plot_paths(analysis, out, esd_plots=esd_plots)
    for p in planned:  # all checked before the first is written
        check_output(p, inputs, what="plot")
    details = analysis.details
    _save_alpha_overview(details, planned[0], inputs)
    rows = list(details.itertuples(index=False)) if esd_plots else []
    bar = progress_bar(progress, len(rows), "plots") if rows else None
    canvas = _ESDFigure() if rows else None
    written = planned[1:]
    k = 0
    try:
        for i, row in enumerate(rows):
            ev = _eigenvalues(analysis.spectra, i)
            if bool((ev > 0).any()):
                _plot_esd(canvas, ev, alpha=float(row.alpha), xmin=float(row.xmin), D=float(row.D),
                          name=str(row.name), status=str(row.status), path=written[k], bins=100, inputs=inputs)
                k += 1
            else:  # e.g. an all-zero matrix: no ESD to draw (its status says why)
                logger.info("layer %r: no positive eigenvalue, no ESD plot (status: %s)", row.name, row.status)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    logger.info("wrote %d plots to %s", len(planned), out)
    return planned
