"""Independent oracles for the tests: fp64 SVD eigenvalues and SPEC.md formulas written plainly,
one layer and one candidate at a time. Nothing here calls tbfast."""

from __future__ import annotations

import math

import numpy as np
import torch


def svd_eigs(mats: torch.Tensor, scale: float = 1.0) -> np.ndarray:
    """Ascending squared singular values (fp64) pooled over a stack of matrices."""
    if mats.dim() == 2:
        mats = mats.unsqueeze(0)
    ev = [torch.linalg.svdvals(m.double() * scale).square() for m in mats]
    return np.sort(torch.cat(ev).numpy())


def conv_matrices(w: torch.Tensor) -> torch.Tensor:
    """(out, in, *kernel) -> (k, out, in), one matrix per kernel position, written plainly."""
    out_c, in_c = w.shape[:2]
    positions = [idx for idx in np.ndindex(*w.shape[2:])]
    return torch.stack([w[(slice(None), slice(None)) + p] for p in positions])


def filter_zeros(e: np.ndarray, thresh: float = 1e-5) -> np.ndarray:
    nz = e[e > thresh]
    return nz if len(nz) else e


def hill(nz: np.ndarray, i: int) -> tuple[float, float]:
    """alpha and D with xmin = nz[i] (SPEC section 3)."""
    N = len(nz)
    n = N - i
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = 1 + n / (np.sum(np.log(nz[i:])) - n * math.log(nz[i]))
        D = max(abs(1 - (nz[i + j] / nz[i]) ** (1 - alpha) - j / n) for j in range(n))
    return float(alpha), float(D)


def median_fit(nz: np.ndarray, xmin_pos: float = 2.0) -> tuple[float, float, int]:
    i = int(len(nz) / xmin_pos)
    a, d = hill(nz, i)
    return a, d, i


def ks_fit(nz: np.ndarray, lo: float = -math.inf, hi: float = math.inf) -> tuple[float, float, int]:
    """The reference scan: Python loop over candidates, skip below lo, stop above hi."""
    N = len(nz)
    alphas = [0.0] * (N - 1)
    Ds = [1.0] * (N - 1)
    for i in range(N - 1):
        if nz[i] < lo:
            continue
        if nz[i] > hi:
            break
        n = N - i
        with np.errstate(divide="ignore", invalid="ignore"):
            a = 1 + n / (np.sum(np.log(nz[i:])) - n * math.log(nz[i]))
        alphas[i] = float(a)
        if a > 1:
            Ds[i] = max(abs(1 - (nz[i + j] / nz[i]) ** (1 - a) - j / n) for j in range(n))
    k = int(np.argmin(Ds))
    return alphas[k], Ds[k], k


def fix_finger_fit(nz: np.ndarray, bins: int = 100, corrected: bool = False) -> tuple[float, float, int]:
    """SPEC section 5, with the histogram written as torch.histc defines it."""
    h = np.log10(nz)
    mn, mx = float(h.min()), float(h.max())
    if mn == mx:
        mn, mx = mn - 1, mx + 1
    counts = [0] * bins
    for v in h:
        b = int(math.floor((v - mn) / (mx - mn) * bins))
        counts[min(max(b, 0), bins - 1)] += 1
    ih = counts.index(max(counts))
    xmin2 = 10 ** (mn + ih * (mx - mn) / bins)
    lo = 0.95 * xmin2 if corrected else math.log10(0.95 * xmin2)
    return ks_fit(nz, lo, 1.5 * xmin2)


def heavy_tailed(rows: int, cols: int, seed: int, df: float = 3.0, dtype=torch.float32) -> torch.Tensor:
    """A random matrix with Student-t entries (heavy-tailed ESD), fixed seed."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi = torch.randn(rows, cols, int(df), generator=g, dtype=torch.float64).square().sum(-1)
    return (z / torch.sqrt(chi / df) / math.sqrt(cols)).to(dtype)


# ---------------------------------------------------------------------------------------------
# SPEC sections 3-5 as plain float64 loops over Python lists, one candidate at a time (math.fsum
# for the log sums): the oracles of the fit kernels

INF = math.inf


def _ln(v: float) -> float:
    return math.log(v) if v > 0 else -INF


def oracle_alpha(x: list[float], i: int) -> float:
    n = len(x) - i
    denom = math.fsum(_ln(v) for v in x[i:]) - n * _ln(x[i])
    if math.isnan(denom):
        return math.nan
    if denom == 0:
        return INF
    return 1.0 + n / denom


def oracle_D(x: list[float], i: int, alpha: float) -> float:
    n = len(x) - i
    if math.isnan(alpha) or x[i] == 0:
        return math.nan
    return max(abs(1.0 - (x[i + j] / x[i]) ** (1.0 - alpha) - j / n) for j in range(n))


def oracle_hill(x: list[float], xmin_pos: float) -> tuple[float, float, int]:
    N = len(x)
    i = int(N / xmin_pos)
    if N < 2 or i >= N:
        return math.nan, math.nan, -1
    a = oracle_alpha(x, i)
    return a, oracle_D(x, i, a), i


def oracle_ks(x: list[float], lo: float = -INF, hi: float = INF) -> tuple[float, float, int, list[float]]:
    N = len(x)
    if N < 2:
        return math.nan, math.nan, -1, []
    alphas, Ds = [0.0] * (N - 1), [1.0] * (N - 1)
    for i in range(N - 1):
        if x[i] < lo:
            continue
        if x[i] > hi:
            break
        a = oracle_alpha(x, i)
        alphas[i] = a
        if a > 1:
            Ds[i] = oracle_D(x, i, a)
    k = min(range(N - 1), key=lambda t: (Ds[t], t))
    return alphas[k], Ds[k], k, Ds


#: The start of the one line `tbfast._backend` logs (once per process) when tbfast._C is not loaded.
FALLBACK_NOTICE = "tbfast._C C++ extension not loaded"


def without_fallback_notice(err: str, extension_loaded: bool) -> str:
    """A child process's stderr without the extension-fallback notice, which a build without
    tbfast._C (no compiler at install time) prints once at import; unchanged when the caller's
    tbfast has the extension loaded (``extension_loaded``), so the tests stay strict there."""
    if extension_loaded:
        return err
    return "".join(line for line in err.splitlines(keepends=True) if not line.startswith(FALLBACK_NOTICE))


# ------------------------------------------------------------ weight_digest (tbfast/ops/digest.py)

_U64 = (1 << 64) - 1
DIGEST_KEYS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F)


def splitmix64_finalizer(z: int) -> int:
    """The splitmix64 finalizer on Python ints, reduced mod 2^64 after every product."""
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _U64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def oracle_digest(data: bytes) -> tuple[int, int]:
    """(H_0, H_1) of the digest definition, word by word in plain Python: the bytes zero-padded to
    a multiple of 8, little-endian words x_i, S_c = sum mix(x_i ^ ((i + 1) K_c)) mod 2^64,
    H_c = mix(S_c ^ (L K_c))."""
    L = len(data)
    padded = data + bytes(-L % 8)
    out = []
    for key in DIGEST_KEYS:
        s = 0
        for i in range(len(padded) // 8):
            x = int.from_bytes(padded[8 * i:8 * i + 8], "little")
            s = (s + splitmix64_finalizer(x ^ (((i + 1) * key) & _U64))) & _U64
        out.append(splitmix64_finalizer(s ^ ((L * key) & _U64)))
    return out[0], out[1]


def oracle_digest_hex(data: bytes) -> str:
    h0, h1 = oracle_digest(data)
    return f"{h0:016x}{h1:016x}"
