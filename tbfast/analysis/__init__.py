"""Analyses built on `tbfast.analyze`: alpha over a series of checkpoints (`analyze_series`)."""

from .series import analyze_series, checkpoint_step, expand_checkpoints

__all__ = ["analyze_series", "checkpoint_step", "expand_checkpoints"]
