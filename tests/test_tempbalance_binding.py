"""TempBalance attaches only to the optimizers it is given, and lets go of them (issue 19 item 3).

Oracles: torch's own hook registries (process-wide and per optimizer) must stay empty / return
to empty; an untuned twin optimizer with the same scheduler gives the scheduler's lr; the
factors are ``tb_linear_map`` of the alphas handed to TempBalance, written plainly in
`test_lr_schedulers.CyclingTable.factors`.
"""
import gc
import math
import weakref

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs
from torch.optim import optimizer as torch_optimizer

from tbfast import TempBalance
from test_lr_schedulers import CyclingTable  # metrics_fn: scripted alphas, factors by the tb_linear_map formula

LR = 0.1


def mlp(seed=0, width=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                         nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))


SETS_A = [[2.0, 2.5, 4.0, 6.0, 3.0], [5.0, 6.0, 2.0, 3.0, 4.0]]
SETS_B = [[3.0, 7.0, 2.0, 4.0, 3.0], [3.0, 2.0, 3.0, 9.0, 3.0]]


def global_hooks():
    return len(torch_optimizer._global_optimizer_pre_hooks) + len(torch_optimizer._global_optimizer_post_hooks)


def own_hooks(opt):
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def train_step(model, opt, seed=0):
    torch.manual_seed(seed)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def no_tempbalance_keys(opt):
    return all(not str(k).startswith("tb_") and k != "tempbalance" for g in opt.param_groups for k in g)


def setup(seed=0, sets=SETS_A, sched=lambda o: lrs.ExponentialLR(o, 0.9)):
    model = mlp(seed)
    table = CyclingTable(model, sets)
    tb = TempBalance(model, metrics_fn=table)
    groups, _ = tb.build_optimizer_param_group(LR)
    opt = torch.optim.SGD(groups, lr=LR)
    twin = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]} for _ in groups], lr=LR)
    return model, table, tb, opt, sched(opt), twin, sched(twin)


def test_no_process_wide_hooks_and_a_stranger_is_untouched():
    assert global_hooks() == 0
    model, table, tb, opt, sched, twin, tsched = setup()
    stranger = nn.Linear(4, 4)
    sopt = torch.optim.SGD(stranger.parameters(), lr=0.01)
    for t in range(4):
        train_step(model, opt, t)
        sched.step()
        tb.step(opt) if t % 2 else tb.apply(opt)
        stranger(torch.randn(2, 4)).sum().backward()
        sopt.param_groups[0]["lr"] = 0.01 * (t + 1)  # the user's own lr
        sopt.step()
        assert sopt.param_groups[0]["lr"] == 0.01 * (t + 1)
    assert global_hooks() == 0  # nothing process-wide, ever
    assert own_hooks(sopt) == 0 and no_tempbalance_keys(sopt)
    assert own_hooks(opt) == 2  # the bound optimizer's own pre / post step hooks
    tb.close()


def _check_released(opt, sched, twin, tsched, model):
    assert own_hooks(opt) == 0 and global_hooks() == 0
    assert no_tempbalance_keys(opt)
    # the user sets lrs: a step leaves them alone
    for i, g in enumerate(opt.param_groups):
        g["lr"] = 0.02 * (i + 1)
    train_step(model, opt, 50)
    assert [g["lr"] for g in opt.param_groups] == [0.02 * (i + 1) for i in range(len(opt.param_groups))]
    # the scheduler goes on from them: multiplies by 0.9 per step, untouched by any step
    for t in range(3):
        sched.step()
        before = [g["lr"] for g in opt.param_groups]
        assert before == pytest.approx([0.02 * (i + 1) * 0.9 ** (t + 1) for i in range(len(before))], rel=1e-12)
        train_step(model, opt, 60 + t)
        assert [g["lr"] for g in opt.param_groups] == before


