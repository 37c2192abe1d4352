"""Asynchronous TempBalance: the ESD of a weight snapshot in the background.

Oracles: the synchronous scheduler run on a model holding exactly the snapshot's weights (the
definition of "the same result for those weights"), and wall-clock ratios for the non-blocking
claim (a relative bound, not an absolute timing).
"""
import copy
import io
import statistics
import threading
import time

import pytest
import torch
from torch import nn

import tbfast
from tbfast.tempbalance import background


def _stack(n_layers=6, width=96, seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        lin = nn.Linear(width, width)
        # heavy-tailed weights so the layers get distinct alphas
        lin.weight.data = torch.distributions.StudentT(3.0).sample(lin.weight.shape) / width ** 0.5
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers)


def _train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, model[0].in_features, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _async_tb(model, momentum=0.0, **kw):
    """An asynchronous TempBalance on ``model`` and an SGD optimizer on its param groups."""
    tb = tbfast.TempBalance(model, eigs_thresh=10, asynchronous=True, **kw)
    groups, _ = tb.build_optimizer_param_group(0.1)
    return tb, torch.optim.SGD(groups, lr=0.1, momentum=momentum)


def _sync_ratios(model_state, template):
    """Synchronous TempBalance on a model holding ``model_state``: the oracle factors."""
    m = copy.deepcopy(template)
    m.load_state_dict(model_state)
    tb = tbfast.TempBalance(m, eigs_thresh=10)
    tb.update()
    return dict(tb.ratios), tb


def _gated(monkeypatch):
    """Make every background ESD wait for a gate (deterministic in-flight states); the worker's
    compute function is `background.snapshot_metrics`, bound when a snapshot is submitted."""
    gate = threading.Event()
    started = []
    inner = background.snapshot_metrics

    def compute(esd, fit, layers):
        started.append(True)
        assert gate.wait(60)
        return inner(esd, fit, layers)

    monkeypatch.setattr(background, "snapshot_metrics", compute)
    return gate, started


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.Conv2d(32, 32, 3), nn.Flatten(), nn.Linear(32 * 2 * 2, 24), nn.Linear(24, 10))


