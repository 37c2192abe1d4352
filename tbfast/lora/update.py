"""Exact eigenvalues of merged LoRA weights ``W' = W0 + sum s B A`` from a cached base spectrum.

On the Gram side (``M0`` = ``W0`` or ``W0^T``, ``n`` = min(rows, cols)) the update is
``M' = M0 + Bm Am`` (the adapters stacked, scalings in ``Bm``), so
``M'^T M' = G0 + U C U^T`` with ``U = [Am^T, M0^T Bm]`` (n x 2R) and
``C = [[Bm^T Bm, I], [I, 0]]``. With ``U = Q R`` (thin QR), ``Z = V^T Q`` and
``Ct = R C R^T``: ``V^T (M'^T M') V = diag(l0) + Z Ct Z^T``, whose eigenvalues the op
``tbfast::eigvalsh_update`` computes in O(n^2 R) without an O(n^3) step.

A layer takes the full path (a float64 eigensolve of its merged Gram) when its base spectrum is
not cached (over the budget), the op reports a root that did not converge or non-finite input,
or the update cancels most of the base (``(lambda_max(G0) + ||Ct||) / lambda_max(G') >
cancel_limit``: the update's rounding error is about ``eps`` times the numerator, so its relative
error grows with that ratio).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ops import secular
from .cache import BaseSpectrum, BaseSpectrumCache, gram_side

__all__ = ["LoRAItem", "update_system", "lora_eigenvalues", "full_eigenvalues", "DEFAULT_CANCEL_LIMIT", "PATHS"]

logger = logging.getLogger("tbfast.lora")

#: Largest ``(lambda_max(G0) + ||C||) / lambda_max(G')`` that takes the update path.
DEFAULT_CANCEL_LIMIT = 32.0
#: Rows of the base weight converted to float64 at a time in :func:`update_system`.
_ROW_BLOCK = 256
#: The values of a layer's ``esd_path``.
PATHS = ("update", "full")

Update = tuple[torch.Tensor, torch.Tensor, float, bool]  # (A, B, s, transpose) as merge_lora takes them


@dataclass
class LoRAItem:
    """One LoRA layer: its ``name``, base weight ``w0`` (rows, cols) and ``updates``."""

    name: str
    w0: torch.Tensor
    updates: Sequence[Update]


def _factors(item: LoRAItem, *, base_float64: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(M0, Bm, Am)`` on the Gram side: ``M' = M0 + Bm @ Am``; ``Bm``, ``Am`` float64, ``M0``
    float64 or (``base_float64=False``) in the weight's own dtype."""
    w0 = item.w0.detach().to("cpu", torch.float64 if base_float64 else None)  # the update path runs on the CPU
    rows, cols = w0.shape
    Bs, As = [], []
    for A, B, s, transpose in item.updates:
        A, B = A.detach().to("cpu", torch.float64), B.detach().to("cpu", torch.float64)
        if transpose:  # the update is (B A)^T = A^T B^T
            A, B = B.T, A.T
        if B.shape[0] != rows or A.shape[1] != cols or B.shape[1] != A.shape[0]:
            raise ValueError(f"LoRA module {item.name!r}: B {tuple(B.shape)} @ A {tuple(A.shape)} does not give "
                             f"the base weight's shape {(rows, cols)}")
        Bs.append(B * s)
        As.append(A)
    B = torch.cat(Bs, dim=1) if Bs else w0.new_zeros((rows, 0), dtype=torch.float64)
    A = torch.cat(As, dim=0) if As else w0.new_zeros((0, cols), dtype=torch.float64)
    if cols <= rows:
        return w0, B, A
    return w0.T, A.T, B.T


