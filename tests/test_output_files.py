"""Output files of `tbfast analyze` (issue 20, items 1 and 2): never over an input, `--csv -`,
devices / FIFOs / symlinks written through, atomic replace keeping the mode, hard links kept,
and a closed standard output (broken pipe) that loses no file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from tbfast import cli


pd = pytest.importorskip("pandas")
safetensors_torch = pytest.importorskip("safetensors.torch")

CSV_HEADER = "layer_id,name,type,N,M,rf,num_evals,alpha"


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _weights(n: int, seed: int = 0, rows: int = 24, cols: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.fc.weight": torch.randn(rows, cols, generator=g) for i in range(n)}


@pytest.fixture()
def ck(tmp_path):
    f = tmp_path / "ck.safetensors"
    sd = _weights(3)
    safetensors_torch.save_file(sd, str(f))
    return f, sd


def _run(*args, **kw):
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.run([sys.executable, "-m", "tbfast.cli", "analyze", *map(str, args), "--no-progress"],
                          timeout=300, **kw)


def _one_line_refusal(capsys_err: str) -> None:
    lines = [line for line in capsys_err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tbfast analyze: error:"), capsys_err


def _check_csv(path_or_buf, sd) -> None:
    """The CSV holds one row per weight, with lambda_max from numpy's SVD (an independent oracle)."""
    df = pd.read_csv(path_or_buf)
    assert sorted(df["name"]) == sorted(k[: -len(".weight")] for k in sd)
    for row in df.itertuples(index=False):
        s = np.linalg.svd(sd[row.name + ".weight"].double().numpy(), compute_uv=False)
        assert row.spectral_norm == pytest.approx(s[0] ** 2, rel=1e-4)


# ------------------------------------------------------------------------------------------------
# item 1: never over an input


def test_csv_over_the_checkpoint_is_refused(ck, capsys):
    f, _ = ck
    before = _sha(f)
    assert cli.main(["analyze", str(f), "--csv", str(f), "--no-progress"]) == cli.EXIT_USAGE
    _one_line_refusal(capsys.readouterr().err)
    assert _sha(f) == before


def test_csv_over_the_checkpoint_through_links_is_refused(ck, tmp_path, capsys):
    f, _ = ck
    before = _sha(f)
    sym = tmp_path / "sym.csv"
    sym.symlink_to(f)
    hard = tmp_path / "hard.csv"
    os.link(f, hard)
    for out in (sym, hard, tmp_path / "." / "ck.safetensors"):
        assert cli.main(["analyze", str(f), "--csv", str(out), "--no-progress"]) == cli.EXIT_USAGE
        _one_line_refusal(capsys.readouterr().err)
        assert _sha(f) == before
    assert sym.is_symlink() and os.stat(hard).st_ino == os.stat(f).st_ino


