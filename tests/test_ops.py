"""The power-law fit ops as torch.library operators (tbfast.ops.fit).

torch.library.opcheck on CPU, the fake kernels against the real outputs, torch.compile, the NaN
policy on every backend, the explicit backend table, and the torch-reference CPU kernel of an
install without the extension. Values are checked against plain float64 loops over the SPEC
formulas written here (sections 3-5) and against the policy as the docs state it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from childproc import run_json
from oracle import oracle_hill, oracle_ks
from tbfast import _backend
from tbfast.kernels import triton_fit_available
from tbfast.ops import fit
from tbfast.powerlaw import fix_finger_window

HAS_CPP = _backend.has_op("hill_fit") and _backend.has_op("ks_scan")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="tbfast._C extension not built")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Triton interpreter: NaN lanes
INF = math.inf
OPS = ("hill_fit", "ks_scan")


# ----------------------------------------------------------------------------- oracle (SPEC 3-5)


def ks_oracle(x: list[float], lo: float, hi: float) -> tuple[float, float, int]:
    """Candidates i = 0..N-2 with lo <= x[i] <= hi; others alpha 0, D 1; first argmin of D."""
    return oracle_ks(x, lo, hi)[:3]


# ----------------------------------------------------------------------------- inputs


def _ragged(layers: list[list[float]], dtype=torch.float64):
    vals = [v for x in layers for v in x]
    ends = np.cumsum([len(x) for x in layers]).tolist()
    starts = [0] + ends[:-1]
    return (torch.tensor(vals, dtype=dtype), torch.tensor(starts, dtype=torch.int64),
            torch.tensor(ends, dtype=torch.int64))


def _gram_layers() -> list[list[float]]:
    """Ascending Gram spectra of four heavy-tailed weight matrices of different shapes."""
    rng = np.random.default_rng(10)
    out = []
    for n, m in ((24, 40), (16, 30), (32, 32), (12, 50)):
        W = rng.standard_t(3.0, (n, m)) / math.sqrt(m)
        out.append(sorted(float(v) for v in np.clip(np.linalg.eigvalsh(W @ W.T), 1e-12, None)))
    return out


LAYERS = _gram_layers()


def _args(op: str, dtype=torch.float64) -> tuple:
    """Realistic op arguments: a ragged batch; ks_scan gets the fix-finger window."""
    values, starts, ends = _ragged(LAYERS, dtype)
    if op == "hill_fit":
        return values, starts, ends, 2.0
    lo, hi = fix_finger_window(values, starts, ends, 10, "corrected")
    return values, starts, ends, lo.contiguous(), hi.contiguous()


def _want(op: str, args: tuple) -> list[tuple[float, float, int]]:
    values, starts, ends = args[:3]
    xs = [values[s:e].double().tolist() for s, e in zip(starts.tolist(), ends.tolist())]
    if op == "hill_fit":
        return [oracle_hill(x, args[3]) for x in xs]
    return [ks_oracle(x, float(lo), float(hi)) for x, lo, hi in zip(xs, args[3], args[4])]


def _assert_matches(out, want, what: str) -> None:
    alpha, D, index = out
    assert index.tolist() == [w[2] for w in want], what
    for l, (a, d, _) in enumerate(want):
        for got, exp in ((float(alpha[l]), a), (float(D[l]), d)):
            assert got == pytest.approx(exp, rel=1e-9, abs=1e-12, nan_ok=True), f"{what} layer {l}"


# ----------------------------------------------------------------------------- opcheck, fake


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", OPS)
def test_opcheck_cpu(name, dtype):
    op = getattr(torch.ops.tbfast, name).default
    args = _args(name, dtype)
    _assert_matches(op(*args), _want(name, args), name)  # the inputs are a real fit
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    # not differentiable: the Autograd key falls through, outputs never require grad
    grad_args = (args[0].clone().requires_grad_(),) + args[1:]
    torch.library.opcheck(op, grad_args, test_utils="test_autograd_registration")
    assert not any(t.requires_grad for t in op(*grad_args))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", OPS)
def test_opcheck_cuda(name, dtype):
    """The CUDA kernel the dispatcher picks (Triton, else the torch reference) on a real fit."""
    op = getattr(torch.ops.tbfast, name).default
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(name, dtype))
    out = op(*args)
    assert all(t.is_cuda for t in out)
    _assert_matches(tuple(t.cpu() for t in out), _want(name, _args(name, dtype)), name)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name", OPS)
def test_other_devices_get_the_torch_reference(name):
    """A device without its own kernel (here PrivateUse1) runs the CompositeExplicitAutograd
    torch reference; CPU and CUDA keep their own kernels."""
    op = getattr(torch.ops.tbfast, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbfast::{name}", "CompositeExplicitAutograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbfast::{name}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tbfast::{name}", "CUDA")
    args = _args(name, torch.float64)
    out = op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1), *args)
    _assert_matches(out, _want(name, args), f"{name} reference kernel")


@needs_cpp
@pytest.mark.parametrize("name", OPS)
def test_fake_kernel_matches_real_outputs(name):
    op = getattr(torch.ops.tbfast, name)
    args = _args(name)
    real = op(*args)
    L = len(LAYERS)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    meta = op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
    for r, f, m, dtype in zip(real, fake, meta, (torch.float64, torch.float64, torch.int64)):
        assert r.shape == f.shape == m.shape == (L,)  # L = len(starts)
        assert r.dtype == f.dtype == m.dtype == dtype
        assert f.device == r.device and m.device.type == "meta"


@needs_cpp
def test_torch_compile_fullgraph_cpu():
    """The ops trace into one graph (fake kernels) and the compiled function returns the eager
    result. Backend aot_eager: dynamo + AOTAutograd on fake tensors, the parts the ops' fake
    kernels serve; inductor adds a C++ compile of the surrounding graph (74 s on the busy 2-core
    test machine), too slow for the suite."""
    hill_args, ks_args = _args("hill_fit"), _args("ks_scan")

    def f(values, starts, ends, lo, hi):
        a1, d1, i1 = torch.ops.tbfast.hill_fit(values, starts, ends, 2.0)
        a2, d2, i2 = torch.ops.tbfast.ks_scan(values, starts, ends, lo, hi)
        return a1 - a2, d1 + d2, i1 * 1000 + i2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(*ks_args)
    want_h, want_k = _want("hill_fit", hill_args), _want("ks_scan", ks_args)
    for l in range(len(LAYERS)):
        assert float(got[0][l]) == pytest.approx(want_h[l][0] - want_k[l][0], rel=1e-9)
        assert float(got[1][l]) == pytest.approx(want_h[l][1] + want_k[l][1], rel=1e-9)
        assert int(got[2][l]) == want_h[l][2] * 1000 + want_k[l][2]


# ----------------------------------------------------------------------------- NaN policy


def _backends() -> list:
    out = [pytest.param("cpp", marks=needs_cpp), "torch"]
    ok, why = triton_fit_available()
    out.append(pytest.param("triton", marks=pytest.mark.skipif(not ok, reason=f"Triton unavailable: {why}")))
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", OPS)
def test_nan_layer_policy(name, backend):
    """Policy (docs/ARCHITECTURE.md, tbfast/ops/fit.py): a layer whose values hold a NaN gets
    alpha = NaN, D = NaN, index = -1 and nothing raises; the other layers are fitted as usual."""
    clean = LAYERS[0]
    nan_head = [math.nan] + clean[1:]           # NaN below the Hill fit's xmin (not read by it)
    nan_tail = clean[:-1] + [math.nan]
    all_nan = [math.nan] * 6
    nan_and_bad = [2.0, -1.0, math.nan, 0.5]      # also negative and unsorted: the NaN wins
    layers = [clean, nan_head, LAYERS[1], nan_tail, all_nan, nan_and_bad, LAYERS[2]]
    values, starts, ends = _ragged(layers)
    nan_layers = {1, 3, 4, 5}
    if name == "hill_fit":
        out = fit.hill_fit(values, starts, ends, 2.0, backend=backend)
        want = [oracle_hill(x, 2.0) for x in layers]
    else:
        lo = torch.full((len(layers),), -INF, dtype=torch.float64)
        out = fit.ks_scan(values, starts, ends, lo, -lo, backend=backend)
        want = [ks_oracle(x, -INF, INF) if l not in nan_layers else None for l, x in enumerate(layers)]
    alpha, D, index = out
    for l in nan_layers:
        assert math.isnan(alpha[l]) and math.isnan(D[l]) and int(index[l]) == -1, f"layer {l}"
    for l in set(range(len(layers))) - nan_layers:
        _assert_matches([t[l:l + 1] for t in out], [want[l]], f"{backend} layer {l}")


@needs_cpp
def test_cpp_keeps_other_validation_errors_next_to_a_nan_layer():
    """Only NaN is a per-layer result; an infinite value in another layer still raises."""
    values, starts, ends = _ragged([[1.0, math.nan, 2.0], [1.0, 2.0, INF]])
    with pytest.raises(RuntimeError, match="layer 1 has a non-finite eigenvalue"):
        fit.hill_fit(values, starts, ends, 2.0, backend="cpp")


# ----------------------------------------------------------------------------- backend table


def test_backend_table():
    values = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown fit backend 'gpu'"):
        fit.fit_kernels(values, "gpu")
    assert fit.pick_backend(values, "torch") == "torch"
    assert fit.pick_backend(values, "auto") == ("cpp" if HAS_CPP else "torch")
    if HAS_CPP:
        with pytest.raises(ValueError, match="C\\+\\+ fit kernels run on CPU tensors"):
            fit.fit_kernels(values.to("meta"), "cpp")
    # every explicit backend gives the oracle's fit
    for backend in ["torch", "auto"] + (["cpp"] if HAS_CPP else []):
        args = _args("ks_scan")
        _assert_matches(fit.ks_scan(*args, backend=backend), _want("ks_scan", args), backend)


_NO_EXTENSION_SCRIPT = """
import json, math, sys
sys.modules["tbfast._C"] = None  # the extension cannot be imported
import torch
from tbfast.ops import fit
values = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 1.0, 3.0, math.nan], dtype=torch.float64)
starts, ends = torch.tensor([0, 5]), torch.tensor([5, 8])
alpha, D, index = torch.ops.tbfast.hill_fit(values, starts, ends, 2.0)
try:
    fit.fit_kernels(values, "cpp")
    err = None
