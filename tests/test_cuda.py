"""cuSOLVER batched eigenvalues (tbfast._cusolver, csrc/cusolver_runtime.cpp).

The oracle is float64 ``torch.linalg.eigvalsh`` on the CPU. Tests marked ``cuda`` need a GPU
(skipped without one, see conftest.py); the rest check the loader, the size policy and the
fallbacks on any machine, loading fake libcusolver builds in a subprocess so this process never
holds a fake library.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from tbfast import _cusolver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_ops() -> bool:
    ops, _ = _cusolver._ops()
    return ops is not None


needs_ops = pytest.mark.skipif(not _has_ops(), reason="tbfast._C with the cuSOLVER ops is not built")


def heavy_tailed_grams(B: int, n: int, seed: int = 0) -> torch.Tensor:
    """float64 CPU Grams W^T W / m of Student-t (df=3) weights W of shape (m, n), m = n + n//4 + 1."""
    gen = torch.Generator().manual_seed(seed)
    m = n + n // 4 + 1
    z = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    chi2 = torch.randn(B, m, n, 3, generator=gen, dtype=torch.float64).square().sum(-1)
    W = z / torch.sqrt(chi2 / 3.0)  # Student-t with 3 degrees of freedom: heavy tails
    return W.transpose(1, 2) @ W / m


def reference(G: torch.Tensor) -> torch.Tensor:
    """Oracle: float64 eigenvalues on the CPU, lower triangle (torch's default UPLO='L')."""
    return torch.linalg.eigvalsh(G.detach().to("cpu", torch.float64))


