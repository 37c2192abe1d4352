"""TempBalance's hold on the optimizers it writes: step hooks on those optimizer instances only.

Nothing here is process-wide. `Hold` is what one `TempBalance` attaches:

- one `Binding` per optimizer it was given (``tb.bind(opt)``, or the first ``tb.step(opt)`` /
  ``tb.apply(opt)``): that optimizer's own ``register_step_pre_hook`` / ``register_step_post_hook``
  (`tbfast.tempbalance.lr_frames.pre_step` / ``post_step``), held through a weak reference;
- until an optimizer built from ``build_optimizer_param_group``'s groups is bound, a `Bridge`: a
  ``register_post_accumulate_grad_hook`` on one parameter of those groups that balances their
  lrs before the optimizer steps (TempBalance never sees that optimizer before its first step);
  it goes as soon as such an optimizer is bound;
- a weak reference to the optimizer given last (`Hold.last`): the one whose state ``esd_of``
  reads (`tbfast.tempbalance.esd_source`), also when it is no torch optimizer.

`Hold.release` (called by ``tb.close()`` and by a ``weakref.finalize`` on the TempBalance, so
garbage collection of ``tb`` detaches too; neither hook refers to ``tb``) removes every hook and
the ``"tempbalance"`` key from the groups it wrote, leaving each group at the lr its next step
would have had: the optimizer is then one TempBalance never touched.
"""
from __future__ import annotations

import weakref
from functools import partial
from typing import Any, Optional

import torch

from . import lr_frames as _lr

__all__ = ["Hold", "Binding", "Bridge", "torch_optimizer"]

# optimizer -> the Binding that holds it (weak keys: an entry dies with its optimizer), so a
# second TempBalance cannot bind an optimizer another one still writes
_owners: "weakref.WeakKeyDictionary[Any, Binding]" = weakref.WeakKeyDictionary()


def torch_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The ``torch.optim.Optimizer`` that steps: ``optimizer`` itself, or the one inside a wrapper
    (``.optimizer``: accelerate's AcceleratedOptimizer; ``._optimizer``: Lightning's
    LightningOptimizer); None for an object that is no torch optimizer (its lrs are written, not hooked)."""
    obj = optimizer
    for _ in range(8):
        inner = next((x for x in (getattr(obj, "optimizer", None), getattr(obj, "_optimizer", None))
                      if isinstance(x, torch.optim.Optimizer) and x is not obj), None)
        if inner is None:
            break
        obj = inner
    return obj if isinstance(obj, torch.optim.Optimizer) else None


def _pre(optimizer: Any, args: Any, kwargs: Any) -> None:
    _lr.pre_step(optimizer.param_groups)


def _post(optimizer: Any, args: Any, kwargs: Any) -> None:
    _lr.post_step(optimizer.param_groups)


class Binding:
    """The two step hooks of one optimizer (removable handles) and a weak reference to it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.ref = weakref.ref(optimizer)
        self.handles = [optimizer.register_step_pre_hook(_pre), optimizer.register_step_post_hook(_post)]
        _owners[optimizer] = self

    @property
    def attached(self) -> bool:
        return bool(self.handles) and self.ref() is not None

    def detach(self) -> None:
        """Remove the hooks and the bookkeeping (the optimizer keeps the lr its next step would have had)."""
        for h in self.handles:
            h.remove()
        self.handles = []
        opt = self.ref()
        if opt is not None:
            if _owners.get(opt) is self:
                del _owners[opt]
            _lr.strip(opt.param_groups)


def _bridge_hook(groups: list, param: Any) -> None:
    _lr.pre_step(groups)


class Bridge:
    """Groups from ``build_optimizer_param_group`` whose optimizer TempBalance has not seen: a
    gradient hook on their first trainable parameter runs `lr_frames.pre_step` on them."""

    def __init__(self, groups: list) -> None:
        self.groups = list(groups)  # the very dicts the optimizer holds (torch keeps them)
        first = next((p for g in self.groups for p in g["params"] if p.requires_grad), None)
        self.handles = [] if first is None else [first.register_post_accumulate_grad_hook(partial(_bridge_hook, self.groups))]

    def holds(self, groups: list) -> bool:
        """Whether ``groups`` (an optimizer's) hold the bridged parameters (also after ``load_state_dict``)."""
        mine = {id(p) for g in self.groups for p in g["params"]}
        return any(id(p) in mine for g in groups for p in g["params"])

    def detach(self, strip: bool) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if strip:
            _lr.strip(self.groups)
        self.groups = []


class Hold:
    """Everything one TempBalance attached: a `Binding` per optimizer, the `Bridge` of its last build."""

    def __init__(self) -> None:
        self.bindings: list[Binding] = []
        self.bridge: Optional[Bridge] = None
        self._last: Optional[weakref.ref] = None

    @classmethod
    def for_owner(cls, owner: Any) -> "Hold":
        """A Hold released when ``owner`` (a TempBalance) is garbage collected (the finalizer holds no reference to it)."""
        hold = cls()
        weakref.finalize(owner, hold.release).atexit = False
        return hold

    def built(self, groups: list) -> None:
        """``build_optimizer_param_group`` returned ``groups``: bridge them until their optimizer is bound."""
        if self.bridge is not None:
            self.bridge.detach(strip=False)
        self.bridge = Bridge(groups)

    def bind(self, optimizer: Any) -> Optional[torch.optim.Optimizer]:
        """Hook ``optimizer`` (once) and make it `last`; returns the torch optimizer bound (None if it
        is no torch optimizer: its lrs are written, not hooked)."""
        opt = torch_optimizer(optimizer)
        if opt is not None and not any(b.ref() is opt for b in self.bindings if b.attached):
            other = _owners.get(opt)
            if other is not None and other.attached:
                raise ValueError("this optimizer is already bound to another TempBalance; close() that one first "
                                 "(one TempBalance per optimizer)")
            self.bindings = [b for b in self.bindings if b.attached]
            try:
                self.bindings.append(Binding(opt))
            except AttributeError:  # an Optimizer subclass that skipped Optimizer.__init__: lrs written, not hooked
                opt = None
            if opt is not None and self.bridge is not None and self.bridge.holds(opt.param_groups):
                self.bridge.detach(strip=False)
                self.bridge = None
        try:  # the torch optimizer inside a wrapper outlives the wrapper object
            self._last = weakref.ref(optimizer if opt is None else opt)
        except TypeError:  # an object without weak references: its state cannot be read later
            self._last = None
        return opt

    def last(self) -> Any:
        """The optimizer given to `bind` last (None: none, released, or collected)."""
        return None if self._last is None else self._last()

    def optimizers(self) -> list:
        """The optimizers bound now (alive)."""
        return [o for o in (b.ref() for b in self.bindings if b.attached) if o is not None]

    def release(self) -> None:
        """Detach from every optimizer and drop the bridge (idempotent)."""
        for b in self.bindings:
            b.detach()
        self.bindings, self._last = [], None
        if self.bridge is not None:
            self.bridge.detach(strip=True)
            self.bridge = None
