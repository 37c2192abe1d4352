"""The per-device kernel registration shared by tbfast's op modules (one place for the pattern)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["register_kernels"]


def register_kernels(lib: torch.library.Library, name: str, *, cpp_cpu: bool, cpu_fallback: Callable,
                     cuda: Callable, reference: Callable, fake: Callable) -> None:
    """Register op ``tbfast::<name>`` (its schema already defined in ``lib``): ``cpu_fallback`` on
    the CPU unless the C++ extension registered a CPU kernel (``cpp_cpu``), ``cuda`` on CUDA,
    ``reference`` for every other device (CompositeExplicitAutograd), ``fake`` for tracing, and an
    Autograd fallthrough (the ops are not differentiable)."""
    qualname = f"tbfast::{name}"
    if not cpp_cpu:
        torch.library.register_kernel(qualname, "cpu", cpu_fallback, lib=lib)
    torch.library.register_kernel(qualname, "cuda", cuda, lib=lib)
    lib.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=lib)
    lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
