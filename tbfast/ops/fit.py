"""The power-law fit ops ``torch.ops.tbfast.hill_fit`` and ``torch.ops.tbfast.ks_scan``.

Contract (SPEC sections 3-5; docs/ARCHITECTURE.md "Compiled ops"): a ragged batch of ascending
spectra, layer ``l`` = ``values[starts[l]:ends[l]]``. Both return ``alpha`` float64 (L,), ``D``
float64 (L,) and ``index`` int64 (L,) (the xmin position relative to ``starts``), L = len(starts).

- ``hill_fit(Tensor values, Tensor starts, Tensor ends, float xmin_pos)``: the "median" fit,
  xmin at ``int(N / xmin_pos)``.
- ``ks_scan(Tensor values, Tensor starts, Tensor ends, Tensor lo, Tensor hi)``: the KS scan over
  xmin candidates in ``[lo, hi]`` (float64 (L,); ``-inf, inf`` for the plain scan), first argmin.

NaN policy, the same on every backend: a layer whose values hold a NaN gets ``alpha = NaN``,
``D = NaN``, ``index = -1`` (as a layer too short to fit); no error, since the CUDA kernels cannot
raise without a host sync. Other invalid input (infinite, negative or unsorted values, bad
ranges or tensors) raises a one-line error on the C++ path; the CUDA paths check tensor metadata
only.

Where each part lives:

- Schema: defined once, here (``torch.library``). Not in C++: the ops must exist, with their CUDA,
  fallback and fake kernels, whether or not the extension ``tbfast._C`` is built; a C++ schema
  would need a second copy here for installs without it. csrc/fit_cpu.cpp only registers CPU
  kernels (``TORCH_LIBRARY_IMPL(tbfast, CPU)``); the dispatcher matches them to these schemas.
- CPU kernel: C++ when ``tbfast._C`` loads, else the torch reference (`tbfast.kernels.ref`).
- CUDA kernel: Triton (`tbfast.kernels.triton_fit`) when a supported triton (>= 3.2) is usable,
  else the torch reference; chosen on the first CUDA call. An explicit ``backend="triton"`` on an
  older triton raises BackendUnavailableError naming both versions.
- Other devices: the torch reference (CompositeExplicitAutograd; CPU and CUDA keep the above).
- Fake kernel: output shapes and dtypes only, for FakeTensor / torch.compile.
- Autograd: not differentiable. The Autograd key falls through, so outputs never require grad
  (no gradient is ever silently wrong or zero).

`fit_kernels` / `hill_fit` / `ks_scan` below take an explicit ``backend`` (``"auto"``: the
dispatcher's pick for the tensors' device; ``"cpp"``, ``"triton"``, ``"torch"``) from one table,
for `tbfast.powerlaw`, the tests and ``tbfast bench``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

from .. import _backend
from ._register import register_kernels
from ..errors import BackendUnavailableError
from ..kernels import ref
from ..options import FIT_BACKENDS

__all__ = ["hill_fit", "ks_scan", "fit_kernels", "pick_backend", "OP_NAMES"]

OP_NAMES = ("hill_fit", "ks_scan")
_SCHEMAS = {
    "hill_fit": "hill_fit(Tensor values, Tensor starts, Tensor ends, float xmin_pos) -> (Tensor, Tensor, Tensor)",
    "ks_scan": "ks_scan(Tensor values, Tensor starts, Tensor ends, Tensor lo, Tensor hi) -> (Tensor, Tensor, Tensor)",
}
_REFS = {"hill_fit": ref.hill_fit_ref, "ks_scan": ref.ks_scan_ref}

FitOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# --------------------------------------------------------------------------- registration

# Load the extension first: its CPU kernels then meet the schemas defined below. (An extension
# from another checkout, which could define schemas itself, is refused by _backend's ABI check.)
_CPP_LOADED = _backend.extension_loaded()
_lib = torch.library.Library("tbfast", "FRAGMENT")


for _name in OP_NAMES:
    _lib.define(_SCHEMAS[_name])


def _has_cpp_kernel(name: str) -> bool:
    return _CPP_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"tbfast::{name}", "CPU")


_CPP = all(_has_cpp_kernel(n) for n in OP_NAMES)


def _cpu_reference(name: str) -> Callable[..., FitOut]:
    """CPU kernel without the extension: the torch reference (logs the fallback once)."""
    def kernel(*args: Any) -> FitOut:
        _backend.log_fallback_once("fit-cpp", "C++ extension not loaded: CPU fits use the torch reference",
                                   level=logging.INFO)  # _backend has warned once already
        return _REFS[name](*args)
    return kernel


@functools.lru_cache(maxsize=1)
def _cuda_backend() -> str:
    """What the CUDA kernels run: ``"triton"`` when usable, else ``"torch"`` (decided once)."""
    from ..kernels import triton_fit_available
    ok, why = triton_fit_available()
    if ok:
        return "triton"
    _backend.log_fallback_once("fit-triton", f"Triton fit kernels unavailable ({why}); CUDA fits use the torch reference")
    return "torch"


def _cuda_kernel(name: str) -> Callable[..., FitOut]:
    which = OP_NAMES.index(name)

    def kernel(*args: Any) -> FitOut:
        return _BACKENDS[_cuda_backend()]()[which](*args)
    return kernel


def _fake(values: torch.Tensor, starts: torch.Tensor) -> FitOut:
    L = starts.shape[0]
    alpha = values.new_empty((L,), dtype=torch.float64)
    return alpha, values.new_empty((L,), dtype=torch.float64), values.new_empty((L,), dtype=torch.int64)


def _hill_fit_fake(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, xmin_pos: float) -> FitOut:
    return _fake(values, starts)


def _ks_scan_fake(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                  lo: torch.Tensor, hi: torch.Tensor) -> FitOut:
    return _fake(values, starts)


for _name, _fake_kernel in (("hill_fit", _hill_fit_fake), ("ks_scan", _ks_scan_fake)):
    register_kernels(_lib, _name, cpp_cpu=_CPP, cpu_fallback=_cpu_reference(_name), cuda=_cuda_kernel(_name),
                     reference=_REFS[_name], fake=_fake_kernel)  # other devices: the torch reference

# --------------------------------------------------------------------------- explicit backends


def _auto() -> tuple[Callable[..., FitOut], Callable[..., FitOut]]:
    return torch.ops.tbfast.hill_fit, torch.ops.tbfast.ks_scan


def _cpp() -> tuple[Callable[..., FitOut], Callable[..., FitOut]]:
    if not _CPP:
        raise BackendUnavailableError("C++ fit kernels requested but the tbfast._C extension is not loaded")
    return torch.ops.tbfast.hill_fit, torch.ops.tbfast.ks_scan


def _triton() -> tuple[Callable[..., FitOut], Callable[..., FitOut]]:
    from ..kernels import triton_fit
    problem = triton_fit.version_problem()
    if problem is not None:
        raise BackendUnavailableError(f"Triton fit kernels requested but {problem}")
    return triton_fit.hill_fit_triton, triton_fit.ks_scan_triton


def _torch() -> tuple[Callable[..., FitOut], Callable[..., FitOut]]:
    return ref.hill_fit_ref, ref.ks_scan_ref


# backend -> (hill_fit, ks_scan); "cpp" is the dispatcher's CPU kernel, hence CPU tensors only
_BACKENDS: dict[str, Callable[[], tuple[Callable[..., FitOut], Callable[..., FitOut]]]] = {
    "auto": _auto, "cpp": _cpp, "triton": _triton, "torch": _torch,
}
assert set(_BACKENDS) == set(FIT_BACKENDS)


def pick_backend(values: torch.Tensor, backend: str = "auto") -> str:
    """The fit backend that runs for ``values``: ``backend`` itself, or for ``"auto"`` the
    kernel the dispatcher picks on ``values``' device (``"cpp"``, ``"triton"`` or ``"torch"``)."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown fit backend {backend!r}; choose from {FIT_BACKENDS}")
    if backend != "auto":
        return backend
    if values.is_cuda:
        return _cuda_backend()
    return "cpp" if _CPP else "torch"


