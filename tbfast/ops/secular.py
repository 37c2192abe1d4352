"""Eigenvalues of a low-rank update of a diagonal matrix: the ``tbfast::eigvalsh_update`` op.

``eigvalsh_update(Tensor d, Tensor Z, Tensor C) -> (Tensor w, Tensor status)``: for each of L
layers, all eigenvalues (ascending, float64) of ``diag(d) + Z C Z^T`` with d (L, n), Z (L, n, k),
C (L, k, k) symmetric (lower triangle read), all float64 and contiguous. ``status`` (L,) int32:
:data:`OK`, :data:`NOT_CONVERGED` (a secular root did not converge; the row is NaN) or
:data:`NON_FINITE` (NaN/Inf input; the row is NaN). This is the refresh step of the exact LoRA
ESD (`tbfast.lora`): ``d`` is a cached base spectrum, ``Z`` the update directions in its
eigenbasis.

Kernels, one per device:

- CPU: the C++ secular-equation kernel of ``tbfast._C`` (csrc/secular_cpu.cpp): k successive
  rank-one updates with deflation, safeguarded rational root finding and the Gu-Eisenstat
  recomputed z; O(n^2 k) per layer, parallel over roots. Without the extension: the reference.
- CUDA and other devices: the torch reference (a dense float64 ``torch.linalg.eigvalsh`` of the
  assembled matrix, `tbfast.kernels.ref.eigvalsh_update_ref`), which never reports
  NOT_CONVERGED.
- a fake kernel (shapes only) so the op traces under ``torch.compile``; Autograd falls through
  (the op is not differentiable).
"""

from __future__ import annotations

import torch

from .. import _backend
from ._register import register_kernels
from ..errors import BackendUnavailableError
from ..kernels.ref import eigvalsh_update_ref

__all__ = ["eigvalsh_update", "implementations", "OP_NAMES", "OK", "NOT_CONVERGED", "NON_FINITE", "BACKENDS"]

OP = "tbfast::eigvalsh_update"
OP_NAMES = ("eigvalsh_update",)
SCHEMA = "eigvalsh_update(Tensor d, Tensor Z, Tensor C) -> (Tensor, Tensor)"
#: Per-layer status codes (kept equal to csrc/secular_cpu.cpp).
OK, NOT_CONVERGED, NON_FINITE = 0, 1, 2
BACKENDS = ("auto", "cpp", "torch")

_CPP_LOADED = _backend.extension_loaded()
_lib = torch.library.Library("tbfast", "FRAGMENT")  # kept alive: dropping it unregisters the op
_lib.define(SCHEMA)
_CPP = _CPP_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")


def _reference_kernel(d: torch.Tensor, Z: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return eigvalsh_update_ref(d, Z, C)


def _cpu_reference(d: torch.Tensor, Z: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _backend.log_fallback_once("secular-cpp", "C++ extension not loaded: eigvalsh_update uses the dense torch reference")
    return eigvalsh_update_ref(d, Z, C)


def _fake_kernel(d: torch.Tensor, Z: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    torch._check(d.dim() == 2, lambda: f"eigvalsh_update: d must be (L, n), got {d.dim()} dims")
    return d.new_empty(d.shape, dtype=torch.float64), d.new_empty((d.shape[0],), dtype=torch.int32)


register_kernels(_lib, "eigvalsh_update", cpp_cpu=_CPP, cpu_fallback=_cpu_reference, cuda=_reference_kernel,
                 reference=_reference_kernel, fake=_fake_kernel)


def implementations() -> dict[str, str]:
    """Which kernel of ``tbfast::eigvalsh_update`` runs per device in this process."""
    return {"cpu": "C++ secular-equation rank-one updates" if _CPP else "dense torch.linalg.eigvalsh (reference)",
            "cuda": "dense torch.linalg.eigvalsh (reference)"}


def _check(d: torch.Tensor, Z: torch.Tensor, C: torch.Tensor, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown eigvalsh_update backend {backend!r}; choose from {BACKENDS}")
    for name, t, dims in (("d", d, 2), ("Z", Z, 3), ("C", C, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"eigvalsh_update: {name} must be a {dims}-D tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise TypeError(f"eigvalsh_update: {name} must be a float tensor, got {t.dtype}")
    L, n = d.shape
    if Z.shape[:2] != (L, n) or C.shape != (L, Z.shape[2], Z.shape[2]):
        raise ValueError(f"eigvalsh_update: shapes d {tuple(d.shape)}, Z {tuple(Z.shape)}, C {tuple(C.shape)} "
                         "do not fit (L, n), (L, n, k), (L, k, k)")


def eigvalsh_update(d: torch.Tensor, Z: torch.Tensor, C: torch.Tensor, *,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues ``(L, n)`` float64 of ``diag(d) + Z C Z^T`` and the per-layer status.

    Inputs are converted to contiguous float64. ``backend``: ``"auto"`` (the dispatcher's kernel
    for the device), ``"cpp"`` (the C++ secular kernel; CPU tensors) or ``"torch"`` (the dense
    reference). Rows with a non-OK status are NaN; the caller re-solves them (see `tbfast.lora`).
    """
    _check(d, Z, C, backend)
    d, Z, C = (t.to(torch.float64).contiguous() for t in (d, Z, C))
    if backend == "torch":
        return eigvalsh_update_ref(d, Z, C)
    if backend == "cpp":
        if not _CPP:
            raise BackendUnavailableError("C++ eigvalsh_update requested but the tbfast._C extension is not loaded")
        if d.device.type != "cpu":
            raise ValueError(f"the C++ eigvalsh_update kernel runs on CPU tensors; d is on {d.device}")
    return torch.ops.tbfast.eigvalsh_update(d, Z, C)
