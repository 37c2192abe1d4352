"""Batched symmetric eigenvalues, dispatched by device in one place.

CPU tensors go to the C++ kernel (LAPACK ``?syevd`` per matrix, parallel over the batch), CUDA
tensors to cuSOLVER's batched solver (loaded at run time) where it pays, and everything else to
``torch.linalg.eigvalsh``. Matrices a solver reports as not converged are solved again with
``torch.linalg.eigvalsh``; each fallback is logged once.
"""

from __future__ import annotations

import logging
import math

import torch

from . import _backend
from .kernels.ref import eigvalsh_batched_ref

__all__ = ["eigvalsh_batched", "EIG_BACKENDS"]

log = logging.getLogger(__name__)
EIG_BACKENDS = ("auto", "cpp", "cusolver", "torch")


def _cuda_solver():
    try:
        from . import _cusolver
    except Exception as exc:  # pragma: no cover - import problems are reported by backend_info
        _backend.log_fallback_once("cusolver-import", f"cuSOLVER path unavailable ({exc}); using torch.linalg.eigvalsh")
        return None
    return _cusolver


def resolve_failed(G: torch.Tensor, w: torch.Tensor, bad_mask: torch.Tensor) -> torch.Tensor:
    """Re-solve the matrices flagged in ``bad_mask`` with ``torch.linalg.eigvalsh``; matrices
    holding NaN/Inf get NaN rows (the caller reports them per layer). One host sync."""
    bad = torch.nonzero(bad_mask).flatten()
    if bad.numel() == 0:
        return w
    sub = G[bad]
    finite = torch.isfinite(sub).flatten(1).all(dim=1)
    fixed = torch.full_like(w[bad], math.nan)
    if bool(finite.any()):
        fixed[finite] = torch.linalg.eigvalsh(sub[finite])
    w = w.clone()
    w[bad] = fixed
    return w


def _resolve_nonconverged(G: torch.Tensor, w: torch.Tensor, info: torch.Tensor, solver: str) -> torch.Tensor:
    bad = info != 0
    if bool(bad.any()):
        _backend.log_fallback_once(
            f"nonconverged-{solver}",
            f"{solver}: {int(bad.sum())} matrix(es) did not converge; solved again with torch.linalg.eigvalsh")
    return resolve_failed(G, w, bad)


def eigvalsh_batched(G: torch.Tensor, *, backend: str = "auto", workspace_limit: int = 0,
                     checks: list | None = None) -> torch.Tensor:
    """Ascending eigenvalues of a batch ``(B, n, n)`` of symmetric float32/float64 matrices.

    Only the lower triangle is read. ``backend``: ``auto`` (by device), ``cpp``, ``cusolver``
    or ``torch``. ``workspace_limit`` bounds the GPU solver's workspace in bytes (0 = default).
    With a ``checks`` list, the GPU solver does not synchronise to check convergence: it appends
    a device bool tensor (True = matrix failed) that the caller must check later.
    """
    if not isinstance(G, torch.Tensor) or G.dim() != 3 or G.shape[1] != G.shape[2]:
        raise ValueError(f"expected a (B, n, n) tensor, got {getattr(G, 'shape', type(G).__name__)}")
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"eigvalsh_batched needs float32 or float64, got {G.dtype}")
    if backend not in EIG_BACKENDS:
        raise ValueError(f"unknown eigensolver backend {backend!r}; choose from {EIG_BACKENDS}")
    B, n = G.shape[0], G.shape[1]
    if B == 0 or n == 0:
        return G.new_zeros((B, n))
    G = G.contiguous()
    if backend == "torch":
        return eigvalsh_batched_ref(G)[0]
    if G.is_cuda:
        if backend in ("auto", "cusolver"):
            cs = _cuda_solver()
            if cs is not None and cs.cusolver_status().get("loaded") and (
                    backend == "cusolver" or cs.use_batched_solver(n, B)):
                return cs.eigvalsh_batched_cuda(G, workspace_limit, deferred=checks)
            if backend == "cusolver":
                raise RuntimeError(f"cuSOLVER batched solver requested but unavailable: {cs and cs.cusolver_status()}")
            if cs is not None and not cs.cusolver_status().get("loaded"):
                _backend.log_fallback_once("cusolver-missing",
                                           f"cuSOLVER not loaded ({cs.cusolver_status().get('reason')}); using torch.linalg.eigvalsh")
        return eigvalsh_batched_ref(G)[0]
    if backend in ("auto", "cpp") and _backend.has_op("eigvalsh_batched"):
        w, info = torch.ops.tbfast.eigvalsh_batched(G, workspace_limit)
        return _resolve_nonconverged(G, w, info, "LAPACK")
    if backend == "cpp":
        raise RuntimeError("C++ eigensolver requested but the tbfast._C extension is not loaded")
    _backend.log_fallback_once("eig-cpu-torch", "C++ extension not loaded: CPU eigenvalues use torch.linalg.eigvalsh")
    return eigvalsh_batched_ref(G)[0]
