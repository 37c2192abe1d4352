"""Each TempBalance refresh's per-layer alpha, lr factors and weight-decay factors reach the trainer's
logger: Hugging Face (``Trainer.log`` -> ``state.log_history``) and Lightning (``logger.log_metrics``).

Oracle: at every step a recorder callback (running after TempBalance's, on the same weights)
computes each layer's median-Hill alpha from fp64 numpy SVD; the factors are the linear map
(SPEC 6) of the scheduled layers' alphas onto the lr range [1, 5] and the weight-decay range
[0.67, 3] (the logs hold each refresh's target factors; ramp_steps only changes what is written).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from test_balancing import hill_alpha, linear_map

import tbfast

OPTS = dict(balance="both", lr_min_ratio=1.0, lr_max_ratio=5.0, wd_min_ratio=0.67, wd_max_ratio=3.0,
            ramp_steps=3, dtype=torch.float64)


def _check_refresh_log(logs: dict, weights: dict) -> int:
    """``logs``: one refresh's metrics; ``weights``: layer -> weight at that step. Returns #layers."""
    lr_keys = [k.split("/", 2)[2] for k in logs if k.startswith("tempbalance/lr_factor/")]
    assert lr_keys and [k.split("/", 2)[2] for k in logs if k.startswith("tempbalance/wd_factor/")] == lr_keys
    alpha = [hill_alpha(weights[n]) for n in lr_keys]
    for n, a in zip(lr_keys, alpha):
        assert math.isclose(logs[f"tempbalance/alpha/{n}"], a, rel_tol=1e-7), n
    got_lr = [logs[f"tempbalance/lr_factor/{n}"] for n in lr_keys]
    got_wd = [logs[f"tempbalance/wd_factor/{n}"] for n in lr_keys]
    assert np.allclose(got_lr, linear_map(alpha, 1.0, 5.0), rtol=1e-7, atol=0)
    assert np.allclose(got_wd, linear_map(alpha, 0.67, 3.0), rtol=1e-7, atol=0)
    assert math.isclose(logs["tempbalance/alpha_mean"], float(np.mean(alpha)), rel_tol=1e-9)
    return len(lr_keys)


def test_hf_trainer_logs_every_refresh(tmp_path):
    test_hf = pytest.importorskip("test_hf")
    import transformers
    from tbfast.integrations import hf

    class Weights(transformers.TrainerCallback):
        def __init__(self, model):
            self.model, self.at = model, {}

            self.factor = {}  # step -> {key: group lr / scheduler lr}

        def _grab(self, state, optimizer, lr_scheduler):
            self.at[state.global_step] = {n: m.weight.detach().double().clone()
                                          for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
            sched = lr_scheduler.get_last_lr()
            self.factor[state.global_step] = {g["tempbalance_key"]: g["lr"] / sched[i] if sched[i] else None
                                              for i, g in enumerate(optimizer.param_groups)}  # linear decay: 0 at the end

        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            self._grab(state, optimizer, lr_scheduler)

        def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):
            self._grab(state, optimizer, lr_scheduler)

    model = test_hf.tiny("bert")
    tb = tbfast.TempBalance(model, eigs_thresh=10, **OPTS)
    trainer = test_hf.make_trainer(model, tmp_path, steps=4)
    cb = hf.attach(trainer, tb, esd_interval=2)
    rec = Weights(model)
    trainer.add_callback(rec)
    trainer.train()
    logged = [h for h in trainer.state.log_history if any(k.startswith("tempbalance/alpha/") for k in h)]
    assert cb.esd_steps == [0, 1, 2, 3, 4] and len(logged) == 5  # 4 steps/epoch // 10 -> an ESD every step
    assert [h["step"] for h in logged] == [0, 1, 2, 3, 4]
    assert [h["tempbalance/esd_step"] for h in logged] == [0, 1, 2, 3, 4]
    for h in logged:
        assert _check_refresh_log(h, rec.at[h["step"]]) >= 10
    assert [r["step"] for r in tb.history][-5:] == [0, 1, 2, 3, 4]
    # the lrs written: ramp_steps=3 on the Trainer's global step, a refresh at every step; at step 0
    # the factors ramp in from the untuned 1.0 (the optimizer was built at the untuned lr)
    keys = [k.split("/", 2)[2] for k in logged[0] if k.startswith("tempbalance/lr_factor/")]
    prev = np.ones(len(keys))
    for c in range(4):
        new = linear_map([hill_alpha(rec.at[c][k]) for k in keys], 1.0, 5.0)
        want = prev + (new - prev) * min(1.0, 1 / OPTS["ramp_steps"])
        got = [rec.factor[c][k] for k in keys]
        assert np.allclose(got, want, rtol=1e-6, atol=0), (c, got, want)
        assert rec.factor[c][None] == pytest.approx(1.0, rel=1e-12)  # untuned parameters
        prev = want


def test_lightning_logs_every_refresh(tmp_path):
    pytest.importorskip("lightning")
    import test_lightning as TL
    from lightning.pytorch.callbacks import Callback

    from tbfast.integrations.lightning import TempBalanceCallback

    class Weights(Callback):
        def __init__(self, model):
            self.model, self.at = model, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.at[trainer.global_step] = {n: m.weight.detach().double().clone()
                                            for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}

    model = TL.net()
    tb = tbfast.TempBalance(model, eigs_thresh=20, **OPTS)
    rec = Weights(model)
    log = TL.MemoryLogger()
    module = TL.Module(model, tb, "step")
    TL.trainer(tmp_path, [TempBalanceCallback(tb, interval="step", frequency=2), rec], epochs=2,
               logger=log).fit(module, TL.data())
    assert [s for s, _ in log.metrics] == [2, 4, 6, 8]  # one record per ESD, none for the layout ESD
    for step, metrics in log.metrics:
        assert _check_refresh_log(metrics, rec.at[step]) == 3
