"""TempBalance for Lightning (2.x): a callback, no change to the training loop.

Usage::

    tb = tbfast.TempBalance(net)                       # net: the model the LightningModule trains

    class Module(L.LightningModule):
        def configure_optimizers(self):
            groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
            opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    trainer = L.Trainer(callbacks=[TempBalanceCallback(tb, interval="epoch", frequency=1)])

The callback recomputes the ESD every ``frequency`` optimizer steps (``interval="step"``) or
epochs (``interval="epoch"``), and after every batch (after Lightning has stepped the lr
schedulers) writes each group's lr = (the scheduler's lr) x (its TempBalance factor) with
``tb.apply(optimizer)``; ``optimizer.step`` always uses the balanced lr (see
`tbfast.TempBalance.apply`). Alphas and factors go to every Lightning logger
(``tempbalance/alpha/<layer>``, ``tempbalance/lr_factor/<key>``) at each ESD, and the
TempBalance state is saved in / restored from Lightning checkpoints, so a resumed fit has the
same lrs as an uninterrupted one. Importing this module does not need lightning; using it does.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..tempbalance import TempBalance
from .refresh_logs import refresh_logs, unlogged

try:  # lightning is optional
    from lightning.pytorch.callbacks import Callback as _CallbackBase
except ImportError:  # pragma: no cover - exercised only without lightning
    try:
        from pytorch_lightning.callbacks import Callback as _CallbackBase
    except ImportError:
        _CallbackBase = object

__all__ = ["TempBalanceCallback"]

logger = logging.getLogger(__name__)


class TempBalanceCallback(_CallbackBase):  # type: ignore[misc]
    """Recompute the ESD every ``frequency`` steps or epochs; keep every group's lr = scheduler lr x factor.

    ``tb`` must be the `TempBalance` whose ``build_optimizer_param_group`` built the optimizer
    (or whose model's parameters the optimizer's groups hold, one TempBalance key per group).
    ``log=False`` turns the logging of alphas and factors off.
    """

    def __init__(self, tb: TempBalance, interval: str = "epoch", frequency: int = 1, log: bool = True) -> None:
        if _CallbackBase is object:
            raise ImportError("tbfast.integrations.lightning needs lightning: pip install lightning")
        if not isinstance(tb, TempBalance):
            raise TypeError(f"TempBalanceCallback expects a tbfast.TempBalance, got {type(tb).__name__}")
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
        if int(frequency) < 1:
            raise ValueError(f"frequency must be >= 1, got {frequency}")
        self.tb = tb
        self.interval = interval
        self.frequency = int(frequency)
        self.log = log
        self.esd_steps: list[int] = []  #: global steps at which the ESD was recomputed
        self._restored: Optional[dict] = None
        self._logged = 0  # refresh number (TempBalance.history) logged last

    # -- helpers
    def _optimizers(self, trainer: Any) -> list:
        own = {id(p) for p in self.tb.net.parameters()}
        opts = [o for o in trainer.optimizers
                if any(id(p) in own for g in o.param_groups for p in g["params"])]
        if not opts:
            raise ValueError("TempBalanceCallback: no optimizer of the Trainer holds parameters of the "
                             "model TempBalance was built with")
        return opts

    def _esd(self, trainer: Any) -> None:
        """One TempBalance step: new ESD and factors, written into every optimizer."""
        opts = self._optimizers(trainer)
        self.tb.step(opts[0])
        for opt in opts[1:]:
            self.tb.apply(opt)
        self.esd_steps.append(trainer.global_step)
        if self.log:
            self._log(trainer)

    def _apply(self, trainer: Any) -> None:
        for opt in self._optimizers(trainer):
            self.tb.apply(opt)
        if self.log and self.tb.asynchronous:  # a background ESD may have taken effect
            self._log(trainer)

    def _log(self, trainer: Any) -> None:
        """Send every refresh not logged yet (`TempBalance.history`, `tbfast.integrations.refresh_logs`)
        to every Lightning logger, at the current global step."""
        records, self._logged = unlogged(self.tb, self._logged)
        for record in records:
            metrics = refresh_logs(record)
            for lg in trainer.loggers:
                lg.log_metrics(metrics, step=trainer.global_step)
            logger.debug("TempBalance at step %d: %s", trainer.global_step, metrics)

    # -- Lightning hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._restored is not None:
            # Lightning restores callbacks before configure_optimizers, whose
            # build_optimizer_param_group ran a new ESD: put the checkpoint's schedule back
            self.tb.load_state_dict(self._restored)
            self._restored = None
        self._logged = self.tb.history.count  # refreshes before training (layout) are not logged
        self._apply(trainer)  # the (restored) factors on the (restored) scheduler lrs

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning has stepped the optimizer and the (non-plateau) lr schedulers of this batch
        step = trainer.global_step
        due = self.interval == "step" and step > 0 and step % self.frequency == 0
        if due and not (self.esd_steps and self.esd_steps[-1] == step):  # once per step (grad accumulation)
            self._esd(trainer)
        else:
            self._apply(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.interval == "epoch" and (trainer.current_epoch + 1) % self.frequency == 0:
            self._esd(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._apply(trainer)  # after the last (epoch-interval or plateau) scheduler step

    # -- checkpoints
    def state_dict(self) -> dict:
        return {"tempbalance": self.tb.state_dict(), "esd_steps": list(self.esd_steps)}

    def load_state_dict(self, state_dict: dict) -> None:
        where = "Lightning checkpoint, callback state of TempBalanceCallback"
        if not isinstance(state_dict, dict) or "tempbalance" not in state_dict:
            raise ValueError(f"{where}: no 'tempbalance' entry")
        try:  # checked (another model's state, NaN factors, ...) before the fit starts
            self.tb.load_state_dict(state_dict["tempbalance"])
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        self._restored = state_dict["tempbalance"]
        self.esd_steps = list(state_dict.get("esd_steps", []))
