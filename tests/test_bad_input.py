"""Bad input gets a one-line error with the right reason (issue 20, items 5 to 8), and the exit
codes that `tbfast analyze --help` and docs/ANALYZE.md document are the ones it produces."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import without_fallback_notice

import tbfast
from tbfast import _backend, cli

safetensors_torch = pytest.importorskip("safetensors.torch")
pd = pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]


def _weights(n: int = 2, seed: int = 0, rows: int = 24, cols: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.q.weight": torch.randn(rows, cols, generator=g) for i in range(n)}


@pytest.fixture()
def ck(tmp_path):
    f = tmp_path / "ck.safetensors"
    sd = _weights()
    safetensors_torch.save_file(sd, str(f))
    return f, sd


def _adapter(d: Path, r: int, cfg: dict) -> Path:
    d.mkdir()
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(2):
        sd[f"base_model.model.layers.{i}.q.lora_A.weight"] = torch.randn(r, 16, generator=g)
        sd[f"base_model.model.layers.{i}.q.lora_B.weight"] = torch.randn(24, r, generator=g)
    safetensors_torch.save_file(sd, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8, **cfg}))
    return d


def _one_line(err: str) -> str:
    lines = [line for line in without_fallback_notice(err, _backend.extension_loaded()).splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# item 5: one-line errors


def test_lora_rank_0_adapter(ck, tmp_path, capsys):
    ad = _adapter(tmp_path / "r0", 0, {})
    assert cli.main(["analyze", str(ad), "--base", str(ck[0]), "--no-progress"]) == cli.EXIT_CORRUPT
    line = _one_line(capsys.readouterr().err)
    assert "rank 0" in line and "layers.0.q" in line


def test_adapter_pattern_that_is_not_a_regex(ck, tmp_path, capsys):
    ad = _adapter(tmp_path / "bad", 4, {"target_modules": "[", "alpha_pattern": {"[": 3}})
    assert cli.main(["analyze", str(ad), "--base", str(ck[0]), "--no-progress"]) == cli.EXIT_CORRUPT
    line = _one_line(capsys.readouterr().err)
    assert "adapter_config.json" in line and "alpha_pattern" in line and "'['" in line
    # target_modules is not read (the adapter's tensors say which modules are adapted): it loads
    ok = _adapter(tmp_path / "ok", 4, {"target_modules": "["})
    assert cli.main(["analyze", str(ok), "--base", str(ck[0]), "--no-progress"]) == cli.EXIT_OK


def test_memory_budget_overflow(ck, capsys):
    for size in ("1e400GiB", "inf", "nan", "1e30GiB"):
        assert cli.main(["analyze", str(ck[0]), "--memory-budget", size]) == cli.EXIT_USAGE
        assert "--memory-budget" in _one_line(capsys.readouterr().err)
    with pytest.raises(ValueError, match="memory_budget"):
        tbfast.analyze(str(ck[0]), memory_budget=float("inf"))


def test_include_exclude_that_are_not_regexes(ck, capsys):
    for opt in ("--include", "--exclude"):
        assert cli.main(["analyze", str(ck[0]), opt, "["]) == cli.EXIT_USAGE
        assert opt in _one_line(capsys.readouterr().err)
    for opt in ("include", "exclude"):
        with pytest.raises(ValueError, match=rf"^{opt}="):
            tbfast.analyze(str(ck[0]), **{opt: "["})
        with pytest.raises(ValueError, match=rf"^{opt}="):
            tbfast.esd(torch.nn.Linear(16, 24), **{opt: "("})


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="an Apple GPU is present")
def test_device_mps_without_mps(ck, capsys):
    assert cli.main(["analyze", str(ck[0]), "--device", "mps", "--no-progress"]) == cli.EXIT_ERROR
    assert "MPS is not available" in _one_line(capsys.readouterr().err)
    with pytest.raises(RuntimeError, match="mps"):
        tbfast.analyze(str(ck[0]), device="mps")


# ------------------------------------------------------------------------------------------------
# item 6: max_evals=0 keeps every layer (docs/ANALYZE.md and docs/WEIGHTWATCHER.md: 0 / None: no limit)


def test_max_evals_zero_means_no_limit():
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 40), torch.nn.Linear(40, 8))
    expected = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    df = tbfast.analyze(model, min_evals=0, max_evals=0)
    assert list(df["name"]) == expected
    assert list(df["num_evals"]) == [16, 24, 8]  # min(out, in), an independent count
    assert list(tbfast.analyze(model, max_evals=0)["name"]) == expected[:2]  # min_evals=10 still applies
    with pytest.raises(ValueError, match="max_evals"):
        tbfast.analyze(model, max_evals=-1)


# ------------------------------------------------------------------------------------------------
# item 7: the real reason, and what is valid loads


def _run(*argv, **kw):
    return subprocess.run([sys.executable.encode(), b"-m", b"tbfast.cli", b"analyze", *argv, b"--no-progress"],
                          capture_output=True, timeout=300, **kw)


def test_non_utf8_file_names_load(tmp_path):
    sd = _weights(seed=3)
    d = os.fsencode(tmp_path)
    pt = os.path.join(d, b"w\xff\xfe.pt")
    st = os.path.join(d, b"w\xff.safetensors")
    torch.save(sd, tmp_path / "tmp.pt")
    os.replace(tmp_path / "tmp.pt", pt)
    safetensors_torch.save_file(sd, str(tmp_path / "tmp.safetensors"))
    os.replace(tmp_path / "tmp.safetensors", st)
    for f in (pt, st):
        # strict UTF-8 on stdout (as under a UTF-8 locale): the names are printed with \xNN escapes
        r = _run(f, b"--csv", os.path.join(d, b"out\xff.csv"), env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
        assert r.returncode == cli.EXIT_OK, r.stderr.decode(errors="replace")
        df = pd.read_csv(open(os.path.join(d, b"out\xff.csv"), "rb"))
        for row in df.itertuples(index=False):  # the weights as saved: numpy's SVD is the oracle
            s = np.linalg.svd(sd[row.name + ".weight"].double().numpy(), compute_uv=False)
            assert row.spectral_norm == pytest.approx(s[0] ** 2, rel=1e-4)
        assert sorted(df["name"]) == ["layers.0.q", "layers.1.q"]
        assert "out\\xff.csv" in r.stdout.decode()
        # the library takes the name as Python keeps it (surrogate escapes)
        assert list(tbfast.analyze(os.fsdecode(f), min_evals=0)["name"]) == ["layers.0.q", "layers.1.q"]


def test_fifo_and_device_as_checkpoint(tmp_path, capsys):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.pt"
    zero.symlink_to("/dev/zero")
    # opened, either would block or read forever: the CLI must answer from os.stat alone
    r = _run(os.fsencode(fifo))
    assert r.returncode == cli.EXIT_CORRUPT
    assert "not a regular file: FIFO" in _one_line(r.stderr.decode())
    assert cli.main(["analyze", str(zero)]) == cli.EXIT_CORRUPT
    assert "not a regular file: character device" in _one_line(capsys.readouterr().err)
    # a shard an index names, and an index found in a directory
    d = tmp_path / "sharded"
    d.mkdir()
    os.mkfifo(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "model-00001-of-00001.safetensors"}}))
    assert cli.main(["analyze", str(d)]) == cli.EXIT_CORRUPT
    assert "not a regular file: FIFO" in _one_line(capsys.readouterr().err)
    e = tmp_path / "fifo-index"
    e.mkdir()
    os.mkfifo(e / "model.safetensors.index.json")
    r = _run(os.fsencode(e))
    assert r.returncode == cli.EXIT_CORRUPT and "not a regular file: FIFO" in r.stderr.decode()
    assert cli.main(["analyze", str(tmp_path / "missing.pt")]) == cli.EXIT_NOT_FOUND  # still "not found"
    assert "not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# item 8: data left out is said at the default verbosity, once


def test_unlisted_shards_and_tensors_warn_once_at_default_verbosity(tmp_path, caplog):
    d = tmp_path / "sharded"
    d.mkdir()
    a, b = _weights(2, seed=4), {"layers.9.q.weight": torch.randn(24, 16)}
    safetensors_torch.save_file({**a, "extra.weight": torch.randn(24, 16)}, str(d / "model-00001-of-00002.safetensors"))
    safetensors_torch.save_file(b, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model-00001-of-00002.safetensors"
                                                                               for k in a}}))
    r = _run(os.fsencode(d))
    err = r.stderr.decode()
    assert r.returncode == cli.EXIT_OK, err
    assert err.count("model-00002-of-00002.safetensors") == 1 and err.count("not listed in the index, ignored") == 1
    assert err.count("extra.weight") == 1
    assert "layers.9.q" not in r.stdout.decode()  # the unlisted shard is left out: hence the warning
    with caplog.at_level("WARNING", logger="tbfast"):
        tbfast.analyze(str(d))
    warned = [rec for rec in caplog.records if rec.levelname == "WARNING" and "ignored" in rec.getMessage()]
    assert len(warned) == 1 and "model-00002-of-00002.safetensors" in warned[0].getMessage()


def test_weights_with_more_than_4_dims_are_warned_about(tmp_path):
    f = tmp_path / "w5.safetensors"
    safetensors_torch.save_file({**_weights(), "conv3d.weight": torch.randn(8, 4, 3, 3, 3)}, str(f))
    r = _run(os.fsencode(f))
    assert r.returncode == cli.EXIT_OK
    assert r.stderr.decode().count("conv3d.weight") == 1 and "warning" in r.stderr.decode()


# ------------------------------------------------------------------------------------------------
# acceptance: the documented exit codes are the produced ones


def _documented_codes() -> tuple[set[int], set[int]]:
    help_text = subprocess.run([sys.executable, "-m", "tbfast.cli", "analyze", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    epilog = " ".join(help_text[help_text.index("exit codes:"):].split())
    from_help = {int(m) for m in re.findall(r"(?:codes:|;) (\d+) ", epilog)}
    doc = (ROOT / "docs" / "ANALYZE.md").read_text()
    table = doc[doc.index("| exit code |"):]
    table = table[: table.index("\n\n")]
    from_docs = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    return from_help, from_docs


def test_documented_exit_codes_are_produced(ck, tmp_path, monkeypatch, capsys):
    from_help, from_docs = _documented_codes()
    assert from_help == from_docs == set(cli.EXIT_CODES)
    f = str(ck[0])
    nan = tmp_path / "nan.safetensors"
    w = torch.randn(20, 20)
    w[1, 2] = float("nan")
    safetensors_torch.save_file({"bad.weight": w}, str(nan))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    q = tmp_path / "q.safetensors"
    safetensors_torch.save_file({"fc.weight": torch.zeros(16, 16, dtype=torch.int8)}, str(q))
    produced = {
        0: cli.main(["analyze", f, "--no-progress"]),
        1: cli.main(["analyze", str(nan), "--no-progress"]),
        2: cli.main(["analyze", f, "--csv", f]),
        3: cli.main(["analyze", str(tmp_path / "missing.safetensors")]),
        4: cli.main(["analyze", str(bad)]),
        5: cli.main(["analyze", str(q)]),
        6: cli.main(["analyze", f, "--include", "nothing-matches"]),
    }

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sys.modules["tbfast.analyze"], "analyze_spectra", interrupted)  # the module, not the function
        produced[130] = cli.main(["analyze", f, "--no-progress"])
    p = subprocess.Popen([sys.executable, "-m", "tbfast.cli", "analyze", f, "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    p.stderr.read()
    produced[141] = p.wait(timeout=300)
    assert {code: rc for code, rc in produced.items()} == {code: code for code in produced}
    assert set(produced) == from_docs
