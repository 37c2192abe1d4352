"""examples/fno_darcy.py: the Darcy FD solver against a manufactured solution, determinism of the
data per seed, PDEBench's nRMSE, and the --quick experiment end to end (training reduces the loss)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fd():
    spec = importlib.util.spec_from_file_location("fno_darcy", ROOT / "examples" / "fno_darcy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fno_darcy"] = mod
    spec.loader.exec_module(mod)
    return mod


def _manufactured(n: int):
    """u = sin(pi x) sin(2 pi y) (zero on the boundary), a = 2 + sin(pi x) cos(pi y);
    f = -div(a grad u) = -(a_x u_x + a_y u_y + a (u_xx + u_yy)), written out by hand."""
    pi = np.pi
    x = np.linspace(0.0, 1.0, n)
    X, Y = np.meshgrid(x, x, indexing="ij")
    u = np.sin(pi * X) * np.sin(2 * pi * Y)
    a = 2.0 + np.sin(pi * X) * np.cos(pi * Y)
    a_x = pi * np.cos(pi * X) * np.cos(pi * Y)
    a_y = -pi * np.sin(pi * X) * np.sin(pi * Y)
    u_x = pi * np.cos(pi * X) * np.sin(2 * pi * Y)
    u_y = 2 * pi * np.sin(pi * X) * np.cos(2 * pi * Y)
    lap_u = -(pi ** 2 + 4 * pi ** 2) * u
    f = -(a_x * u_x + a_y * u_y + a * lap_u)
    return a, f, u


def test_solver_manufactured_solution_second_order(fd):
    errs = []
    for n in (17, 33, 65):
        a, f, u = _manufactured(n)
        errs.append(np.abs(fd.solve_darcy(a, f) - u).max())
    # halving h divides the error by ~4 (second order), and it is small in absolute terms
    assert 3.6 < errs[0] / errs[1] < 4.4
    assert 3.6 < errs[1] / errs[2] < 4.4
    assert errs[2] < 1e-3


def test_solver_piecewise_constant_coefficient_flux_balance(fd):
    """With a piecewise-constant a and f = beta, the discrete solution satisfies the 5-point
    flux balance at every interior node (written here independently of the sparse assembly)."""
    rng = np.random.default_rng(0)
    a = fd.darcy_coefficient(rng, 20)
    u = fd.solve_darcy(a, 100.0)
    h2 = (1.0 / 19) ** 2
    c = a[1:-1, 1:-1]
    flux = ((c + a[2:, 1:-1]) / 2 * (u[2:, 1:-1] - u[1:-1, 1:-1]) - (c + a[:-2, 1:-1]) / 2 * (u[1:-1, 1:-1] - u[:-2, 1:-1])
            + (c + a[1:-1, 2:]) / 2 * (u[1:-1, 2:] - u[1:-1, 1:-1]) - (c + a[1:-1, :-2]) / 2 * (u[1:-1, 1:-1] - u[1:-1, :-2]))
    np.testing.assert_allclose(-flux / h2, 100.0, rtol=1e-9)
    assert np.all(u[0] == 0) and np.all(u[-1] == 0) and np.all(u[:, 0] == 0) and np.all(u[:, -1] == 0)
    assert u[1:-1, 1:-1].min() > 0  # maximum principle: positive source, zero boundary


def test_solver_rejects_bad_coefficient(fd):
    with pytest.raises(ValueError, match="> 0"):
        fd.solve_darcy(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="square"):
        fd.solve_darcy(np.ones((5, 6)))


def test_dataset_deterministic_per_seed(fd, tmp_path):
    a1, u1 = fd.make_darcy_dataset(4, 16, split_seed=7)
    a2, u2 = fd.make_darcy_dataset(4, 16, split_seed=7)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(u1, u2)
    a3, _ = fd.make_darcy_dataset(2, 16, split_seed=7)  # sample i does not depend on the set size
    np.testing.assert_array_equal(a3, a1[:2])
    a4, _ = fd.make_darcy_dataset(4, 16, split_seed=8)
    assert not np.array_equal(a4, a1)
    # PDEBench's two coefficient values, both present in each field
    for a in a1:
        assert set(np.unique(a).tolist()) == {np.float32(0.1), np.float32(1.0)}
    # the cache returns the same arrays, the second time from disk
    ac, uc = fd.cached_dataset(tmp_path, 4, 16, 7)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    ac2, uc2 = fd.cached_dataset(tmp_path, 4, 16, 7)
    np.testing.assert_array_equal(ac2, a1)
    np.testing.assert_array_equal(uc2, u1)


def test_nrmse_matches_pdebench_definition(fd):
    rng = np.random.default_rng(1)
    true = rng.normal(size=(3, 5, 5))
    pred = true + 0.1 * rng.normal(size=(3, 5, 5))
    expect = np.mean([np.linalg.norm(p - t) / np.linalg.norm(t) for p, t in zip(pred, true)])
    assert fd.nrmse(torch.from_numpy(pred), torch.from_numpy(true)) == pytest.approx(expect, rel=1e-12)


def test_tempbalance_with_s_zero_is_the_baseline(fd):
    """TB_Sigmoid with s = 0 gives every layer the untuned lr: the run must equal the plain-Adam run."""
    a, u = fd.make_darcy_dataset(8, 12, split_seed=3)
    a, u = torch.from_numpy(a), torch.from_numpy(u)
    kw = dict(lr=1e-2, weight_decay=1e-4, steps=12, batch=4, seed=0, modes=3, width=8)
    base, _ = fd.train_fno(a, u, {"train": (a, u)}, method="baseline", **kw)
    tb, info = fd.train_fno(a, u, {"train": (a, u)}, method="tb", s=0.0, **kw)
    assert info["esd_calls"] > 0
    assert tb["train"] == pytest.approx(base["train"], rel=1e-5)


def test_quick_run_trains_and_writes_table(fd, tmp_path):
    res = fd.main(["--quick", "--out", str(tmp_path), "--no-cache"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["chosen"] == res["chosen"]
    assert [d["lr"] for d in saved["selection"]["lr"]] == list(fd.QUICK["lr_grid"])
    assert len(saved["runs"]) == 2 * len(fd.QUICK["ratios"]) * len(fd.QUICK["seeds"])
    for r in saved["runs"]:
        assert r["loss_last"] < 0.5 * r["loss_first"], r  # training reduces the loss
        assert 0 < r["test_nrmse"] < 1
        if r["method"] == "tb":
            # the 1x1 conv skips and fc1 are scheduled; fc0 / fc2 removed, spectral weights not analysed
            assert set(r["extra"]["lr_factors_last"]) == {"w.0", "w.1", "w.2", "w.3", "fc1"}
            assert r["esd_calls"] > 0 and 0 < r["tb_s"] < r["train_s"]
    table = (tmp_path / "table.md").read_text()
    assert "| 100% | 64 |" in table and "| 25% | 16 |" in table
