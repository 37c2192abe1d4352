"""Triton fit kernels (tbfast.kernels.triton_fit) against a plain float64 loop over SPEC formulas.

Without a CUDA device the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here
before triton is imported) on CPU tensors; on a GPU machine the real kernels run on CUDA tensors.
Also compared with the torch reference (tbfast.kernels.ref) and, when the extension is built,
with the C++ ops torch.ops.tbfast.hill_fit / ks_scan.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton.language fixes interpreter mode at import; too late to switch it on here
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (set it in "
                    "tests/conftest.py)", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from tbfast.kernels import triton_fit  # noqa: E402

if triton_fit.version_problem() is not None:  # e.g. triton 3.0, pinned by torch 2.4
    pytest.skip(f"Triton fit kernels unsupported here: {triton_fit.version_problem()}",
                allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: inf/NaN in masked lanes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EVALS_THRESH = 1e-5
RTOL = 1e-9


# ----------------------------------------------------------------------------- oracle
# Plain per-layer float64 loops, written from SPEC sections 3-5 (numpy scalars: IEEE inf/NaN).


def _alpha(x: np.ndarray, i: int) -> float:
    n = len(x) - i
    with np.errstate(all="ignore"):
        return 1.0 + np.float64(n) / (np.sum(np.log(x[i:])) - n * np.log(x[i]))


def _d(x: np.ndarray, i: int, alpha: float) -> float:
    n = len(x) - i
    with np.errstate(all="ignore"):
        dev = [abs(1.0 - (x[i + j] / x[i]) ** (1.0 - alpha) - j / n) for j in range(n)]
    return float(np.max(dev))  # NaN propagates, like the reference's max


def hill_oracle(x: np.ndarray, xmin_pos: float) -> tuple[float, float, int]:
    N = len(x)
    i = int(N / xmin_pos)
    if N < 2 or i >= N:
        return math.nan, math.nan, -1
    a = _alpha(x, i)
    return float(a), _d(x, i, a), i


def ks_oracle(x: np.ndarray, lo: float, hi: float) -> tuple[float, float, int, list[float]]:
    N = len(x)
    if N < 2:
        return math.nan, math.nan, -1, []
    alphas, ds = [0.0] * (N - 1), [1.0] * (N - 1)
    for i in range(N - 1):
        if x[i] < lo:
            continue
        if x[i] > hi:
            break
        a = _alpha(x, i)
        alphas[i] = float(a)
        if a > 1:
            ds[i] = _d(x, i, a)
    k = int(np.argmin(ds))  # first index on ties
    return alphas[k], ds[k], k, ds


# ----------------------------------------------------------------------------- batch


def _spectra(rng: np.random.Generator) -> list[np.ndarray]:
    """~25 ascending spectra: N < 2, tiny, heavy tails, MP bulk + spikes, ties, zeros."""
    out = [np.array([]), np.array([0.7]), np.array([0.5, 2.0]), np.array([1.0, 3.0, 3.5])]
    for n, a in [(12, 1.5), (40, 2.0), (64, 2.5), (97, 3.0), (150, 4.0), (200, 6.0)]:
        out.append(np.sort(rng.pareto(a - 1.0, n) + 1.0) * rng.uniform(0.01, 10.0))
    for m, n in [(60, 30), (200, 120)]:  # Marchenko-Pastur bulk with a few spikes
        w = rng.standard_normal((m, n)) / math.sqrt(m)
        w[:, :3] *= np.array([4.0, 6.0, 9.0])
        out.append(np.sort(np.linalg.eigvalsh(w.T @ w)))
    ties = np.sort(rng.pareto(1.5, 50) + 1.0)
    ties[10:14] = ties[10]  # a run of equal values in the bulk
    ties[-1] = ties[-2]  # a tie at the top: alpha = inf for the last candidate
    out.append(ties)
    out.append(np.sort(np.round(rng.pareto(2.0, 80) + 1.0, 1)))  # many ties
    zeros = np.concatenate([np.zeros(7), [1e-9, 3e-6], np.sort(rng.pareto(2.0, 60) + 1.0)])
    out.append(zeros)  # zeros and tiny values: filtered by the window, or NaN alphas if not
    out.append(np.concatenate([np.zeros(5), np.sort(rng.pareto(1.0, 30) + 0.1)]))
    out.append(np.zeros(6))  # all zero: the filter keeps everything, alpha is NaN
    out.append(np.full(5, 2.5))  # all equal
    for n in (129, 33, 17):  # block-boundary lengths
        out.append(np.sort(rng.pareto(2.0, n) + 1.0))
    return out


def _ragged(specs: list[np.ndarray], filter_zeros: bool, dtype=torch.float64):
    lens = [len(s) for s in specs]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    starts = offsets[:-1].copy()
    if filter_zeros:  # SPEC: nz = e[e > thresh], all of e if that is empty
        for l, s in enumerate(specs):
            keep = int(np.sum(s > EVALS_THRESH))
            if keep:
                starts[l] += len(s) - keep
    values = torch.tensor(np.concatenate(specs), dtype=dtype, device=DEVICE)
    st = torch.tensor(starts, device=DEVICE)
    en = torch.tensor(offsets[1:], device=DEVICE)
    layers = [values[a:b].double().cpu().numpy() for a, b in zip(starts, offsets[1:])]
    return values, st, en, layers


def _windows(layers: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """Per-layer [lo, hi]: plain scans, fix-finger-like windows, empty windows."""
    lo, hi = [], []
    for l, x in enumerate(layers):
        N = len(x)
        kind = l % 5
        if N < 4 or kind == 0:
            lo.append(-math.inf), hi.append(math.inf)
        elif kind == 1:  # a window inside the spectrum
            lo.append(float(x[N // 4])), hi.append(float(x[N // 2]))
        elif kind == 2:  # the reference quirk: lo on a log10 scale, only hi bites
            xmin2 = float(x[N // 3])
            lo.append(math.log10(0.95 * xmin2)), hi.append(1.5 * xmin2)
        elif kind == 3:  # nothing visited: alpha 0, D 1, index 0
            lo.append(-math.inf), hi.append(float(x[0]) * 0.5 - 1.0)
        else:  # lo above every candidate
            lo.append(float(x[-1]) * 2.0 + 1.0), hi.append(math.inf)
    return lo, hi


@pytest.fixture(scope="module")
def batch():
    return _spectra(np.random.default_rng(1234))


def _close(got: float, want: float, rtol: float = RTOL) -> bool:
    if math.isnan(want) or math.isinf(want):
        return (math.isnan(got) and math.isnan(want)) or got == want
    return abs(got - want) <= rtol * max(1.0, abs(want))


def _check(name: str, got, want, layers, ds_oracle=None) -> None:
    alpha, D, index = (t.cpu() for t in got)
    assert alpha.dtype == torch.float64 and D.dtype == torch.float64 and index.dtype == torch.int64
    assert alpha.shape == D.shape == index.shape == (len(layers),)
    for l in range(len(layers)):
        wa, wd, wk = want[l][:3]
        ga, gd, gk = float(alpha[l]), float(D[l]), int(index[l])
        if gk != wk and ds_oracle is not None and wk >= 0 and 0 <= gk < len(ds_oracle[l]):
            # a near-tie in D: accept the other index only if its oracle D is within 1e-12
            assert abs(ds_oracle[l][gk] - wd) < 1e-12, f"{name} layer {l}: index {gk} != {wk}"
            continue
        assert gk == wk, f"{name} layer {l} (N={len(layers[l])}): index {gk} != {wk}"
        assert _close(ga, wa), f"{name} layer {l}: alpha {ga!r} != {wa!r}"
        assert _close(gd, wd), f"{name} layer {l}: D {gd!r} != {wd!r}"


def _cpp_ops():
    """torch.ops.tbfast when the C++ extension is built and loaded, else None."""
    try:
        from tbfast import _backend
        if _backend.has_op("hill_fit") and _backend.has_op("ks_scan"):
            return torch.ops.tbfast
    except Exception:  # extension not built or loader API differs: skip that comparison
        return None
    return None


# ----------------------------------------------------------------------------- tests


def test_available_reports_reason():
    ok, why = triton_fit.triton_available()
    assert ok, why
    assert "triton" in why


@pytest.mark.parametrize("filter_zeros", [False, True])
@pytest.mark.parametrize("xmin_pos", [2.0, 1.5])
def test_hill_fit_matches_oracle(batch, filter_zeros, xmin_pos):
    values, starts, ends, layers = _ragged(batch, filter_zeros)
    want = [hill_oracle(x, xmin_pos) for x in layers]
    _check("hill", triton_fit.hill_fit_triton(values, starts, ends, xmin_pos), want, layers)
    # small blocks: several loop iterations per layer
    _check("hill/b8", triton_fit.hill_fit_triton(values, starts, ends, xmin_pos, block=8), want, layers)


def test_hill_fit_float32_input_upcasts(batch):
    values, starts, ends, layers = _ragged(batch, True, dtype=torch.float32)
    want = [hill_oracle(x, 2.0) for x in layers]  # layers: the float32 values upcast to float64
    _check("hill/f32", triton_fit.hill_fit_triton(values, starts, ends, 2.0), want, layers)


def _ks_case(batch, filter_zeros: bool, windowed: bool):
    values, starts, ends, layers = _ragged(batch, filter_zeros)
    if windowed:
        lo, hi = _windows(layers)
    else:
        lo, hi = [-math.inf] * len(layers), [math.inf] * len(layers)
    want = [ks_oracle(x, a, b) for x, a, b in zip(layers, lo, hi)]
    lo_t = torch.tensor(lo, dtype=torch.float64, device=DEVICE)
    hi_t = torch.tensor(hi, dtype=torch.float64, device=DEVICE)
    return (values, starts, ends, lo_t, hi_t), want, layers


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("filter_zeros", [False, True])
def test_ks_scan_matches_oracle(batch, filter_zeros, windowed):
    args, want, layers = _ks_case(batch, filter_zeros, windowed)
    _check("ks", triton_fit.ks_scan_triton(*args), want, layers, [w[3] for w in want])


@pytest.mark.parametrize("windowed", [False, True])
def test_ks_scan_small_tiles(batch, windowed):
    """Tiny tiles: candidate blocks, tail loops and argmin blocks cross many boundaries."""
    args, want, layers = _ks_case(batch, False, windowed)
    got = triton_fit.ks_scan_triton(*args, block_i=8, block_j=16, argmin_block=8)
    _check("ks/8x16", got, want, layers, [w[3] for w in want])


def test_ks_scan_window_semantics():
    """Hand-made case: candidates below lo are skipped, the scan stops above hi."""
    x = np.array([1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0])
    values = torch.tensor(np.tile(x, 3), dtype=torch.float64, device=DEVICE)  # three layers
    starts = torch.tensor([0, 8, 16], device=DEVICE)
    ends = torch.tensor([8, 16, 24], device=DEVICE)
    lo = torch.tensor([1.6, -math.inf, 100.0], dtype=torch.float64, device=DEVICE)
    hi = torch.tensor([4.0, 0.5, math.inf], dtype=torch.float64, device=DEVICE)
    for argmin_block in (256, 2):  # 2: ties of D = 1 spread over several argmin lanes
        _check_windows(triton_fit.ks_scan_triton(values, starts, ends, lo, hi,
                                                 argmin_block=argmin_block), x)


def _check_windows(result, x):
    alpha, D, index = (t.cpu() for t in result)
    # layer 0 visits candidates 2 (x=2) and 3 (x=3) only
    cands = {i: (_alpha(x, i), _d(x, i, _alpha(x, i))) for i in (2, 3)}
    k = min(cands, key=lambda i: cands[i][1])
    assert int(index[0]) == k
    assert float(alpha[0]) == pytest.approx(cands[k][0], rel=RTOL)
    assert float(D[0]) == pytest.approx(cands[k][1], rel=RTOL)
    # layers 1, 2: nothing visited -> first candidate, alpha 0, D 1
    assert index[1:].tolist() == [0, 0]
    assert alpha[1:].tolist() == [0.0, 0.0]
    assert D[1:].tolist() == [1.0, 1.0]


def test_matches_torch_reference_and_cpp(batch):
    from tbfast.kernels import ref

    values, starts, ends, layers = _ragged(batch, True)
    lo, hi = _windows(layers)
    lo_t = torch.tensor(lo, dtype=torch.float64, device=DEVICE)
    hi_t = torch.tensor(hi, dtype=torch.float64, device=DEVICE)
    impls = {"ref": (ref.hill_fit_ref, ref.ks_scan_ref)}
    ops = _cpp_ops()
    if ops is not None:
        impls["cpp"] = (ops.hill_fit, ops.ks_scan)
    got_h = [t.cpu() for t in triton_fit.hill_fit_triton(values, starts, ends, 1.5)]
    got_k = [t.cpu() for t in triton_fit.ks_scan_triton(values, starts, ends, lo_t, hi_t)]
    for name, (hill, scan) in impls.items():
        cpu = [t.cpu() for t in (values, starts, ends, lo_t, hi_t)]
        want_h = hill(cpu[0], cpu[1], cpu[2], 1.5)
        want_k = scan(*cpu)
        for got, want in ((got_h, want_h), (got_k, want_k)):
            assert torch.equal(got[2], want[2].cpu()), name
            for g, w in zip(got[:2], want[:2]):
                torch.testing.assert_close(g, w.cpu().double(), rtol=RTOL, atol=RTOL, equal_nan=True)


def test_nan_layers_small_blocks(batch):
    """NaN policy (tbfast/ops/fit.py): a layer whose values hold a NaN gets alpha = NaN, D = NaN,
    index = -1, wherever the NaN sits (tiny blocks: in a later block of the Hill fit's head too);
    the other layers match the oracle."""
    specs = [s.copy() for s in batch if len(s) >= 20][:6]
    specs[0][0] = math.nan                      # head of the Hill fit (below xmin), first block
    specs[1][len(specs[1]) // 2 - 1] = math.nan  # last head value, a later block
    specs[2][-1] = math.nan                     # top of the tail
    specs[3][:] = math.nan
    values, starts, ends, layers = _ragged(specs, False)
    unfit = (math.nan, math.nan, -1, [])
    want_h = [unfit if l < 4 else hill_oracle(x, 2.0) for l, x in enumerate(layers)]
    _check("hill/nan/b8", triton_fit.hill_fit_triton(values, starts, ends, 2.0, block=8), want_h, layers)
    want_k = [unfit if l < 4 else ks_oracle(x, -math.inf, math.inf) for l, x in enumerate(layers)]
    lo = torch.full((len(layers),), -math.inf, dtype=torch.float64, device=DEVICE)
    got = triton_fit.ks_scan_triton(values, starts, ends, lo, -lo, block_i=8, block_j=16, argmin_block=8)
    _check("ks/nan/8x16", got, want_k, layers, [w[3] for w in want_k])


def test_empty_batch_and_bad_input():
    values = torch.rand(5, dtype=torch.float64, device=DEVICE)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    for out in (triton_fit.hill_fit_triton(values, none, none, 2.0),
                triton_fit.ks_scan_triton(values, none, none, none.double(), none.double())):
        assert [t.numel() for t in out] == [0, 0, 0]
    st = torch.tensor([0], device=DEVICE)
    en = torch.tensor([5], device=DEVICE)
    with pytest.raises(ValueError, match="int64"):
        triton_fit.hill_fit_triton(values, st.int(), en, 2.0)
    with pytest.raises(ValueError, match="float32 or float64"):
        triton_fit.hill_fit_triton(values.half(), st, en, 2.0)
    with pytest.raises(ValueError, match="xmin_pos"):
        triton_fit.hill_fit_triton(values, st, en, 0.0)
    with pytest.raises(ValueError, match="one entry per layer"):
        triton_fit.ks_scan_triton(values, st, en, torch.zeros(2, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="power of two"):
        triton_fit.ks_scan_triton(values, st, en, -math.inf, math.inf, block_i=6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sizes for a GPU: too slow in the interpreter")
def test_ks_scan_large_cuda():
    """72 x 768, 144 x 1024 and 4096-eigenvalue layers against the torch reference on the GPU."""
    from tbfast.kernels import ref

    g = torch.Generator(device="cpu").manual_seed(7)
    for lens in ([768] * 72, [1024] * 144, [4096, 4096, 300]):
        specs = [torch.sort(torch.rand(n, generator=g, dtype=torch.float64) ** -0.8 - 0.9)[0]
                 for n in lens]
        values = torch.cat(specs).to(DEVICE)
        off = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
        starts, ends = off[:-1].contiguous(), off[1:].contiguous()
        L = len(lens)
        lo = torch.full((L,), -math.inf, dtype=torch.float64, device=DEVICE)
        hi = torch.full((L,), math.inf, dtype=torch.float64, device=DEVICE)
        got = triton_fit.ks_scan_triton(values, starts, ends, lo, hi)
        want = ref.ks_scan_ref(values, starts, ends, lo, hi)
        torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)
        assert torch.equal(got[2], want[2])
        got = triton_fit.hill_fit_triton(values, starts, ends, 2.0)
        want = ref.hill_fit_ref(values, starts, ends, 2.0)
        torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)
        assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("fit", ["median", "ks", "fix-finger"])
def test_dispatch_through_fit_power_law(batch, fit):
    """tbfast.fit_power_law(backend="triton") agrees with backend="torch"."""
    import tbfast

    specs = [x for x in batch if len(x) >= 2][:8]
    values, starts, ends, _ = _ragged(specs, False)
    offsets = torch.cat([starts[:1], ends]).cpu()
    got = tbfast.fit_power_law((values, offsets), fit=fit, filter_zeros=True, backend="triton")
    want = tbfast.fit_power_law((values, offsets), fit=fit, filter_zeros=True, backend="torch")
    assert torch.equal(got.xmin_index.cpu(), want.xmin_index.cpu())
    for name in ("alpha", "D"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name).cpu(),
                                   rtol=RTOL, atol=RTOL, equal_nan=True)


def _device_check() -> None:
    """`python tests/test_triton_kernels.py`: scale check and timings on the GPU (a script for
    a device session, not a test). Prints max relative errors against the torch reference and
    the mean time per call after one compiling call."""
    import time

    from tbfast.kernels import ref

    print(triton_fit.triton_available(), torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    g = torch.Generator().manual_seed(0)
    cases = [[768] * 72, [1024] * 144, [4096] * 4] if DEVICE == "cuda" else [[48] * 3]
    for lens in cases:
        specs = [torch.sort(torch.rand(n, generator=g, dtype=torch.float64) ** -0.8 - 0.9)[0]
                 for n in lens]
        v = torch.cat(specs).to(DEVICE)
        off = torch.tensor([0] + lens).cumsum(0).to(DEVICE)
        s, e = off[:-1].contiguous(), off[1:].contiguous()
        L = len(lens)
        lo = torch.full((L,), -math.inf, dtype=torch.float64, device=DEVICE)
        hi = torch.full((L,), math.inf, dtype=torch.float64, device=DEVICE)
        for name, fn, args, rfn in (("ks_scan", triton_fit.ks_scan_triton, (v, s, e, lo, hi), ref.ks_scan_ref),
                                    ("hill_fit", triton_fit.hill_fit_triton, (v, s, e, 2.0), ref.hill_fit_ref)):
            got, want = fn(*args), rfn(*args)
            err_a = ((got[0] - want[0]).abs() / want[0].abs()).max().item()
            err_d = ((got[1] - want[1]).abs() / want[1].abs()).max().item()
            reps = 50 if DEVICE == "cuda" else 2
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(*args)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / reps * 1e3
            print(f"{name} {L}x{lens[0]}: {ms:.3f} ms/call; max rel err alpha {err_a:.1e}, "
                  f"D {err_d:.1e}; index equal {torch.equal(got[2], want[2])}")


if __name__ == "__main__":
    _device_check()
