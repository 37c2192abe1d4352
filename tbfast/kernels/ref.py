"""Plain-torch reference implementations of the op kernels (ARCHITECTURE.md op contracts).

They define what the C++ and Triton kernels must return, serve as the fallback when neither is
available, and are what the tests compare the fast kernels with. Arithmetic is float64.
NaN policy of the fit ops (tbfast/ops/fit.py): a layer holding a NaN gets NaN, NaN, -1.
"""

from __future__ import annotations

import math

import torch

__all__ = ["hill_fit_ref", "ks_scan_ref", "eigvalsh_batched_ref", "eigvalsh_update_ref", "weight_digest_ref",
           "segment_ids"]

_CANDIDATE_BLOCK = 512  # candidates per chunk of the (candidate x tail) matrix in ks_scan_ref


def segment_ids(starts: torch.Tensor, ends: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a ragged batch of ``total`` values, each value's layer id (-1 outside every
    ``[start, end)``) and a mask of values inside their layer's window. No host sync."""
    device = starts.device
    pos = torch.arange(total, device=device)
    # layer windows do not overlap and are ordered; bucketize finds the candidate layer
    seg = torch.bucketize(pos, ends, right=True)
    inside = seg < len(ends)
    seg_c = seg.clamp(max=max(len(ends) - 1, 0))
    if len(ends):
        inside &= pos >= starts[seg_c]
    return torch.where(inside, seg_c, torch.full_like(seg_c, -1)), inside


