"""Loads the compiled extension ``tbfast._C`` once; one-time fallback logs.

The extension is optional: when it cannot be imported, every op has a plain-torch fallback and
one warning says why. Why it is missing comes from the build record ``tbfast/_build_status.json``
that setup.py writes (built / failed to build / skipped, and the reason). Before the shared
library is loaded, the JSON stamp that csrc/module.cpp compiles into it is read from the file:
an extension built against another torch release is not loaded (a C++ extension is tied to the
torch it was compiled with) and the package falls back to the torch reference with one warning
naming both versions, unless the stamp says the build is version-independent (``stable_abi``,
built on torch's stable C++ interface for torch >= ``torch_min``). An extension that imports but
was built from another checkout (its ``build_info()`` "abi" differs from :data:`EXTENSION_ABI`)
is an ImportError, not a fallback: it has already registered its own op schemas, which the op
modules must not silently keep. Dispatch code asks :func:`has_op` and logs fallbacks with
:func:`log_fallback_once`; ``tbfast._info.backend_info`` summarises everything for users.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: The ABI of tbfast._C this checkout expects (``TBFAST_ABI`` in csrc/module.cpp; bump both).
EXTENSION_ABI = 5
REBUILD_HINT = "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`"

_lock = threading.Lock()
_loaded: bool | None = None  # None until the first load attempt
_module: Any = None
_reason: str | None = None
_abi_error: str | None = None  # set when tbfast._C imported but has another ABI
_version_error: str | None = None  # set when tbfast._C was built against another torch
_logged: set[str] = set()


def _load() -> bool:
    """Import tbfast._C (registering its ops under torch.ops.tbfast); True when it loaded."""
    global _loaded, _module, _reason, _abi_error, _version_error
    if _abi_error is not None:
        raise ImportError(_abi_error)
    if _loaded is not None:
        return _loaded
    with _lock:
        if _abi_error is not None:
            raise ImportError(_abi_error)
        if _loaded is not None:
            return _loaded
        # the stamp is read from the file first: a _C for another torch must not even be loaded
        _version_error = torch_mismatch(_file_stamp())
        if _version_error is not None:
            _module, _loaded, _reason = None, False, _version_error
        else:
            try:
                module = importlib.import_module("tbfast._C")
            except Exception as exc:  # ImportError, or an OSError/undefined symbol from a stale build
                _module, _loaded = None, False
                _reason = _missing_reason(exc)
            else:
                _abi_error = abi_mismatch(module)
                if _abi_error is not None:
                    raise ImportError(_abi_error)
                _version_error = torch_mismatch(_module_stamp(module))
                if _version_error is not None:  # no readable stamp in the file, but build_info() says so
                    _module, _loaded, _reason = None, False, _version_error
                else:
                    _module, _loaded, _reason = module, True, None
    if _version_error is not None:
        log_fallback_once("extension", f"{_version_error}; using the pure-torch fallbacks. Rebuild it "
                                       f"against this torch with {REBUILD_HINT}")
    elif not _loaded:
        log_fallback_once(
            "extension",
            f"tbfast._C C++ extension not loaded ({_reason}); using the pure-torch fallbacks. "
            f"Build it with {REBUILD_HINT}",
        )
    return _loaded


def build_status() -> dict[str, Any] | None:
    """The build record setup.py wrote (``tbfast/_build_status.json``): ``extension`` is "built",
    "failed" or "skipped", ``reason`` says why not, ``torch_version`` the torch it built with.
    None when there is none (a source tree that never ran setup.py)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_status.json")
    try:
        with open(path, encoding="utf-8") as f:
            status = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"extension": "unknown", "reason": f"unreadable {path}: {type(exc).__name__}: {exc}"}
    return status if isinstance(status, dict) else None


