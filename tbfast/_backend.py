"""Loads the compiled extension ``tbfast._C`` once; one-time fallback logs.

The extension is optional: when it cannot be imported, every op has a plain-torch fallback and
one warning says why. Dispatch code asks :func:`has_op` and logs fallbacks with
:func:`log_fallback_once`; ``tbfast._info.backend_info`` summarises everything for users.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: bool | None = None  # None until the first load attempt
_module: Any = None
_reason: str | None = None
_logged: set[str] = set()


def _load() -> bool:
    """Import tbfast._C (registering its ops under torch.ops.tbfast); True when it loaded."""
    global _loaded, _module, _reason
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            _module = importlib.import_module("tbfast._C")
            _loaded, _reason = True, None
        except Exception as exc:  # ImportError, or an OSError/undefined symbol from a stale build
            _module, _loaded = None, False
            _reason = f"{type(exc).__name__}: {exc}"
    if not _loaded:
        log_fallback_once(
            "extension",
            f"tbfast._C C++ extension not loaded ({_reason}); using the pure-torch fallbacks. "
            "Build it with `python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`",
        )
    return _loaded


def extension_loaded() -> bool:
    """True when the compiled extension tbfast._C is importable (loads it on first call)."""
    return _load()


def has_op(name: str) -> bool:
    """True when the extension is loaded and registers ``torch.ops.tbfast.<name>``."""
    if not _load():
        return False
    try:
        getattr(torch.ops.tbfast, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def schema_defined(qualname: str) -> bool:
    """True when torch's dispatcher holds a schema for ``qualname`` (e.g. "tbfast::eigvalsh_batched").

    Op modules define a schema only when it is missing: the C++ kernels register first, and a
    tbfast._C built from an older checkout may define the schema itself (defining it twice aborts).
    """
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


def log_fallback_once(key: str, msg: str, level: int = logging.WARNING) -> None:
    """Log ``msg`` the first time ``key`` is seen in this process (one line per fallback kind)."""
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.log(level, msg)


def _json_info(name: str) -> dict[str, Any] | None:
    """A JSON info string from a plain function of tbfast._C (not a torch op); None when absent."""
    if not _load():
        return None
    fn = getattr(_module, name, None)
    if fn is None:
        return None
    try:
        return json.loads(fn())
    except Exception as exc:  # report, never raise, from an info function
        return {"error": f"{type(exc).__name__}: {exc}"}


def extension_details() -> dict[str, Any]:
    """``loaded``, ``path``, ``reason`` (why not loaded) and ``build`` (how tbfast._C was built)."""
    loaded = _load()
    return {"loaded": loaded, "path": getattr(_module, "__file__", None), "reason": _reason,
            "build": _json_info("build_info") if loaded else None}


def lapack_info() -> dict[str, Any] | None:
    """Where the CPU eigensolver found LAPACK ``?syevd`` (None when the extension is not loaded)."""
    return _json_info("lapack_info")
