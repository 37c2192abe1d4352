"""LLR / AlphaDecay-style balancing in TempBalance: refresh_every, ramp_steps, separate weight-decay
range, esd_of (gradients, an optimizer state) and the refresh history.

Oracles written plainly here: fp64 numpy SVD eigenvalues, the SPEC section 3 median Hill
estimator, the SPEC section 6 linear map, and the ramp formula of docs/TEMPBALANCE.md
(``old + (new - old) * min(1, (c - r + 1) / M)``, ``old`` = the factor in force at step ``c - 1``).
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
from torch import nn

import balancing_worker as W
import tbfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ oracles (no tbfast)
def hill_alpha(mat, xmin_pos: float = 2.0) -> float:
    """SPEC 3: eigenvalues = squared singular values (fp64), i = int(N / xmin_pos), xmin = e[i]."""
    m = np.asarray(mat.detach().double() if isinstance(mat, torch.Tensor) else mat, dtype=np.float64)
    e = np.sort(np.linalg.svd(m, compute_uv=False) ** 2)
    N = len(e)
    i = int(N / xmin_pos)
    n = N - i
    return float(1 + n / (np.sum(np.log(e[i:])) - n * np.log(e[i])))


def linear_map(alpha, lo: float, hi: float) -> np.ndarray:
    """SPEC 6 tb_linear_map at untuned lr 1: alpha from [min, max] onto [lo, hi]."""
    a = np.asarray(alpha, dtype=np.float64)
    return lo + (a - a.min()) / (a.max() - a.min()) * (hi - lo)


def ramped_factors(weights_at_refresh: dict, steps: int, ramp: int, lo: float, hi: float) -> list[np.ndarray]:
    """Factor of each tuned layer at step count 0..steps: at a refresh r the target is the linear
    map of the weights' alphas; f(c) = old + (new - old) * min(1, (c - r + 1) / ramp) with old
    the factor of step c - 1 (the first schedule at once)."""
    out, prev, old, new, r = [], None, None, None, None
    for c in range(steps + 1):
        if c in weights_at_refresh:
            target = linear_map([hill_alpha(w) for w in weights_at_refresh[c]], lo, hi)
            old, new, r = (target if prev is None else prev), target, c
        f = old + (new - old) * min(1.0, (c - r + 1) / ramp)
        out.append(f)
        prev = f
    return out


def _close(a, b, rel=1e-7) -> bool:
    return np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rel, atol=0)


# ------------------------------------------------------------------ LLR-like schedule, one process
def test_llr_schedule_matches_the_formulas_at_every_step():
    inner = W.tiny_model()
    lrs, weights = W.llr_run(inner, inner, rank=0)
    assert sorted(weights) == [0, 3, 6, 9]
    want = ramped_factors(weights, W.STEPS, W.RAMP, W.LO, W.HI)
    assert len(lrs) == W.STEPS + 1
    for c, (got, f) in enumerate(zip(lrs, want)):
        assert _close(got[:3], W.LR * f), (c, got, W.LR * f)
        assert got[3] == W.LR  # everything else at the untuned lr
        assert np.all(f >= W.LO - 1e-12) and np.all(f <= W.HI + 1e-12)
    # the ramp is really exercised: mid-ramp factors are neither the old nor the new targets
    assert not _close(want[4], want[3]) and not _close(want[4], want[6])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_llr_schedule_on_two_ddp_ranks(tmp_path):
    """Both ranks get bit-identical factors, equal to the formulas on the (shared) DDP weights;
    esd_of='grad' on DDP gives the oracle alpha of the all-reduced gradient on both ranks."""
    import torch.multiprocessing as mp

    mp.spawn(W.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert res[0]["lrs_hex"] == res[1]["lrs_hex"]
    assert set(res[0]["owner"]) == {0, 1}  # the layers were split over the ranks
    lrs = [[float.fromhex(v) for v in step] for step in res[0]["lrs_hex"]]
    want = ramped_factors(saved[0]["weights"], W.STEPS, W.RAMP, W.LO, W.HI)
    for c, (got, f) in enumerate(zip(lrs, want)):
        assert _close(got[:3], W.LR * f), (c, got)
        assert got[3] == W.LR
    names = res[0]["names"]
    for r in range(2):
        got = dict(zip(names, res[r]["grad_alpha"]))
        for i, g in zip(W.TUNED, saved[0]["grads"]):
            assert math.isclose(got[f"module.{i}"], hill_alpha(g), rel_tol=1e-7)


def test_llr_ramp_resumes_from_state_dict():
    model = W.tiny_model()
    kw = dict(lr_min_ratio=1.0, lr_max_ratio=5.0, refresh_every=2, ramp_steps=5, dtype=torch.float64)
    tb = tbfast.TempBalance(model, **kw)
    groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
    opt = torch.optim.SGD(groups, lr=0.1)
    for c in range(1, 4):  # a refresh at 2, mid-ramp at 3
        x, y = W.batch(0, c)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        tb.step(opt, 0.1)
    state = tb.state_dict()
    want = [tb.step(opt, 0.1) for _ in range(3)]  # a refresh at 4 inside the ramp of 2
    tb.close()  # one TempBalance per optimizer (tbfast.tempbalance.binding)
    tb2 = tbfast.TempBalance(model, **kw)
    tb2.load_state_dict(state)
    assert [tb2.step(opt, 0.1) for _ in range(3)] == want


# ------------------------------------------------------------------ separate weight-decay range
def test_weight_decay_range_independent_of_lr_range():
    model = W.tiny_model()
    tb = tbfast.TempBalance(model, balance="both", lr_min_ratio=1.0, lr_max_ratio=5.0, wd_min_ratio=0.67,
                            wd_max_ratio=3.0, dtype=torch.float64)
    groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.01)
    tb.step(opt, 0.1)
    alpha = [hill_alpha(model[i].weight) for i in W.TUNED]
    g = opt.param_groups
    assert _close([g[j]["lr"] for j in range(3)], 0.1 * linear_map(alpha, 1.0, 5.0))
    assert _close([g[j]["weight_decay"] for j in range(3)], 0.01 * linear_map(alpha, 0.67, 3.0))
    assert g[3]["lr"] == 0.1 and g[3]["weight_decay"] == 0.01
    rec = tb.history[-1]
    assert _close(list(rec["wd_factor"].values()), linear_map(alpha, 0.67, 3.0))
    # default: the weight decay follows the lr range (the behaviour before wd_min_ratio existed)
    tb = tbfast.TempBalance(model, balance="both", lr_min_ratio=1.0, lr_max_ratio=5.0, dtype=torch.float64)
    groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.01)
    tb.step(opt, 0.1)
    assert _close([opt.param_groups[j]["weight_decay"] for j in range(3)], 0.01 * linear_map(alpha, 1.0, 5.0))


def test_alphadecay_balances_only_the_weight_decay():
    model = W.tiny_model()
    tb = tbfast.TempBalance(model, balance="weight_decay", wd_min_ratio=0.67, wd_max_ratio=3.0, dtype=torch.float64)
    groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)
    tb.step(opt, 0.1)
    alpha = [hill_alpha(model[i].weight) for i in W.TUNED]
    assert [g["lr"] for g in opt.param_groups] == [0.1] * 4
    assert _close([g["weight_decay"] for g in opt.param_groups[:3]], 0.1 * linear_map(alpha, 0.67, 3.0))
    rec = tb.history[-1]
    assert "lr_factor" not in rec and _close(list(rec["wd_factor"].values()), linear_map(alpha, 0.67, 3.0))


def test_weight_decay_factors_ramp_like_the_lr_factors():
    """refresh every step, ramp 2: at step 1 both factors are half-way from the build's targets."""
    model = W.tiny_model()
    tb = tbfast.TempBalance(model, balance="both", lr_min_ratio=1.0, lr_max_ratio=5.0, wd_min_ratio=0.67,
                            wd_max_ratio=3.0, ramp_steps=2, dtype=torch.float64)
    a0 = [hill_alpha(model[i].weight) for i in W.TUNED]
    groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
    assert _close([g["lr"] for g in groups[:3]], 0.1 * linear_map(a0, 1.0, 5.0))  # the first schedule: at once
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=0.01)
    x, y = W.batch(0, 1)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    a1 = [hill_alpha(model[i].weight) for i in W.TUNED]
    tb.step(opt, 0.1)
    for lo, hi, key, base in ((1.0, 5.0, "lr", 0.1), (0.67, 3.0, "weight_decay", 0.01)):
        old, new = linear_map(a0, lo, hi), linear_map(a1, lo, hi)
        assert _close([g[key] for g in opt.param_groups[:3]], base * (old + (new - old) / 2)), key
    tb.step(opt, 0.1)  # step 2 refreshes again: half-way from the step-1 factors to the new targets
    a2 = [hill_alpha(model[i].weight) for i in W.TUNED]
    prev = linear_map(a0, 1.0, 5.0) + (linear_map(a1, 1.0, 5.0) - linear_map(a0, 1.0, 5.0)) / 2
    new = linear_map(a2, 1.0, 5.0)
    assert _close([g["lr"] for g in opt.param_groups[:3]], 0.1 * (prev + (new - prev) / 2))


