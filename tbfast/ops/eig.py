"""Batched symmetric eigenvalues: the ``tbfast::eigvalsh_batched`` op and its Python entry.

The op ``eigvalsh_batched(Tensor G, int workspace_limit) -> (Tensor w, Tensor info)`` is defined
here, once, with one kernel per device:

- CPU: the C++ LAPACK ``?syevd`` kernel of ``tbfast._C`` (csrc/eig_cpu.cpp) when it is built;
- CUDA: cuSOLVER's batched solver (``tbfast::cusolver_eigvalsh``, csrc/cusolver_runtime.cpp)
  where it pays (:func:`tbfast.ops.cusolver.use_batched_solver`), else ``torch.linalg.eigvalsh``;
- anywhere else, or with nothing compiled: the torch reference (CompositeExplicitAutograd);
- a fake kernel, so the op traces under ``torch.compile``.

``info[k] != 0`` means matrix k was not solved. The op adds no host synchronisation of its own
(``torch.linalg.eigvalsh`` keeps its own error check). The Python entry
:func:`eigvalsh_batched` adds the one retry policy (:func:`resolve_flagged`): matrices a solver
flags are solved again with ``torch.linalg.eigvalsh``, or, with ``failure_flags``, their flags
are handed to the caller to check later without a host sync.
"""

from __future__ import annotations

import logging

import math

import torch

from .. import _backend
from ..errors import BackendUnavailableError
from ..kernels.ref import eigvalsh_batched_ref
from ..options import EIG_BACKENDS
from . import cusolver

__all__ = ["eigvalsh_batched", "resolve_flagged", "implementations", "registration", "EIG_BACKENDS", "OP_NAMES"]

OP = "tbfast::eigvalsh_batched"
CUSOLVER_OP = "tbfast::cusolver_eigvalsh"

SCHEMAS = {
    "eigvalsh_batched": "eigvalsh_batched(Tensor G, int workspace_limit) -> (Tensor, Tensor)",
    # the raw batched cuSOLVER solver: CUDA kernel in csrc/cusolver_runtime.cpp, none without it
    "cusolver_eigvalsh": "cusolver_eigvalsh(Tensor G, int workspace_limit) -> (Tensor, Tensor)",
}
#: The ops this module defines in namespace ``tbfast``.
OP_NAMES = tuple(SCHEMAS)


# The C++ kernels register first (impl before def is legal). An extension from another checkout,
# which could define these schemas itself, is refused by _backend's ABI check.
_backend.extension_loaded()
_lib = torch.library.Library("tbfast", "FRAGMENT")  # kept alive: dropping it unregisters the ops
for _schema in SCHEMAS.values():
    _lib.define(_schema)


