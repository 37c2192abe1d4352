"""Loads the compiled extension ``tbfast._C`` once and reports which backends are active.

The extension is optional: when it cannot be imported, every op has a plain-torch fallback and
one warning says why. Dispatch code asks :func:`has_op` and logs fallbacks with
:func:`log_fallback_once`; :func:`backend_info` summarises everything for users and bug reports.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
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


def log_fallback_once(key: str, msg: str, level: int = logging.WARNING) -> None:
    """Log ``msg`` the first time ``key`` is seen in this process (one line per fallback kind)."""
    with _lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.log(level, msg)


def _json_info(name: str) -> dict[str, Any] | None:
    """A JSON info string from a plain function of tbfast._C (not a torch op)."""
    fn = getattr(_module, name, None)
    if fn is None:
        return None
    try:
        return json.loads(fn())
    except Exception as exc:  # report, never raise, from an info function
        return {"error": f"{type(exc).__name__}: {exc}"}


def _triton_info() -> dict[str, Any]:
    info: dict[str, Any] = {"available": False, "version": None,
                            "interpret": os.environ.get("TRITON_INTERPRET", "") not in ("", "0")}
    try:
        import triton  # noqa: PLC0415 - optional dependency
    except Exception as exc:
        info["reason"] = f"{type(exc).__name__}: {exc}"
        return info
    info["available"] = True
    info["version"] = getattr(triton, "__version__", None)
    return info


def _cusolver_info() -> dict[str, Any]:
    try:
        from ._cusolver import cusolver_status  # noqa: PLC0415 - optional module, loaded lazily
    except Exception as exc:
        return {"loaded": False, "reason": f"tbfast._cusolver unavailable ({type(exc).__name__}: {exc})"}
    try:
        return cusolver_status()
    except Exception as exc:
        return {"loaded": False, "reason": f"cusolver_status() failed ({type(exc).__name__}: {exc})"}


def backend_info() -> dict[str, Any]:
    """What tbfast runs on in this process.

    Keys: ``extension`` (loaded, path, reason, build: torch version built against, OpenMP,
    compiler), ``lapack`` (whether ?syevd was found for the CPU eigensolver), ``ops`` (the
    registered torch.ops.tbfast names), ``torch`` (version, threads), ``devices`` (cpu, cuda and
    its device name), ``triton`` (available, version, TRITON_INTERPRET), ``cusolver``.
    """
    loaded = _load()
    ext: dict[str, Any] = {"loaded": loaded, "path": getattr(_module, "__file__", None), "reason": _reason}
    ext["build"] = _json_info("build_info") if loaded else None
    lapack = _json_info("lapack_info") if loaded else None
    names = ("eigvalsh_batched", "hill_fit", "ks_scan", "cusolver_eigvalsh")
    cuda = torch.cuda.is_available()
    devices: dict[str, Any] = {"cpu": True, "cuda": cuda, "cuda_device_count": torch.cuda.device_count() if cuda else 0,
                               "cuda_name": torch.cuda.get_device_name(0) if cuda else None}
    triton = _triton_info()
    cusolver = _cusolver_info()
    fits_cpp = has_op("hill_fit") and has_op("ks_scan")
    eig_cpp = has_op("eigvalsh_batched")
    active = {
        "cpu": {"eigensolver": ("C++ batched " + ("LAPACK ?syevd" if (lapack or {}).get("syevd") else "at::linalg_eigvalsh"))
                if eig_cpp else "torch.linalg.eigvalsh",
                "fits": "C++ kernels" if fits_cpp else "torch reference"},
    }
    if cuda:
        triton_ok = triton["available"]
        active["cuda"] = {
            "eigensolver": (f"cuSOLVER XsyevBatched for n <= {cusolver.get('max_n')}, torch.linalg.eigvalsh above"
                            if cusolver.get("loaded") else "torch.linalg.eigvalsh"),
            "fits": "Triton kernels" if triton_ok else "torch reference",
        }
    return {
        "active": active,
        "extension": ext,
        "lapack": lapack if lapack is not None else {"syevd": False, "source": "extension not loaded"},
        "ops": {n: has_op(n) for n in names},
        "torch": {"version": torch.__version__, "cuda_version": torch.version.cuda,
                  "num_threads": torch.get_num_threads()},
        "devices": devices,
        "triton": triton,
        "cusolver": cusolver,
    }
