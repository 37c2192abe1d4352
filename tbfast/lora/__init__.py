"""Exact LoRA ESD at rank-r cost: a cached base spectrum, refreshed by secular rank-one updates.

`tbfast.lora.cache` (`BaseSpectrumCache`: the base weight's Gram eigendecomposition, checksummed,
memory-bounded, saved next to a checkpoint) and `tbfast.lora.update` (the eigenvalues of
``W0 + s B A`` from it through the op ``tbfast::eigvalsh_update``, with the full eigensolve as
the fallback). The public entry `tbfast.lora_esd` lives in `tbfast.lora.esd` (not imported here:
it sits above the ESD stage, which itself may use `tbfast.lora.update`).
"""

from __future__ import annotations

from .cache import BaseSpectrum, BaseSpectrumCache, weight_checksum
from .update import DEFAULT_CANCEL_LIMIT, LoRAItem, lora_eigenvalues

__all__ = ["BaseSpectrum", "BaseSpectrumCache", "weight_checksum", "LoRAItem", "lora_eigenvalues",
           "DEFAULT_CANCEL_LIMIT"]
