"""Finding and loading libcusolver for the batched GPU eigensolver, without side effects.

``tbfast._C`` is built without the CUDA toolkit; ``csrc/cusolver_runtime.cpp`` opens libcusolver
with ``dlopen`` and calls ``cusolverDnXsyevBatched``. This module finds the library, checks that
it belongs to torch's CUDA, and holds the size policy (:func:`use_batched_solver`).

Discovery never runs CUDA work and never creates a CUDA context: it reads torch's install
(``torch/lib`` and the ``nvidia`` pip wheels of torch's CUDA), ``/proc/self/maps``, the
environment and the file system, then ``dlopen``s one file and asks it ``cusolverGetVersion``
(a host function). Importing this module needs neither a GPU, the extension nor CUDA libraries.
"""

from __future__ import annotations

import ctypes.util
import glob
import logging
import os
import site
import sys
import threading
import warnings
from typing import Any

import torch

from .. import _backend

__all__ = [
    "CUSOLVER_MAJOR_FOR_CUDA",
    "DEFAULT_MAX_N",
    "DEFAULT_WORKSPACE_LIMIT",
    "cusolver_status",
    "required_cusolver_major",
    "size_threshold",
    "use_batched_solver",
    "version_mismatch",
]

log = logging.getLogger(__name__)

#: Largest n for which the batched solver is used by default (SPEC section 8: it pays up to
#: ~1024-2048; at 4096 the per-matrix solver is as fast). Measured on an H200: docs/GPU.md.
DEFAULT_MAX_N = 1536
#: Environment variable overriding :data:`DEFAULT_MAX_N`.
ENV_MAX_N = "TBFAST_CUSOLVER_MAX_N"
#: The former name of :data:`ENV_MAX_N` (read when the new one is unset; warns once).
ENV_MAX_N_DEPRECATED = "TBFAST_SYEVJ_MAX_N"
#: Environment variable naming a libcusolver to load before any search.
ENV_LIBRARY = "TBFAST_CUSOLVER_PATH"
#: Default bound, in bytes, on the solver workspace plus the scratch copy of the matrices.
DEFAULT_WORKSPACE_LIMIT = 2 << 30

#: libcusolver major version shipped with each CUDA major version. Source: NVIDIA's conda
#: channel, https://anaconda.org/nvidia/libcusolver/labels (one label per CUDA release, read
#: 2026-11-27): cuda-11.3.0 .. cuda-11.8.0 carry libcusolver 11.1.1.58 .. 11.4.1.48,
#: cuda-12.0.0 .. cuda-12.9.1 carry 11.4.2.57 .. 11.7.5.82, cuda-13.0.0 .. cuda-13.1.1 carry
#: 12.0.3.29 .. 12.0.9.81. (CUDA 11.0-11.2 are not listed there; tbfast needs
#: cusolverDnXsyevBatched, cuSOLVER >= 11.7.1 = CUDA 12.6 Update 2, in any case.)
CUSOLVER_MAJOR_FOR_CUDA = {11: 11, 12: 11, 13: 12}

_lock = threading.Lock()
_status: dict[str, Any] | None = None
_warned_deprecated_env = False


# ---------------------------------------------------------------------------------------------
# Pure functions: versions


def cuda_major(cuda_version: str | None) -> int | None:
    """The major of a CUDA version string such as torch.version.cuda ("13.0" -> 13); None if unknown."""
    head = (cuda_version or "").split(".")[0]
    return int(head) if head.isdigit() else None


def required_cusolver_major(cuda_version: str | None) -> int | None:
    """The libcusolver major that belongs to ``cuda_version`` (:data:`CUSOLVER_MAJOR_FOR_CUDA`)."""
    major = cuda_major(cuda_version)
    return CUSOLVER_MAJOR_FOR_CUDA.get(major) if major is not None else None


def version_string(version: int | None) -> str | None:
    """cusolverGetVersion's integer (major*1000 + minor*100 + patch) as "major.minor.patch"."""
    if version is None or version < 0:
        return None
    return f"{version // 1000}.{(version % 1000) // 100}.{version % 100}"


def version_mismatch(version: int | None, cuda_version: str | None) -> str | None:
    """One line saying why libcusolver ``version`` does not belong to torch's ``cuda_version``;
    None when it does, or when either is unknown (nothing to compare)."""
    required = required_cusolver_major(cuda_version)
    if version is None or version < 0 or required is None or version // 1000 == required:
        return None
    return (f"libcusolver {version_string(version)} does not match torch's CUDA {cuda_version} "
            f"(which ships libcusolver {required}.x)")


