"""TempBalance for the Hugging Face ``Trainer`` (no fork of the Trainer).

Usage (the paper's RoBERTa setup: block-wise TB_Sigmoid, ``xmin_pos=1.5``)::

    tb = tbfast.TempBalance(model, assign_func="tb_sigmoid", s=(2, 1), granularity="block",
                            xmin_pos=1.5, remove_first_layer=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    tbfast.integrations.hf.attach(trainer, tb)          # optimizer + callback
    trainer.train()

`attach` gives the Trainer an optimizer whose param groups are the Trainer's own decay /
no-decay split refined per TempBalance key (block or layer), built with the Trainer's optimizer
class and arguments, and adds a `TempBalanceCallback`. The callback recomputes the ESD every
``esd_interval`` optimizer steps, with ``esd_interval = min(esd_interval, max(1, steps_per_epoch // 10))``
(SPEC section 7; ``esd_interval=None`` means just ``max(1, steps_per_epoch // 10)``), re-applies
the balanced lrs after every lr-scheduler step from the latest ESD, and logs the per-layer table
through ``Trainer.log`` (keys ``tempbalance/alpha/<layer>``, ``tempbalance/lr_factor/<key>``).

The lr of a group is ``(the lr the Trainer's scheduler gave it) * factor``, so warm-up and decay
schedules apply unchanged on top of the balancing. Works with transformers 4.x and 5.x; importing
this module does not need transformers, using it does.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any, Optional

import torch

from ..tempbalance.layout import param_layout
from ..tempbalance import TempBalance
from .refresh_logs import refresh_logs, unlogged

try:  # transformers is optional
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - exercised only without transformers
    _CallbackBase = object

__all__ = ["TempBalanceCallback", "attach", "create_optimizer", "param_groups", "esd_interval_for"]

logger = logging.getLogger(__name__)

#: key of the TempBalance entry in ``TrainerState.stateful_callbacks`` (saved in trainer_state.json)
STATE_KEY = "tbfast.TempBalance"


def _need_transformers() -> None:
    if _CallbackBase is object:
        raise ImportError("tbfast.integrations.hf needs transformers: pip install 'tbfast[hf]'")


def esd_interval_for(steps_per_epoch: int, esd_interval: Optional[int] = None) -> int:
    """SPEC 7: ``min(esd_interval, max(1, steps_per_epoch // 10))``."""
    rule = max(1, int(steps_per_epoch) // 10)
    if esd_interval is None:
        return rule
    if int(esd_interval) < 1:
        raise ValueError(f"esd_interval must be >= 1, got {esd_interval}")
    return min(int(esd_interval), rule)


def param_groups(tb: TempBalance, decay_parameter_names: Any, weight_decay: float,
                 trainable_only: bool = True) -> list[dict]:
    """TempBalance keys x the Trainer's decay / no-decay split.

    One group per (key, decay) pair that has parameters, tuned keys in TempBalance's order,
    then the untuned parameters; every group carries ``weight_decay`` (``weight_decay`` or 0)
    and no ``lr`` (the optimizer's default lr applies, so the Trainer's scheduler sees one
    base lr). Computes an ESD if ``tb`` has none yet.
    """
    if not tb.ratios:
        tb.update()
    decay = set(decay_parameter_names)
    names = {id(p): n for n, p in tb.net.named_parameters()}
    layout, untuned = param_layout(tb.net, tb.ratios, tb.options)
    blocks = [(key, params) for _, key, params in layout] + [(None, untuned)]
    out: list[dict] = []
    for key, params in blocks:
        for is_decay in (True, False):
            ps = [p for p in params if (names.get(id(p)) in decay) == is_decay and (p.requires_grad or not trainable_only)]
            if ps:
                out.append({"params": ps, "weight_decay": weight_decay if is_decay else 0.0,
                            "tempbalance_key": key})
    return out


def create_optimizer(trainer: Any, tb: TempBalance) -> torch.optim.Optimizer:
    """An optimizer for ``trainer`` with TempBalance param groups, the Trainer's class and kwargs."""
    _need_transformers()
    model = trainer.model
    if {id(p) for p in model.parameters()} != {id(p) for p in tb.net.parameters()}:
        raise ValueError("TempBalance was built on a different model than the Trainer's")
    decay = trainer.get_decay_parameter_names(model)
    groups = param_groups(tb, decay, trainer.args.weight_decay)
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        cls, kwargs = trainer.optimizer_cls_and_kwargs
    else:
        cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    kwargs = dict(kwargs)
    for k in ("params", "model", "optimizer_dict"):
        if k in kwargs:
            raise ValueError(f"optimizer {getattr(cls, '__name__', cls)} builds its own groups ({k!r}); "
                             "TempBalance needs a standard torch optimizer class")
    return cls(groups, **kwargs)


class TempBalanceCallback(_CallbackBase):  # type: ignore[misc]
    """Recompute the ESD every ``esd_interval`` optimizer steps and re-apply balanced lrs after every step.

    ``start_after_warmup=True`` leaves the lrs untuned until the Trainer's warm-up steps are over.
    ``trainer`` (set by `attach`) is used for ``Trainer.log``; without it the table goes to the
    module logger at DEBUG level.
    """

    def __init__(self, tb: TempBalance, esd_interval: Optional[int] = None, start_after_warmup: bool = False,
                 log_table: bool = True, trainer: Any = None) -> None:
        _need_transformers()
        if esd_interval is not None and int(esd_interval) < 1:
            raise ValueError(f"esd_interval must be >= 1, got {esd_interval}")
        self.tb = tb
        self.esd_interval = esd_interval
        self.start_after_warmup = start_after_warmup
        self.log_table = log_table
        self.trainer = trainer
        self.interval: Optional[int] = None
        self.esd_steps: list[int] = []
        self._logged = 0  # refresh number (TempBalance.history) logged last

    # -- helpers
    @staticmethod
    def _steps_per_epoch(args: Any, state: Any, train_dataloader: Any) -> int:
        if train_dataloader is not None:
            try:
                return max(1, math.ceil(len(train_dataloader) / max(1, args.gradient_accumulation_steps)))
            except TypeError:
                pass
        if getattr(state, "num_train_epochs", 0) and state.max_steps > 0:
            return max(1, state.max_steps // max(1, int(state.num_train_epochs)))
        return max(1, state.max_steps)

    def _esd(self, state: Any) -> None:
        self.tb.refresh()  # in the background for TempBalance(asynchronous=True)
        self.esd_steps.append(state.global_step)

    def _log_refreshes(self, state: Any) -> None:
        """Log every refresh not logged yet (`TempBalance.history`; asynchronous ESDs when they take
        effect) through ``Trainer.log``, or the module logger at DEBUG level without a trainer."""
        records, self._logged = unlogged(self.tb, self._logged)
        for record in records if self.log_table else ():
            logs = refresh_logs(record)
            if self.trainer is not None:
                self.trainer.log(logs)
            else:
                logger.debug("TempBalance step %d: %s", state.global_step, logs)

    def _export(self, state: Any) -> None:
        """Put the schedule into ``state.stateful_callbacks`` so it is saved with every checkpoint.

        Stored under `STATE_KEY` (not this class's name, so ``restore_callback_states_from_checkpoint``
        leaves this callback alone); ``tempbalance`` is ``TempBalance.state_dict()`` as a JSON string,
        which keeps the order of the factors and the exact float values.
        """
        callbacks = getattr(state, "stateful_callbacks", None)
        if isinstance(callbacks, dict):
            callbacks[STATE_KEY] = {"global_step": int(state.global_step), "esd_steps": list(self.esd_steps),
                                    "tempbalance": json.dumps(self.tb.state_dict())}

    def _restore(self, state: Any) -> bool:
        """Load the schedule saved at ``state.global_step`` (a resumed run); False when there is none."""
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_KEY)
        if not state.global_step:
            return False
        if not isinstance(saved, dict) or saved.get("global_step") != state.global_step:
            logger.warning("TempBalance: the checkpoint at step %d holds no TempBalance state (saved by an older "
                           "tbfast?); recomputing the ESD now, so the schedule differs from an uninterrupted run",
                           state.global_step)
            return False
        try:
            tb_state = json.loads(saved["tempbalance"])
            esd_steps = [int(s) for s in saved["esd_steps"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"TempBalance state in the checkpoint's trainer_state.json ({STATE_KEY!r}) is "
                             f"malformed: {exc}") from exc
        try:
            self.tb.load_state_dict(tb_state)
        except (TypeError, ValueError) as exc:  # another model's state, NaN factors, a truncated state
            raise type(exc)(f"checkpoint trainer_state.json, key stateful_callbacks[{STATE_KEY!r}]['tempbalance']: "
                            f"{exc}") from None
        self.esd_steps = esd_steps
        return True

    # -- Trainer events
    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        if optimizer is None:
            raise ValueError("TempBalanceCallback: the Trainer passed no optimizer")
        self.interval = esd_interval_for(self._steps_per_epoch(args, state, train_dataloader), self.esd_interval)
        start = int(args.get_warmup_steps(state.max_steps)) if self.start_after_warmup else None
        restored = self._restore(state)
        self._logged = self.tb.history.count  # refreshes before training (layout) are not logged
        self.tb.set_step(state.global_step, start_step=start)
        if self.tb.active and not restored:
            self._esd(state)
        self.tb.apply(optimizer)
        self._log_refreshes(state)
        self._export(state)
        logger.info("TempBalance: ESD every %d optimizer steps, balancing from step %d%s", self.interval,
                    self.tb.start_step, f" (schedule restored at step {state.global_step})" if restored else "")

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.tb.set_step(state.global_step)
        if self.tb.active and (state.global_step % self.interval == 0 or not self.esd_steps):
            self._esd(state)
        self.tb.apply(optimizer)
        self._log_refreshes(state)
        if control.should_save:  # only for a checkpoint: state_dict() waits for an asynchronous ESD in flight
            self._export(state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:  # save_strategy='epoch' decides here
            self._export(state)


def attach(trainer: Any, tb: TempBalance, esd_interval: Optional[int] = None, start_after_warmup: bool = False,
           log_table: bool = True) -> TempBalanceCallback:
    """Give ``trainer`` TempBalance param groups and the callback; call before ``trainer.train()``."""
    _need_transformers()
    if getattr(trainer, "optimizer", None) is not None:
        raise ValueError("trainer already has an optimizer; attach TempBalance before it is created "
                         "(do not pass optimizers=(opt, ...) together with attach)")
    trainer.optimizer = create_optimizer(trainer, tb)
    cb = TempBalanceCallback(tb, esd_interval=esd_interval, start_after_warmup=start_after_warmup,
                             log_table=log_table, trainer=trainer)
    trainer.add_callback(cb)
    return cb
