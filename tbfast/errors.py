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
    "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_NOT_FOUND", "EXIT_CORRUPT", "EXIT_DTYPE", "EXIT_EMPTY",
    "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE", "EXIT_CODES", "analyze_exit_codes",
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


# ``tbfast analyze``'s exit codes (tbfast.cli re-exports them; here so that the command's modules,
# e.g. tbfast.analysis.command, use them without importing the CLI)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_DTYPE, EXIT_EMPTY = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away

#: ``tbfast analyze``'s exit codes and their meaning (the --help epilog and docs/ANALYZE.md list these).
EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_ERROR: "error (no CUDA/MPS, NaN/Inf weights, an output that cannot be written)",
    EXIT_USAGE: "usage (bad option value, an output path that is an input or a directory)",
    EXIT_NOT_FOUND: "file not found",
    EXIT_CORRUPT: "corrupt or unreadable checkpoint (or not a regular file)",
    EXIT_DTYPE: "unsupported dtype",
    EXIT_EMPTY: "no analysable layer",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_BROKEN_PIPE: "standard output closed early (broken pipe; --csv/--plot files are complete)",
}


def analyze_exit_codes() -> tuple[tuple[type[BaseException], int], ...]:
    """Exception type -> exit code of ``tbfast analyze``, most specific first; the errors of
    other types are not caught (a bug shows its traceback)."""
    return ((CheckpointNotFoundError, EXIT_NOT_FOUND), (CorruptCheckpointError, EXIT_CORRUPT),
            (UnsupportedDtypeError, EXIT_DTYPE), (EmptyCheckpointError, EXIT_EMPTY), (NoLayersError, EXIT_EMPTY),
            (ImportError, EXIT_ERROR), (ValueError, EXIT_ERROR), (KeyError, EXIT_ERROR), (TypeError, EXIT_ERROR),
            (RuntimeError, EXIT_ERROR))
