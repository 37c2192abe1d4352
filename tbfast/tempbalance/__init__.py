"""The TempBalance scheduler: layer-wise learning rates (and weight decays) from each layer's ESD.

Modules, in import order:

- `assign`: the assignment functions (scores -> lr factors; ``tb_linear_map``, ``tb_sigmoid``, ...), pure;
- `options`: `TempBalanceOptions`, every option validated once;
- `plan`: an ESD table's columns -> the factor of every schedule key, pure;
- `layout`: which parameters follow which schedule key; optimizer groups -> keys;
- `ramp`: the linear ramp from the factors in force to a refresh's new ones (``ramp_steps``);
- `esd_source`: the tensors an ESD is taken of (weights, gradients, an optimizer state; ``esd_of``);
- `history`: the bounded record of each refresh's alphas and factors (``TempBalance.history``);
- `lr_frames`: the lr and weight-decay factors on top of any lr scheduler (per-group bookkeeping,
  validated lrs);
- `binding`: the step hooks on the optimizers a TempBalance was given (released by ``close()`` /
  GC), and the optimizer ``esd_of`` reads;
- `state`: ``state_dict`` with its fingerprint (ramp and weight-decay factors included), and the
  checks of ``load_state_dict``;
- `report`: the per-layer table of a schedule (``TempBalance.table``);
- `background`: the asynchronous ESD of a weight snapshot;
- `scheduler`: the `TempBalance` class (state and the optimizer protocol).
"""
from __future__ import annotations

from .options import PL_FITTINGS, SCORE_METRICS, TempBalanceOptions
from .scheduler import TempBalance, Tempbalance

__all__ = ["TempBalance", "Tempbalance", "TempBalanceOptions", "PL_FITTINGS", "SCORE_METRICS"]
