"""tbfast: fast, exact heavy-tailed self-regularization (HT-SR) analysis and TempBalance.

The data flows one way: layers -> spectra (batched eigenvalues) -> power-law fits -> metrics ->
learning-rate schedule. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging

from ._interrupt import import_guard as _import_guard

try:
    with _import_guard():  # a Ctrl-C meanwhile ends in KeyboardInterrupt, even where torch 2.4 drops it
        from ._info import backend_info
        from .analyze import analyze, summary
        from .analysis import analyze_series
        from .layers import Layer, block_index, find_layers, layers_from_matrices
        from .lora import BaseSpectrumCache
        from .lora.esd import lora_esd
        from .metrics import ESDMetrics, compute_metrics
        from .pipeline import layer_metrics
        from .powerlaw import PowerLawFit, fit_power_law
        from .spectra import Spectra, esd
        from .watcher import WeightWatcher
except KeyboardInterrupt:  # Ctrl-C while torch loads: one line and exit 130 in the `tbfast` command only
    from ._interrupt import exit_if_cli

    exit_if_cli("tbfast: interrupted")
    raise

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "backend_info", "Layer", "block_index", "find_layers", "layers_from_matrices", "ESDMetrics",
    "compute_metrics", "layer_metrics", "PowerLawFit", "fit_power_law", "Spectra", "esd", "analyze", "analyze_series", "summary",
    "TempBalance", "Tempbalance", "WeightWatcher", "lora_esd", "BaseSpectrumCache", "__version__",
]
_LAZY = ("TempBalance", "Tempbalance")


def __getattr__(name: str):
    # heavier parts load on first use, so `import tbfast` stays light
    if name in _LAZY:
        from . import tempbalance
        return getattr(tempbalance, name)
    raise AttributeError(f"module 'tbfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazily imported names are part of the public API: dir(), help() and tab completion list them
    return sorted(set(globals()) | set(_LAZY))
