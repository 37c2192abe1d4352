"""TempBalance factors on top of torch / Hugging Face lr schedulers (``tb.step(opt)`` / ``tb.apply(opt)``).

Oracle: the same scheduler run on an identical optimizer without TempBalance (the untuned lr
trajectory) times the factor that ``tb_linear_map`` gives, written plainly below from the alphas
the ESD table handed to TempBalance. The alphas change at every ESD, so a factor that is not
divided out of the scheduler's lr (or is divided out in the wrong frame) shows up at once.
"""
import copy
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from tbfast import TempBalance

LR = 0.1
LO, HI = 0.5, 1.5  # TempBalance's default lr_min_ratio / lr_max_ratio
# alphas handed to TempBalance at successive ESDs (5 layers; the first and last are not tuned)
ALPHA_SETS = [
    [2.0, 2.5, 4.0, 6.0, 3.0],
    [5.0, 6.0, 2.0, 3.0, 4.0],
    [3.0, 3.5, 5.5, 2.2, 2.0],
    [4.0, 2.0, 2.0001, 7.0, 2.0],
]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


class CyclingTable:
    """metrics_fn: the next alpha set at every call (independent of tbfast's ESD)."""

    def __init__(self, model, sets=ALPHA_SETS, calls=0):
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.sets, self.calls = sets, calls
        self.alpha = None

    def __call__(self, net):
        self.alpha = list(self.sets[self.calls % len(self.sets)])
        self.calls += 1
        return self

    def __getitem__(self, key):
        if key == "alpha":
            return self.alpha
        if key == "num_evals":
            return [100] * len(self.names)
        raise KeyError(key)

    def factors(self):
        """tb_linear_map: alpha mapped linearly from [min, max] onto [LO, HI]; one per optimizer group."""
        tuned = self.alpha[1:-1]
        lo, hi = min(tuned), max(tuned)
        return [LO + (a - lo) / (hi - lo) * (HI - LO) for a in tuned] + [1.0]


def hf():
    return pytest.importorskip("transformers")


# (name, factory(optimizer) -> scheduler, how to step it)
SCHEDULERS = {
    "ExponentialLR": (lambda o: lrs.ExponentialLR(o, 0.9), None),
    "CosineAnnealingLR": (lambda o: lrs.CosineAnnealingLR(o, T_max=7, eta_min=0.002), None),
    "StepLR": (lambda o: lrs.StepLR(o, step_size=3, gamma=0.5), None),
    "MultiplicativeLR": (lambda o: lrs.MultiplicativeLR(o, lambda e: 0.93), None),
    "LambdaLR": (lambda o: lrs.LambdaLR(o, lambda e: 1.0 / (1.0 + 0.3 * e)), None),
    "OneCycleLR": (lambda o: lrs.OneCycleLR(o, max_lr=0.2, total_steps=14), None),
    "ReduceLROnPlateau": (lambda o: lrs.ReduceLROnPlateau(o, factor=0.5, patience=1, min_lr=1e-4), "plateau"),
    "SequentialLR": (lambda o: lrs.SequentialLR(o, [lrs.LinearLR(o, 0.1, total_iters=3), lrs.ExponentialLR(o, 0.8)],
                                                milestones=[4]), None),
    "ChainedScheduler": (lambda o: lrs.ChainedScheduler([lrs.ExponentialLR(o, 0.9), lrs.StepLR(o, 4, 0.5)]), None),
    "LinearLR": (lambda o: lrs.LinearLR(o, 0.2, total_iters=5), None),
    "ChainedConstantExponential": (lambda o: lrs.ChainedScheduler([lrs.ConstantLR(o, 0.25, total_iters=4),
                                                                   lrs.ExponentialLR(o, 0.9)]), None),
    "ChainedPlusPlateau": (lambda o: (lrs.CosineAnnealingLR(o, T_max=10), lrs.ReduceLROnPlateau(o, factor=0.5, patience=1)),
                           "both"),
    "hf_linear": (lambda o: hf().get_linear_schedule_with_warmup(o, 3, 14), None),
    "hf_cosine": (lambda o: hf().get_cosine_schedule_with_warmup(o, 3, 14), None),
    "hf_plateau": (lambda o: hf().get_reduce_on_plateau_schedule(o, factor=0.5, patience=1), "plateau"),
}


