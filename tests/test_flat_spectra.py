"""Flat (degenerate) ESD tails: flagged in analyze and TempBalance, numbers kept (issue 9 item 7).

Oracles: eigenvalues from an fp64 SVD with the SPEC median Hill formula written here, the
WeightWatcher warning thresholds, the TB linear-map formula written here, and the reference
TempBalance of tbfast.bench.reference. The flatness criterion is the documented one: the tail's
mean log-spread ``mean_i ln(lambda_i / xmin)`` is at most 1e-3.
"""
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

import tbfast
from tbfast.bench.reference import ReferenceTempBalance

FLAT_SPREAD = 1e-3  # the documented bound on the tail's mean log-spread
LO, HI = 0.5, 1.5


def oracle_tail(weight, xmin_pos=2.0):
    """(Hill alpha, mean log-spread of the tail) from an fp64 SVD, SPEC median fit."""
    e = np.sort((torch.linalg.svdvals(weight.detach().double()) ** 2).numpy())
    i = int(len(e) / xmin_pos)
    spread = float(np.mean(np.log(e[i:] / e[i])))
    alpha = 1 + (len(e) - i) / float(np.sum(np.log(e[i:])) - (len(e) - i) * np.log(e[i]))
    return alpha, spread


def linear_with_eigs(evals, seed):
    """A square Linear whose Gram eigenvalues are ``evals`` (random orthogonal U, V)."""
    g = torch.Generator().manual_seed(seed)
    n = len(evals)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w = u @ torch.diag(torch.as_tensor(evals, dtype=torch.float64).sqrt()) @ v.T
    lin = nn.Linear(n, n, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


class Net(nn.Module):
    """fc0 .. fc{n-1}, 128 x 128, the ones in ``orthogonal`` orthogonally initialised."""

    def __init__(self, n=5, orthogonal=(2,), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        for k in range(n):
            lin = nn.Linear(128, 128)
            if k in orthogonal:
                nn.init.orthogonal_(lin.weight)
            setattr(self, f"fc{k}", lin)
        self.n = n

    def forward(self, x):
        for k in range(self.n):
            x = getattr(self, f"fc{k}")(x)
        return x


# ----------------------------------------------------------------------------- analyze
@pytest.mark.parametrize("spread_target,flat", [(0.5e-3, True), (2e-3, False)])
def test_criterion_at_the_documented_bound(spread_target, flat):
    # tail eigenvalues 1 + c * t, t in [0, 1]: the mean log-spread of the tail is about c / 2
    n = 128
    evals = np.concatenate([np.linspace(0.1, 0.9, n // 2), 1 + 2 * spread_target * np.linspace(0, 1, n // 2)])
    lin = linear_with_eigs(evals, seed=3)
    alpha, spread = oracle_tail(lin.weight)
    assert (spread <= FLAT_SPREAD) == flat  # the construction lands on the intended side
    d = tbfast.analyze(lin, fit="median", dtype=torch.float64)
    row = d.iloc[0]
    assert row["status"] == "ok"
    assert row["alpha"] == pytest.approx(alpha, rel=1e-6)  # the reference's number is kept
    assert row["warning"] == ("flat-spectrum" if flat else "under-trained")


def test_analyze_flags_orthogonal_layer():
    net = Net()
    d = tbfast.analyze(net, fit="median")
    for row in d.itertuples(index=False):
        lin = getattr(net, row.name)
        alpha, spread = oracle_tail(lin.weight)
        assert row.status == "ok"
        if row.name == "fc2":
            assert spread < 1e-6  # orthogonal: every eigenvalue is 1
            assert math.isfinite(row.alpha) and row.alpha > 1 + 1 / FLAT_SPREAD  # huge, kept, not NaN
            assert row.warning == "flat-spectrum"
        else:
            assert row.alpha == pytest.approx(alpha, rel=1e-4)
            # normal layers keep WeightWatcher's labels
            assert row.warning == ("over-trained" if alpha < 2 else "under-trained" if alpha > 6 else "")


# ----------------------------------------------------------------------------- TempBalance
def _records(caplog):
    return [r for r in caplog.records if r.name.startswith("tbfast.tempbalance") and r.levelno == logging.WARNING]


def test_tempbalance_keep_warns_and_keeps_reference_lrs(caplog):
    net = Net()
    tb = tbfast.TempBalance(net, eigs_thresh=10)  # flat_policy='keep' by default
    with caplog.at_level(logging.WARNING, logger="tbfast.tempbalance"):
        groups, count = tb.build_optimizer_param_group(untuned_lr=0.1)
        recs = _records(caplog)
        assert len(recs) == 1  # one warning per ESD, naming the flat layer only
        msg = recs[0].getMessage()
        assert "fc2" in msg and "fc1" not in msg and "fc3" not in msg
        tb.update()
        assert len(_records(caplog)) == 2
    assert tb.flat_layers == ["fc2"]
    # same lrs as the reference scheduler: the flat layer's alpha ~1e6 pushes the others to lr_min
    ref = ReferenceTempBalance(net, eigs_thresh=10).layer_lrs(0.1)
    assert count == 3
    for (name, lr) in tb.layer_lrs.items():
        assert lr == pytest.approx(ref[name], rel=1e-4), name
    assert tb.layer_lrs["fc2"] == pytest.approx(0.1 * HI)
    assert tb.layer_lrs["fc1"] == pytest.approx(0.1 * LO, rel=1e-4)


def test_tempbalance_no_warning_without_flat_layer(caplog):
    with caplog.at_level(logging.WARNING, logger="tbfast.tempbalance"):
        tb = tbfast.TempBalance(Net(orthogonal=()), eigs_thresh=10)
        tb.update()
    assert _records(caplog) == [] and tb.flat_layers == []


@pytest.mark.parametrize("normalize", [False, True])
def test_tempbalance_untuned_policy(normalize):
    net = Net(n=6)
    tb = tbfast.TempBalance(net, eigs_thresh=10, flat_policy="untuned", normalize=normalize)
    groups, count = tb.build_optimizer_param_group(untuned_lr=0.1)
    # oracle: TB linear map over the non-flat tuned layers only (fc1, fc3, fc4), then normalisation
    names = ["fc1", "fc3", "fc4"]
    a = np.array([oracle_tail(getattr(net, n).weight)[0] for n in names])
    f = LO + (a - a.min()) / (a.max() - a.min()) * (HI - LO)
    if normalize:
        f = f / f.mean()
    want = dict(zip(names, 0.1 * f))
    want["fc2"] = 0.1  # the flat layer stays at the untuned lr
    by_param = {id(p): n.split(".")[0] for n, p in net.named_parameters()}
    assert count == 4
    for g in groups[:count]:
        layer = by_param[id(g["params"][0])]
        assert g["lr"] == pytest.approx(want[layer], rel=1e-4), layer
    assert groups[-1]["lr"] == 0.1


class Blocks(nn.Module):
    """blocks.{0,1,2}.{a,b}: block 1 has one flat layer, block 2 only flat layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList()
        for b in range(3):
            blk = nn.Module()
            blk.a, blk.b = nn.Linear(128, 128), nn.Linear(128, 128)
            blk.ln = nn.LayerNorm(128)
            self.blocks.append(blk)
        for lin in (self.blocks[1].a, self.blocks[2].a, self.blocks[2].b):
            nn.init.orthogonal_(lin.weight)


def test_tempbalance_untuned_policy_blocks():
    net = Blocks()
    tb = tbfast.TempBalance(net, eigs_thresh=10, granularity="block", flat_policy="untuned",
                            remove_first_layer=False, remove_last_layer=False)
    groups, count = tb.build_optimizer_param_group(untuned_lr=1.0)
    assert sorted(tb.flat_layers) == ["blocks.1.a", "blocks.2.a", "blocks.2.b"]
    # block scores without the flat layers: block 0 = mean(a, b), block 1 = b alone
    m0 = np.mean([oracle_tail(net.blocks[0].a.weight)[0], oracle_tail(net.blocks[0].b.weight)[0]])
    m1 = oracle_tail(net.blocks[1].b.weight)[0]
    want = {0: HI if m0 > m1 else LO, 1: LO if m0 > m1 else HI, 2: 1.0}
    block_of = {id(p): int(n.split(".")[1]) for n, p in net.named_parameters()}
    assert count == 3
    for g in groups[:count]:
        b = block_of[id(g["params"][0])]
        assert len(g["params"]) == 6  # a, b and the LayerNorm (weight + bias each) follow the block lr
        assert g["lr"] == pytest.approx(want[b], rel=1e-9), b


def test_flat_policy_validated():
    with pytest.raises(ValueError, match="flat_policy"):
        tbfast.TempBalance(Net(), flat_policy="drop")


def test_tempbalance_untuned_policy_layer_in_block():
    net = Blocks()
    tb = tbfast.TempBalance(net, eigs_thresh=10, granularity="layer_in_block", flat_policy="untuned",
                            remove_first_layer=False, remove_last_layer=False)
    groups, count = tb.build_optimizer_param_group(untuned_lr=1.0)
    a = {n: oracle_tail(m.weight)[0] for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    m0, m1 = (a["blocks.0.a"] + a["blocks.0.b"]) / 2, a["blocks.1.b"]
    block = {0: HI if m0 > m1 else LO, 1: LO if m0 > m1 else HI, 2: 1.0}
    big0 = "blocks.0.a" if a["blocks.0.a"] > a["blocks.0.b"] else "blocks.0.b"
    want = {
        # inside block 0: the two layers span [LO, HI] x the block lr
        "blocks.0.a": (HI if big0 == "blocks.0.a" else LO) * block[0],
        "blocks.0.b": (HI if big0 == "blocks.0.b" else LO) * block[0],
        "blocks.1.b": (LO + HI) / 2 * block[1],  # the only non-flat layer of block 1: the middle
        "blocks.1.a": 1.0, "blocks.2.a": 1.0, "blocks.2.b": 1.0,  # flat: untuned
        "blocks.0.ln": block[0], "blocks.1.ln": block[1], "blocks.2.ln": 1.0,  # other block params
    }
    owner = {id(p): n.rsplit(".", 1)[0] for n, p in net.named_parameters()}
    seen = set()
    for g in groups[:count]:
        layer = owner[id(g["params"][0])]
        seen.add(layer)
        assert g["lr"] == pytest.approx(want[layer], rel=1e-9), layer
    assert seen == set(want)