def update_system(item: LoRAItem, base: BaseSpectrum) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, Z, C)`` with ``V^T M'^T M' V = diag(d) + Z C Z^T`` (float64; Z is n x 2R)."""
    M0, Bm, Am = _factors(item, base_float64=False)
    R = Bm.shape[1]
    # M0^T Bm in float64, a block of the weight's rows at a time (its memory order, so each block
    # converts contiguously) and never all of it in float64 (4096 x 4096, r = 8, 1 thread: 0.02 s
    # vs 0.17 s for M0.double().T @ Bm)
    MtB = Bm.new_empty((M0.shape[1], R))
    if M0.mT.is_contiguous():  # M0 = W0^T: M0^T Bm = W0 Bm, by rows of W0
        W0 = M0.mT
        for k in range(0, W0.shape[0], _ROW_BLOCK):
            torch.mm(W0[k:k + _ROW_BLOCK].to(torch.float64), Bm, out=MtB[k:k + _ROW_BLOCK])
    else:  # (Bm^T M0)^T, by rows of M0
        BtM = Bm.new_zeros((R, M0.shape[1]))
        for k in range(0, M0.shape[0], _ROW_BLOCK):
            BtM += Bm[k:k + _ROW_BLOCK].T @ M0[k:k + _ROW_BLOCK].to(torch.float64)
        MtB = BtM.T
    U = torch.cat([Am.T, MtB], dim=1)
    C = Bm.new_zeros((2 * R, 2 * R))
    C[:R, :R] = Bm.T @ Bm
    C[:R, R:] = torch.eye(R, dtype=C.dtype)
    C[R:, :R] = torch.eye(R, dtype=C.dtype)
    Q, Rf = torch.linalg.qr(U)
    Ct = Rf @ C @ Rf.T
    Ct = (Ct + Ct.T) / 2
    V = base.evecs.to(torch.float64)
    return base.evals.to(torch.float64), (Q.T @ V).T.contiguous(), Ct  # Q^T V: ~3x faster than V^T Q


def full_eigenvalues(item: LoRAItem) -> torch.Tensor:
    """Ascending float64 eigenvalues of the merged Gram (the full path), clamped at 0."""
    M0, Bm, Am = _factors(item)
    M = M0 + Bm @ Am
    if not bool(torch.isfinite(M).all()):  # NaN row: the caller reports the layer's weights
        return torch.full((M.shape[1],), float("nan"), dtype=torch.float64)
    return torch.linalg.eigvalsh(M.T @ M).clamp_(min=0)


def lora_eigenvalues(items: Sequence[LoRAItem], cache: BaseSpectrumCache | None, *, backend: str = "auto",
                     cancel_limit: float = DEFAULT_CANCEL_LIMIT) -> list[tuple[torch.Tensor, str]]:
    """``(eigenvalues, esd_path)`` of every item: ascending float64 CPU eigenvalues of ``M'^T M'``
    and ``"update"`` (cached base spectrum + ``tbfast::eigvalsh_update``) or ``"full"``. Runs on
    the CPU whatever the weights' device. A layer whose weights hold NaN/Inf gets a NaN row."""
    out: list[tuple[torch.Tensor, str] | None] = [None] * len(items)
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for i, item in enumerate(items):
        base = cache.lookup(item.name, item.w0) if cache is not None else None
        if base is None:
            continue
        d, Z, C = update_system(item, base)
        groups[(d.shape[0], Z.shape[1])].append((i, d, Z, C))
    for members in groups.values():
        idx = [m[0] for m in members]
        w, status = secular.eigvalsh_update(torch.stack([m[1] for m in members]), torch.stack([m[2] for m in members]),
                                            torch.stack([m[3] for m in members]), backend=backend)
        for j, i in enumerate(idx):
            d, C = members[j][1], members[j][3]
            if int(status[j]) == secular.NON_FINITE:
                continue  # NaN/Inf in the adapter: the full path gives the NaN row the caller reports
            if int(status[j]) != secular.OK:
                logger.warning("layer %r: secular update failed (status %d); using the full eigensolve",
                               items[i].name, int(status[j]))
                continue
            top = float(w[j, -1]) if w.shape[1] else 0.0
            size = float(d.abs().max()) + float(torch.linalg.matrix_norm(C)) if d.numel() else 0.0
            if size > cancel_limit * max(top, 0.0) and size > 0:
                logger.info("layer %r: the LoRA update cancels most of the base weight (%.3g / %.3g); "
                            "using the full eigensolve", items[i].name, size, top)
                continue
            out[i] = (w[j].clamp(min=0), "update")
    return [r if r is not None else (full_eigenvalues(items[i]), "full") for i, r in enumerate(out)]
