"""Fit kernels: Triton (CUDA) in `triton_fit`, plain-torch references in `ref`."""

from __future__ import annotations


def triton_fit_available() -> tuple[bool, str]:
    """Whether the Triton fit kernels can run here, and why not."""
    try:
        from . import triton_fit
    except Exception as exc:  # triton missing or broken
        return False, f"import failed: {exc}"
    return triton_fit.triton_available()