def _missing_reason(exc: BaseException) -> str:
    """Why tbfast._C is missing: the build record's reason when the build failed or was skipped."""
    why = f"{type(exc).__name__}: {exc}"
    status = build_status()
    if status and status.get("extension") in ("failed", "skipped") and status.get("reason"):
        return f"not built at install time: {status['reason']} [{why}]"
    return why


#: Where the JSON stamp of csrc/module.cpp's build_info() starts inside the shared library.
_STAMP_START = b'{"abi": '


def _file_stamp() -> dict[str, Any] | None:
    """build_info() of tbfast._C read from the shared library's bytes, without loading it; None when
    there is no such file (or no stamp in it)."""
    if "tbfast._C" in sys.modules:  # already imported (or replaced): nothing left to protect
        return None
    try:
        spec = importlib.util.find_spec("tbfast._C")
    except (ImportError, ValueError):
        return None
    path = getattr(spec, "origin", None)
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    start = data.find(_STAMP_START)
    end = data.find(b"}", start)
    if start < 0 or end < 0:
        return None
    try:
        stamp = json.loads(data[start:end + 1].decode("utf-8"))
    except ValueError:
        return None
    stamp["path"] = path
    return stamp


def _module_stamp(module: Any) -> dict[str, Any] | None:
    try:
        stamp = json.loads(module.build_info())
    except Exception:  # abi_mismatch has already judged a missing or broken build_info()
        return None
    if isinstance(stamp, dict):
        stamp.setdefault("path", getattr(module, "__file__", None) or "tbfast._C")
    return stamp if isinstance(stamp, dict) else None


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a torch version string such as "2.13.0+cpu" or "2.14.0.dev20260101"."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(g or 0) for g in m.groups()) if m else ()


def torch_mismatch(stamp: dict[str, Any] | None, running: str | None = None) -> str | None:
    """One line saying why an extension with build stamp ``stamp`` must not run on torch ``running``
    (default: this process's torch); None when it may (or when the stamp names no torch).

    A regular build runs only on the torch release it was compiled against (the local tag, e.g.
    +cpu / +cu130, is not compared: the extension uses no CUDA headers). A ``stable_abi`` build
    runs on every torch >= its ``torch_min``.
    """
    if not stamp or not stamp.get("torch_version") or stamp.get("torch_version") == "unknown":
        return None
    running = running or torch.__version__
    built = str(stamp["torch_version"])
    path = stamp.get("path") or "tbfast._C"
    if stamp.get("stable_abi"):
        floor = str(stamp.get("torch_min") or built)
        if _release(running)[:2] >= _release(floor)[:2]:
            return None
        return (f"tbfast._C extension {path} uses torch's stable C++ interface for torch >= {floor} "
                f"(built with torch {built}); this process runs torch {running}")
    if built.split("+")[0] == running.split("+")[0]:
        return None
    return (f"tbfast._C extension {path} was built against torch {built}, but this process runs "
            f"torch {running}; not loaded (a compiled extension is tied to its torch version)")


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
    """``loaded``, ``path``, ``reason`` (why not loaded), ``build`` (how tbfast._C was built),
    ``torch_mismatch`` (the torch-version refusal, or None) and ``build_status`` (setup.py's record)."""
    loaded = _load()
    return {"loaded": loaded, "path": getattr(_module, "__file__", None), "reason": _reason,
            "build": _json_info("build_info") if loaded else None, "torch_mismatch": _version_error,
            "build_status": build_status()}


def cpu_features() -> dict[str, Any] | None:
    """The CPU features the compiled kernels use and the active vector variants of the secular
    kernel (``secular_simd``: ``"avx512"`` or ``"portable"``) and of the digest kernel
    (``digest_simd``: ``"avx512"``, ``"avx2"`` or ``"portable"``); None when the extension is not
    loaded."""
    return _json_info("cpu_features")


def lapack_info() -> dict[str, Any] | None:
    """Where the CPU eigensolver found LAPACK ``?syevd`` (None when the extension is not loaded)."""
    return _json_info("lapack_info")
