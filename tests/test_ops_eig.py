"""The eigensolver op layer (tbfast/ops/eig.py): one registered op, its kernels, its fake kernel,
torch.library.opcheck, the retry policy and the Python entry.

Oracles: numpy's float64 eigvalsh, and the real kernels' own output shapes for the fake kernel.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tbfast import _backend
from tbfast.errors import BackendUnavailableError
from tbfast.ops import eig as eig_ops

EXT_BUILT = _backend.has_op("eigvalsh_batched")
needs_ext = pytest.mark.skipif(not EXT_BUILT, reason="tbfast._C extension not built")


def sym_batch(B: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Grams X^T X of Gaussian (n + 3, n) matrices."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n + 3, n, generator=gen, dtype=torch.float64)
    return (X.mT @ X).to(dtype)


def numpy_eigvalsh(G: torch.Tensor) -> np.ndarray:
    return np.linalg.eigvalsh(G.double().numpy(), UPLO="L")


def assert_close_to_numpy(w: torch.Tensor, G: torch.Tensor, tol: float) -> None:
    want = numpy_eigvalsh(G)
    scale = np.abs(want).max(axis=1, keepdims=True) + 1e-300
    err = np.abs(w.double().numpy() - want) / scale
    assert err.max() <= tol, f"max relative error {err.max():.2e}"


# --------------------------------------------------------------------------------- registration


def test_one_op_with_a_kernel_per_device():
    op = eig_ops.OP
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")  # torch reference
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")  # the size policy (Python)
    # the CPU kernel is the C++ one exactly when the extension is built
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU") is EXT_BUILT


@needs_ext
def test_test_only_ops_are_out_of_the_production_namespace():
    for name in ("_eigvalsh_batched_path", "cusolver_syev_batched_workspace", "cusolver_syev_batched_plan"):
        with pytest.raises((AttributeError, RuntimeError)):
            getattr(torch.ops.tbfast, name)
    for name in ("eigvalsh_batched_path", "cusolver_eigvalsh_host", "cusolver_syev_batched_workspace",
                 "cusolver_syev_batched_plan"):
        assert callable(getattr(torch.ops.tbfast_testing, name))


def test_cusolver_op_schema_has_no_stream_argument():
    schema = torch.ops.tbfast.cusolver_eigvalsh.default._schema
    assert [a.name for a in schema.arguments] == ["G", "workspace_limit"]


# ------------------------------------------------------------------------- fake kernel, opcheck


def _samples() -> list[tuple[torch.Tensor, int]]:
    return [(sym_batch(4, 6, 0), 0), (sym_batch(3, 5, 1, torch.float32), 0), (sym_batch(2, 9, 2), 1),
            (sym_batch(1, 1, 3), 0)]


@pytest.mark.parametrize("i", range(4))
def test_opcheck_cpu(i):
    G, limit = _samples()[i]
    torch.library.opcheck(torch.ops.tbfast.eigvalsh_batched.default, (G, limit))


@pytest.mark.parametrize("shape,dtype", [((4, 6, 6), torch.float64), ((3, 5, 5), torch.float32),
                                         ((0, 5, 5), torch.float32), ((2, 0, 0), torch.float64)])
def test_fake_kernel_matches_the_real_outputs(shape, dtype):
    G = torch.eye(shape[1], dtype=dtype).expand(shape).contiguous()
    w, info = torch.ops.tbfast.eigvalsh_batched(G, 0)
    with FakeTensorMode() as mode:
        fw, finfo = torch.ops.tbfast.eigvalsh_batched(mode.from_tensor(G), 0)
    assert (fw.shape, fw.dtype, finfo.shape, finfo.dtype) == (w.shape, w.dtype, info.shape, info.dtype)
    assert info.dtype == torch.int32 and w.dtype == dtype


def test_compiles_without_graph_break():
    G = sym_batch(5, 7, 4)

    def spectrum(G):
        w, info = torch.ops.tbfast.eigvalsh_batched(G, 0)
        return w * 2.0, info

    w, info = torch.compile(spectrum, backend="aot_eager", fullgraph=True)(G)
    assert info.tolist() == [0] * 5
    assert_close_to_numpy(w / 2.0, G, 1e-11)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_cuda(dtype):
    """On a GPU: the CUDA kernel (size policy) and the raw cuSOLVER op pass opcheck."""
    G = sym_batch(6, 16, 5, dtype).cuda()
    torch.library.opcheck(torch.ops.tbfast.eigvalsh_batched.default, (G, 0))
    if eig_ops.cusolver.cusolver_status()["loaded"]:
        torch.library.opcheck(torch.ops.tbfast.cusolver_eigvalsh.default, (G, 0))


# ------------------------------------------------------------------------------- retry policy


def test_resolve_flagged_resolves_info_and_nonfinite_rows(caplog):
    G = sym_batch(5, 8, 6)
    want = torch.from_numpy(numpy_eigvalsh(G))
    w = want.clone()
    w[1] = 123.0              # reported not converged
    w[3, 2] = float("inf")    # converged but non-finite output
    info = torch.tensor([0, 7, 0, 0, 2], dtype=torch.int32)
    G[4, 0, 0] = float("nan")  # non-finite input: NaN row
    _backend._logged.discard("nonconverged-test solver")
    with caplog.at_level(logging.WARNING):
        out = eig_ops.resolve_flagged(G, w, info, "test solver")
    torch.testing.assert_close(out[:4], want[:4], rtol=0, atol=1e-12 * want.abs().max().item())
    assert torch.isnan(out[4]).all()
    assert "test solver: 2 of 5 matrices" in caplog.text and "[7, 0]" in caplog.text
    assert w[1, 0].item() == 123.0  # input not modified


def test_failure_flags_defer_the_check():
    G = sym_batch(3, 4, 7)
    w = torch.from_numpy(numpy_eigvalsh(G))
    w[2, 0] = float("nan")
    info = torch.tensor([0, 5, 0], dtype=torch.int32)
    flags: list = []
    out = eig_ops.resolve_flagged(G, w, info, "test solver", failure_flags=flags)
    assert out is w  # nothing re-solved, no host sync
    assert len(flags) == 1 and flags[0].tolist() == [False, True, True]


# ----------------------------------------------------------------------------- the Python entry


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("cpp", marks=needs_ext)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_entry_matches_numpy(backend, dtype):
    G = sym_batch(6, 11, 8, dtype)
    w = eig_ops.eigvalsh_batched(G, backend=backend)
    assert w.shape == (6, 11) and w.dtype == dtype
    assert_close_to_numpy(w, G, 1e-11 if dtype == torch.float64 else 5e-5)


def test_entry_on_cpu_checks_at_once_even_with_failure_flags():
    flags: list = []
    G = sym_batch(2, 5, 9)
    w = eig_ops.eigvalsh_batched(G, failure_flags=flags)
    assert flags == []  # CPU solves are checked here: no deferred flags
    assert_close_to_numpy(w, G, 1e-11)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"G": torch.zeros(3, 4)}, ValueError, r"\(B, n, n\)"),
    ({"G": torch.zeros(2, 3, 3, dtype=torch.float16)}, TypeError, "float32 or float64"),
    ({"G": torch.zeros(2, 3, 3), "backend": "lapack"}, ValueError, "unknown eigensolver backend"),
    ({"G": torch.zeros(2, 3, 3), "workspace_limit": -1}, ValueError, "workspace_limit must be >= 0"),
    ({"G": torch.zeros(2, 3, 3), "checks": []}, TypeError, "checks"),
])
def test_entry_rejects_bad_input(kwargs, exc, match):
    G = kwargs.pop("G")
    with pytest.raises(exc, match=match):
        eig_ops.eigvalsh_batched(G, **kwargs)


def test_entry_cpp_without_extension_raises(monkeypatch):
    monkeypatch.setattr(_backend, "has_op", lambda name: False)
    with pytest.raises(BackendUnavailableError, match="extension is not loaded"):
        eig_ops.eigvalsh_batched(sym_batch(1, 3, 0), backend="cpp")


def test_without_the_extension_the_op_runs_the_torch_reference():
    """A fresh process where tbfast._C cannot be imported: the op exists, its CPU calls reach the
    torch reference, opcheck passes, and the entry matches numpy."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = textwrap.dedent("""
        import importlib.abc, json, sys
        class NoExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "tbfast._C":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, NoExtension())
        import numpy as np, torch
        from tbfast import _backend
        from tbfast.ops import eig
        X = torch.randn(3, 9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        G = X.mT @ X
        w, info = torch.ops.tbfast.eigvalsh_batched(G, 0)
        torch.library.opcheck(torch.ops.tbfast.eigvalsh_batched.default, (G, 0))
        want = np.linalg.eigvalsh(G.numpy())
        print(json.dumps({"loaded": _backend.extension_loaded(), "info": info.tolist(),
                          "cpu_kernel": torch._C._dispatch_has_kernel_for_dispatch_key("tbfast::eigvalsh_batched", "CPU"),
                          "err_op": float(np.abs(w.numpy() - want).max() / np.abs(want).max()),
                          "err_entry": float(np.abs(eig.eigvalsh_batched(G).numpy() - want).max() / np.abs(want).max()),
                          "registration": eig.registration()["CPU"]}))
        """)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["loaded"] is False and out["cpu_kernel"] is False and out["info"] == [0, 0, 0]
    assert out["err_op"] < 1e-12 and out["err_entry"] < 1e-12
    assert out["registration"] == "torch reference"