# ------------------------------------------------------------------ esd_of
def test_esd_of_grad_is_the_gradient_alpha():
    model = W.tiny_model()
    tb = tbfast.TempBalance(model, esd_of="grad", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer '0' has no gradient for esd_of='grad'"):
        tb.update()
    x, y = W.batch(0, 1, n=256)
    nn.functional.mse_loss(model(x), y).backward()
    tb.update()
    alpha = dict(zip(tb.metrics.names, tb.metrics.alpha.tolist()))
    for i in W.TUNED:
        assert math.isclose(alpha[str(i)], hill_alpha(model[i].weight.grad), rel_tol=1e-7)
        assert not math.isclose(alpha[str(i)], hill_alpha(model[i].weight), rel_tol=1e-3)
    assert _close(list(tb.ratios.values()), linear_map([alpha[str(i)] for i in W.TUNED], 0.5, 1.5))


def test_esd_of_exp_avg_reads_the_optimizer_state():
    model = W.tiny_model()
    tb = tbfast.TempBalance(model, esd_of="exp_avg", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"esd_of='exp_avg' reads the optimizer's state, but no optimizer"):
        tb.build_optimizer_param_group(0.01)
    # start_step=1: the layout comes from the weights, the first active ESD from Adam's exp_avg
    tb = tbfast.TempBalance(model, esd_of="exp_avg", start_step=1, ramp_steps=3, dtype=torch.float64)
    groups, _ = tb.build_optimizer_param_group(0.01)
    opt = torch.optim.Adam(groups, lr=0.01)
    with pytest.raises(ValueError, match=r"layer '0' has no optimizer state 'exp_avg' yet \(Adam holds nothing"):
        tb.set_step(1)
        tb.apply(opt)
        tb.update()
    tb.set_step(0)
    x, y = W.batch(0, 1, n=256)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    lrs = tb.step(opt)  # first active step: ESD of exp_avg, ramped in from the untuned factor 1.0
    m = [opt.state[model[i].weight]["exp_avg"] for i in W.TUNED]
    alpha = [hill_alpha(t) for t in m]
    got = [tb.metrics.alpha[tb.metrics.names.index(str(i))] for i in W.TUNED]
    assert _close(got, alpha)
    target = linear_map(alpha, 0.5, 1.5)
    assert _close(list(tb.ratios.values()), target)
    assert _close(lrs[:3], 0.01 * (1.0 + (target - 1.0) / 3))
    assert tb.history[0]["esd_of"] == "weight" and not tb.history[0]["active"]  # the layout-only ESD
    assert tb.history[-1]["esd_of"] == "exp_avg" and tb.history[-1]["active"]


def test_esd_of_reads_the_bound_optimizer_through_a_wrapper_and_close_lets_go():
    """The optimizer esd_of reads is the one TempBalance holds (tbfast.tempbalance.binding): the torch
    optimizer inside a wrapper given to step (the wrapper itself may be gone), none after close()."""
    import gc

    class Wrapper:  # Lightning-style: holds the torch optimizer as ._optimizer, shares its groups
        def __init__(self, opt):
            self._optimizer, self.param_groups = opt, opt.param_groups

    model = W.tiny_model()
    tb = tbfast.TempBalance(model, esd_of="exp_avg", start_step=1, dtype=torch.float64)
    groups, _ = tb.build_optimizer_param_group(0.01)
    opt = torch.optim.Adam(groups, lr=0.01)
    x, y = W.batch(0, 1, n=256)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    tb.step(Wrapper(opt))  # the wrapper is garbage right after this call
    gc.collect()
    tb.update()  # reads opt's exp_avg although the wrapper is gone
    alpha = [hill_alpha(opt.state[model[i].weight]["exp_avg"]) for i in W.TUNED]
    assert _close([tb.metrics.alpha[tb.metrics.names.index(str(i))] for i in W.TUNED], alpha)
    tb.close()
    with pytest.raises(ValueError, match=r"esd_of='exp_avg' reads the optimizer's state, but no optimizer"):
        tb.update()
    tb.step(opt)  # given again: bound and read again
    assert _close(list(tb.ratios.values()), linear_map(alpha, 0.5, 1.5))
    tb.close()


# ------------------------------------------------------------------ history and options
def test_a_scheduler_bound_to_an_optimizer_still_pickles():
    import pickle

    model = W.tiny_model()
    tb = tbfast.TempBalance(model, ramp_steps=3)
    groups, _ = tb.build_optimizer_param_group(0.1)
    opt = torch.optim.SGD(groups, lr=0.1)
    tb.step(opt, 0.1)
    tb2 = pickle.loads(pickle.dumps(tb))
    assert tb2.ratios == tb.ratios and tb2.history == tb.history and tb2.history.count == tb.history.count


def test_history_is_bounded_and_holds_oracle_alphas():
    model = W.tiny_model()
    tb = tbfast.TempBalance(model, history_size=2, dtype=torch.float64)
    groups, _ = tb.build_optimizer_param_group(0.1)
    opt = torch.optim.SGD(groups, lr=0.1)
    for c in range(1, 4):
        x, y = W.batch(0, c)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        tb.step(opt, 0.1)
    assert len(tb.history) == 2 and tb.history.count == 4
    assert [r["refresh"] for r in tb.history] == [3, 4] and [r["step"] for r in tb.history] == [2, 3]
    rec = tb.history[-1]
    alpha = [hill_alpha(model[i].weight) for i in W.TUNED]
    assert _close([rec["alpha"][str(i)] for i in W.TUNED], alpha)
    assert _close(list(rec["lr_factor"].values()), linear_map(alpha, 0.5, 1.5))
    assert "wd_factor" not in rec and "history" not in tb.state_dict()


@pytest.mark.parametrize("kw, msg", [
    (dict(ramp_steps=-1), "ramp_steps must be an integer >= 0, got -1"),
    (dict(refresh_every=0), "refresh_every must be an integer >= 1, got 0"),
    (dict(history_size=1.5), "history_size must be an integer >= 0, got 1.5"),
    (dict(esd_of="hessian"), "esd_of must be one of"),
    (dict(wd_min_ratio=0.5), "wd_min_ratio sets the weight-decay factor range; it needs balance="),
    (dict(balance="both", wd_min_ratio=2.0, wd_max_ratio=1.0), "wd_min_ratio must be <= wd_max_ratio, got 2.0 > 1.0"),
    (dict(balance="both", wd_max_ratio=float("nan")), "wd_max_ratio must be None or a finite number >= 0"),
    (dict(esd_of="grad", asynchronous=True), "esd_of='grad' cannot be combined with asynchronous=True"),
])
def test_balancing_options_are_validated(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        tbfast.TempBalance(W.tiny_model(), **kw)
    assert "\n" not in str(e.value)


def test_llr_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "llr_balancing.py")], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "refresh" in p.stdout and "max |factor - formula|" in p.stdout