@pytest.mark.parametrize("how", ["close", "del"])
def test_close_and_garbage_collection_detach(how):
    model, table, tb, opt, sched, twin, tsched = setup()
    for t in range(3):
        train_step(model, opt, t)
        twin.step()
        sched.step()
        tsched.step()
        tb.step(opt)
    train_step(model, opt, 9)  # a step: the follow groups hold the untuned lr now
    twin.step()
    want = [tg["lr"] * f for tg, f in zip(twin.param_groups, table.factors())]
    ref = weakref.ref(tb)
    if how == "close":
        tb.close()
        tb.close()  # idempotent
    else:
        del tb
        gc.collect()
        assert ref() is None  # no hook keeps the scheduler alive
    # what stays: every group at the lr its next step would have had (scheduler lr x factor)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-12)
    _check_released(opt, sched, twin, tsched, model)


def test_garbage_collection_before_the_optimizer_was_seen():
    """Groups from build_optimizer_param_group: balanced before TempBalance sees the optimizer,
    left alone once the TempBalance is gone."""
    model, table, tb, opt, sched, twin, tsched = setup(sched=lambda o: lrs.LambdaLR(o, lambda e: 1 / (1 + e)))
    factors = table.factors()
    for g in opt.param_groups:  # LambdaLR wrote the untuned lr
        assert g["lr"] == pytest.approx(LR)
    train_step(model, opt, 0)  # the first step is balanced (a gradient hook of TempBalance ran before it)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR * f for f in factors], rel=1e-12)
    sched.step()
    ref = weakref.ref(tb)
    del tb
    gc.collect()
    assert ref() is None and global_hooks() == 0 and no_tempbalance_keys(opt)
    for g in opt.param_groups:
        g["lr"] = 0.07
    train_step(model, opt, 1)
    assert [g["lr"] for g in opt.param_groups] == [0.07] * len(opt.param_groups)


def test_two_optimizers_two_tempbalances_do_not_interfere():
    a = setup(0, SETS_A)
    b = setup(1, SETS_B, sched=lambda o: lrs.CosineAnnealingLR(o, T_max=6, eta_min=0.01))
    for t in range(6):
        for model, table, tb, opt, sched, twin, tsched in (a, b):
            train_step(model, opt, t)
            twin.step()
            sched.step()
            tsched.step()
            tb.step(opt) if t % 2 else tb.apply(opt)
        for model, table, tb, opt, sched, twin, tsched in (a, b):
            want = [tg["lr"] * f for tg, f in zip(twin.param_groups, table.factors())]
            assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-9), t
    assert a[1].factors() != b[1].factors()
    with pytest.raises(ValueError, match="already bound to another TempBalance"):
        b[2].bind(a[3])
    a[2].close()
    _check_released(a[3], a[4], a[5], a[6], a[0])
    assert own_hooks(b[3]) == 2  # the other one is still bound
    b[2].close()
    assert own_hooks(b[3]) == 0 and global_hooks() == 0


def test_what_group_lr_reads_and_get_last_lr():
    """After tb.apply: scheduler lr x factor; after optimizer.step: the untuned (scheduler) lr;
    after the scheduler's step: its new lr; get_last_lr(): the lr each group steps with."""
    model, table, tb, opt, sched, twin, tsched = setup()
    tb.bind(opt)
    # groups fresh from build_optimizer_param_group keep the balanced lr through a step (the original's)
    train_step(model, opt, 99)
    twin.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR * f for f in table.factors()], rel=1e-12)
    tb.apply(opt)  # from here on the groups follow the scheduler
    for t in range(3):
        train_step(model, opt, t)
        twin.step()
        untuned = [tg["lr"] for tg in twin.param_groups]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(untuned, rel=1e-12)
        sched.step()
        tsched.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([tg["lr"] for tg in twin.param_groups], rel=1e-12)
        want = [tg["lr"] * f for tg, f in zip(twin.param_groups, table.factors())]
        assert tb.get_last_lr() == pytest.approx(want, rel=1e-12)
        tb.apply(opt)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-12)
        assert sched.get_last_lr() == pytest.approx([tg["lr"] for tg in twin.param_groups], rel=1e-12)
    tb.close()
    assert global_hooks() == 0


