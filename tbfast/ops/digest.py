"""A 128-bit content digest of a tensor's bytes: the ``tbfast::weight_digest`` op.

``weight_digest(Tensor bytes) -> Tensor``: for a 1-D uint8 tensor of length ``L``, an int64 tensor
``(H_0, H_1)`` (two's complement of two 64-bit unsigned values) on the same device. The LoRA
base-spectrum cache (`tbfast.lora.cache.weight_checksum`) uses it to see, at every refresh,
whether a frozen base weight changed. Definition (all arithmetic mod 2^64, logical shifts):

- zero-pad the bytes to a multiple of 8; ``x_i`` = the i-th little-endian uint64 word, i = 0..N-1;
- ``mix(z)``, the splitmix64 finalizer: ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
  z *= 0x94D049BB133111EB; z ^= z >> 31``;
- two lanes c = 0, 1 with keys ``K_0 = 0x9E3779B97F4A7C15``, ``K_1 = 0xC2B2AE3D27D4EB4F``:
  ``S_c = sum_i mix(x_i ^ ((i + 1) K_c))``;
- length finalization: ``H_c = mix(S_c ^ (L K_c))``;
- `digest_hex`: the 32 hex digits of ``H_0`` then ``H_1`` (16 each, zero-padded). The empty
  input digests to (0, 0) (``mix(0) = 0``); `weight_checksum` puts dtype and shape beside it.

Properties the cache relies on: mix is a bijection, so a change of any single word changes every
term it enters and hence both sums; the position key ``(i + 1) K_c`` makes word order matter; a
sum mod 2^64 does not depend on how it is split, so the kernels sum in parallel pieces and every
kernel gives the same bits. It is a checksum against accidental change (a weight edited in place,
also through ``.data``), not a cryptographic hash: a forged collision is easy to construct.

Kernels, one per device:

- CPU: the C++ kernel of ``tbfast._C`` (csrc/digest_cpu.cpp): memory-bandwidth bound, parallel
  over ranges of words, vectorized with AVX-512 (F + DQ) where the CPU has it, else AVX2 or the
  baseline (``TBFAST_DIGEST_SIMD=avx2`` / ``portable`` caps the choice). Without the extension:
  the reference (logged once).
- CUDA and other devices: the torch reference (`tbfast.kernels.ref.weight_digest_ref`: int64
  torch ops in 8 MiB pieces), so a GPU weight is digested where it lives.
- a fake kernel (shape (2,) int64) so the op traces under ``torch.compile``; Autograd falls through.
"""

from __future__ import annotations

import torch

from .. import _backend
from ._register import register_kernels
from ..errors import BackendUnavailableError
from ..kernels.ref import weight_digest_ref

__all__ = ["weight_digest", "tensor_bytes", "digest_hex", "implementations", "OP_NAMES", "BACKENDS"]

OP = "tbfast::weight_digest"
OP_NAMES = ("weight_digest",)
SCHEMA = "weight_digest(Tensor bytes) -> Tensor"
BACKENDS = ("auto", "cpp", "torch")

_CPP_LOADED = _backend.extension_loaded()
_lib = torch.library.Library("tbfast", "FRAGMENT")  # kept alive: dropping it unregisters the op
_lib.define(SCHEMA)
_CPP = _CPP_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")


def _reference_kernel(data: torch.Tensor) -> torch.Tensor:
    return weight_digest_ref(data)


def _cpu_reference(data: torch.Tensor) -> torch.Tensor:
    _backend.log_fallback_once("digest-cpp", "C++ extension not loaded: weight_digest uses the torch reference")
    return weight_digest_ref(data)


def _fake_kernel(data: torch.Tensor) -> torch.Tensor:
    torch._check(data.dim() == 1, lambda: f"weight_digest: bytes must be 1-D, got {data.dim()} dims")
    return data.new_empty((2,), dtype=torch.int64)


register_kernels(_lib, "weight_digest", cpp_cpu=_CPP, cpu_fallback=_cpu_reference, cuda=_reference_kernel,
                 reference=_reference_kernel, fake=_fake_kernel)


def cpu_variant() -> str | None:
    """The vector variant the C++ CPU kernel runs now (``"avx512"``, ``"avx2"`` or
    ``"portable"``); None without the extension."""
    return (_backend.cpu_features() or {}).get("digest_simd") if _CPP else None


def implementations() -> dict[str, str]:
    """Which kernel of ``tbfast::weight_digest`` runs per device in this process."""
    ref = "torch reference (tbfast.kernels.ref.weight_digest_ref)"
    return {"cpu": f"C++ weight_digest ({cpu_variant()})" if _CPP else ref, "cuda": ref}


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (detached, made contiguous, on its device) as a 1-D uint8 tensor."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def weight_digest(t: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The digest ``(H_0, H_1)`` (int64, on ``t``'s device) of the bytes of tensor ``t`` (any
    dtype and shape; its bytes in row-major order). ``backend``: ``"auto"`` (the dispatcher's
    kernel for the device), ``"cpp"`` (the C++ kernel; CPU tensors) or ``"torch"`` (the reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown weight_digest backend {backend!r}; choose from {BACKENDS}")
    data = tensor_bytes(t)
    if backend == "torch":
        return weight_digest_ref(data)
    if backend == "cpp":
        if not _CPP:
            raise BackendUnavailableError("C++ weight_digest requested but the tbfast._C extension is not loaded")
        if data.device.type != "cpu":
            raise ValueError(f"the C++ weight_digest kernel runs on CPU tensors; the tensor is on {data.device}")
    return torch.ops.tbfast.weight_digest(data)


def digest_hex(t: torch.Tensor, *, backend: str = "auto") -> str:
    """`weight_digest` of ``t`` as 32 hex digits (``H_0`` then ``H_1``)."""
    h0, h1 = (v & ((1 << 64) - 1) for v in weight_digest(t, backend=backend).tolist())
    return f"{h0:016x}{h1:016x}"