def step_scheduler(sched, how):
    if how == "plateau":
        sched.step(1.0)  # never improves: the lr is cut every patience + 1 steps
    elif how == "both":
        sched[0].step()
        sched[1].step(1.0)
    else:
        sched.step()


def untuned_twin(groups):
    """An optimizer with the same number of groups, every group at the untuned lr, no TempBalance."""
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]} for _ in groups], lr=LR)


def train_step(model, opt):
    x = torch.randn(4, 8)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_is_scheduler_lr_times_factor(name):
    factory, how = SCHEDULERS[name]
    model = mlp()
    table = CyclingTable(model)
    tb = TempBalance(model, metrics_fn=table)
    groups, count = tb.build_optimizer_param_group(LR)
    assert count == 3 and len(groups) == 4
    opt = torch.optim.SGD(groups, lr=LR)
    sched = factory(opt)
    twin = untuned_twin(groups)
    twin_sched = factory(twin)
    seen_factors, seen_lrs = set(), set()
    for t in range(14):
        train_step(model, opt)
        twin.step()
        step_scheduler(sched, how)
        step_scheduler(twin_sched, how)
        if t % 3 == 2:
            tb.step(opt)  # new ESD, new factors
        else:
            tb.apply(opt)
        factors = table.factors()
        seen_factors.add(tuple(round(f, 6) for f in factors))
        seen_lrs.add(twin.param_groups[0]["lr"])
        for gi, (g, tg, f) in enumerate(zip(opt.param_groups, twin.param_groups, factors)):
            want = tg["lr"] * f
            assert math.isclose(g["lr"], want, rel_tol=1e-9, abs_tol=1e-15), (name, t, gi, g["lr"], want)
            if tg["lr"] > 0:
                assert LO - 1e-12 <= g["lr"] / tg["lr"] <= HI + 1e-12
        for k, f in zip([n for n in table.names[1:-1]], factors):
            assert math.isclose(tb.ratios[k], f, rel_tol=1e-12)
    assert len(seen_factors) >= 4  # the factors did change
    assert len(seen_lrs) >= 3  # and so did the scheduler's lr


@pytest.mark.parametrize("name", ["LambdaLR", "ExponentialLR", "hf_cosine", "LinearLR", "ChainedConstantExponential"])
def test_optimizer_steps_with_balanced_lr_without_reapplying(name):
    """ESD once per 'epoch' of 4 steps: between tb.step calls the optimizer still steps with lr x factor."""
    factory, how = SCHEDULERS[name]
    model = mlp().double()
    table = CyclingTable(model)
    tb = TempBalance(model, metrics_fn=table)
    groups, _ = tb.build_optimizer_param_group(LR)
    opt = torch.optim.SGD(groups, lr=LR)  # plain SGD: the update is lr * grad
    sched = factory(opt)
    twin = untuned_twin(groups)
    twin_sched = factory(twin)
    for t in range(12):
        want = [tg["lr"] * f for tg, f in zip(twin.param_groups, table.factors())]
        model(torch.randn(4, 8, dtype=torch.float64)).pow(2).mean().backward()
        before = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
        grads = [[p.grad.clone() for p in g["params"]] for g in opt.param_groups]
        opt.step()
        opt.zero_grad()
        for gi, g in enumerate(opt.param_groups):
            p, p0, gr = g["params"][0], before[gi][0], grads[gi][0]
            i = gr.abs().argmax()
            eff = float((p0.flatten()[i] - p.detach().flatten()[i]) / gr.flatten()[i])
            assert math.isclose(eff, want[gi], rel_tol=1e-9), (name, t, gi, eff, want[gi])
        twin.step()
        step_scheduler(sched, how)
        step_scheduler(twin_sched, how)
        if t % 4 == 3:
            tb.step(opt)