def _tail_d(x: torch.Tensor, i: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """D for candidates ``i`` (1-D) of one ascending spectrum ``x`` (float64)."""
    N = x.numel()
    t = torch.arange(N, device=x.device)
    j = t.unsqueeze(0) - i.unsqueeze(1)  # (C, N)
    n = (N - i).to(x.dtype).unsqueeze(1)
    ratio = x.unsqueeze(0) / x[i].unsqueeze(1)
    cdf = 1.0 - ratio.pow(1.0 - alpha.unsqueeze(1))
    dev = (cdf - j.to(x.dtype) / n).abs()
    dev = torch.where(j >= 0, dev, torch.zeros_like(dev))
    return dev.amax(dim=1)


def _unfitted(L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha = D = NaN and index = -1 for L layers: the result of a layer that cannot be fitted
    (too short, or holding a NaN)."""
    alpha = torch.full((L,), math.nan, dtype=torch.float64, device=device)
    return alpha, alpha.clone(), torch.full((L,), -1, dtype=torch.int64, device=device)


def hill_fit_ref(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, xmin_pos: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Median ("xmin_mid") Hill fit of every layer (SPEC section 3)."""
    alpha, D, index = _unfitted(len(starts), values.device)
    for l, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        N = e - s
        i = int(N / xmin_pos)
        if N < 2 or i >= N:
            continue
        x = values[s:e].double()
        if torch.isnan(x).any():
            continue
        n = N - i
        a = 1.0 + n / (torch.log(x[i:]).sum() - n * torch.log(x[i]))
        alpha[l] = a
        D[l] = _tail_d(x, torch.tensor([i], device=x.device), a.reshape(1))[0]
        index[l] = i
    return alpha, D, index


def ks_scan_ref(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Goodness-of-fit scan over every xmin candidate (SPEC sections 4-5), per layer, with the
    candidate window ``[lo, hi]`` of the fix-finger variant (``-inf, inf`` for the plain scan)."""
    alpha, D, index = _unfitted(len(starts), values.device)
    for l, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        N = e - s
        if N < 2:
            continue
        x = values[s:e].double()
        if torch.isnan(x).any():
            continue
        logs = torch.log(x)
        suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])
        cand = torch.arange(N - 1, device=x.device)
        n = (N - cand).double()
        a = 1.0 + n / (suffix[:-1] - n * logs[:-1])
        xc = x[:-1]
        # ascending x: "skip below lo, stop at the first above hi" == visit lo <= x <= hi
        visited = (xc >= lo[l].double()) & (xc <= hi[l].double())
        d = torch.ones(N - 1, dtype=torch.float64, device=x.device)
        fit = visited & (a > 1)
        idx = cand[fit]
        for c0 in range(0, idx.numel(), _CANDIDATE_BLOCK):
            blk = idx[c0:c0 + _CANDIDATE_BLOCK]
            d[blk] = _tail_d(x, blk, a[blk])
        a = torch.where(visited, a, torch.zeros_like(a))
        k = int(torch.argmin(d))  # first index on ties
        alpha[l], D[l], index[l] = a[k], d[k], k
    return alpha, D, index


def eigvalsh_batched_ref(G: torch.Tensor, workspace_limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending eigenvalues of a batch of symmetric matrices via ``torch.linalg.eigvalsh``."""
    info = torch.zeros(G.shape[0], dtype=torch.int32, device=G.device)
    try:
        return torch.linalg.eigvalsh(G), info
    except RuntimeError:  # torch.linalg.LinAlgError: NaN/Inf input or no convergence
        pass
    w = torch.full(G.shape[:2], float("nan"), dtype=G.dtype, device=G.device)
    for b in range(G.shape[0]):  # rare path: isolate the matrices that fail
        try:
            w[b] = torch.linalg.eigvalsh(G[b])
        except RuntimeError:
            info[b] = 1
    return w, info


def eigvalsh_update_ref(d: torch.Tensor, Z: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``tbfast::eigvalsh_update``: ascending eigenvalues ``(L, n)`` float64 of
    ``diag(d) + Z C Z^T`` (C's lower triangle) by a dense float64 eigensolve, and the status
    ``(L,)`` int32: 0, or 2 for a layer whose inputs hold NaN/Inf (its row is NaN)."""
    d, Z, C = d.double(), Z.double(), C.double()
    L, n = d.shape
    Cs = torch.tril(C) + torch.tril(C, -1).mT
    M = torch.diag_embed(d) + Z @ Cs @ Z.mT
    finite = (torch.isfinite(d).all(dim=1) & torch.isfinite(Z).flatten(1).all(dim=1)
              & torch.isfinite(C).flatten(1).all(dim=1))
    M = torch.where(finite[:, None, None], M, torch.zeros((), dtype=M.dtype, device=M.device))
    w = torch.linalg.eigvalsh(M) if n else M.new_zeros((L, 0))
    w = torch.where(finite[:, None], w, torch.full_like(w, math.nan))
    status = torch.where(finite, 0, 2).to(torch.int32)
    return w, status


# weight_digest (tbfast/ops/digest.py): the splitmix64 finalizer and the lane keys as int64 (two's
# complement); int64 products and sums wrap mod 2^64 like the uint64 ones, and a logical right
# shift by k is the arithmetic one masked to its 64 - k low bits.
_DIGEST_KEYS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)
_DIGEST_PIECE = 1 << 20  # words per piece: the reference holds a few 8 MiB temporaries at a time


def _s64(u: int) -> int:
    """The int64 (two's complement) holding the 64-bit unsigned ``u``."""
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >> 63 else u


_MIX_C1, _MIX_C2 = _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _mix_(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on an int64 tensor, in place."""
    z.bitwise_xor_((z >> 30) & ((1 << 34) - 1))
    z.mul_(_MIX_C1)
    z.bitwise_xor_((z >> 27) & ((1 << 37) - 1))
    z.mul_(_MIX_C2)
    return z.bitwise_xor_((z >> 31) & ((1 << 33) - 1))


def weight_digest_ref(data: torch.Tensor) -> torch.Tensor:
    """Reference of ``tbfast::weight_digest``: ``(H_0, H_1)`` int64 of the 1-D uint8 ``data`` (the
    definition: tbfast/ops/digest.py), on ``data``'s device, in pieces of 8 MiB; no host sync."""
    L = data.numel()
    words, rem = divmod(L, 8)
    dev = data.device
    sums = [torch.zeros((), dtype=torch.int64, device=dev) for _ in _DIGEST_KEYS]
    padded = words + (1 if rem else 0)
    for a in range(0, padded, _DIGEST_PIECE):
        b = min(a + _DIGEST_PIECE, padded)
        piece = data[8 * a:8 * min(b, words)]
        if b > words:  # the last word, zero-padded
            piece = torch.cat([piece, data[8 * words:], torch.zeros(8 - rem, dtype=torch.uint8, device=dev)])
        elif piece.storage_offset() % 8:  # a byte view off the 8-byte grid: view(int64) needs it on
            piece = piece.clone()
        x = piece.view(torch.int64)
        pos = torch.arange(a + 1, a + 1 + x.numel(), dtype=torch.int64, device=dev)
        for c, key in enumerate(_DIGEST_KEYS):
            sums[c] = sums[c] + _mix_(torch.mul(pos, _s64(key)).bitwise_xor_(x)).sum()
    return torch.stack([_mix_(s.bitwise_xor(_s64(L * key))) for s, key in zip(sums, _DIGEST_KEYS)])
