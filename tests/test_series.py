"""Alpha over training: a series of tiny checkpoints created here, analysed as one long table;
alphas against a numpy fp64 SVD + SPEC section 3 Hill oracle written plainly in the test."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import tbfast
from tbfast.analysis.series import SERIES_COLUMNS, checkpoint_step
from tbfast.cli import main

NAMES = ["encoder.layer.0.attention.query", "encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]


def _hill(W, xmin_pos=2.0):
    x = np.sort(np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False) ** 2)
    N = len(x)
    i = int(N / xmin_pos)
    n = N - i
    return 1 + n / (np.sum(np.log(x[i:])) - n * np.log(x[i]))


def _state(step, seed=0):
    """Weights whose tails grow heavier with the step (Student-t with smaller df)."""
    g = np.random.default_rng(seed + step)
    df = max(2.2, 8.0 - step / 10)
    return {f"{n}.weight": torch.from_numpy((g.standard_t(df, size=(40, 24 + 8 * j)) / 8).astype(np.float32))
            for j, n in enumerate(NAMES)}


def _trainer_run(root, steps, state_steps=None):
    root.mkdir()
    for k, step in enumerate(steps):
        d = root / f"checkpoint-{step}"
        d.mkdir()
        save_file(_state(step), str(d / "model.safetensors"))
        if state_steps is not None:
            (d / "trainer_state.json").write_text(json.dumps({"global_step": state_steps[k], "log_history": []}))
    return root


OPTS = dict(fit="median", dtype=torch.float64, min_evals=0)


def test_run_directory_is_a_series_in_step_order(tmp_path):
    run = _trainer_run(tmp_path / "run", [20, 5, 100])
    torch.save({"lr": 0.1}, run / "training_args.bin")  # a trainer file, not weights
    table = tbfast.analyze_series(run, **OPTS)
    assert tuple(table.columns) == SERIES_COLUMNS
    assert list(table["step"]) == [5] * 3 + [20] * 3 + [100] * 3
    assert list(table["checkpoint"].unique()) == [str(run / f"checkpoint-{s}") for s in (5, 20, 100)]
    for _, row in table.iterrows():
        W = _state(row.step)[row["name"] + ".weight"].numpy()
        assert abs(row.alpha - _hill(W)) < 1e-9, (row.step, row["name"])


def test_steps_from_trainer_state_names_or_positions(tmp_path, caplog):
    run = _trainer_run(tmp_path / "run", [1, 2], state_steps=[300, 600])  # trainer_state wins over the name
    assert [checkpoint_step(run / "checkpoint-1"), checkpoint_step(run / "checkpoint-2" / "model.safetensors")] \
        == [300, 600]
    files = []
    for s in (10, 30):
        f = tmp_path / f"step_{s}.safetensors"
        save_file(_state(s), str(f))
        files.append(f)
    t = tbfast.analyze_series(files, **OPTS)
    assert sorted(set(t["step"])) == [10, 30]
    other = tmp_path / "weights_final.safetensors"
    save_file(_state(50), str(other))
    with caplog.at_level(logging.WARNING, logger="tbfast.analysis.series"):
        t = tbfast.analyze_series([files[0], other], **OPTS)
    assert list(dict.fromkeys(t["step"])) == [0, 1] and "no training step found" in caplog.text
    t = tbfast.analyze_series([files[0], other], steps=[7, 9], **OPTS)
    assert list(dict.fromkeys(t["step"])) == [7, 9]
    with pytest.raises(ValueError, match="2 steps for 3 checkpoints"):
        tbfast.analyze_series([files[0], other, files[1]], steps=[7, 9])


def test_models_and_state_dicts_in_a_series():
    from torch import nn

    def model(step):
        m = nn.Module()
        for n, w in _state(step).items():
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w
            m.add_module(n[: -len(".weight")].replace(".", "_"), lin)
        return m

    t = tbfast.analyze_series([model(0), _state(40)], steps=[0, 40], **OPTS)
    assert list(t["checkpoint"].unique()) == ["checkpoint 0", "checkpoint 1"]
    row = t[(t.step == 40) & (t.name == NAMES[2])].iloc[0]
    assert abs(row.alpha - _hill(_state(40)[NAMES[2] + ".weight"].numpy())) < 1e-9


def test_cli_series_csv_and_plot(tmp_path, capsys):
    run = _trainer_run(tmp_path / "run", [0, 10, 20, 40])
    csv, plots = tmp_path / "series.csv", tmp_path / "plots"
    ckpts = [str(run / f"checkpoint-{s}") for s in (0, 10, 20, 40)]
    code = main(["analyze", *ckpts, "--fit", "median", "--dtype", "float64", "--min-evals", "0", "--csv", str(csv),
                 "--plot", str(plots), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4 checkpoints, steps 0..40" in out and "alpha per layer" in out
    df = pd.read_csv(csv)
    assert list(df.columns) == list(SERIES_COLUMNS) and len(df) == 12
    for _, row in df.iterrows():
        assert math.isclose(row.alpha, _hill(_state(int(row.step))[row["name"] + ".weight"].numpy()), rel_tol=1e-9)
    png = plots / "alpha_over_steps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run directory alone is the same series
    assert main(["analyze", str(run), "--fit", "median", "--dtype", "float64", "--min-evals", "0",
                 "--no-progress"]) == 0
    assert "4 checkpoints" in capsys.readouterr().out
    # a missing checkpoint: one line naming it, exit 3
    assert main(["analyze", ckpts[0], str(tmp_path / "nope"), "--no-progress"]) == 3
    assert "nope" in capsys.readouterr().err


def test_many_layers_plot_uses_a_colour_bar(tmp_path):
    from tbfast.analysis.series_plot import plot_alpha_series

    rows = [{"step": s, "name": f"l{j}", "alpha": 2 + j / 10 + s / 100, "status": "ok"}
            for s in (0, 100, 200) for j in range(30)]
    fig = plot_alpha_series(pd.DataFrame(rows), tmp_path / "a.png")
    assert len(fig.axes) == 2  # the plot and its colour bar
    assert (tmp_path / "a.png").stat().st_size > 1000