def fit_kernels(values: torch.Tensor, backend: str = "auto"
                ) -> tuple[Callable[..., FitOut], Callable[..., FitOut]]:
    """``(hill_fit, ks_scan)`` callables of ``backend`` for ``values`` (see the module doc).

    Raises ValueError for an unknown name or ``"cpp"`` on non-CPU tensors, BackendUnavailableError
    (a RuntimeError) for ``"cpp"`` without the extension."""
    kind = pick_backend(values, backend)
    if kind == "cpp" and values.device.type != "cpu":
        raise ValueError(f"the C++ fit kernels run on CPU tensors; values are on {values.device}")
    return _BACKENDS[backend]()


def hill_fit(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, xmin_pos: float, *,
             backend: str = "auto") -> FitOut:
    """Median ("xmin_mid") Hill fit of every layer (SPEC section 3): ``(alpha, D, index)``,
    ``index = int(N / xmin_pos)``; NaN, NaN, -1 where ``N < 2``, ``index >= N`` or the layer
    holds a NaN."""
    return fit_kernels(values, backend)[0](values, starts, ends, float(xmin_pos))


def ks_scan(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, lo: torch.Tensor,
            hi: torch.Tensor, *, backend: str = "auto") -> FitOut:
    """KS scan over the xmin candidates ``lo <= x_i <= hi`` of every layer (SPEC sections 4-5):
    ``(alpha, D, index)`` of the first argmin of ``D_i``; NaN, NaN, -1 where ``N < 2`` or the
    layer holds a NaN."""
    return fit_kernels(values, backend)[1](values, starts, ends, lo, hi)
