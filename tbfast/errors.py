"""Exception types and per-layer status strings shared by every stage.

Control flow tests these types and constants, never the text of a message. Every exception
keeps the builtin base class callers caught before (``ValueError``, ``FileNotFoundError``...),
so ``except ValueError`` around `tbfast.analyze` still works.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "TbfastError", "CheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError",
    "UnsupportedDtypeError", "EmptyCheckpointError", "NoLayersError", "NonFiniteWeightsError",
    "BackendUnavailableError",
    "STATUS_OK", "STATUS_NONFINITE", "STATUS_ALL_ZERO", "STATUS_XMIN_ZERO", "STATUS_EMPTY_WINDOW",
    "status_too_few", "status_fit_failed",
]


class TbfastError(Exception):
    """Base class of the errors tbfast raises on purpose."""


# ------------------------------------------------------------------------------------------------
# input files


class CheckpointError(TbfastError):
    """Base class for checkpoint reading errors."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path (or a shard it names) does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint file exists but cannot be parsed."""


class UnsupportedDtypeError(CheckpointError, TypeError):
    """A weight tensor has a dtype tbfast cannot analyse."""


class EmptyCheckpointError(CheckpointError, ValueError):
    """A checkpoint holds no analysable weight matrix."""


# ------------------------------------------------------------------------------------------------
# layers and weights


class NoLayersError(TbfastError, ValueError):
    """No layer matched the selection (types, include/exclude, eigenvalue-count filters)."""


class NonFiniteWeightsError(TbfastError, ValueError):
    """Some layers' weights hold NaN or Inf; ``layers`` names them."""

    def __init__(self, layers: Sequence[str]):
        self.layers = list(layers)
        super().__init__(f"weights contain NaN or Inf in layer(s): {', '.join(self.layers)}")

    def __reduce__(self):  # picklable with its layer list (worker threads, process groups)
        return (type(self), (self.layers,))


# ------------------------------------------------------------------------------------------------
# backends


class BackendUnavailableError(TbfastError, RuntimeError):
    """A backend named explicitly (``backend="cpp"``, ``"cusolver"``, ``"triton"``) cannot run here."""


# ------------------------------------------------------------------------------------------------
# per-layer status (the ``status`` column): "ok" or why the fit of that layer is not usable

STATUS_OK = "ok"
STATUS_NONFINITE = "weights contain NaN or Inf"
STATUS_ALL_ZERO = "all-zero matrix: no spectrum to fit"
STATUS_XMIN_ZERO = "xmin is 0 (zero eigenvalues in the tail): use filter_zeros=True"
STATUS_EMPTY_WINDOW = "fix-finger window holds no xmin candidate"


def status_too_few(n: int) -> str:
    """Status of a layer with fewer than two eigenvalues to fit."""
    return f"too few eigenvalues to fit ({int(n)})"


def status_fit_failed(alpha: float) -> str:
    """Status of a layer whose fitted alpha is not finite."""
    return f"power-law fit failed: alpha = {alpha} (all tail eigenvalues equal?)"
