"""tbfast.integrations.lightning.TempBalanceCallback: a small Lightning fit on CPU.

Oracles: the scheduler's lr is the same CosineAnnealingLR run on an optimizer without
TempBalance; the factor is tb_linear_map (written plainly) of the median-Hill alpha of each
tuned layer's fp64 SVD eigenvalues (tests/oracle.py) at the last ESD, which the callback runs on
the final weights.
"""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from oracle import median_fit, svd_eigs

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

from tbfast import TempBalance  # noqa: E402
from tbfast.integrations.lightning import TempBalanceCallback  # noqa: E402

LR = 0.05
T_MAX = 10


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class Module(L.LightningModule):
    def __init__(self, model, tb, interval):
        super().__init__()
        self.model = model
        self.tb = tb
        self.interval = interval  # None: no lr scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        groups, _ = self.tb.build_optimizer_param_group(LR)
        opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
        if self.interval is None:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T_MAX)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class LrRecorder(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append((trainer.global_step, [g["lr"] for g in trainer.optimizers[0].param_groups]))


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.randn(32, 4, generator=g)), batch_size=8)  # 4 steps per epoch


def trainer(tmp_path, callbacks, epochs, logger=False, checkpoint=False):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpoint,
                     default_root_dir=tmp_path, num_sanity_val_steps=0)


def oracle_factors(model):
    """tb_linear_map of the fp64-SVD median-Hill alphas of the tuned (middle) layers."""
    linears = [m for m in model if isinstance(m, nn.Linear)][1:-1]
    alphas = [median_fit(svd_eigs(m.weight.detach()), 2.0)[0] for m in linears]
    lo, hi = min(alphas), max(alphas)
    return alphas, [0.5 + (a - lo) / (hi - lo) * 1.0 for a in alphas] + [1.0]


def untuned_cosine(steps):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T_MAX)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("interval, esd_every, sched_interval", [("step", 2, "step"), ("epoch", 1, "epoch"),
                                                                  ("step", 2, None)])
def test_fit_ends_with_scheduler_lr_times_factor(tmp_path, interval, esd_every, sched_interval):
    model = net()
    tb = TempBalance(model, eigs_thresh=20)
    cb = TempBalanceCallback(tb, interval=interval, frequency=esd_every)
    log = MemoryLogger()
    module = Module(model, tb, sched_interval)
    trainer(tmp_path, [cb], epochs=2, logger=log).fit(module, data())

    opt = module.trainer.optimizers[0]
    if sched_interval is None:
        assert not module.trainer.lr_scheduler_configs
        untuned = LR
    else:
        sched = module.trainer.lr_scheduler_configs[0].scheduler
        steps = 8 if sched_interval == "step" else 2
        assert sched.last_epoch == steps
        untuned = untuned_cosine(steps)
        assert sched.get_last_lr()[0] == pytest.approx(untuned, rel=1e-12)
    alphas, factors = oracle_factors(model)
    assert len(opt.param_groups) == 4
    for g, f in zip(opt.param_groups, factors):
        assert math.isclose(g["lr"], untuned * f, rel_tol=1e-4), (g["lr"], untuned, f)
    # ESDs at the chosen interval, each logged through the Lightning logger
    want_steps = [2, 4, 6, 8] if interval == "step" else [4, 8]
    assert cb.esd_steps == want_steps
    assert [s for s, _ in log.metrics] == want_steps
    last = log.metrics[-1][1]
    names = ["2", "4", "6"]  # the tuned Linear layers of the Sequential
    for n, a, f in zip(names, alphas, factors):
        assert last[f"tempbalance/alpha/{n}"] == pytest.approx(a, rel=1e-4)
        assert last[f"tempbalance/lr_factor/{n}"] == pytest.approx(f, rel=1e-4)


def test_resume_from_lightning_checkpoint_gives_identical_lrs(tmp_path):
    def run(epochs, ckpt_path=None, save=False):
        model = net()
        tb = TempBalance(model, eigs_thresh=20)
        rec = LrRecorder()
        cbs = [TempBalanceCallback(tb, interval="step", frequency=3), rec]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
        module = Module(model, tb, "step")
        trainer(tmp_path, cbs, epochs=epochs, checkpoint=save).fit(module, data(), ckpt_path=ckpt_path)
        return rec.lrs, [g["lr"] for g in module.trainer.optimizers[0].param_groups]

    straight, end = run(3, save=True)
    assert (tmp_path / "epoch=0.ckpt").exists()
    resumed, end2 = run(3, ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert [s for s, _ in resumed] == list(range(5, 13))
    assert resumed == straight[4:]
    assert end2 == end


def test_asynchronous_tempbalance_in_a_lightning_fit(tmp_path):
    """TempBalance(asynchronous=True): the callback's ESDs run in the background; after
    synchronize() the schedule is the fp64-SVD oracle's for the final weights (last ESD at the end)."""
    model = net()
    tb = TempBalance(model, eigs_thresh=20, asynchronous=True)
    cb = TempBalanceCallback(tb, interval="step", frequency=2)
    module = Module(model, tb, "step")
    trainer(tmp_path, [cb], epochs=2).fit(module, data())
    assert tb.lag is not None and tb.lag >= 0
    tb.synchronize()
    _, factors = oracle_factors(model)
    assert [tb.ratios[k] for k in tb.ratios] == pytest.approx(factors[:-1], rel=1e-3)
    tb.close()


def test_resume_refuses_another_models_tempbalance_state(tmp_path):
    """A Lightning checkpoint whose TempBalanceCallback state belongs to another model: a
    ValueError naming the checkpoint entry and the first differing layer, before the fit resumes."""
    model = net()
    tb = TempBalance(model, eigs_thresh=20)
    cbs = [TempBalanceCallback(tb, interval="step", frequency=3),
           ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)]
    trainer(tmp_path, cbs, epochs=1, checkpoint=True).fit(Module(model, tb, "step"), data())
    path = tmp_path / "epoch=0.ckpt"
    ck = torch.load(path, weights_only=False)
    key = next(k for k in ck["callbacks"] if "TempBalanceCallback" in k)
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    foreign = TempBalance(other, eigs_thresh=4, remove_first_layer=False, remove_last_layer=False)
    foreign.build_optimizer_param_group(LR)
    ck["callbacks"][key]["tempbalance"] = foreign.state_dict()
    torch.save(ck, path)

    model2 = net()
    tb2 = TempBalance(model2, eigs_thresh=20)
    with pytest.raises(ValueError, match=r"Lightning checkpoint, callback state of TempBalanceCallback: "
                                         r"TempBalance state does not match this model \(first differing layer: "
                                         r"saved '2' \(4, 32\), this model '2' \(32, 32\)"):
        trainer(tmp_path, [TempBalanceCallback(tb2, interval="step", frequency=3)], epochs=2).fit(
            Module(model2, tb2, "step"), data(), ckpt_path=str(path))
