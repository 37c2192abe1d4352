"""TempBalance and analyze on a 2-process gloo group (CPU): DDP, FSDP2, checkpoint analysis, torchrun CLI.

One ``torch.multiprocessing.spawn`` runs every library scenario (tests/dist_worker.py) once per
module; the oracles are single-process runs on the same weights (tbfast's own single-process
path, the reference TempBalance of tbfast.bench.reference) and fp64 SVD eigenvalues.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import dist_worker
from oracle import ks_fit, svd_eigs

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(path: str) -> dict:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {f"l{i}.weight": torch.randn(40 + 10 * i, 30 + 7 * i, generator=g) for i in range(5)}
    save_file(sd, path)
    return sd


needs_fsdp2 = pytest.mark.skipif(
    not hasattr(__import__("torch.distributed.fsdp").distributed.fsdp, "fully_shard"),
    reason=f"FSDP2 (public torch.distributed.fsdp.fully_shard) needs torch >= 2.6; this is torch {torch.__version__}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("dist")
    ckpt = str(d / "ck.safetensors")
    sd = _checkpoint(ckpt)
    mp.spawn(dist_worker.run, args=(2, _free_port(), str(d), ckpt), nprocs=2, join=True)
    out = [json.load(open(d / f"rank{r}.json")) for r in range(2)]
    return {"r": out, "ckpt": ckpt, "sd": sd}


@pytest.fixture(scope="module")
def single():
    """The same training and TempBalance steps in this (single) process."""
    model = dist_worker.tiny_model()
    hist, tb = dist_worker.train_with_tempbalance(model)
    return model, hist, tb


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=needs_fsdp2), "fsdp1"])
def test_lrs_identical_on_ranks_and_equal_to_single_process(ranks, single, mode):
    r0, r1 = ranks["r"]
    assert r0[f"{mode}_lrs_hex"] == r1[f"{mode}_lrs_hex"]  # bit-identical on both ranks
    model, hist, _ = single
    assert len(r0[f"{mode}_lrs"]) == len(hist) == dist_worker.STEPS
    for got, want in zip(r0[f"{mode}_lrs"], hist):
        assert _rel(got, want) < 1e-5
    # independent oracle: the reference TempBalance on the single-process weights after 3 steps
    from tbfast.bench.reference import ReferenceTempBalance

    ref = ReferenceTempBalance(model).layer_lrs(dist_worker.LR)
    assert list(ref) == ["2", "4", "6"]
    assert _rel(r0[f"{mode}_lrs"][-1][:3], list(ref.values())) < 1e-5


def test_ddp_without_process_group_each_rank_alone(ranks, single):
    """process_group=None with replicated (DDP) weights: no split, no collective; each rank
    computes what a single process computes."""
    _, hist, _ = single
    for res in ranks["r"]:
        assert not res["ddp_default_split"]
        got = [[float.fromhex(v) for v in h] for h in res["ddp_default_lrs_hex"]]
        for g, want in zip(got, hist):
            assert _rel(g, want) < 1e-5


def test_ranks_that_disagree_raise_on_every_rank(ranks):
    """Replicated weights that differ (rank 1 changed one entry of layer '4') or hold NaN on the
    rank that does not analyse the layer: every rank raises, naming the layer and the ranks."""
    r0, r1 = ranks["r"]
    for key in ("mismatch_analyze", "mismatch_tempbalance"):
        assert r0[key] == r1[key], key  # the same verdict on both ranks
        msg = r0[key]
        assert msg and msg.startswith("ReplicaMismatchError") and "layer '4'" in msg, msg
        assert "rank 0" in msg and "[1]" in msg or "rank 1" in msg and "[0]" in msg, msg
    msg = r0["nan_elsewhere"]
    assert r1["nan_elsewhere"] == msg and msg.startswith("ReplicaMismatchError"), msg
    assert f"layer {r0['nan_layer']!r}" in msg and "NaN or Inf on rank(s) [1] but not on rank(s) [0]" in msg, msg
    assert r0["agree"] is None and r1["agree"] is None  # identical replicas pass


def test_one_rank_alone_never_waits_for_the_others(tmp_path):
    """Once torch.distributed is initialised, rank 0 alone calls layer_metrics / esd / analyze and
    TempBalance(process_group=None).step on ordinary weights while rank 1 calls nothing: every
    call returns (before, process_group=None meant the world group and rank 0 hung forever)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.path.join(ROOT, "tests") + os.pathsep
           + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    worker = os.path.join(ROOT, "tests", "dist_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, "solo", str(r), "2", str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]  # the timeout guard: a hang fails here
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    res = json.load(open(tmp_path / "solo0.json"))
    assert not res["analyze_split"] and not res["tb_split"]
    import tbfast

    model = dist_worker.tiny_model()
    want = tbfast.layer_metrics(model, min_evals=0).alpha.tolist()  # a single process, same weights
    assert res["esd_layers"] == len(want) and _rel(res["alpha_esd"], want) < 1e-6
    assert _rel(res["analyze_alpha"], tbfast.analyze(model, min_evals=0)["alpha"]) < 1e-6
    hist, _ = dist_worker.train_with_tempbalance(dist_worker.tiny_model())
    assert _rel(res["tb_lrs"], hist) < 1e-5


def test_ranks_split_the_layers(ranks):
    r0, r1 = ranks["r"]
    owner = r0["ddp_owner"]
    assert r1["ddp_owner"] == owner and set(owner) == {0, 1}
    names = ["module.0", "module.2", "module.4", "module.6", "module.8"]
    for r, res in enumerate((r0, r1)):  # each rank read exactly its own layers
        assert sorted(res["ddp_loaded"]) == sorted(n for n, o in zip(names, owner) if o == r)


@needs_fsdp2
def test_fsdp2_rank_materialises_only_its_layers(ranks):
    """A rank's extra memory for TempBalance on an FSDP2 model: the full weights of its own layers."""
    model = dist_worker.tiny_model()
    full = {str(i): m.weight for i, m in enumerate(model) if isinstance(m, torch.nn.Linear)}
    for r, res in enumerate(ranks["r"]):
        own = [n for n, o in zip(res["fsdp_names"], res["fsdp_owner"]) if o == r]
        assert own and sorted(res["fsdp_materialized"]) == sorted(own)
        assert res["fsdp_materialized_bytes"] == sum(full[n].numel() * 4 for n in own)
        assert res["fsdp_materialized_bytes"] < sum(w.numel() * 4 for w in full.values())
        assert res["fsdp_full_tensor_calls"] == 0  # shards go to the owner only, never to every rank


@needs_fsdp2
def test_fsdp2_optimizer_state_dict_resume(ranks):
    for res in ranks["r"]:
        assert res["fsdp_resume_lrs"] == res["fsdp_resume_applied"]  # resumed lrs re-applied unchanged
        assert res["fsdp_resume_lrs"][0] != res["fsdp_resume_lrs"][1]  # balanced, not all untuned


def test_analyze_checkpoint_on_two_ranks(ranks):
    import tbfast

    r0, r1 = ranks["r"]
    assert r0["analyze"] == r1["analyze"] and r0["analyze_values_hex"] == r1["analyze_values_hex"]
    want = tbfast.analyze(ranks["ckpt"], min_evals=0)
    got = r0["analyze"]
    assert got["name"] == list(want["name"]) and got["status"] == list(want["status"])
    assert _rel(got["alpha"], want["alpha"]) < 1e-6
    assert _rel(got["spectral_norm"], want["spectral_norm"]) < 1e-6
    for i, name in enumerate(got["name"]):  # fp64 SVD oracle
        ev = svd_eigs(ranks["sd"][f"{name}.weight"])
        assert math.isclose(got["spectral_norm"][i], ev[-1], rel_tol=1e-4)
        assert math.isclose(got["alpha"][i], ks_fit(ev)[0], rel_tol=1e-3)
    from tbfast.analyze import analyze_spectra

    # the gathered eigenvalues (every rank's full Spectra, used for --plot) equal a single-process run's
    values = np.array([float.fromhex(h) for h in r0["analyze_values_hex"]])
    single = analyze_spectra(ranks["ckpt"], min_evals=0).spectra.values.double().numpy()
    assert values.shape == single.shape and np.allclose(values, single, rtol=1e-5, atol=1e-6 * single.max())
    for res in (r0, r1):
        assert res["analyze_subgroup"] == got  # process_group=<a group>: the same split and table
        assert not res["analyze_alone_split"]  # process_group=False: each rank alone, as before
        assert _rel(res["analyze_alone"]["alpha"], want["alpha"]) < 1e-6
        assert not res["analyze_default_split"]  # process_group=None: this rank alone, no collective
        assert _rel(res["analyze_default"]["alpha"], want["alpha"]) < 1e-6
    owner = r0["analyze_owner"]
    for r, res in enumerate((r0, r1)):  # each rank read only its tensors from the file
        assert sorted(res["analyze_loaded"]) == sorted(n for n, o in zip(got["name"], owner) if o == r)


def test_hf_trainer_two_processes(ranks):
    r0, r1 = (res["hf"] for res in ranks["r"])
    if r0 is None:
        pytest.skip("transformers not installed")
    assert r0["world_size"] == 2 and r0["wrapped"] == "DistributedDataParallel"
    assert r0["checked"] == r1["checked"] == 3  # the fp64-oracle lr check ran at every step on both ranks
    assert set(r0["owner"]) == {0, 1} and r0["lrs_hex"] == r1["lrs_hex"]


def test_error_on_one_rank_reaches_every_rank(ranks):
    msgs = [res["error"] for res in ranks["r"]]
    assert all(m and "layer 'b': cannot read its tensor" in m for m in msgs)
    assert sum("(on rank" in m for m in msgs) == 1  # the other rank says where it happened
    assert [res["error_class"] for res in ranks["r"]] == ["CorruptCheckpointError"] * 2  # CLI exit code 4


def test_torchrun_cli_prints_and_writes_once(tmp_path):
    ckpt = str(tmp_path / "ck.safetensors")
    _checkpoint(ckpt)
    csv = tmp_path / "t.csv"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "tbfast", "analyze", ckpt, "--min-evals", "0", "--csv", str(csv), "--plot", str(tmp_path / "plots")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("tbfast analyze:") == 1 and p.stdout.count("wrote ") == 2  # the CSV and the plots
    assert sorted(f.name for f in (tmp_path / "plots").iterdir())[0] == "alpha_overview.png"
    assert len(list((tmp_path / "plots").iterdir())) == 1 + 5  # overview + one ESD per layer
    assert p.stdout.count("summary (mean") == 1
    import pandas as pd

    import tbfast

    got = pd.read_csv(csv)
    want = tbfast.analyze(ckpt, min_evals=0)
    assert list(got["name"]) == list(want["name"])
    assert _rel(got["alpha"], want["alpha"]) < 1e-6


# ---------------------------------------------------------------------------------------------- planner
def _matrix_layer(name: str, rows: int, cols: int):
    from tbfast.layers import Layer

    return Layer(name=name, kind="matrix", shape=(rows, cols), rows=rows, cols=cols)


def test_plan_is_lpt_and_within_four_thirds_of_the_optimum():
    import itertools

    from tbfast.distributed import layer_cost, plan, plan_loads

    sizes = [(900, 300), (500, 500), (700, 200), (400, 400), (300, 300), (256, 100), (1000, 64)]
    layers = [_matrix_layer(f"l{i}", r, c) for i, (r, c) in enumerate(sizes)]
    # the cost model, written plainly: Gram flops + weighted eigensolver flops
    from tbfast.distributed import EIG_FLOP_WEIGHT

    want_cost = [2 * max(r, c) * min(r, c) ** 2 + EIG_FLOP_WEIGHT * 4 / 3 * min(r, c) ** 3 for r, c in sizes]
    assert [layer_cost(l) for l in layers] == pytest.approx(want_cost)
    for ranks in (2, 3):
        owner = plan(layers, ranks)
        loads = plan_loads(layers, owner, ranks)
        best = min(max(sum(c for c, o in zip(want_cost, a) if o == r) for r in range(ranks))
                   for a in itertools.product(range(ranks), repeat=len(layers)))
        assert best <= max(loads) <= (4 / 3 - 1 / (3 * ranks)) * best + 1e-6  # Graham's LPT bound
        assert sum(loads) == pytest.approx(sum(want_cost))
    assert plan(layers, 1) == [0] * len(layers)
    assert sorted(set(plan(layers, 10))) == list(range(len(layers)))  # more ranks than layers: one each


def test_without_process_group_nothing_changes():
    from tbfast.distributed import active_group, is_main_process

    assert not dist.is_initialized()
    assert active_group() is None and active_group(False) is None and is_main_process()
    assert active_group(None, dist_worker.tiny_model()) is None
    with pytest.raises(RuntimeError, match="not initialised"):
        active_group(object())


def test_llama7b_projection_shapes_and_imbalance():
    from tbfast.bench.scale import llama7b_layers, project

    layers = llama7b_layers()
    assert len(layers) == 224 and all(l.gram_size == 4096 for l in layers)
    assert sum(l.rows * l.cols for l in layers) == 32 * (4 * 4096 ** 2 + 3 * 11008 * 4096)
    costs = {(4096, 4096): 2.0, (11008, 4096): 3.0, (4096, 11008): 3.0}
    total = 32 * (4 * 2.0 + 3 * 3.0)
    rows = project(layers, costs, (1, 4, 8))
    assert rows[0]["critical_path_s"] == pytest.approx(total) and rows[0]["imbalance"] == pytest.approx(0)
    for r in rows[1:]:
        n = r["ranks"]
        assert sum(r["per_rank_s"]) == pytest.approx(total)
        assert r["critical_path_s"] == pytest.approx(max(r["per_rank_s"]))
        assert r["imbalance"] == pytest.approx(max(r["per_rank_s"]) / (total / n) - 1)
        assert r["critical_path_s"] <= total / n + 3.0  # LPT: at most one matrix above the mean