def _reference_kernel(G: torch.Tensor, workspace_limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    return eigvalsh_batched_ref(G)


def _cusolver_pays(G: torch.Tensor) -> bool:
    """The CUDA policy: cuSOLVER's batched solver when it is loaded and the size pays."""
    return bool(cusolver.cusolver_status()["loaded"]) and cusolver.use_batched_solver(G.shape[1], G.shape[0])


def _solve(G: torch.Tensor, workspace_limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw batched cuSOLVER op (a seam for the GPU tests)."""
    return torch.ops.tbfast.cusolver_eigvalsh(G, workspace_limit)


def _cusolver_solve(G: torch.Tensor, workspace_limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batched cuSOLVER kernel; a failing call (not out-of-memory) falls back to torch."""
    try:
        return _solve(G, workspace_limit)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        _backend.log_fallback_once(f"cusolver-failed-{type(exc).__name__}",
                                   f"cuSOLVER batched eigensolver failed ({exc}); using torch.linalg.eigvalsh")
        return eigvalsh_batched_ref(G)


def _cuda_kernel(G: torch.Tensor, workspace_limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    if _cusolver_pays(G):
        return _cusolver_solve(G, workspace_limit)
    return eigvalsh_batched_ref(G)


def _fake_kernel(G: torch.Tensor, workspace_limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes and dtypes of the real kernels: w (B, n) in G's dtype, info int32 (B,)."""
    torch._check(G.dim() == 3, lambda: f"expected a (B, n, n) tensor, got {G.dim()} dims")
    return G.new_empty((G.shape[0], G.shape[1])), G.new_empty((G.shape[0],), dtype=torch.int32)


_lib.impl("eigvalsh_batched", _reference_kernel, "CompositeExplicitAutograd")
_lib.impl("eigvalsh_batched", _cuda_kernel, "CUDA")
torch.library.register_fake(OP, _fake_kernel, lib=_lib)
torch.library.register_fake(CUSOLVER_OP, _fake_kernel, lib=_lib)


def implementations() -> dict[str, str]:
    """Which kernel of ``tbfast::eigvalsh_batched`` runs per device in this process."""
    cpp = _backend.has_op("eigvalsh_batched") and torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")
    lapack = bool((_backend.lapack_info() or {}).get("syevd"))
    out = {"cpu": ("C++ batched " + ("LAPACK ?syevd" if lapack else "at::linalg_eigvalsh")) if cpp
           else "torch.linalg.eigvalsh"}
    st = cusolver.cusolver_status()
    out["cuda"] = (f"cuSOLVER XsyevBatched for n <= {st['max_n']}, torch.linalg.eigvalsh above"
                   if st["loaded"] else "torch.linalg.eigvalsh")
    return out


def registration() -> dict[str, object]:
    """What the dispatcher holds for ``tbfast::eigvalsh_batched``, per dispatch key."""
    def has(key: str) -> bool:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP, key))

    return {"name": OP,
            "CPU": "C++ LAPACK kernel (tbfast._C)" if has("CPU") else "torch reference",
            "CUDA": "cuSOLVER where it pays, else torch.linalg.eigvalsh (tbfast.ops.eig)" if has("CUDA")
            else "torch reference",
            "reference": "torch.linalg.eigvalsh (CompositeExplicitAutograd)" if has("CompositeExplicitAutograd") else None,
            "fake": has("Meta")}


# ---------------------------------------------------------------------------------------------
# The retry policy


def resolve_flagged(G: torch.Tensor, w: torch.Tensor, info: torch.Tensor, solver: str,
                    failure_flags: list | None = None) -> torch.Tensor:
    """The one retry policy for the compiled solvers' ``(w, info)``.

    A matrix is flagged when ``info != 0`` or its eigenvalues are not all finite. With a
    ``failure_flags`` list the flags (a device bool tensor, True = failed) are appended for the
    caller to check later and ``w`` is returned as is (no host sync). Otherwise flagged matrices
    are solved again with ``torch.linalg.eigvalsh`` (one host sync), except flagged matrices
    holding NaN/Inf, which get NaN rows. A matrix holding NaN/Inf that is not flagged (e.g. a NaN
    on the diagonal can give finite eigenvalues with info 0) keeps its eigenvalues: finding
    non-finite weights is the caller's job (it checks them per layer). A re-solve is logged once
    per solver.
    """
    flagged = (info != 0) | ~torch.isfinite(w).all(dim=1)
    if failure_flags is not None:
        failure_flags.append(flagged)
        return w
    if not bool(flagged.any()):  # the one host synchronisation of a call
        return w
    bad = torch.nonzero(flagged).flatten()
    sub = G[bad]
    finite = torch.isfinite(sub).flatten(1).all(dim=1)
    fixed = torch.full_like(w[bad], math.nan)
    if bool(finite.any()):
        codes = info[bad][finite].tolist()
        _backend.log_fallback_once(
            f"nonconverged-{solver}",
            f"{solver}: {len(codes)} of {G.shape[0]} matrices (n={G.shape[1]}) not converged or non-finite "
            f"(info {codes[:8]}); solved again with torch.linalg.eigvalsh")
        fixed[finite] = torch.linalg.eigvalsh(sub[finite])
    w = w.clone()
    w[bad] = fixed
    return w


# ---------------------------------------------------------------------------------------------
# The Python entry


def _check(G: torch.Tensor, backend: str, workspace_limit: int) -> None:
    if not isinstance(G, torch.Tensor) or G.dim() != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(f"expected a (B, n, n) tensor, got {getattr(G, 'shape', type(G).__name__)}")
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"eigvalsh_batched needs float32 or float64, got {G.dtype}")
    if backend not in EIG_BACKENDS:
        raise ValueError(f"unknown eigensolver backend {backend!r}; choose from {EIG_BACKENDS}")
    if workspace_limit < 0:
        raise ValueError(f"eigvalsh_batched: workspace_limit must be >= 0, got {workspace_limit}")


def _solver(G: torch.Tensor, backend: str) -> str:
    """The kernel for this call: "cusolver", "cpp" or "torch".

    Raises BackendUnavailableError when an explicitly requested one is missing."""
    if backend == "torch":
        return "torch"
    if G.is_cuda:
        if backend == "cpp":
            return "torch"
        st = cusolver.cusolver_status()
        if backend == "cusolver":
            if not st["loaded"]:
                raise BackendUnavailableError(f"cuSOLVER batched solver requested but unavailable: {st['reason']}")
            return "cusolver"
        if not st["loaded"]:
            _backend.log_fallback_once("cusolver-missing",
                                       f"cuSOLVER not loaded ({st['reason']}); using torch.linalg.eigvalsh")
            return "torch"
        return "cusolver" if _cusolver_pays(G) else "torch"
    if backend in ("auto", "cpp") and _backend.has_op("eigvalsh_batched"):
        return "cpp"
    if backend == "cpp":
        raise BackendUnavailableError("C++ eigensolver requested but the tbfast._C extension is not loaded")
    _backend.log_fallback_once("eig-cpu-torch", "C++ extension not loaded: CPU eigenvalues use torch.linalg.eigvalsh",
                               level=logging.INFO)  # _backend has warned once already
    return "torch"


def eigvalsh_batched(G: torch.Tensor, *, backend: str = "auto", workspace_limit: int = 0,
                     failure_flags: list | None = None) -> torch.Tensor:
    """Ascending eigenvalues ``(B, n)`` of a batch ``(B, n, n)`` of symmetric float32/float64 matrices.

    Only the lower triangle is read. ``backend``: ``auto`` (by device, see the module doc),
    ``cpp`` (the C++ CPU kernel; CUDA tensors use torch), ``cusolver`` (the batched GPU solver at
    any size) or ``torch``. ``workspace_limit`` bounds the solver's workspace in bytes (0 =
    default). ``failure_flags``: a list that receives, for the GPU solver, a device bool tensor
    (True = matrix failed) instead of re-solving here, so the host does not synchronise; the
    caller must check it. CPU solves are always checked here.
    """
    _check(G, backend, workspace_limit)
    B, n = G.shape[0], G.shape[1]
    if B == 0 or n == 0:
        return G.new_zeros((B, n))
    G = G.contiguous()
    solver = _solver(G, backend)
    if solver == "torch":
        return eigvalsh_batched_ref(G)[0]
    if solver == "cpp":
        w, info = torch.ops.tbfast.eigvalsh_batched(G, workspace_limit)
        return resolve_flagged(G, w, info, "LAPACK")
    w, info = _cusolver_solve(G, workspace_limit)
    return resolve_flagged(G, w, info, "cuSOLVER cusolverDnXsyevBatched", failure_flags)