def _cnn_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(8, 3, 8, 8, generator=g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_snapshot_esd_equals_synchronous_result_exactly(kind):
    model = _stack() if kind == "linear" else _cnn()
    train = _train_step if kind == "linear" else _cnn_step
    tb, opt = _async_tb(model, momentum=0.9)
    for t in range(3):
        train(model, opt, t)
        snapshot_weights = copy.deepcopy(model.state_dict())
        tb.step(opt, 0.1)
        # the weights keep changing while the ESD of the snapshot runs
        train(model, opt, 100 + t)
        tb.synchronize()
        want, oracle = _sync_ratios(snapshot_weights, model)
        assert tb.schedule_step == tb.step_count
        assert tb.ratios == want  # exactly, not approximately
        assert torch.equal(tb.metrics.alpha, oracle.metrics.alpha)


def test_latest_mode_newest_snapshot_replaces_queued_one(monkeypatch):
    """async_lag=None: the newest finished ESD, never waiting (the pre-lag behaviour)."""
    model = _stack()
    tb, opt = _async_tb(model, async_lag=None)
    assert tb.lag == 0 and tb.schedule_step == 0
    gate, started = _gated(monkeypatch)
    weights = {}
    for t in (1, 2, 3):
        _train_step(model, opt, t)
        weights[t] = copy.deepcopy(model.state_dict())
        tb.step(opt, 0.1)
        if t == 1:  # wait until the worker holds snapshot 1, so 2 and 3 queue behind it
            for _ in range(600):
                if started:
                    break
                time.sleep(0.01)
        # nothing finished yet: the schedule is still the one of step 0
        assert tb.schedule_step == 0 and tb.lag == t
    assert tb._async.worker.in_flight_step == 3
    gate.set()
    tb.synchronize()
    # snapshot 2 was replaced by 3 while 1 was running: the newest finished ESD is step 3's
    assert tb.schedule_step == 3 and tb.lag == 0
    assert len(started) == 2
    assert tb.ratios == _sync_ratios(weights[3], model)[0]
    # the next step uses the latest finished ESD (lag 1 once the previous one is done)
    _train_step(model, opt, 4)
    tb.step(opt, 0.1)
    tb._async.worker.wait()
    _train_step(model, opt, 5)
    tb.step(opt, 0.1)
    assert tb.schedule_step == 4 and tb.lag == 1
    tb.close()


def test_state_dict_mid_flight_resumes_exactly(monkeypatch):
    model = _stack()
    tb, opt = _async_tb(model)
    gate, _ = _gated(monkeypatch)
    _train_step(model, opt, 1)
    snap = copy.deepcopy(model.state_dict())
    tb.step(opt, 0.1)  # ESD of step 1 in flight
    gate.set()
    buf = io.BytesIO()
    torch.save({"tb": tb.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert tb.schedule_step == 0  # saving waited for the ESD but did not make it current
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = _stack(seed=1)
    model2.load_state_dict(ckpt["model"])
    tb2 = tbfast.TempBalance(model2, eigs_thresh=10, asynchronous=True)
    groups2, _ = tb2.build_optimizer_param_group(0.1)
    opt2 = torch.optim.SGD(groups2, lr=0.1)
    opt2.load_state_dict(ckpt["opt"])
    tb2.load_state_dict(ckpt["tb"])
    assert tb2.step_count == tb.step_count and tb2.schedule_step == 0

    want = _sync_ratios(snap, model)[0]
    for t in (2, 3):
        _train_step(model, opt, t)
        _train_step(model2, opt2, t)
        lrs = tb.step(opt, 0.1)
        lrs2 = tb2.step(opt2, 0.1)
        assert lrs == lrs2
        if t == 2:  # both use the ESD that was in flight at the save
            assert tb.schedule_step == tb2.schedule_step == 1
            assert tb.ratios == tb2.ratios == want
        tb.synchronize()
        tb2.synchronize()
        assert tb.ratios == tb2.ratios
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    tb.close()
    tb2.close()


def test_async_step_returns_in_a_fraction_of_a_synchronous_step():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(768, 768) for _ in range(14)])
    tb_sync = tbfast.TempBalance(model, eigs_thresh=10)
    tb_async = tbfast.TempBalance(model, eigs_thresh=10, asynchronous=True)
    g1, _ = tb_sync.build_optimizer_param_group(0.1)
    g2, _ = tb_async.build_optimizer_param_group(0.1)
    opt1 = torch.optim.SGD(g1, lr=0.1)
    opt2 = torch.optim.SGD(g2, lr=0.1)
    sync_t, async_t = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        tb_sync.step(opt1, 0.1)
        sync_t.append(time.perf_counter() - t0)
    for _ in range(3):
        tb_async.synchronize()  # idle worker: time step() alone, not a competing ESD
        t0 = time.perf_counter()
        tb_async.step(opt2, 0.1)
        async_t.append(time.perf_counter() - t0)
    tb_async.synchronize()
    tb_async.close()
    assert statistics.median(async_t) <= 0.10 * min(sync_t), (async_t, sync_t)
    assert tb_async.ratios == tb_sync.ratios  # same weights (no training in between)


def test_errors_surface_in_the_caller_and_options_are_checked(monkeypatch):
    model = _stack()
    with pytest.raises(ValueError, match="metrics_fn"):
        tbfast.TempBalance(model, asynchronous=True, metrics_fn=lambda net: None)
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises((ValueError, TypeError), match="async_lag"):
            tbfast.TempBalance(model, asynchronous=True, async_lag=bad)
    tb, opt = _async_tb(model)

    def broken(esd, fit, layers):
        raise ValueError("layer '0': boom")

    monkeypatch.setattr(background, "snapshot_metrics", broken)
    tb.step(opt, 0.1)
    with pytest.raises(RuntimeError, match="background ESD failed: layer '0': boom"):
        tb.synchronize()
    tb.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_async_step_makes_no_host_sync():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)]).cuda()
    tb, opt = _async_tb(model)
    x = torch.randn(64, 256, device="cuda")
    snaps = []
    for t in range(3):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        snaps.append(copy.deepcopy(model.state_dict()))
        torch.cuda.set_sync_debug_mode("error")
        try:
            tb.step(opt, 0.1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    tb.synchronize()
    want, _ = _sync_ratios(snaps[-1], model)
    assert tb.schedule_step == 3
    assert tb.ratios == want
    tb.close()


def test_mid_flight_state_is_json_ready():
    """The HF integration stores TempBalance.state_dict() as JSON in trainer_state.json."""
    import json

    model = _stack()
    tb, opt = _async_tb(model)
    _train_step(model, opt, 1)
    snap = copy.deepcopy(model.state_dict())
    tb.step(opt, 0.1)
    state = json.loads(json.dumps(tb.state_dict()))
    tb2 = tbfast.TempBalance(copy.deepcopy(model), eigs_thresh=10, asynchronous=True)
    tb2.build_optimizer_param_group(0.1)
    tb2.load_state_dict(state)
    tb2.synchronize()
    assert tb2.schedule_step == 1
    assert tb2.ratios == _sync_ratios(snap, model)[0]
    tb.close()
    tb2.close()


# ---------------------------------------------------------------- deterministic lag (issue 19, item 7)
def _slow_worker(monkeypatch, seconds):
    """Every background ESD sleeps ``seconds`` first: the worker is late for the step that needs it."""
    inner = background.snapshot_metrics

    def slow(esd, fit, layers):
        time.sleep(seconds)
        return inner(esd, fit, layers)

    monkeypatch.setattr(background, "snapshot_metrics", slow)


def _lagged_run(steps, lag, stop_at=None, resume=None, busy_before_resume=0):
    """A seeded SGD run (momentum) with asynchronous TempBalance; every lr, schedule step, and the weights.

    ``stop_at``: return a checkpoint taken right after ``tb.step`` at that step (an ESD in flight);
    ``resume``: continue from such a checkpoint (fresh model, optimizer and TempBalance, which first
    runs ``busy_before_resume`` steps of its own, leaving ESDs in flight that the load must drop)."""
    model = _stack(seed=0 if resume is None else 7)
    tb, opt = _async_tb(model, momentum=0.9, async_lag=lag)
    for t in range(busy_before_resume):
        _train_step(model, opt, 50 + t)
        tb.step(opt, 0.1)
    first = 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        tb.load_state_dict(resume["tb"])
        first = tb.step_count + 1
    lrs, sched, weights = {}, {}, {}
    for t in range(first, steps + 1):
        _train_step(model, opt, t)
        weights[t] = copy.deepcopy(model.state_dict())
        lrs[t] = tb.step(opt, 0.1)
        sched[t] = tb.schedule_step
        if t == stop_at:
            in_flight = tb._async.worker.busy
            buf = io.BytesIO()
            torch.save({"tb": tb.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
            tb.close()
            buf.seek(0)
            return in_flight, torch.load(buf, weights_only=True)
    tb.close()
    return lrs, sched, weights, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("lag", [1, 3])
def test_esd_of_step_k_is_applied_at_exactly_step_k_plus_lag(lag, monkeypatch):
    _slow_worker(monkeypatch, 0.05)
    lrs, sched, weights, _ = _lagged_run(7, lag)
    for t in range(1, 8):
        assert sched[t] == (t - lag if t > lag else 0)
    # the factors in use at step t are the synchronous ones of the weights snapshotted at t - lag
    model = _stack()
    for t in (lag + 1, 7):
        want = _sync_ratios(weights[t - lag], model)[0]
        assert lrs[t][:-1] == [0.1 * r for r in want.values()]


@pytest.mark.parametrize("lag", [1, 2])
def test_two_asynchronous_runs_are_bitwise_identical_whatever_the_worker_speed(lag, monkeypatch):
    a = _lagged_run(8, lag)
    b = _lagged_run(8, lag)
    _slow_worker(monkeypatch, 0.3)  # the training thread now waits for every due ESD
    c = _lagged_run(8, lag)
    for other in (b, c):
        assert other[0] == a[0]  # every lr of every group at every step, exactly
        assert other[1] == a[1]
        for p, q in zip(a[3], other[3]):
            assert torch.equal(p, q)
    # and the lags made a difference: the lrs are not constant over the run
    assert len({tuple(v) for v in a[0].values()}) > 2


@pytest.mark.parametrize("lag", [1, 2])
def test_resume_with_esds_in_flight_is_bitwise_exact(lag, monkeypatch):
    _slow_worker(monkeypatch, 0.3)
    full_lrs, full_sched, _, full_w = _lagged_run(8, lag)
    in_flight, ckpt = _lagged_run(8, lag, stop_at=4)
    assert in_flight  # the checkpoint was taken with an ESD still running
    assert len(ckpt["tb"]["pending_esd"]) == lag  # the finished, not yet applied ESDs travel with it
    for busy in (0, 3):  # a fresh TempBalance, and one with ESDs of its own in flight
        # (a copy: SGD adopts the loaded momentum buffers and updates them in place)
        lrs, sched, _, w = _lagged_run(8, lag, resume=copy.deepcopy(ckpt), busy_before_resume=busy)
        assert lrs == {t: full_lrs[t] for t in range(5, 9)}
        assert sched == {t: full_sched[t] for t in range(5, 9)}
        for p, q in zip(w, full_w):
            assert torch.equal(p, q)
