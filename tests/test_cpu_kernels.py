"""C++ CPU kernels (torch.ops.tbfast.*) against independent float64 oracles.

eigvalsh_batched is compared with numpy's float64 eigvalsh; hill_fit and ks_scan with plain
Python loops written here from the SPEC formulas (sections 3-5), with math.fsum for log sums.
"""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import pytest
import torch

from oracle import oracle_hill, oracle_ks
from tbfast import _backend

pytestmark = pytest.mark.skipif(not _backend.has_op("ks_scan"), reason="tbfast._C extension not built")

INF = math.inf


# ---------------------------------------------------------------------------------------------
# Spectra


def _one_blas_thread():
    """numpy's BLAS on one thread: its spinning OpenBLAS pool next to torch's OpenMP pool makes
    a busy 2-core machine crawl (seconds for a 300 x 300 eigensolve)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


@pytest.fixture(autouse=True)
def _numpy_single_threaded():
    with _one_blas_thread():
        yield


def _numpy_eigvalsh(A: np.ndarray) -> np.ndarray:
    with _one_blas_thread():
        return np.linalg.eigvalsh(A)


def _spectra() -> list[list[float]]:
    """At least 20 ascending spectra: heavy- and light-tailed, N = 2, 3, .., ties, zeros."""
    rng = np.random.default_rng(1234)
    out: list[np.ndarray] = [
        np.array([0.5, 2.0]),
        np.array([1.0, 1.0]),
        np.array([0.1, 0.3, 7.0]),
        np.array([0.0, 0.0, 1.0, 4.0]),
        np.array([2.0, 2.0, 2.0, 2.0, 2.0]),  # all equal: every alpha is inf
    ]
    for n in (12, 40, 97, 160, 250):
        out.append(rng.pareto(1.5, n) + 0.01)                 # heavy tail
        out.append(rng.uniform(0.5, 1.5, n))                  # light tail
    for n, df in ((60, 2.0), (120, 3.0), (200, 5.0)):         # Gram spectra of Student-t weights
        W = rng.standard_t(df, (n, n + 20)) / math.sqrt(n)
        out.append(np.clip(_numpy_eigvalsh(W @ W.T), 0, None))
    W = rng.standard_normal((150, 150)) / math.sqrt(150)      # Marchenko-Pastur bulk, light tail
    out.append(np.clip(_numpy_eigvalsh(W @ W.T), 0, None))
    ties = np.round(rng.pareto(2.0, 80) * 4) / 4 + 0.25       # many exact ties, tied maximum
    out.append(np.append(ties, [ties.max()] * 3))
    z = rng.pareto(1.2, 70) + 0.1
    z[:9] = 0.0                                               # zeros present (not filtered)
    out.append(z)
    out.append(np.geomspace(1e-3, 1e3, 64))                   # exact power law-ish grid
    return [sorted(float(v) for v in a) for a in out]


with _one_blas_thread():
    SPECTRA = _spectra()


def _ragged(spectra: list[list[float]], dtype=torch.float64, gap: int = 0):
    """Concatenate spectra (optionally with junk between layers) into values/starts/ends."""
    vals, starts, ends = [], [], []
    for sp in spectra:
        vals.extend([-7.0] * gap)  # never read: outside every [start, end)
        starts.append(len(vals))
        vals.extend(sp)
        ends.append(len(vals))
    return (torch.tensor(vals, dtype=dtype), torch.tensor(starts, dtype=torch.int64),
            torch.tensor(ends, dtype=torch.int64))


def _bounds(lo, hi):
    return torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)


def _assert_close(got: float, want: float, rtol: float, atol: float, what: str):
    if math.isnan(want):
        assert math.isnan(got), f"{what}: got {got}, want NaN"
    elif math.isinf(want):
        assert got == want, f"{what}: got {got}, want {want}"
    else:
        assert abs(got - want) <= atol + rtol * abs(want), f"{what}: got {got!r}, want {want!r}"


def _assert_index(got: int, want: int, Ds: list[float], what: str):
    """Same first argmin; a different one only for an exact-arithmetic tie (oracle Ds within 1e-13)."""
    if got != want:
        assert abs(Ds[got] - Ds[want]) < 1e-13, f"{what}: index {got} vs oracle {want} (D {Ds[got]} vs {Ds[want]})"


# ---------------------------------------------------------------------------------------------
# hill_fit


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("xmin_pos", [2.0, 1.5, 3.0])
def test_hill_fit_matches_oracle(dtype, xmin_pos):
    assert len(SPECTRA) >= 20
    values, starts, ends = _ragged(SPECTRA, dtype, gap=2)
    alpha, D, index = torch.ops.tbfast.hill_fit(values, starts, ends, xmin_pos)
    assert alpha.dtype == torch.float64 and D.dtype == torch.float64 and index.dtype == torch.int64
    for l, sp in enumerate(SPECTRA):
        x = [float(v) for v in torch.tensor(sp, dtype=dtype).double()]  # what the kernel sees
        a, d, i = oracle_hill(x, xmin_pos)
        assert int(index[l]) == i, f"layer {l}"
        _assert_close(float(alpha[l]), a, 1e-10, 0.0, f"layer {l} alpha")
        _assert_close(float(D[l]), d, 0.0, 1e-10, f"layer {l} D")


def test_hill_fit_short_layers_and_xmin_pos_past_end():
    values, starts, ends = _ragged([[], [3.0], [1.0, 2.0]])
    alpha, D, index = torch.ops.tbfast.hill_fit(values, starts, ends, 2.0)
    assert math.isnan(alpha[0]) and math.isnan(D[0]) and index[0] == -1
    assert math.isnan(alpha[1]) and math.isnan(D[1]) and index[1] == -1
    assert index[2] == 1 and alpha[2] == INF and D[2] == 0.0  # n = 1: one-point tail
    for xmin_pos in (0.9, 1e-300):  # i = int(N / xmin_pos) >= N (N / 1e-300 overflows to inf)
        alpha, D, index = torch.ops.tbfast.hill_fit(values, starts, ends, xmin_pos)
        assert index.tolist() == [-1, -1, -1] and torch.isnan(alpha).all() and torch.isnan(D).all()


# ---------------------------------------------------------------------------------------------
# ks_scan


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ks_scan_matches_oracle(dtype):
    values, starts, ends = _ragged(SPECTRA, dtype, gap=1)
    L = len(SPECTRA)
    lo, hi = _bounds([-INF] * L, [INF] * L)
    alpha, D, index = torch.ops.tbfast.ks_scan(values, starts, ends, lo, hi)
    assert alpha.dtype == torch.float64 and index.dtype == torch.int64
    for l, sp in enumerate(SPECTRA):
        x = [float(v) for v in torch.tensor(sp, dtype=dtype).double()]
        a, d, k, Ds = oracle_ks(x)
        _assert_index(int(index[l]), k, Ds, f"layer {l}")
        _assert_close(float(D[l]), d, 0.0, 1e-10, f"layer {l} D")
        if int(index[l]) == k:
            _assert_close(float(alpha[l]), a, 1e-10, 0.0, f"layer {l} alpha")


def test_ks_scan_fix_finger_windows():
    rng = random.Random(7)
    spectra, los, his = [], [], []
    for sp in SPECTRA:
        if len(sp) < 5:
            continue
        a, b = sorted(rng.sample(range(len(sp)), 2))
        # windows: inside the spectrum, the reference quirk (tiny lo: nothing skipped),
        # one that skips every candidate, and one that stops at once
        for lo, hi in ((sp[a], sp[b]), (math.log10(0.95 * max(sp[b], 1e-9)), 1.5 * sp[a]),
                       (sp[-1] * 2, INF), (-INF, sp[0] / 2)):
            spectra.append(sp)
            los.append(lo)
            his.append(hi)
    values, starts, ends = _ragged(spectra)
    lo_t, hi_t = _bounds(los, his)
    alpha, D, index = torch.ops.tbfast.ks_scan(values, starts, ends, lo_t, hi_t)
    for l, sp in enumerate(spectra):
        a, d, k, Ds = oracle_ks(sp, los[l], his[l])
        _assert_index(int(index[l]), k, Ds, f"window {l}")
        _assert_close(float(D[l]), d, 0.0, 1e-10, f"window {l} D")
        if int(index[l]) == k:
            _assert_close(float(alpha[l]), a, 1e-10, 0.0, f"window {l} alpha")
    # a window that skips every candidate: first argmin of all-ones D is candidate 0, alpha 0
    skip_all = [l for l in range(len(spectra)) if los[l] > spectra[l][-1]]
    assert skip_all and all(index[l] == 0 and alpha[l] == 0.0 and D[l] == 1.0 for l in skip_all)


def test_ks_scan_short_layers_and_empty_batch():
    values, starts, ends = _ragged([[], [2.0], [1.0, 3.0]])
    lo, hi = _bounds([-INF] * 3, [INF] * 3)
    alpha, D, index = torch.ops.tbfast.ks_scan(values, starts, ends, lo, hi)
    assert index[:2].tolist() == [-1, -1] and torch.isnan(alpha[:2]).all() and torch.isnan(D[:2]).all()
    # N = 2: the only candidate is 0 with n = 2: alpha = 1 + 2 / ln 3, D = |1 - 3^(1-alpha) - 1/2|
    a = 1 + 2 / math.log(3.0)
    assert index[2] == 0
    assert math.isclose(float(alpha[2]), a, rel_tol=1e-12)
    assert math.isclose(float(D[2]), abs(0.5 - 3.0 ** (1 - a)), rel_tol=1e-12)
    empty = torch.empty(0, dtype=torch.int64)
    for out in (torch.ops.tbfast.ks_scan(torch.empty(0, dtype=torch.float64), empty, empty,
                                         *_bounds([], [])),
                torch.ops.tbfast.hill_fit(torch.empty(0, dtype=torch.float32), empty, empty, 2.0)):
        assert [t.shape for t in out] == [(0,), (0,), (0,)]
        assert [t.dtype for t in out] == [torch.float64, torch.float64, torch.int64]


def _heavy_batch(L: int, n: int, seed: int) -> torch.Tensor:
    """Ascending Gram spectra of L Student-t(3) matrices (heavy-tailed ESDs), float64."""
    W = np.random.default_rng(seed).standard_t(3.0, (L, n, n + 16)) / math.sqrt(n)
    return torch.from_numpy(np.clip(_numpy_eigvalsh(W @ W.transpose(0, 2, 1)), 0, None))


def test_ks_scan_pruning_is_exact_and_thread_independent():
    """The pruned scan returns bit-for-bit what the exhaustive (unpruned) scan returns."""
    ev = _heavy_batch(12, 160, 3)
    L, n = ev.shape
    parts = [ev.reshape(-1), torch.sort(torch.rand(4 * 200, dtype=torch.float64) + 0.5)[0]]
    values = torch.cat(parts)
    starts = torch.tensor([l * n for l in range(L)] + [L * n + 200 * j for j in range(4)])
    ends = starts + torch.tensor([n] * L + [200] * 4)
    lo, hi = _bounds([-INF] * len(starts), [INF] * len(starts))
    full = torch.ops.tbfast_testing._ks_scan_exhaustive(values, starts, ends, lo, hi)
    threads = torch.get_num_threads()
    try:
        for t in sorted({1, 2, threads}):
            torch.set_num_threads(t)
            fast = torch.ops.tbfast.ks_scan(values, starts, ends, lo, hi)
            for got, want in zip(fast, full):
                assert torch.equal(got, want), f"{t} threads"
    finally:
        torch.set_num_threads(threads)
    # and the exhaustive scan is the oracle's
    for l in (0, L - 1, L):
        x = values[starts[l]:ends[l]].tolist()
        a, d, k, Ds = oracle_ks(x)
        _assert_index(int(full[2][l]), k, Ds, f"layer {l}")
        _assert_close(float(full[1][l]), d, 0.0, 1e-10, f"layer {l} D")


# ---------------------------------------------------------------------------------------------
# Bad input -> clear errors (a NaN value is not an error: the NaN policy, tests/test_ops.py)


def _fit_args():
    values, starts, ends = _ragged([[0.5, 1.0, 2.0, 4.0], [1.0, 2.0, 3.0]])
    lo, hi = _bounds([-INF] * 2, [INF] * 2)
    return values, starts, ends, lo, hi


@pytest.mark.parametrize("case, match", [
    ("noncontiguous", "contiguous"),
    ("int_values", "float32 or float64"),
    ("half_values", "float32 or float64"),
    ("int32_starts", "int64"),
    ("bad_range", "layer 1 has an invalid range"),
    ("inf", "layer 0 has a non-finite"),
    ("negative", "layer 0 has a negative"),
    ("unsorted", "layer 1 is not sorted"),
    ("lo_float32", "lo must be float64"),
    ("hi_length", "hi must be 1-D with one entry per layer"),
])
def test_fit_ops_reject_bad_input(case, match):
    values, starts, ends, lo, hi = _fit_args()
    if case == "noncontiguous":
        values = torch.stack([values, values], 1)[:, 0]
    elif case == "int_values":
        values = values.long()
    elif case == "half_values":
        values = values.half()
    elif case == "int32_starts":
        starts = starts.int()
    elif case == "bad_range":
        ends = ends.clone()
        ends[1] = 99
    elif case == "inf":
        values[3] = INF
    elif case == "negative":
        values[0] = -1e-3
    elif case == "unsorted":
        values[4], values[5] = 2.5, 2.0
    elif case == "lo_float32":
        lo = lo.float()
    elif case == "hi_length":
        hi = hi[:1]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tbfast.ks_scan(values, starts, ends, lo, hi)
    if case not in ("lo_float32", "hi_length"):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.tbfast.hill_fit(values, starts, ends, 2.0)


def test_hill_fit_rejects_bad_xmin_pos():
    values, starts, ends, _, _ = _fit_args()
    for bad in (0.0, -2.0, math.nan):
        with pytest.raises(RuntimeError, match="xmin_pos must be a positive"):
            torch.ops.tbfast.hill_fit(values, starts, ends, bad)


# ---------------------------------------------------------------------------------------------
# eigvalsh_batched


def _sym_batch(kind: str, B: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        A = rng.standard_normal((B, n, n))
        return (A + A.transpose(0, 2, 1)) / 2
    if kind == "gram":
        X = rng.standard_normal((B, n + 3, n))
        return X.transpose(0, 2, 1) @ X
    if kind == "rank_deficient":  # Gram of a wide matrix: n - max(1, n // 3) zero eigenvalues
        X = rng.standard_normal((B, max(1, n // 3), n))
        return X.transpose(0, 2, 1) @ X
    if kind == "repeated":  # eigenvalues with multiplicity
        Q, _ = np.linalg.qr(rng.standard_normal((B, n, n)))
        d = (np.arange(n) // 3 + 1) * 1.5
        return (Q * d[None, None, :]) @ Q.transpose(0, 2, 1)
    raise ValueError(kind)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_lapack", [True, False])
def test_eigvalsh_batched_matches_numpy(n, dtype, use_lapack):
    rng = np.random.default_rng(n)
    batch = 1 if n == 300 else 5
    # n = 300 keeps two kinds: on a busy 2-core machine each threaded LAPACK call can take seconds
    kinds = ("gram", "repeated") if n == 300 else ("random", "gram", "rank_deficient", "repeated")
    for kind in kinds:
        A = _sym_batch(kind, batch, n, rng)
        want = _numpy_eigvalsh(A)  # float64 oracle, ascending
        G = torch.from_numpy(A).to(dtype).contiguous()
        w, info = torch.ops.tbfast_testing.eigvalsh_batched_path(G, 0, use_lapack)
        if use_lapack and n < 300:
            w2, info2 = torch.ops.tbfast.eigvalsh_batched(G, 0)
            assert torch.equal(w, w2) and torch.equal(info, info2)
        assert w.shape == (batch, n) and w.dtype == dtype
        assert info.dtype == torch.int32 and info.tolist() == [0] * batch
        scale = np.abs(want).max(axis=1, keepdims=True) + 1e-300
        tol = 1e-11 if dtype == torch.float64 else 5e-5
        err = np.abs(w.double().numpy() - want) / scale
        assert err.max() <= tol, f"{kind} n={n}: max rel err {err.max():.2e}"
        assert np.all(np.diff(w.double().numpy(), axis=1) >= 0), "not ascending"


def test_eigvalsh_batched_reads_lower_triangle_and_many_matrices():
    rng = np.random.default_rng(0)
    A = _sym_batch("gram", 37, 24, rng)
    junk = np.triu(rng.standard_normal(A.shape) * 100, 1)
    G = torch.from_numpy(np.tril(A) + junk)  # upper triangle is garbage
    w, info = torch.ops.tbfast.eigvalsh_batched(G, 0)
    assert info.tolist() == [0] * 37
    np.testing.assert_allclose(w.numpy(), _numpy_eigvalsh(A), rtol=0, atol=1e-10 * np.abs(A).max())
    # a small workspace limit (one matrix at a time) gives the same eigenvalues
    w1, _ = torch.ops.tbfast.eigvalsh_batched(G, 1)
    assert torch.equal(w, w1)


def test_eigvalsh_batched_empty_shapes():
    for shape in ((0, 5, 5), (3, 0, 0)):
        w, info = torch.ops.tbfast.eigvalsh_batched(torch.zeros(shape), 0)
        assert w.shape == shape[:2] and info.shape == shape[:1]


@pytest.mark.parametrize("case, match", [
    ("noncontiguous", "contiguous"),
    ("int", "float32 or float64"),
    ("half", "float32 or float64"),
    ("not_square", r"shape \(B, n, n\)"),
    ("2d", r"shape \(B, n, n\)"),
    ("negative_limit", "workspace_limit must be >= 0"),
])
def test_eigvalsh_batched_rejects_bad_input(case, match):
    G = torch.eye(4).expand(2, 4, 4).contiguous()
    limit = 0
    if case == "noncontiguous":
        G = G.transpose(1, 2)
    elif case == "int":
        G = G.int()
    elif case == "half":
        G = G.half()
    elif case == "not_square":
        G = torch.zeros(2, 4, 3)
    elif case == "2d":
        G = G[0]
    elif case == "negative_limit":
        limit = -1
    with pytest.raises(RuntimeError, match=match):
        torch.ops.tbfast.eigvalsh_batched(G, limit)