def soname_major(path: str) -> int | None:
    """The major in a libcusolver file name (libcusolver.so.12 -> 12); None if it has none."""
    suffix = os.path.basename(path)[len("libcusolver.so"):].lstrip(".")
    major = suffix.split(".")[0]
    return int(major) if major.isdigit() else None


# ---------------------------------------------------------------------------------------------
# Finding libcusolver (file system and /proc only)


def _is_cusolver(path: str) -> bool:
    base = os.path.basename(path)
    return base == "libcusolver.so" or base.startswith("libcusolver.so.")


def _unique(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _glob_libraries(pattern_dirs: list[str]) -> list[str]:
    """libcusolver files in ``pattern_dirs`` (glob patterns allowed), newest soname first."""
    found: list[str] = []
    for d in pattern_dirs:
        paths = glob.glob(os.path.join(d, "libcusolver.so*"))
        found.extend(sorted((p for p in paths if _is_cusolver(p)), key=lambda p: (-(soname_major(p) or 0), p)))
    return _unique(found)


def mapped_libraries(maps_file: str = "/proc/self/maps") -> list[str]:
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
            if path.startswith("/") and _is_cusolver(path):
                found.append(path)
    return _unique(found)


def torch_libraries(torch_dir: str, cuda_version: str | None) -> list[str]:
    """The libcusolver torch itself would load: ``torch/lib``, then the ``nvidia`` wheels next to
    torch for its CUDA major (CUDA 13: ``nvidia/cu13/lib``; CUDA 12: ``nvidia/cusolver/lib``)."""
    site_dir = os.path.dirname(torch_dir)
    dirs = [os.path.join(torch_dir, "lib")]
    major = cuda_major(cuda_version)
    if major is not None:
        dirs.append(os.path.join(site_dir, "nvidia", f"cu{major}", "lib"))
    dirs.append(os.path.join(site_dir, "nvidia", "cusolver", "lib"))
    return _glob_libraries(dirs)


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
    return _unique(roots)


def package_libraries(roots: list[str] | None = None) -> list[str]:
    """libcusolver files of the ``nvidia-cusolver`` wheels (cu12: nvidia/cusolver/lib, cu13: nvidia/cu13/lib)."""
    roots = _search_roots() if roots is None else roots
    return _glob_libraries([os.path.join(r, "nvidia", "*", "lib") for r in roots])


def _system_libraries() -> list[str]:
    """libcusolver files on LD_LIBRARY_PATH and in the CUDA toolkit."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "lib64"))
    dirs.append("/usr/local/cuda/lib64")
    return _glob_libraries(dirs)


def candidates(cuda_version: str | None = None, *, torch_dir: str | None = None,
               maps_file: str = "/proc/self/maps", roots: list[str] | None = None,
               system: bool = True) -> list[str]:
    """Every libcusolver worth trying, most likely first; "" means the default sonames.

    Order: ``$TBFAST_CUSOLVER_PATH``; copies already mapped into the process; torch's own
    (:func:`torch_libraries`); the ``nvidia`` wheels; LD_LIBRARY_PATH and the CUDA toolkit;
    ``ctypes.util.find_library``. Found files whose soname major is not the one of torch's CUDA
    (:data:`CUSOLVER_MAJOR_FOR_CUDA`) are left out, so a mismatched copy is not loaded unless
    the user names it (its version is then checked after loading).
    """
    torch_dir = torch_dir or os.path.dirname(torch.__file__)
    explicit = [os.environ[ENV_LIBRARY]] if os.environ.get(ENV_LIBRARY) else []
    out: list[str] = []
    out.extend(mapped_libraries(maps_file))
    out.extend(torch_libraries(torch_dir, cuda_version))
    out.extend(package_libraries(roots))
    if system:
        out.extend(_system_libraries())
        name = ctypes.util.find_library("cusolver")
        if name:
            out.append(name)
    required = required_cusolver_major(cuda_version)
    keep = explicit + [c for c in out if required is None or soname_major(c) in (None, required)]
    keep.append("")  # cusolver_load("") tries libcusolver.so.12, .so.11, .so via the loader's search path
    return _unique(keep)


# ---------------------------------------------------------------------------------------------
# Loading and status


def _not_loaded(reason: str, tried: list[str] | None = None) -> dict[str, Any]:
    return {"loaded": False, "path": None, "version": None, "version_str": None, "reason": reason,
            "tried": tried or []}


def _load(ops: Any, cuda_version: str | None) -> dict[str, Any]:
    """Load the first usable candidate through ``ops`` (tbfast._C: its cusolver_load/_status)."""
    tried: list[str] = []
    reasons: list[str] = []
    for cand in candidates(cuda_version):
        tried.append(cand or "<default sonames>")
        err = ops.cusolver_load(cand)
        if not err:
            break
        reasons.append(err)
    loaded, path, version, last_error = ops.cusolver_status()
    if not loaded:
        return _not_loaded("libcusolver with cusolverDnXsyevBatched not found: " + "; ".join(reasons or [last_error]),
                           tried)
    version = int(version) if version >= 0 else None
    status = {"loaded": True, "path": path or None, "version": version, "version_str": version_string(version),
              "reason": None, "tried": tried}
    mismatch = version_mismatch(version, cuda_version)
    if mismatch:  # reported as not loaded; tbfast never calls this copy
        status.update(loaded=False, reason=f"{mismatch}: {path}")
    return status


def cusolver_status(refresh: bool = False) -> dict[str, Any]:
    """Whether cuSOLVER's batched eigensolver is usable, and why not. No CUDA work, no context.

    Returns a dict: ``loaded`` (bool), ``path`` (the library file), ``version`` (e.g. 12000)
    and ``version_str``, ``reason`` (why not usable, else None; a libcusolver whose major does
    not belong to torch's CUDA is "not loaded" with both versions named), ``tried``
    (candidates), ``torch_cuda`` (torch.version.cuda), ``cuda_available``, ``max_n`` (the active
    size threshold). The first call searches for and loads the library; later calls return the
    cached result unless ``refresh``.
    """
    global _status
    with _lock:
        if _status is None or refresh:
            if _backend.extension_function("cusolver_load") is None:
                why = ("the tbfast._C extension is not built" if not _backend.extension_loaded()
                       else "tbfast._C was built without csrc/cusolver_runtime.cpp (no cusolver_load)")
                _status = _not_loaded(why)
            else:
                try:
                    _status = _load(_backend.extension_module(), torch.version.cuda)
                except Exception as exc:  # a broken library must not break the caller
                    _status = _not_loaded(f"loading libcusolver failed: {exc}")
        out = dict(_status)
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    out["max_n"] = size_threshold()
    return out


# ---------------------------------------------------------------------------------------------
# Size policy


def _env_max_n() -> tuple[str, str]:
    """(variable name, raw value) of the size threshold; the old name warns once per process."""
    global _warned_deprecated_env
    raw = os.environ.get(ENV_MAX_N, "").strip()
    if raw:
        return ENV_MAX_N, raw
    raw = os.environ.get(ENV_MAX_N_DEPRECATED, "").strip()
    if raw and not _warned_deprecated_env:
        _warned_deprecated_env = True
        warnings.warn(f"{ENV_MAX_N_DEPRECATED} is deprecated (the batched solver is not Jacobi); "
                      f"set {ENV_MAX_N} instead", FutureWarning, stacklevel=3)
    return ENV_MAX_N_DEPRECATED, raw


def size_threshold() -> int:
    """Largest n for the batched solver: ``$TBFAST_CUSOLVER_MAX_N``, else the deprecated
    ``$TBFAST_SYEVJ_MAX_N``, else :data:`DEFAULT_MAX_N`."""
    name, raw = _env_max_n()
    if not raw:
        return DEFAULT_MAX_N
    try:
        return int(raw)
    except ValueError:
        _backend.log_fallback_once(f"bad-env-{raw}", f"{name}={raw!r} is not an integer; using {DEFAULT_MAX_N}")
        return DEFAULT_MAX_N


def use_batched_solver(n: int, batch: int, max_n: int | None = None) -> bool:
    """True when cuSOLVER's batched solver should handle ``batch`` matrices of size ``n``.

    The batched solver pays up to n ~ 1024-2048 (SPEC section 8); above, torch's per-matrix
    solver is as fast. The threshold is ``max_n`` if given, else :func:`size_threshold`.
    """
    limit = size_threshold() if max_n is None else int(max_n)
    return batch >= 1 and 1 <= n <= limit
