"""Plots show what they claim: the drawn data are checked against the formulas, not just the files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pd = pytest.importorskip("pandas")

from tbfast.analyze import analyze, analyze_spectra  # noqa: E402
from tbfast.plot import esd_filename, plot_alpha_overview, plot_analysis, plot_esd  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _heavy_tailed_evals(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return np.sort(rng.pareto(2.0, n) + 1e-3)


def test_esd_plot_draws_fit_and_xmin(tmp_path):
    e = _heavy_tailed_evals()
    alpha, xmin = 2.7, float(e[150])
    path = tmp_path / "esd.png"
    fig = plot_esd(torch.tensor(e), alpha=alpha, xmin=xmin, D=0.05, name="layer.0", path=path)
    assert path.read_bytes()[:8] == PNG
    ax, ax2 = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax2.get_xscale() == "log" and ax2.get_yscale() == "log"
    lines = {l.get_label(): l for l in ax.get_lines()}
    fit = next(l for k, l in lines.items() if k.startswith("power law"))
    x, y = fit.get_xdata(), fit.get_ydata()
    frac = np.sum(e >= xmin) / len(e)
    np.testing.assert_allclose(y, frac * (alpha - 1) / xmin * (x / xmin) ** (-alpha), rtol=1e-12)
    assert x[0] == pytest.approx(xmin) and x[-1] == pytest.approx(e[-1])
    vline = next(l for k, l in lines.items() if k.startswith("$x_{min}$"))
    assert list(vline.get_xdata()) == [xmin, xmin]
    # the histogram is a density over log bins: its integral is the fraction of positive eigenvalues (all)
    (stairs,) = [p for p in ax.patches]
    heights, edges = stairs.get_data().values, stairs.get_data().edges
    assert np.sum(heights * np.diff(edges)) == pytest.approx(1.0)
    # the CCDF panel: the empirical tail starts at 1, and the fitted curve is (x/xmin)^(1-alpha)
    emp, fitted = ax2.get_lines()[0], ax2.get_lines()[1]
    assert emp.get_ydata()[0] == 1.0 and len(emp.get_xdata()) == np.sum(e >= xmin)
    np.testing.assert_allclose(fitted.get_ydata(), (fitted.get_xdata() / xmin) ** (1 - alpha), rtol=1e-12)


def test_esd_plot_without_fit_says_why():
    fig = plot_esd(np.linspace(0.1, 1.0, 20), alpha=float("nan"), xmin=float("nan"),
                   status="too few eigenvalues to fit (1)")
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert any("too few eigenvalues" in t for t in texts)
    assert not any(l.get_label().startswith("power law") for l in fig.axes[0].get_lines())


def test_esd_plot_rejects_empty():
    with pytest.raises(ValueError, match="no positive eigenvalue"):
        plot_esd(np.zeros(5), alpha=2.0, xmin=1.0, name="zeros")


def test_alpha_overview_bars_are_the_alphas(tmp_path):
    df = pd.DataFrame({
        "name": ["a", "blocks.0.x", "blocks.0.y", "blocks.1.x"], "type": ["Embedding", "Linear", "Linear", "Conv2d"],
        "alpha": [1.5, 3.0, 7.0, 4.0], "status": ["ok", "ok", "fit failed", "ok"],
        "block": pd.array([None, 0, 0, 1], dtype="Int64"),
    })
    path = tmp_path / "overview.png"
    fig = plot_alpha_overview(df, path)
    assert path.read_bytes()[:8] == PNG
    ax = fig.axes[0]
    bars = [p for p in ax.patches if type(p).__name__ == "Rectangle" and p.get_width() == pytest.approx(0.8)]
    assert [(round(b.get_x() + b.get_width() / 2), b.get_height()) for b in bars] == [(0, 1.5), (1, 3.0), (3, 4.0)]
    ys = sorted({float(l.get_ydata()[0]) for l in ax.get_lines()})
    assert 2.0 in ys and 6.0 in ys and pytest.approx(np.mean([1.5, 3.0, 4.0])) in ys
    assert [t.get_text() for t in ax.get_xticklabels()] == list(df["name"])


def test_plot_analysis_writes_one_file_per_layer(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.Linear(40, 20))
    result = analyze_spectra(model)
    paths = plot_analysis(result, tmp_path / "p")
    names = sorted(p.name for p in paths)
    assert names == sorted(["alpha_overview.png", esd_filename(1, "0"), esd_filename(2, "1")])
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    # analyze(plot_dir=...) is the same route
    analyze(model, plot_dir=tmp_path / "q")
    assert len(list((tmp_path / "q").glob("*.png"))) == 3


def test_esd_filename_is_safe():
    assert esd_filename(7, "a/b c:d") == "esd_007_a_b_c_d.png"


def _fake_analysis(spectra, rows):
    """An Analysis-like object: per-layer eigenvalues and the table columns plot_analysis reads."""
    import types

    details = pd.DataFrame(rows, columns=["layer_id", "name", "alpha", "xmin", "D", "status", "type"])
    details["block"] = pd.array([None] * len(rows), dtype="Int64")
    return types.SimpleNamespace(details=details, spectra=[torch.tensor(e) for e in spectra])


def test_plot_analysis_reuses_one_figure_and_matches_fresh_plots(tmp_path, monkeypatch):
    """All ESD plots are drawn into one reused figure (building a figure per layer made --plot slow),
    yet every file is pixel-identical to a fresh `plot_esd` of that layer alone, including a fitted
    layer drawn right after an unfitted one."""
    import matplotlib.image as mpimg

    import tbfast.plot as plot_mod

    a, b, c = _heavy_tailed_evals(300, 1), _heavy_tailed_evals(50, 2), _heavy_tailed_evals(500, 3)
    rows = [(0, "a", 2.7, float(a[150]), 0.05, "ok", "Linear"),
            (1, "b", float("nan"), float("nan"), float("nan"), "too few eigenvalues to fit (1)", "Linear"),
            (2, "c", 3.4, float(c[400]), 0.08, "ok", "Linear")]
    built = []
    real_figure = plot_mod.new_figure
    monkeypatch.setattr(plot_mod, "new_figure", lambda *s: built.append(s) or real_figure(*s))
    paths = plot_analysis(_fake_analysis([a, b, c], rows), tmp_path / "run")
    assert len(built) == 2  # the overview and one ESD figure for all three layers
    monkeypatch.setattr(plot_mod, "new_figure", real_figure)
    for e, row, p in zip([a, b, c], rows, paths[1:]):
        assert p.name == esd_filename(row[0], row[1])
        fresh = tmp_path / f"fresh_{row[1]}.png"
        plot_esd(e, alpha=row[2], xmin=row[3], D=row[4], name=row[1], status=row[5], path=fresh)
        np.testing.assert_array_equal(mpimg.imread(p), mpimg.imread(fresh))


def test_plot_analysis_skips_all_zero_layer(tmp_path):
    """A layer without a positive eigenvalue (all-zero weights) gets no ESD file instead of an error."""
    e = _heavy_tailed_evals()
    rows = [(0, "zero", float("nan"), float("nan"), float("nan"), "all-zero matrix", "Linear"),
            (1, "w", 2.5, float(e[100]), 0.05, "ok", "Linear")]
    paths = plot_analysis(_fake_analysis([np.zeros(20), e], rows), tmp_path)
    assert [p.name for p in paths] == ["alpha_overview.png", esd_filename(1, "w")]
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files left


def test_cli_plot_shows_progress(tmp_path):
    """`tbfast analyze --plot DIR --progress`: a bar over the layers while the PNGs are written."""
    from tbfast import cli

    safetensors_torch = pytest.importorskip("safetensors.torch")
    pytest.importorskip("tqdm")
    g = torch.Generator().manual_seed(0)
    f = tmp_path / "m.safetensors"
    safetensors_torch.save_file({f"l{i}.weight": torch.randn(40, 30, generator=g) for i in range(3)}, str(f))
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["analyze", str(f), "--plot", str(tmp_path / "p"), "--progress"]) == 0
    assert "plots: 100%" in err.getvalue() and "3/3" in err.getvalue(), err.getvalue()
    assert len(list((tmp_path / "p").glob("esd_*.png"))) == 3
