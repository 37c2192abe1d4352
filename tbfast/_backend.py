"""Loads the compiled extension ``tbfast._C`` once; one-time fallback logs.

The extension is optional: when it cannot be imported, every op has a plain-torch fallback and
one warning says why. An extension that imports but was built from another checkout (its
``build_info()`` "abi" differs from :data:`EXTENSION_ABI`) is an ImportError, not a fallback: it
has already registered its own op schemas, which the op modules must not silently keep. Dispatch code asks :func:`has_op` and logs fallbacks with
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

#: The ABI of tbfast._C this checkout expects (``TBFAST_ABI`` in csrc/module.cpp; bump both).
EXTENSION_ABI = 3
REBUILD_HINT = "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"

_lock = threading.Lock()
_loaded: bool | None = None  # None until the first load attempt
_module: Any = None
_reason: str | None = None
_abi_error: str | None = None  # set when tbfast._C imported but has another ABI
_logged: set[str] = set()


def _load() -> bool:
    """Import tbfast._C (registering its ops under torch.ops.tbfast); True when it loaded."""
    global _loaded, _module, _reason, _abi_error
    if _abi_error is not None:
        raise ImportError(_abi_error)
    if _loaded is not None:
        return _loaded
    with _lock:
        if _abi_error is not None:
            raise ImportError(_abi_error)
        if _loaded is not None:
            return _loaded
        try:
            module = importlib.import_module("tbfast._C")
        except Exception as exc:  # ImportError, or an OSError/undefined symbol from a stale build
            _module, _loaded = None, False
            _reason = f"{type(exc).__name__}: {exc}"
        else:
            _abi_error = abi_mismatch(module)
            if _abi_error is not None:
                raise ImportError(_abi_error)
            _module, _loaded, _reason = module, True, None
    if not _loaded:
        log_fallback_once(
            "extension",
            f"tbfast._C C++ extension not loaded ({_reason}); using the pure-torch fallbacks. "
            f"Build it with {REBUILD_HINT}",
        )
    return _loaded


def abi_mismatch(module: Any) -> str | None:
    """One line saying why ``module`` (an imported tbfast._C) does not match this checkout; None if it does."""
    path = getattr(module, "__file__", None) or "tbfast._C"
    try:
        abi = json.loads(module.build_info()).get("abi")
    except Exception as exc:  # no build_info, or not JSON: an extension from another checkout
        abi = None
        why = " ".join(str(exc).split())  # keep the message on one line
        detail = f" (build_info() failed: {type(exc).__name__}: {why})"
    else:
        detail = ""
    if abi == EXTENSION_ABI:
        return None
    found = "no ABI number" if abi is None else f"ABI {abi}"
    return (f"stale tbfast._C extension {path}: it has {found}{detail}, this tbfast needs ABI "
            f"{EXTENSION_ABI}; rebuild it with {REBUILD_HINT}")


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


def extension_module() -> Any:
    """The imported tbfast._C module (for its plain, non-op functions); None when not loaded."""
    return _module if _load() else None


def extension_function(name: str) -> Any:
    """The plain (non-op) function ``tbfast._C.<name>``; None when the extension or it is missing."""
    return getattr(extension_module(), name, None)


def log_fallback_once(key: str, msg: str, level: int = logging.WARNING) -> None:
    """Log ``msg`` the first time ``key`` is seen in this process (one line per fallback kind)."""
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.log(level, msg)


def _json_info(name: str) -> dict[str, Any] | None:
    """A JSON info string from a plain function of tbfast._C (not a torch op); None when absent."""
    fn = extension_function(name)
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
