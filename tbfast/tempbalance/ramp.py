"""The ramp of TempBalance factors: after a refresh, the written factors move linearly to the new ones.

Clock: ``TempBalance.step_count`` (one per `TempBalance.step` call, or the value `set_step` gave
it, e.g. a Trainer's global step). A refresh at step count ``r`` with ``ramp_steps = M`` gives,
at step count ``c >= r``, the factor

    old + (new - old) * min(1, (c - r + 1) / M)

so the write of the refresh's own step moves ``1 / M`` of the way and the write at step count
``r + M - 1`` is the new factor. ``old`` is the factor in force at step count ``r - 1`` (itself
possibly inside an earlier ramp); 1.0 when balancing was not active then (``start_step``); the
first schedule ever (no factors before) takes effect at once, as does any ``M <= 1``.
Factors are kept per channel: ``'lr'`` (schedule keys), ``'layer'`` (per layer) and ``'wd'``.
"""
from __future__ import annotations

from typing import Mapping, Optional

__all__ = ["Ramp"]


class Ramp:
    """The factors in force at the last refresh (per channel and key) and its step count."""

    def __init__(self) -> None:
        self.start: Optional[int] = None
        self.old: dict[str, dict[str, float]] = {}

    def factor(self, channel: str, key: str, target: float, step: int, steps: int) -> float:
        """The factor of ``key`` at step count ``step`` on its way to ``target``."""
        old = self.old.get(channel, {}).get(key)
        if steps <= 1 or old is None or self.start is None:
            return target
        t = (step - self.start + 1) / steps
        if t >= 1:
            return target
        return old + (target - old) * max(t, 1 / steps)

    def begin(self, step: int, steps: int, previous: Mapping[str, Mapping[str, float]],
              new: Mapping[str, Mapping[str, float]], active_before: bool) -> None:
        """A refresh at step count ``step``: ``previous`` / ``new`` are the target factors per
        channel before / after it; ``active_before``: whether balancing was on at ``step - 1``."""
        old: dict[str, dict[str, float]] = {}
        if steps > 1 and any(previous.values()):
            for channel, factors in new.items():
                before = previous.get(channel, {})
                old[channel] = {k: (self.factor(channel, k, before[k], step - 1, steps) if active_before else 1.0)
                                for k in factors if k in before or not active_before}
        self.start, self.old = int(step), old

    def to_state(self) -> dict:
        """Plain numbers and dicts (for ``TempBalance.state_dict``)."""
        return {"start": self.start, "old": {c: dict(v) for c, v in self.old.items()}}

    def load_state(self, state: Optional[dict]) -> None:
        """Restore `to_state` (None: no ramp in progress)."""
        state = state or {}
        self.start = state.get("start")
        self.old = {c: {k: float(x) for k, x in v.items()} for c, v in (state.get("old") or {}).items()}