def assert_eigs_close(w: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Per-matrix error relative to lambda_max: 5e-4 in float32 (SPEC 8 saw 1.5e-4), 1e-9 in float64."""
    w = w.detach().to("cpu", torch.float64)
    assert w.shape == ref.shape
    scale = ref.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    err = ((w - ref).abs() / scale).max().item()
    tol = 5e-4 if dtype == torch.float32 else 1e-9
    assert err <= tol, f"max relative error {err:.3e} > {tol:.0e}"


# ============================================================================ any machine


def test_size_policy_default_env_and_argument(monkeypatch):
    monkeypatch.delenv(_cusolver.ENV_MAX_N, raising=False)
    assert _cusolver.DEFAULT_MAX_N == 1536
    assert _cusolver.use_batched_solver(768, 72)
    assert _cusolver.use_batched_solver(1536, 16)
    assert not _cusolver.use_batched_solver(2048, 8)
    assert not _cusolver.use_batched_solver(0, 8)
    assert not _cusolver.use_batched_solver(768, 0)
    monkeypatch.setenv(_cusolver.ENV_MAX_N, "4096")
    assert _cusolver.use_batched_solver(4096, 4)
    assert not _cusolver.use_batched_solver(4097, 4)
    assert not _cusolver.use_batched_solver(4096, 4, max_n=512)
    monkeypatch.setenv(_cusolver.ENV_MAX_N, "lots")
    assert _cusolver.use_batched_solver(1536, 1) and not _cusolver.use_batched_solver(1537, 1)


def test_version_string():
    assert _cusolver._version_string(11701) == "11.7.1"
    assert _cusolver._version_string(12000) == "12.0.0"
    assert _cusolver._version_string(-1) is None


def test_mapped_libraries_parses_proc_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(textwrap.dedent("""\
        7f00-7f01 r--p 00000000 08:01 1 /opt/py/site-packages/nvidia/cu13/lib/libcusolver.so.12
        7f01-7f02 r-xp 00001000 08:01 1 /opt/py/site-packages/nvidia/cu13/lib/libcusolver.so.12
        7f02-7f03 r--p 00000000 08:01 2 /opt/py/site-packages/nvidia/cu13/lib/libcusolverMg.so.12
        7f03-7f04 rw-p 00000000 00:00 0
        7f04-7f05 r--p 00000000 08:01 3 /usr/lib/libc.so.6
        """))
    assert _cusolver._mapped_libraries(str(maps)) == ["/opt/py/site-packages/nvidia/cu13/lib/libcusolver.so.12"]
    assert _cusolver._mapped_libraries(str(tmp_path / "missing")) == []


def test_package_libraries_finds_cu12_and_cu13_wheel_layouts(tmp_path):
    for rel in ("nvidia/cu13/lib/libcusolver.so.12", "nvidia/cusolver/lib/libcusolver.so.11",
                "nvidia/cu13/lib/libcusolverMg.so.12", "nvidia/cublas/lib/libcublas.so.12"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found = _cusolver._package_libraries([str(tmp_path)])
    assert sorted(os.path.relpath(f, tmp_path) for f in found) == [
        "nvidia/cu13/lib/libcusolver.so.12", "nvidia/cusolver/lib/libcusolver.so.11"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report on a machine without a GPU")
def test_status_without_gpu_says_why():
    st = _cusolver.cusolver_status()
    assert st["cuda_available"] is False
    if not st["loaded"]:
        assert isinstance(st["reason"], str) and st["reason"]
        assert st["path"] is None


def test_rejects_cpu_and_bad_inputs():
    with pytest.raises(ValueError, match="CUDA tensor"):
        _cusolver.eigvalsh_batched_cuda(torch.eye(3)[None])
    with pytest.raises(ValueError, match=r"\(B, n, n\)"):
        _cusolver.eigvalsh_batched_cuda(torch.eye(3))


def test_resolve_failures_resolves_flagged_and_nan_rows(caplog):
    """The non-converged path on CPU tensors: flagged or non-finite rows are solved again."""
    G = heavy_tailed_grams(5, 12, seed=3)
    ref = reference(G)
    w = ref.clone()
    w[1] = 123.0          # reported not converged
    w[3, 2] = float("nan")  # converged but non-finite output
    info = torch.tensor([0, 7, 0, 0, 0], dtype=torch.int32)
    G_bad = G.clone()
    G_bad[4, 0, 0] = float("inf")
    info[4] = 2
    with caplog.at_level(logging.WARNING, logger="tbfast._cusolver"):
        _cusolver._logged.discard("nonconverged")
        out = _cusolver._resolve_failures(G_bad, w, info)
    assert torch.allclose(out[:4], ref[:4], rtol=0, atol=1e-12 * ref.abs().max().item())
    assert torch.isnan(out[4]).all()  # non-finite input: NaN row, reported by the caller per layer
    assert "torch.linalg.eigvalsh" in caplog.text
    assert w[1, 0].item() == 123.0  # input not modified


def _compile_fake(tmp_path, name: str, with_syev: bool, version: int) -> str:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build a fake libcusolver")
    syev = "int cusolverDnXsyevBatched_bufferSize(void) { return 0; }\n" \
           "int cusolverDnXsyevBatched(void) { return 0; }\n" if with_syev else ""
    src = tmp_path / f"{name}.c"
    src.write_text(
        f"int cusolverGetVersion(int* v) {{ *v = {version}; return 0; }}\n"
        "int cusolverDnCreate(void** h) { *h = 0; return 0; }\n"
        "int cusolverDnSetStream(void* h, void* s) { return 0; }\n"
        "int cusolverDnCreateParams(void** p) { *p = 0; return 0; }\n" + syev)
    out = tmp_path / f"{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(out)], check=True, capture_output=True)
    return str(out)


@needs_ops
def test_loader_failure_paths_in_subprocess(tmp_path):
    """No library, not a library, a cuSOLVER without XsyevBatched, then a usable (fake) one."""
    not_a_lib = tmp_path / "libcusolver.so.99"
    not_a_lib.write_text("not an ELF file")
    old = _compile_fake(tmp_path, "libcusolver_old", with_syev=False, version=11600)
    new = _compile_fake(tmp_path, "libcusolver_new", with_syev=True, version=12001)
    script = textwrap.dedent(f"""
        import json, torch, tbfast._C
        ops = torch.ops.tbfast
        out = {{"before": list(ops.cusolver_status())}}
        out["missing"] = ops.cusolver_load({str(tmp_path / 'nope' / 'libcusolver.so.12')!r})
        out["not_a_lib"] = ops.cusolver_load({str(not_a_lib)!r})
        out["old"] = ops.cusolver_load({old!r})
        out["after_failures"] = list(ops.cusolver_status())
        from tbfast import _cusolver
        st = _cusolver.cusolver_status()   # finds the fake through TBFAST_CUSOLVER_PATH
        out["status"] = {{k: st[k] for k in ("loaded", "path", "version", "version_str", "reason")}}
        out["again"] = ops.cusolver_load({str(not_a_lib)!r})  # already loaded: no-op
        print(json.dumps(out))
        """)
    env = dict(os.environ, TBFAST_CUSOLVER_PATH=new, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["before"] == [False, "", -1, ""]
    assert "nope" in out["missing"] and "dlopen" in out["missing"]
    assert str(not_a_lib) in out["not_a_lib"]
    assert "cusolverDnXsyevBatched" in out["old"] and "11600" in out["old"] and "11.7.1" in out["old"]
    loaded, path, version, last_error = out["after_failures"]
    assert (loaded, path, version) == (False, "", -1) and "11.7.1" in last_error
    assert out["status"] == {"loaded": True, "path": new, "version": 12001, "version_str": "12.0.1", "reason": None}
    assert out["again"] == ""


# ============================================================================ GPU

cuda = pytest.mark.cuda


def _require_cusolver():
    st = _cusolver.cusolver_status()
    if not st["loaded"]:
        pytest.fail(f"cuSOLVER not loaded on a CUDA machine: {st['reason']}")
    return st


SHAPES = [(1, 1), (72, 1), (72, 8), (72, 128), (1, 384), (16, 384), (1, 768), (8, 768)]


@cuda
@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("B,n", SHAPES, ids=[f"{b}x{n}" for b, n in SHAPES])
def test_batched_eigenvalues_match_fp64_cpu(B, n, dtype):
    _require_cusolver()
    G64 = heavy_tailed_grams(B, n, seed=B * 1000 + n)
    ref = reference(G64)
    G = G64.to("cuda", dtype)
    w, info = torch.ops.tbfast.cusolver_eigvalsh(G, 0, torch.cuda.current_stream().cuda_stream)
    assert w.dtype == dtype and w.device == G.device and info.dtype == torch.int32
    assert info.cpu().eq(0).all(), info
    assert bool((w[:, 1:] >= w[:, :-1]).all()), "eigenvalues not ascending"
    assert_eigs_close(w, ref, dtype)
    assert_eigs_close(_cusolver.eigvalsh_batched_cuda(G), ref, dtype)


@cuda
@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reads_lower_triangle_only(dtype):
    _require_cusolver()
    G64 = heavy_tailed_grams(6, 64, seed=11)
    ref = reference(G64)
    junk = torch.randn(6, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1e3
    G = (torch.tril(G64) + torch.triu(junk, diagonal=1)).to("cuda", dtype)
    assert_eigs_close(_cusolver.eigvalsh_batched_cuda(G), ref, dtype)
    # the input is not overwritten (cuSOLVER works on a copy)
    assert torch.equal(G.cpu(), (torch.tril(G64) + torch.triu(junk, diagonal=1)).to(dtype))


@cuda
@needs_ops
def test_registered_cuda_kernel_of_eigvalsh_batched():
    """torch.ops.tbfast.eigvalsh_batched on CUDA runs this file's kernel (stream from C++)."""
    _require_cusolver()
    if not hasattr(torch.ops.tbfast, "eigvalsh_batched"):
        pytest.skip("eigvalsh_batched schema (csrc/eig_cpu.cpp) not built")
    G64 = heavy_tailed_grams(24, 96, seed=2)
    w, info = torch.ops.tbfast.eigvalsh_batched(G64.cuda(), 0)
    assert info.is_cuda and info.cpu().eq(0).all()
    assert_eigs_close(w, reference(G64), torch.float64)


@cuda
@needs_ops
def test_workspace_split_gives_same_result():
    _require_cusolver()
    dev = torch.cuda.current_device()
    n, B = 128, 72
    full_chunk, dev_bytes, _ = torch.ops.tbfast.cusolver_syev_batched_plan(n, B, torch.float64, dev, 0)
    assert full_chunk == B and dev_bytes >= 0
    ws_dev, ws_host = torch.ops.tbfast.cusolver_syev_batched_workspace(n, B, torch.float64, dev)
    assert ws_dev == dev_bytes and ws_host >= 0
    # a budget for about ten matrices: chunks of fewer than B that respect the budget
    _, one_dev, _ = torch.ops.tbfast.cusolver_syev_batched_plan(n, 1, torch.float64, dev, 0)
    budget = 10 * (one_dev + n * n * 8)
    chunk, chunk_dev, _ = torch.ops.tbfast.cusolver_syev_batched_plan(n, B, torch.float64, dev, budget)
    assert 1 <= chunk < B
    assert chunk == 1 or chunk_dev + chunk * n * n * 8 <= budget
    assert torch.ops.tbfast.cusolver_syev_batched_plan(n, B, torch.float64, dev, 1)[0] == 1

    G64 = heavy_tailed_grams(B, n, seed=9)
    G = G64.cuda()
    whole = _cusolver.eigvalsh_batched_cuda(G)
    for limit in (1, budget):
        split = _cusolver.eigvalsh_batched_cuda(G, workspace_limit=limit)
        assert torch.allclose(split, whole, rtol=0, atol=1e-12 * whole.abs().max().item())
    assert_eigs_close(whole, reference(G64), torch.float64)


@cuda
@needs_ops
def test_nonconverged_matrices_are_solved_again(monkeypatch, caplog):
    _require_cusolver()
    G64 = heavy_tailed_grams(10, 48, seed=4)
    real_solve = _cusolver._solve

    def flaky_solve(G, limit, stream):
        w, info = real_solve(G, limit, stream)
        w, info = w.clone(), info.clone()
        w[[2, 7]] = -1.0
        info[[2, 7]] = torch.tensor([3, 11], dtype=info.dtype, device=info.device)
        return w, info

    monkeypatch.setattr(_cusolver, "_solve", flaky_solve)
    _cusolver._logged.discard("nonconverged")
    with caplog.at_level(logging.WARNING, logger="tbfast._cusolver"):
        w = _cusolver.eigvalsh_batched_cuda(G64.cuda())
    assert_eigs_close(w, reference(G64), torch.float64)
    assert "2 of 10 matrices" in caplog.text


@cuda
@needs_ops
def test_failure_of_the_op_falls_back_to_torch(monkeypatch, caplog):
    _require_cusolver()

    def broken(G, limit, stream):
        raise RuntimeError("tbfast: cusolverDnXsyevBatched failed with CUSOLVER_STATUS_INTERNAL_ERROR")

    monkeypatch.setattr(_cusolver, "_solve", broken)
    G64 = heavy_tailed_grams(3, 20, seed=6)
    with caplog.at_level(logging.WARNING, logger="tbfast._cusolver"):
        w = _cusolver.eigvalsh_batched_cuda(G64.cuda())
    assert_eigs_close(w, reference(G64), torch.float64)


@cuda
@needs_ops
@pytest.mark.parametrize("via", ["python", "registered_op"])
def test_runs_on_the_current_non_default_stream(via):
    """Input written on a side stream after a long sleep: a solver on any other stream reads zeros."""
    _require_cusolver()
    if via == "registered_op" and not hasattr(torch.ops.tbfast, "eigvalsh_batched"):
        pytest.skip("eigvalsh_batched schema (csrc/eig_cpu.cpp) not built")
    G64 = heavy_tailed_grams(16, 256, seed=8)
    src = G64.to("cuda", torch.float32)
    ref = reference(G64)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        G = torch.zeros_like(src)
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on this stream only
        G.copy_(src)
        if via == "python":
            w = _cusolver.eigvalsh_batched_cuda(G)
        else:
            w, _ = torch.ops.tbfast.eigvalsh_batched(G, 0)
    side.synchronize()
    assert_eigs_close(w, ref, torch.float32)


@cuda
@needs_ops
def test_empty_and_dtype_errors():
    _require_cusolver()
    assert _cusolver.eigvalsh_batched_cuda(torch.empty(0, 5, 5, device="cuda")).shape == (0, 5)
    assert _cusolver.eigvalsh_batched_cuda(torch.empty(3, 0, 0, device="cuda")).shape == (3, 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        _cusolver.eigvalsh_batched_cuda(torch.eye(4, device="cuda", dtype=torch.float16)[None])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.tbfast.cusolver_eigvalsh(torch.eye(4, device="cuda", dtype=torch.float16)[None], 0, -1)


@cuda
@needs_ops
def test_status_on_gpu_reports_library():
    st = _require_cusolver()
    assert st["path"] and os.path.basename(st["path"]).startswith("libcusolver.so")
    assert st["version"] is None or st["version"] >= 11701
