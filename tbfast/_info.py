"""``backend_info()``: what tbfast runs on in this process, for users and bug reports.

Reporting has no side effects: no CUDA work and no CUDA context (the cuSOLVER search reads files
only, and the GPU name is asked only when CUDA is already initialised).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from . import _backend
from .kernels import triton_fit_available
from .ops import digest as digest_op
from .ops import eig as eig_op
from .ops import fit as fit_op
from .ops import secular as secular_op
from .lora import stage as lora_stage

#: Every op in namespace ``tbfast``, as the op modules define them.
OP_NAMES = (*eig_op.OP_NAMES, *fit_op.OP_NAMES, *secular_op.OP_NAMES, *digest_op.OP_NAMES)


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
    ok, why = triton_fit_available()
    info["fit_kernels"] = {"usable": ok, "reason": why}  # e.g. "triton 3.0.0 is older than ..."
    return info


def _cusolver_info() -> dict[str, Any]:
    try:
        return eig_op.cusolver.cusolver_status()
    except Exception as exc:
        return {"loaded": False, "reason": f"cusolver_status() failed ({type(exc).__name__}: {exc})"}


def _devices() -> dict[str, Any]:
    """CPU/CUDA presence. ``torch.cuda.get_device_name`` initialises CUDA (a context on first
    use), so the GPU name is reported only when CUDA is already initialised in this process."""
    cuda = torch.cuda.is_available()
    named = cuda and torch.cuda.is_initialized()
    return {"cpu": True, "cuda": cuda, "cuda_device_count": torch.cuda.device_count() if cuda else 0,
            "cuda_name": torch.cuda.get_device_name(0) if named else None,
            "cuda_name_note": None if named or not cuda else "not queried: CUDA is not initialised yet"}


def backend_info() -> dict[str, Any]:
    """What tbfast runs on in this process.

    Keys: ``active`` (per device: the eigensolver kernel and the fit path in use),
    ``extension`` (loaded, path, reason, build: torch version built against, OpenMP,
    compiler), ``lapack`` (whether ?syevd was found for the CPU eigensolver), ``ops`` (the
    registered torch.ops.tbfast names), ``eig_op`` (the kernels the dispatcher holds for
    ``tbfast::eigvalsh_batched``, per dispatch key), ``torch`` (version, threads), ``devices`` (cpu, cuda and
    its device name), ``triton`` (available, version, TRITON_INTERPRET, fit_kernels: usable and why), ``cusolver``,
    ``lora_update`` (the exact LoRA ESD refresh: its op, kernels, and ``checksum``: the
    ``tbfast::weight_digest`` kernel that checks the base weights on the CPU).
    """
    ext = _backend.extension_details()
    lapack = _backend.lapack_info()
    devices = _devices()
    triton = _triton_info()
    cusolver = _cusolver_info()
    fits_cpp = _backend.has_op("hill_fit") and _backend.has_op("ks_scan")
    eig = eig_op.implementations()
    active = {"cpu": {"eigensolver": eig["cpu"], "fits": "C++ kernels" if fits_cpp else "torch reference"}}
    if devices["cuda"]:
        active["cuda"] = {"eigensolver": eig["cuda"],
                          "fits": "Triton kernels" if triton_fit_available()[0] else "torch reference"}
    return {
        "active": active,
        "extension": ext,
        "lapack": lapack if lapack is not None else {"syevd": False, "source": "extension not loaded"},
        "ops": {n: _backend.has_op(n) for n in OP_NAMES},
        "eig_op": eig_op.registration(),
        "lora_update": {"op": "tbfast::eigvalsh_update", "kernels": secular_op.implementations(),
                        "cpu_simd": (_backend.cpu_features() or {}).get("secular_simd"),
                        "checksum": digest_op.implementations()["cpu"],
                        "checksum_kernels": digest_op.implementations(),
                        "paths": "update (cached base spectrum + secular rank-one updates) | full",
                        "used_by": "tbfast.esd / layer_metrics / analyze with lora_cache=, CLI --lora-cache, "
                                   "TempBalance(lora_cache=True) on PEFT LoRA layers on the CPU with n >= "
                                   "break_even_n_over_r[dtype] x r; without a cache: full",
                        "break_even_n_over_r": {str(k).replace("torch.", ""): v
                                                for k, v in lora_stage.BREAK_EVEN_N_OVER_R.items()}},
        "torch": {"version": torch.__version__, "cuda_version": torch.version.cuda,
                  "num_threads": torch.get_num_threads()},
        "devices": devices,
        "triton": triton,
        "cusolver": cusolver,
    }