except RuntimeError as exc:
    err = [type(exc).__name__, str(exc)]
# the torch-reference CPU kernel passes opcheck (finite layers: a NaN layer gives NaN outputs)
from tbfast.powerlaw import fix_finger_window
clean = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 1.0, 3.0, 5.0, 6.5], dtype=torch.float64)
cs, ce = torch.tensor([0, 5]), torch.tensor([5, 9])
lo, hi = fix_finger_window(clean, cs, ce, 10, "corrected")
for op, args in ((torch.ops.tbfast.hill_fit.default, (clean, cs, ce, 2.0)),
                 (torch.ops.tbfast.ks_scan.default, (clean, cs, ce, lo.contiguous(), hi.contiguous()))):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
print(json.dumps({"alpha": alpha.tolist(), "D": D.tolist(), "index": index.tolist(),
                  "auto": fit.pick_backend(values), "cpp_error": err}))
"""


def test_without_extension_cpu_kernel_is_the_torch_reference():
    got = run_json(_NO_EXTENSION_SCRIPT, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert got["auto"] == "torch"
    assert got["cpp_error"] == ["BackendUnavailableError",
                                "C++ fit kernels requested but the tbfast._C extension is not loaded"]
    x = [0.5, 1.0, 2.0, 4.0, 8.0]
    a, d, i = oracle_hill(x, 2.0)  # i = 2: alpha = 1 + 3 / (ln 1 + ln 2 + ln 4), D on x[2:]
    assert got["index"] == [i, -1]
    assert got["alpha"][0] == pytest.approx(a, rel=1e-12) and math.isnan(got["alpha"][1])
    assert got["D"][0] == pytest.approx(d, rel=1e-12) and math.isnan(got["D"][1])