def test_resume_gives_identical_lrs():
    factory, how = SCHEDULERS["hf_linear"]
    def build(model):
        table = CyclingTable(model)
        tb = TempBalance(model, metrics_fn=table)
        groups, _ = tb.build_optimizer_param_group(LR)
        opt = torch.optim.AdamW(groups, lr=LR)
        return table, tb, opt, factory(opt)

    model = mlp()
    table, tb, opt, sched = build(model)

    def run(model, tb, opt, sched, steps, t0):
        out = []
        for t in range(t0, t0 + steps):
            torch.manual_seed(100 + t)
            train_step(model, opt)
            step_scheduler(sched, how)
            tb.step(opt) if t % 3 == 2 else tb.apply(opt)
            out.append([g["lr"] for g in opt.param_groups])
        return out

    run(model, tb, opt, sched, 5, 0)
    saved = copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(),
                               tb=tb.state_dict(), calls=table.calls))
    straight = run(model, tb, opt, sched, 7, 5)

    model2 = mlp()
    table2, tb2, opt2, sched2 = build(model2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    tb2.load_state_dict(saved["tb"])
    table2.calls = saved["calls"]
    resumed = run(model2, tb2, opt2, sched2, 7, 5)
    assert resumed == straight
    assert [p.tolist() for p in model2.parameters()] == [p.tolist() for p in model.parameters()]


def test_explicit_untuned_lr_keeps_original_behaviour():
    """tb.step(opt, untuned_lr) writes untuned_lr x factor, whatever a scheduler did before."""
    model = mlp()
    table = CyclingTable(model)
    tb = TempBalance(model, metrics_fn=table)
    groups, _ = tb.build_optimizer_param_group(LR)
    opt = torch.optim.SGD(groups, lr=LR)
    sched = lrs.ExponentialLR(opt, 0.5)
    for t in range(3):
        train_step(model, opt)
        sched.step()
        written = tb.step(opt, 0.05)
        want = [0.05 * f for f in table.factors()]
        assert [g["lr"] for g in opt.param_groups] == written
        assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(written, want))


def test_hf_trainer_reduce_lr_on_plateau(tmp_path):
    """The Trainer's reduce_lr_on_plateau (stepped at evaluation, after the factors were applied)."""
    transformers = hf()
    from tbfast.integrations import hf as tb_hf

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(cfg)

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(1)
            self.x = torch.randint(3, 100, (8, 12), generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": (self.x[i, 0] > 50).long()}

    plateau = dict(mode="max", factor=0.5, patience=0)  # cut the lr whenever the eval loss does not rise
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
        lr_scheduler_type="reduce_lr_on_plateau", lr_scheduler_kwargs=plateau, eval_strategy="steps",
        eval_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data(), eval_dataset=Data())
    tb = TempBalance(model, eigs_thresh=10)
    tb_hf.attach(trainer, tb, log_table=False)
    twin = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    twin_plateau = lrs.ReduceLROnPlateau(twin, **plateau)
    checked = []

    class Check(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            alpha = dict(tb.layer_values("alpha"))
            tuned = [alpha[n] for n in tb.tuned_layers]
            lo, hi = min(tuned), max(tuned)
            for g in optimizer.param_groups:
                key = g["tempbalance_key"]
                f = 1.0 if key is None else LO + (alpha[key] - lo) / (hi - lo) * (HI - LO)
                want = twin.param_groups[0]["lr"] * f
                assert math.isclose(g["lr"], want, rel_tol=1e-9), (state.global_step, key, g["lr"], want)
            checked.append(twin.param_groups[0]["lr"])

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            twin_plateau.step(metrics["eval_loss"])  # the Trainer steps its plateau with this metric next

    trainer.add_callback(Check())
    trainer.train()
    assert len(checked) == 6
    assert min(checked) < 1e-3  # the plateau did cut the lr


def test_tensor_lrs():
    """Param groups whose lr is a (float32) tensor, as for compiled / capturable optimizers."""
    model = mlp()
    table = CyclingTable(model)
    tb = TempBalance(model, metrics_fn=table)
    groups, _ = tb.build_optimizer_param_group(LR)
    for g in groups:
        g["lr"] = torch.tensor(g["lr"], dtype=torch.float32)
    opt = torch.optim.Adam(groups, lr=torch.tensor(LR))
    sched = lrs.LambdaLR(opt, lambda e: 0.8 ** e)
    twin = untuned_twin(groups)
    twin_sched = lrs.LambdaLR(twin, lambda e: 0.8 ** e)
    for t in range(6):
        train_step(model, opt)
        twin.step()
        sched.step()
        twin_sched.step()
        tb.step(opt) if t % 2 else tb.apply(opt)
        for g, tg, f in zip(opt.param_groups, twin.param_groups, table.factors()):
            assert isinstance(g["lr"], torch.Tensor)
            assert math.isclose(float(g["lr"]), tg["lr"] * f, rel_tol=1e-6), (t, float(g["lr"]), tg["lr"] * f)
