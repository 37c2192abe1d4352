"""The examples of docs/HTSR_TOOLS.md (FARMS, MoE experts, alpha over training) run, and their
numbers agree with plain numpy oracles."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hill(W):
    x = np.sort(np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False) ** 2)
    i = int(len(x) / 2)
    n = len(x) - i
    return 1 + n / (np.sum(np.log(x[i:])) - n * np.log(x[i]))


def test_farms_example_removes_the_aspect_ratio_trend(capsys):
    out = _load("farms_alpha").main()
    plain, farms = np.array(out["plain"]), np.array(out["farms"])
    assert np.all(np.diff(plain) > 0) and plain[-1] - plain[0] > 1.0  # plain alpha grows with cols / rows
    assert farms.max() - farms.min() < 0.2
    assert "spread over aspect ratios" in capsys.readouterr().out


def test_moe_example_rows_match_a_per_matrix_oracle():
    mod = _load("moe_experts")
    df = mod.main()
    assert len(df) == mod.BLOCKS * 2 * mod.EXPERTS and set(df["type"]) == {"Expert"}
    model = mod.build()
    for b, p, e in ((0, "gate_up_proj", 0), (3, "down_proj", 7)):
        row = df[df.name == f"layers.{b}.mlp.experts.{p}[{e}]"].iloc[0]
        W = getattr(model.layers[b].mlp.experts, p)[e].detach().numpy()
        assert abs(row.alpha - _hill(W)) < 1e-4


def test_alpha_over_training_example_writes_the_plot(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "alpha_over_training.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert "step" in p.stdout and "120" in p.stdout
    png = tmp_path / "alpha_over_steps.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
