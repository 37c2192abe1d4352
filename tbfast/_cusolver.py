"""cuSOLVER batched eigenvalues for CUDA tensors, with libcusolver found and loaded at run time.

``tbfast._C`` is built without the CUDA toolkit; ``csrc/cusolver_runtime.cpp`` opens libcusolver
with ``dlopen`` and calls ``cusolverDnXsyevBatched`` (eigenvalues only) on torch's current
stream with workspace from torch's caching allocator. This module finds the library (the copy
torch itself loaded, the ``nvidia-cusolver`` pip package, ``LD_LIBRARY_PATH``, the CUDA
toolkit), decides when the batched solver pays (:func:`use_batched_solver`), and wraps the op
with fallbacks to ``torch.linalg.eigvalsh`` (:func:`eigvalsh_batched_cuda`). Importing it never
needs a GPU, the extension or CUDA libraries.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib
import logging
import os
import site
import sys
import threading
from typing import Any

import torch

__all__ = [
    "DEFAULT_MAX_N",
    "DEFAULT_WORKSPACE_LIMIT",
    "cusolver_status",
    "eigvalsh_batched_cuda",
    "use_batched_solver",
]

log = logging.getLogger(__name__)

#: Largest n for which the batched solver is used by default (SPEC section 8: it pays up to
#: ~1024-2048; at 4096 the per-matrix solver is as fast). Confirm on the device: docs/GPU.md.
DEFAULT_MAX_N = 1536
#: Environment variable overriding :data:`DEFAULT_MAX_N`.
ENV_MAX_N = "TBFAST_SYEVJ_MAX_N"
#: Environment variable naming a libcusolver to load before any search.
ENV_LIBRARY = "TBFAST_CUSOLVER_PATH"
#: Default bound, in bytes, on the solver workspace plus the scratch copy of the matrices.
DEFAULT_WORKSPACE_LIMIT = 2 << 30

_lock = threading.Lock()
_status: dict[str, Any] | None = None
_logged: set[str] = set()


def _log_once(key: str, message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key in _logged:
        return
    _logged.add(key)
    log.log(level, message)


# ---------------------------------------------------------------------------------------------
# Finding libcusolver


def _ops() -> tuple[Any, str]:
    """``(torch.ops.tbfast, "")`` when the cuSOLVER ops are registered, else ``(None, reason)``."""
    try:
        importlib.import_module("tbfast._C")
    except ImportError as exc:
        return None, f"the tbfast._C extension is not built ({exc})"
    ops = torch.ops.tbfast
    try:
        ops.cusolver_load  # noqa: B018 - attribute lookup raises when the op is missing
    except (AttributeError, RuntimeError):
        return None, "tbfast._C was built without csrc/cusolver_runtime.cpp (no cusolver_load op)"
    return ops, ""


def _is_cusolver(path: str) -> bool:
    base = os.path.basename(path)
    return base == "libcusolver.so" or base.startswith("libcusolver.so.")


def _mapped_libraries(maps_file: str = "/proc/self/maps") -> list[str]:
    """Paths of the libcusolver copies already mapped into this process (e.g. by torch)."""
    try:
        with open(maps_file, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6:
            path = parts[5].strip()
            if path.startswith("/") and _is_cusolver(path) and path not in found:
                found.append(path)
    return found


def _touch_torch_cusolver() -> None:
    """Make torch load its own libcusolver (its CUDA linear algebra library loads lazily)."""
    if not torch.cuda.is_available():
        return
    try:
        torch.linalg.eigvalsh(torch.eye(2, device="cuda"))
    except Exception as exc:  # pragma: no cover - depends on the device
        log.debug("torch.linalg.eigvalsh on CUDA failed while locating libcusolver: %s", exc)


def _search_roots() -> list[str]:
    """Directories that may hold the ``nvidia`` pip namespace package."""
    roots: list[str] = []
    try:
        roots.extend(site.getsitepackages())
    except AttributeError:  # pragma: no cover - virtualenvs without getsitepackages
        pass
    try:
        roots.append(site.getusersitepackages())
    except AttributeError:  # pragma: no cover
        pass
    roots.extend(p for p in sys.path if p)
    try:
        import nvidia  # the namespace package of the nvidia-* CUDA wheels

        roots.extend(os.path.dirname(p) for p in getattr(nvidia, "__path__", []))
    except ImportError:
        pass
    seen: list[str] = []
    for r in roots:
        if r not in seen:
            seen.append(r)
    return seen


def _soname_rank(path: str) -> tuple[int, str]:
    """Sort key: newest soname first (libcusolver.so.12 before .so.11), plain .so last."""
    suffix = os.path.basename(path)[len("libcusolver.so"):].lstrip(".")
    major = suffix.split(".")[0]
    return (-int(major) if major.isdigit() else 0, path)


def _package_libraries(roots: list[str] | None = None) -> list[str]:
    """libcusolver files of the ``nvidia-cusolver`` wheels (cu12: nvidia/cusolver/lib, cu13: nvidia/cu13/lib)."""
    found: list[str] = []
    for root in _search_roots() if roots is None else roots:
        for path in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libcusolver.so*")), key=_soname_rank):
            if _is_cusolver(path) and path not in found:
                found.append(path)
    return found


def _system_libraries() -> list[str]:
    """libcusolver files on LD_LIBRARY_PATH and in the CUDA toolkit."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "lib64"))
    dirs.append("/usr/local/cuda/lib64")
    found: list[str] = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "libcusolver.so*")), key=_soname_rank):
            if _is_cusolver(path) and path not in found:
                found.append(path)
    return found


