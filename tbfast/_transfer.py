"""Host -> device copies that never stall the host.

A copy from pageable host memory to a CUDA device synchronises the stream first, which would
make the host wait for every kernel queued before it (the eigensolver, say). Index arrays are
therefore staged in pinned memory and copied with ``non_blocking=True``; torch's caching host
allocator keeps the pinned block alive until the copy has run.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_device"]


def to_device(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (host array or tensor) on ``device`` without a host synchronisation."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