def test_pickled_scheduler_binds_on_its_own():
    import pickle

    model = mlp()
    tb = TempBalance(model, metrics_fn=CyclingTable(model, SETS_A))
    tb2 = pickle.loads(pickle.dumps(tb))
    groups, _ = tb2.build_optimizer_param_group(LR)
    opt = torch.optim.SGD(groups, lr=LR)
    tb2.apply(opt)
    assert own_hooks(opt) == 2
    tb2.close()
    assert own_hooks(opt) == 0 and no_tempbalance_keys(opt)
    assert math.isclose(opt.param_groups[-1]["lr"], LR)


@pytest.mark.parametrize("name", ["LambdaLR", "ExponentialLR", "CosineAnnealingLR", "StepLR", "ReduceLROnPlateau",
                                  "SequentialLR", "ChainedConstantExponential", "hf_cosine"])
def test_bound_up_front_every_step_uses_scheduler_lr_times_factor(name):
    """tb.bind(opt) right after building optimizer and scheduler: every step (plain SGD, so the
    update is lr x grad) uses the untuned twin's lr x the current factor; ESD every 4 steps. (OneCycleLR
    cycles SGD's momentum, so it is checked on the lrs only, in test_lr_schedulers.)"""
    from test_lr_schedulers import SCHEDULERS, step_scheduler, untuned_twin

    factory, how = SCHEDULERS[name]
    model = mlp().double()
    table = CyclingTable(model)
    tb = TempBalance(model, metrics_fn=table)
    groups, _ = tb.build_optimizer_param_group(LR)
    opt = torch.optim.SGD(groups, lr=LR)
    sched = factory(opt)
    tb.bind(opt)
    twin = untuned_twin(groups)
    twin_sched = factory(twin)
    for t in range(12):
        want = [tg["lr"] * f for tg, f in zip(twin.param_groups, table.factors())]
        model(torch.randn(4, 8, dtype=torch.float64)).pow(2).mean().backward()
        before = [g["params"][0].detach().clone() for g in opt.param_groups]
        grads = [g["params"][0].grad.clone() for g in opt.param_groups]
        opt.step()
        opt.zero_grad()
        for gi, g in enumerate(opt.param_groups):
            i = grads[gi].abs().argmax()
            eff = float((before[gi].flatten()[i] - g["params"][0].detach().flatten()[i]) / grads[gi].flatten()[i])
            assert math.isclose(eff, want[gi], rel_tol=1e-9), (name, t, gi, eff, want[gi])
        twin.step()
        step_scheduler(sched, how)
        step_scheduler(twin_sched, how)
        if t % 4 == 3:
            tb.step(opt)
    tb.close()
    assert own_hooks(opt) == 0 and global_hooks() == 0


def _scheduler_names():
    from test_lr_schedulers import SCHEDULERS

    return list(SCHEDULERS)


@pytest.mark.parametrize("name", _scheduler_names())
def test_bound_up_front_lr_is_scheduler_lr_times_factor(name):
    """The 15 schedules of test_lr_schedulers with tb.bind(opt) before the first step."""
    from test_lr_schedulers import SCHEDULERS, step_scheduler, train_step, untuned_twin

    factory, how = SCHEDULERS[name]
    model = mlp()
    table = CyclingTable(model)
    tb = TempBalance(model, metrics_fn=table)
    groups, _ = tb.build_optimizer_param_group(LR)
    opt = torch.optim.SGD(groups, lr=LR)
    sched = factory(opt)
    tb.bind(opt)
    twin = untuned_twin(groups)
    twin_sched = factory(twin)
    for t in range(14):
        train_step(model, opt)
        twin.step()
        step_scheduler(sched, how)
        step_scheduler(twin_sched, how)
        tb.step(opt) if t % 3 == 2 else tb.apply(opt)
        want = [tg["lr"] * f for tg, f in zip(twin.param_groups, table.factors())]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(want, rel=1e-9, abs=1e-15), (name, t)