def _candidates() -> list[str]:
    """Every libcusolver worth trying, most likely first; "" means the default sonames."""
    out: list[str] = []
    if os.environ.get(ENV_LIBRARY):
        out.append(os.environ[ENV_LIBRARY])
    mapped = _mapped_libraries()
    if not mapped:
        _touch_torch_cusolver()
        mapped = _mapped_libraries()
    out.extend(mapped)
    out.extend(_package_libraries())
    out.extend(_system_libraries())
    name = ctypes.util.find_library("cusolver")
    if name:
        out.append(name)
    out.append("")  # cusolver_load("") tries libcusolver.so.12, .so.11, .so via the loader's search path
    unique: list[str] = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def _version_string(version: int) -> str | None:
    """cusolverGetVersion's integer (major*1000 + minor*100 + patch) as "major.minor.patch"."""
    if version is None or version < 0:
        return None
    return f"{version // 1000}.{(version % 1000) // 100}.{version % 100}"


def _load(ops: Any) -> dict[str, Any]:
    tried: list[str] = []
    reasons: list[str] = []
    for cand in _candidates():
        tried.append(cand or "<default sonames>")
        err = ops.cusolver_load(cand)
        if not err:
            break
        reasons.append(err)
    loaded, path, version, last_error = ops.cusolver_status()
    status: dict[str, Any] = {
        "loaded": bool(loaded),
        "path": path or None,
        "version": int(version) if version >= 0 else None,
        "version_str": _version_string(int(version)),
        "reason": None,
        "tried": tried,
    }
    if not loaded:
        status["reason"] = "libcusolver with cusolverDnXsyevBatched not found: " + "; ".join(reasons or [last_error])
    return status


def cusolver_status(refresh: bool = False) -> dict[str, Any]:
    """Whether cuSOLVER's batched eigensolver is usable, and why not.

    Returns a dict: ``loaded`` (bool), ``path`` (the library file), ``version`` (e.g. 12000)
    and ``version_str``, ``reason`` (why not loaded, else None), ``tried`` (candidates),
    ``cuda_available``, ``max_n`` (the active size threshold). The first call searches for
    and loads the library; later calls return the cached result unless ``refresh``.
    """
    global _status
    with _lock:
        if _status is None or refresh:
            ops, why = _ops()
            if ops is None:
                st: dict[str, Any] = {"loaded": False, "path": None, "version": None,
                                      "version_str": None, "reason": why, "tried": []}
            else:
                try:
                    st = _load(ops)
                except Exception as exc:  # a broken library must not break the import
                    st = {"loaded": False, "path": None, "version": None, "version_str": None,
                          "reason": f"loading libcusolver failed: {exc}", "tried": []}
            _status = st
        out = dict(_status)
    out["cuda_available"] = torch.cuda.is_available()
    out["max_n"] = _max_n_from_env()
    return out


# ---------------------------------------------------------------------------------------------
# Size policy


