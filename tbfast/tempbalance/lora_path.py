"""TempBalance's exact LoRA ESD (the paper's setting): an owned base-spectrum cache, used automatically.

``TempBalance(lora_cache=True)`` (the default) on a model with PEFT LoRA layers creates one
`tbfast.lora.BaseSpectrumCache` for itself at the first ESD refresh (nothing process-wide: it
lives and dies with the scheduler) and passes it to the ESD stage, where a LoRA layer takes the
exact update path when its base weight is on the CPU and its Gram side ``n`` is at least
`tbfast.lora.stage.BREAK_EVEN_N_OVER_R` times its adapter rank (96 against the default float32
full path, 64 with ``dtype=torch.float64``; below that, or on a GPU, the full eigensolve is the
faster one). The first refresh builds the cache (one float64
eigendecomposition with vectors per base weight); every later one is O(n^2 r) per layer.
``lora_cache=<BaseSpectrumCache>``: that cache, for every LoRA layer; ``False``: the full path.
The eigenvalues are those of the float64 eigensolve of the merged weights, so the option does
not change the schedule beyond the default float32 path's rounding.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LoRAPath"]


class LoRAPath:
    """The cache `tbfast.TempBalance` uses for its ``lora_cache`` option (``cache``: None until a
    refresh needed one; the user's own when ``lora_cache`` is a `BaseSpectrumCache`)."""

    def __init__(self) -> None:
        self.cache: Any = None
        self._owned: Any = None

    def run_options(self, layers: list, option: Any, dtype: Any = None) -> dict[str, Any]:
        """Keywords of `tbfast.pipeline.run` for ``layers`` under ``option`` (True, False or a
        cache) when the full path computes in ``dtype``: empty without a LoRA layer or when False."""
        if option is False or not any(getattr(l, "lora", None) is not None for l in layers):
            return {}
        from ..lora.cache import BaseSpectrumCache
        from ..lora.stage import BREAK_EVEN_N_OVER_R

        if option is True and self._owned is None:
            self._owned = BaseSpectrumCache()
        self.cache = self._owned if option is True else option
        auto = option is True
        ratio = BREAK_EVEN_N_OVER_R.get(dtype, BREAK_EVEN_N_OVER_R[torch.float32])
        return {"lora_cache": self.cache, "lora_min_ratio": ratio if auto else 0.0,
                "lora_cpu_only": auto}
