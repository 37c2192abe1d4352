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


def test_cli_series_never_writes_over_a_checkpoint_of_the_series(tmp_path, capsys):
    """c1's output rules hold in series mode: every file of every checkpoint is an input, checked
    before the analysis (one line, exit 2, nothing changed), for --csv and for the plot."""
    run = _trainer_run(tmp_path / "run", [0, 10, 20])
    ckpts = [str(run / f"checkpoint-{s}") for s in (0, 10, 20)]
    last = run / "checkpoint-20" / "model.safetensors"  # the last checkpoint, not only the first
    before = last.read_bytes()
    link = tmp_path / "link.csv"
    link.symlink_to(last)
    for target in (str(last), str(link)):
        assert main(["analyze", *ckpts, "--min-evals", "0", "--csv", target, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refusing to overwrite" in err[0], err
    assert last.read_bytes() == before
    # --plot DIR whose alpha_over_steps.png is (a link to) a checkpoint file
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "alpha_over_steps.png").symlink_to(run / "checkpoint-10" / "model.safetensors")
    csv = tmp_path / "out.csv"
    assert main(["analyze", *ckpts, "--min-evals", "0", "--csv", str(csv), "--plot", str(plots),
                 "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not csv.exists()
    # a --plot path that is a file: usage error, one line
    assert main(["analyze", *ckpts, "--plot", str(last), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and last.read_bytes() == before
    # the library's plot_dir follows the same rule
    from tbfast.io import OutputRefusedError

    with pytest.raises(OutputRefusedError):
        tbfast.analyze_series(ckpts, plot_dir=plots, **OPTS)


def test_cli_series_csv_to_stdout_and_atomic_replace(tmp_path, capsys):
    run = _trainer_run(tmp_path / "run", [0, 10])
    ckpts = [str(run / f"checkpoint-{s}") for s in (0, 10)]
    args = ["analyze", *ckpts, "--fit", "median", "--dtype", "float64", "--min-evals", "0", "--no-progress"]
    assert main(args + ["--csv", "-"]) == 0
    out = capsys.readouterr().out
    df = pd.read_csv(__import__("io").StringIO(out))  # only the CSV on standard output
    assert list(df.columns) == list(SERIES_COLUMNS) and len(df) == 6
    for _, row in df.iterrows():
        assert math.isclose(row.alpha, _hill(_state(int(row.step))[row["name"] + ".weight"].numpy()), rel_tol=1e-9)
    csv = tmp_path / "series.csv"
    csv.write_text("old\n")
    csv.chmod(0o600)
    assert main(args + ["--csv", str(csv)]) == 0
    assert (csv.stat().st_mode & 0o777) == 0o600 and pd.read_csv(csv).shape == (6, len(SERIES_COLUMNS))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_cli_series_bad_farms_value_is_a_usage_error(tmp_path, capsys):
    run = _trainer_run(tmp_path / "run", [0, 10])
    assert main(["analyze", str(run), "--farms-aspect-ratio", "nan", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aspect_ratio" in err[0]