def _max_n_from_env() -> int:
    raw = os.environ.get(ENV_MAX_N, "").strip()
    if not raw:
        return DEFAULT_MAX_N
    try:
        value = int(raw)
    except ValueError:
        _log_once(f"bad-env-{raw}", f"{ENV_MAX_N}={raw!r} is not an integer; using {DEFAULT_MAX_N}")
        return DEFAULT_MAX_N
    return value


def use_batched_solver(n: int, batch: int, max_n: int | None = None) -> bool:
    """True when cuSOLVER's batched solver should handle ``batch`` matrices of size ``n``.

    The batched solver pays up to n ~ 1024-2048 (SPEC section 8); above, torch's per-matrix
    solver is as fast. The threshold is ``max_n`` if given, else the environment variable
    ``TBFAST_SYEVJ_MAX_N``, else :data:`DEFAULT_MAX_N`.
    """
    limit = _max_n_from_env() if max_n is None else int(max_n)
    return batch >= 1 and 1 <= n <= limit


# ---------------------------------------------------------------------------------------------
# Solving


def _solve(G: torch.Tensor, workspace_limit: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw op: ``(w, info)``; info[k] != 0 means matrix k did not converge."""
    return torch.ops.tbfast.cusolver_eigvalsh(G, workspace_limit, stream)


def _resolve_failures(G: torch.Tensor, w: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
    """Re-solve the matrices cuSOLVER flagged (info != 0) or returned non-finite values for."""
    from .eig import resolve_failed

    bad_mask = (info != 0) | ~torch.isfinite(w).all(dim=1)
    if not bool(bad_mask.any()):  # the one host synchronisation of a call
        return w
    bad = torch.nonzero(bad_mask).flatten()
    codes = info[bad].tolist()
    _log_once("nonconverged",
              f"cuSOLVER cusolverDnXsyevBatched: {bad.numel()} of {G.shape[0]} matrices (n={G.shape[1]}) "
              f"not converged or non-finite (info {codes[:8]}); solved again with torch.linalg.eigvalsh")
    return resolve_failed(G, w, bad_mask)


def eigvalsh_batched_cuda(G: torch.Tensor, workspace_limit: int = 0, *,
                          deferred: list | None = None) -> torch.Tensor:
    """Ascending eigenvalues ``(B, n)`` of a CUDA batch ``(B, n, n)`` of symmetric matrices.

    Reads the lower triangle only, like ``torch.linalg.eigvalsh``. Uses cuSOLVER's
    ``cusolverDnXsyevBatched`` on the current stream, in chunks whose workspace stays under
    ``workspace_limit`` bytes (0: :data:`DEFAULT_WORKSPACE_LIMIT`). Falls back to
    ``torch.linalg.eigvalsh`` when cuSOLVER is unavailable or fails, and re-solves matrices it
    reports as not converged; each reason is logged once. Non-finite matrices give NaN rows.
    With a ``deferred`` list, nothing is re-solved here and the host does not synchronise: a
    device bool tensor (True = not converged or non-finite) is appended for the caller to check.
    """
    if not isinstance(G, torch.Tensor) or G.dim() != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(f"eigvalsh_batched_cuda: expected a (B, n, n) tensor, got {getattr(G, 'shape', type(G).__name__)}")
    if not G.is_cuda:
        raise ValueError(f"eigvalsh_batched_cuda: expected a CUDA tensor, got device {G.device}")
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"eigvalsh_batched_cuda: needs float32 or float64 matrices, got {G.dtype}")
    if workspace_limit < 0:
        raise ValueError(f"eigvalsh_batched_cuda: workspace_limit must be >= 0, got {workspace_limit}")
    B, n = G.shape[0], G.shape[1]
    if B == 0 or n == 0:
        return G.new_zeros((B, n))
    status = cusolver_status()
    if not status["loaded"]:
        _log_once("unavailable", f"cuSOLVER unavailable ({status['reason']}); using torch.linalg.eigvalsh")
        return torch.linalg.eigvalsh(G)
    stream = torch.cuda.current_stream(G.device).cuda_stream
    try:
        w, info = _solve(G, int(workspace_limit), int(stream))
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        _log_once(f"failed-{type(exc).__name__}",
                  f"cuSOLVER batched eigensolver failed ({exc}); using torch.linalg.eigvalsh")
        return torch.linalg.eigvalsh(G)
    if deferred is not None:
        deferred.append((info != 0) | ~torch.isfinite(w).all(dim=1))
        return w
    return _resolve_failures(G, w, info)