def test_shards_of_an_index_base_and_adapter_files_are_inputs(tmp_path, capsys):
    d = tmp_path / "sharded"
    d.mkdir()
    a, b = _weights(2, seed=1), {f"layers.{i}.fc.weight": w for i, w in enumerate(_weights(2, seed=2).values(), 2)}
    safetensors_torch.save_file(a, str(d / "model-00001-of-00002.safetensors"))
    safetensors_torch.save_file(b, str(d / "model-00002-of-00002.safetensors"))
    wm = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    shard2 = d / "model-00002-of-00002.safetensors"
    link = tmp_path / "shard2-link.csv"
    link.symlink_to(shard2)
    before = {p: _sha(p) for p in d.iterdir()}
    for out in (shard2, link, d / "model.safetensors.index.json"):
        assert cli.main(["analyze", str(d), "--csv", str(out), "--no-progress"]) == cli.EXIT_USAGE
        _one_line_refusal(capsys.readouterr().err)
    # the base checkpoint of a delta, and the files of a LoRA adapter directory
    base = tmp_path / "base.safetensors"
    safetensors_torch.save_file(_weights(2, seed=3), str(base))
    fine = tmp_path / "fine.safetensors"
    safetensors_torch.save_file(_weights(2, seed=4), str(fine))
    base_sha = _sha(base)
    assert cli.main(["analyze", str(fine), "--base", str(base), "--csv", str(base), "--no-progress"]) == 2
    _one_line_refusal(capsys.readouterr().err)
    ad = tmp_path / "adapter"
    ad.mkdir()
    g = torch.Generator().manual_seed(5)
    safetensors_torch.save_file({f"base_model.model.layers.{i}.fc.lora_{x}.weight": torch.randn(*s, generator=g)
                                 for i in range(2) for x, s in (("A", (4, 16)), ("B", (24, 4)))},
                                str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    for out in (ad / "adapter_model.safetensors", ad / "adapter_config.json"):
        sha = _sha(out)
        assert cli.main(["analyze", str(ad), "--base", str(base), "--csv", str(out), "--no-progress"]) == 2
        _one_line_refusal(capsys.readouterr().err)
        assert _sha(out) == sha
    assert _sha(base) == base_sha
    assert {p: _sha(p) for p in d.iterdir()} == before


def test_plot_files_never_overwrite_an_input(ck, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    f, _ = ck
    before = _sha(f)
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "alpha_overview.png").symlink_to(f)
    assert cli.main(["analyze", str(f), "--plot", str(plots), "--no-progress"]) == cli.EXIT_USAGE
    _one_line_refusal(capsys.readouterr().err)
    assert _sha(f) == before
    assert sorted(p.name for p in plots.iterdir()) == ["alpha_overview.png"]  # nothing written at all
    (plots / "alpha_overview.png").unlink()
    os.link(f, plots / "esd_000_layers.0.fc.png")  # the first layer's ESD plot name
    assert cli.main(["analyze", str(f), "--plot", str(plots), "--no-progress"]) == cli.EXIT_USAGE
    _one_line_refusal(capsys.readouterr().err)
    assert _sha(f) == before and sorted(p.name for p in plots.iterdir()) == ["esd_000_layers.0.fc.png"]
    csv = tmp_path / "out.csv"  # a refused plot: no CSV written either (all outputs checked first)
    assert cli.main(["analyze", str(f), "--plot", str(plots), "--csv", str(csv), "--no-progress"]) == 2
    assert not csv.exists()
    capsys.readouterr()
    # the library's plot_dir= follows the same rule
    import tbfast

    from tbfast.io import OutputRefusedError

    with pytest.raises(OutputRefusedError, match="reads"):
        tbfast.analyze(str(f), plot_dir=plots)
    assert _sha(f) == before


def test_plot_dir_that_is_a_file_is_refused_before_the_analysis(ck, tmp_path, capsys):
    f, _ = ck
    not_dir = tmp_path / "plots"
    not_dir.write_text("keep me")
    assert cli.main(["analyze", str(f), "--plot", str(not_dir), "--no-progress"]) == cli.EXIT_USAGE
    _one_line_refusal(capsys.readouterr().err)
    assert not_dir.read_text() == "keep me"


# ------------------------------------------------------------------------------------------------
# item 1: what is at the output path


def test_csv_dash_writes_the_table_to_stdout(ck, capsysbinary):
    f, sd = ck
    assert cli.main(["analyze", str(f), "--csv", "-", "--no-progress"]) == 0
    out = capsysbinary.readouterr().out.decode()
    assert out.startswith(CSV_HEADER)  # nothing but the CSV on stdout
    import io

    _check_csv(io.StringIO(out), sd)
    assert not os.path.exists("-")


def test_csv_to_dev_stdout_redirected_to_a_file_is_written_through(ck, tmp_path):
    f, sd = ck
    out = tmp_path / "all.txt"
    with open(out, "wb") as fh:
        r = _run(f, "--csv", "/dev/stdout", stdout=fh, stderr=subprocess.PIPE)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.startswith(CSV_HEADER) and "summary (mean over" in text  # the CSV, then the table
    csv = text[: text.index("tbfast analyze:")]
    import io

    _check_csv(io.StringIO(csv), sd)


def test_symlink_target_is_written_and_the_link_kept(ck, tmp_path, capsys):
    f, sd = ck
    target = tmp_path / "real.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    dev_link = tmp_path / "null.csv"
    dev_link.symlink_to(os.devnull)
    assert cli.main(["analyze", str(f), "--csv", str(link), "--no-progress"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    _check_csv(target, sd)
    assert cli.main(["analyze", str(f), "--csv", str(dev_link), "--no-progress"]) == 0
    assert dev_link.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)


def test_existing_file_keeps_its_mode_and_a_new_one_gets_the_umask(ck, tmp_path, capsys):
    f, sd = ck
    old = tmp_path / "private.csv"
    old.write_text("old\n")
    os.chmod(old, 0o600)
    ino = os.stat(old).st_ino
    assert cli.main(["analyze", str(f), "--csv", str(old), "--no-progress"]) == 0
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o600
    assert os.stat(old).st_ino != ino  # replaced by a rename, not rewritten in place
    _check_csv(old, sd)
    new = tmp_path / "sub" / "new.csv"
    mask = os.umask(0o027)
    try:
        assert cli.main(["analyze", str(f), "--csv", str(new), "--no-progress"]) == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o666 & ~0o027
    assert [p.name for p in new.parent.iterdir()] == ["new.csv"]  # no temporary file left


def test_hard_linked_output_is_written_in_place(ck, tmp_path, capsys):
    f, sd = ck
    a = tmp_path / "a.csv"
    a.write_text("old\n")
    b = tmp_path / "b.csv"
    os.link(a, b)
    assert cli.main(["analyze", str(f), "--csv", str(a), "--no-progress"]) == 0
    assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_nlink == 2  # the link is kept
    _check_csv(b, sd)


def test_fifo_with_a_reader_is_written_through_and_without_one_refused(ck, tmp_path, capsys):
    f, sd = ck
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    rc = cli.main(["analyze", str(f), "--csv", str(fifo), "--no-progress"])
    reader.join(30)  # a CLI that replaced the FIFO leaves the reader blocked (a daemon thread)
    assert rc == 0 and stat.S_ISFIFO(os.stat(fifo).st_mode) and got
    import io

    _check_csv(io.StringIO(got[0].decode()), sd)
    capsys.readouterr()
    assert cli.main(["analyze", str(f), "--csv", str(fifo), "--no-progress"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    _one_line_refusal(err)
    assert "FIFO" in err and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_existing_plot_keeps_its_mode(ck, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    f, _ = ck
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "alpha_overview.png").write_bytes(b"old")
    os.chmod(plots / "alpha_overview.png", 0o600)
    assert cli.main(["analyze", str(f), "--plot", str(plots), "--no-progress"]) == 0
    p = plots / "alpha_overview.png"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert not [q for q in plots.iterdir() if q.name.endswith(".tmp")]


def test_write_output_leaves_the_old_file_when_the_writer_fails(tmp_path):
    from tbfast.io import write_output

    p = tmp_path / "out.csv"
    p.write_text("complete old content\n")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_output(p, broken)
    assert p.read_text() == "complete old content\n"
    assert [q.name for q in tmp_path.iterdir()] == ["out.csv"]


# ------------------------------------------------------------------------------------------------
# item 2: a closed standard output


@pytest.fixture()
def many(tmp_path):
    f = tmp_path / "many.safetensors"
    sd = _weights(1200, seed=7, rows=12, cols=11)
    safetensors_torch.save_file(sd, str(f))
    return f, sd


def test_broken_pipe_keeps_the_csv_and_exits_141(many, tmp_path):
    """`tbfast analyze many.safetensors --csv out.csv --all-columns | head -n 1`: the table (about
    0.4 MB) cannot fit the pipe, so the reader closes while tbfast is still writing."""
    f, sd = many
    out = tmp_path / "out.csv"
    writer = subprocess.Popen([sys.executable, "-m", "tbfast.cli", "analyze", str(f), "--csv", str(out),
                               "--all-columns", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-n", "1"], stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # head holds the only read end
    first, _ = head.communicate(timeout=300)
    err = writer.stderr.read().decode()
    assert writer.wait(timeout=300) == 141, err  # 128 + SIGPIPE (cli.EXIT_BROKEN_PIPE)
    assert first.decode().startswith("tbfast analyze:") and first.count(b"\n") == 1
    assert "Traceback" not in err and "BrokenPipe" not in err
    df = pd.read_csv(out)
    assert len(df) == 1200 and set(df["name"]) == {k[: -len(".weight")] for k in sd}


def test_closed_stdout_with_csv_dash_exits_141(ck):
    f, _ = ck
    p = subprocess.Popen([sys.executable, "-m", "tbfast.cli", "analyze", str(f), "--csv", "-", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # no reader at all: the first write fails
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141, err
    assert "Traceback" not in err
