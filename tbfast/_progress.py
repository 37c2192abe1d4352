"""An optional tqdm progress bar (tqdm is an optional dependency)."""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["progress_bar"]

log = logging.getLogger(__name__)


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "layer") -> Any:
    """A tqdm bar over ``total`` items (on stderr), or None when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        log.info("tqdm not installed: no progress bar")
        return None
    return tqdm(total=total, desc=desc, unit=unit)
