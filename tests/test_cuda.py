"""cuSOLVER batched eigenvalues (tbfast/ops/cusolver.py, tbfast/ops/eig.py, csrc/cusolver_runtime.cpp).

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

from tbfast import _backend
from tbfast.ops import cusolver as cs
from tbfast.ops import eig as eig_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_ops = pytest.mark.skipif(_backend.extension_function("cusolver_load") is None,
                               reason="tbfast._C with the cuSOLVER loader is not built")


def solve_cusolver(G: torch.Tensor, **kwargs) -> torch.Tensor:
    """The Python entry, forced onto the batched cuSOLVER path (with the retry policy)."""
    return eig_ops.eigvalsh_batched(G, backend="cusolver", **kwargs)


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
    monkeypatch.delenv(cs.ENV_MAX_N, raising=False)
    monkeypatch.delenv(cs.ENV_MAX_N_DEPRECATED, raising=False)
    assert cs.ENV_MAX_N == "TBFAST_CUSOLVER_MAX_N"
    assert cs.DEFAULT_MAX_N == 1536
    assert cs.use_batched_solver(768, 72)
    assert cs.use_batched_solver(1536, 16)
    assert not cs.use_batched_solver(2048, 8)
    assert not cs.use_batched_solver(0, 8)
    assert not cs.use_batched_solver(768, 0)
    monkeypatch.setenv(cs.ENV_MAX_N, "4096")
    assert cs.use_batched_solver(4096, 4)
    assert not cs.use_batched_solver(4097, 4)
    assert not cs.use_batched_solver(4096, 4, max_n=512)
    monkeypatch.setenv(cs.ENV_MAX_N, "lots")
    assert cs.use_batched_solver(1536, 1) and not cs.use_batched_solver(1537, 1)


def test_old_env_name_still_read_with_one_deprecation_warning(monkeypatch):
    monkeypatch.delenv(cs.ENV_MAX_N, raising=False)
    monkeypatch.setenv("TBFAST_SYEVJ_MAX_N", "300")
    monkeypatch.setattr(cs, "_warned_deprecated_env", False)
    with pytest.warns(FutureWarning, match="TBFAST_SYEVJ_MAX_N is deprecated.*TBFAST_CUSOLVER_MAX_N"):
        assert cs.use_batched_solver(300, 1) and not cs.use_batched_solver(301, 1)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second read does not warn again
        assert cs.size_threshold() == 300
    monkeypatch.setenv(cs.ENV_MAX_N, "200")  # the new name wins
    assert cs.size_threshold() == 200


def test_version_string():
    assert cs.version_string(11701) == "11.7.1"
    assert cs.version_string(12000) == "12.0.0"
    assert cs.version_string(-1) is None and cs.version_string(None) is None


@pytest.mark.parametrize("cuda, required", [("11.8", 11), ("12.1", 11), ("12.6", 11), ("12.9", 11),
                                            ("13.0", 12), ("13.1", 12), (None, None), ("10.2", None)])
def test_cusolver_major_for_torch_cuda(cuda, required):
    # NVIDIA's conda channel: CUDA 11.3-11.8 and 12.0-12.9 ship libcusolver 11.x, CUDA 13.x ships 12.x
    assert cs.required_cusolver_major(cuda) == required


def test_version_mismatch_names_both_versions():
    assert cs.version_mismatch(12004, "13.0") is None
    assert cs.version_mismatch(11701, "12.6") is None
    assert cs.version_mismatch(11701, None) is None and cs.version_mismatch(None, "13.0") is None
    why = cs.version_mismatch(11701, "13.0")
    assert why == "libcusolver 11.7.1 does not match torch's CUDA 13.0 (which ships libcusolver 12.x)"
    assert "12.0.4" in cs.version_mismatch(12004, "12.8") and "12.8" in cs.version_mismatch(12004, "12.8")


class FakeLoaderOps:
    """Stands in for tbfast._C's cusolver_load / cusolver_status (no library, no GPU)."""

    def __init__(self, version: int):
        self.version, self.loaded, self.calls = version, "", []

    def cusolver_load(self, path):
        self.calls.append(path)
        if not path.endswith("libcusolver.so.12"):
            return f"dlopen({path}) failed"
        self.loaded = path
        return ""

    def cusolver_status(self):
        return (bool(self.loaded), self.loaded, self.version if self.loaded else -1, "")


def test_mismatched_major_is_not_loaded_with_reason(monkeypatch, tmp_path):
    lib = tmp_path / "libcusolver.so.12"
    lib.write_bytes(b"")
    monkeypatch.setenv(cs.ENV_LIBRARY, str(lib))
    ok = cs._load(FakeLoaderOps(12004), "13.0")
    assert ok["loaded"] and ok["reason"] is None and ok["version_str"] == "12.0.4"
    bad = cs._load(FakeLoaderOps(12004), "12.4")  # a libcusolver.so.12 claiming 12.x under CUDA 12
    assert bad["loaded"] is False and bad["version"] == 12004
    assert bad["reason"].startswith("libcusolver 12.0.4 does not match torch's CUDA 12.4") and str(lib) in bad["reason"]


def test_candidates_follow_torch_and_skip_other_majors(tmp_path, monkeypatch):
    monkeypatch.delenv(cs.ENV_LIBRARY, raising=False)
    site_dir = tmp_path / "site-packages"
    torch_dir = site_dir / "torch"
    for rel in ("torch/lib/libcusolver.so.12", "nvidia/cu13/lib/libcusolver.so.12",
                "nvidia/cusolver/lib/libcusolver.so.11", "nvidia/cu13/lib/libcusolverMg.so.12"):
        p = site_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r--p 00000000 08:01 1 /opt/cuda/lib64/libcusolver.so.11.7.5\n")
    got = cs.candidates("13.0", torch_dir=str(torch_dir), maps_file=str(maps), roots=[], system=False)
    assert got == [str(site_dir / "torch/lib/libcusolver.so.12"), str(site_dir / "nvidia/cu13/lib/libcusolver.so.12"), ""]
    got12 = cs.candidates("12.8", torch_dir=str(torch_dir), maps_file=str(maps), roots=[], system=False)
    assert got12 == ["/opt/cuda/lib64/libcusolver.so.11.7.5", str(site_dir / "nvidia/cusolver/lib/libcusolver.so.11"), ""]


def test_mapped_libraries_parses_proc_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(textwrap.dedent("""\
        7f00-7f01 r--p 00000000 08:01 1 /opt/py/site-packages/nvidia/cu13/lib/libcusolver.so.12
        7f01-7f02 r-xp 00001000 08:01 1 /opt/py/site-packages/nvidia/cu13/lib/libcusolver.so.12
        7f02-7f03 r--p 00000000 08:01 2 /opt/py/site-packages/nvidia/cu13/lib/libcusolverMg.so.12
        7f03-7f04 rw-p 00000000 00:00 0
        7f04-7f05 r--p 00000000 08:01 3 /usr/lib/libc.so.6
        """))
    assert cs.mapped_libraries(str(maps)) == ["/opt/py/site-packages/nvidia/cu13/lib/libcusolver.so.12"]
    assert cs.mapped_libraries(str(tmp_path / "missing")) == []


def test_package_libraries_finds_cu12_and_cu13_wheel_layouts(tmp_path):
    for rel in ("nvidia/cu13/lib/libcusolver.so.12", "nvidia/cusolver/lib/libcusolver.so.11",
                "nvidia/cu13/lib/libcusolverMg.so.12", "nvidia/cublas/lib/libcublas.so.12"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found = cs.package_libraries([str(tmp_path)])
    assert sorted(os.path.relpath(f, tmp_path) for f in found) == [
        "nvidia/cu13/lib/libcusolver.so.12", "nvidia/cusolver/lib/libcusolver.so.11"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report on a machine without a GPU")
def test_status_without_gpu_says_why():
    st = cs.cusolver_status()
    assert st["cuda_available"] is False and st["torch_cuda"] == torch.version.cuda
    if not st["loaded"]:
        assert isinstance(st["reason"], str) and st["reason"]
        assert st["path"] is None


def test_status_runs_no_cuda_work(monkeypatch):
    """Discovery reads files only: no CUDA initialisation, no probe eigensolve, even with a GPU."""
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: calls.append("torch.cuda._lazy_init"))
    real_eigvalsh = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: calls.append("eigvalsh") or real_eigvalsh(*a, **k))
    st = cs.cusolver_status(refresh=True)
    assert calls == [] and st["cuda_available"] is True
    cs.cusolver_status(refresh=True)  # leave the cache as the real machine would have it


@needs_ops
def test_raw_solver_refuses_cpu_tensors():
    """The cuSOLVER kernel is CUDA-only; its host entry takes CPU tensors only with the test double."""
    G = torch.eye(3)[None].contiguous()
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.tbfast.cusolver_eigvalsh(G, 0)
    if not cs.cusolver_status()["loaded"]:  # this process never holds the host double
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            torch.ops.tbfast_testing.cusolver_eigvalsh_host(G, 0)


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
    # the usable fake reports the libcusolver major of the running torch's CUDA (CUDA 12 ships
    # libcusolver 11, CUDA 13 ships 12; the loader refuses any other major), at least 11.7.1
    # (the first with XsyevBatched); a CPU torch has no CUDA to match: 12.0.1
    major = cs.required_cusolver_major(torch.version.cuda)
    new_version = 12001 if major is None else max(major * 1000 + 1, 11701)
    new_version_str = f"{new_version // 1000}.{new_version % 1000 // 100}.{new_version % 100}"
    new = _compile_fake(tmp_path, "libcusolver_new", with_syev=True, version=new_version)
    script = textwrap.dedent(f"""
        import json, torch, tbfast._C
        ops = tbfast._C
        out = {{"before": list(ops.cusolver_status())}}
        out["missing"] = ops.cusolver_load({str(tmp_path / 'nope' / 'libcusolver.so.12')!r})
        out["not_a_lib"] = ops.cusolver_load({str(not_a_lib)!r})
        out["old"] = ops.cusolver_load({old!r})
        out["after_failures"] = list(ops.cusolver_status())
        from tbfast.ops import cusolver
        st = cusolver.cusolver_status()   # finds the fake through TBFAST_CUSOLVER_PATH
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
    assert out["status"] == {"loaded": True, "path": new, "version": new_version, "version_str": new_version_str,
                             "reason": None}
    assert out["again"] == ""


# A host-memory test double of libcusolver: the same C entry points, "device" pointers are host
# pointers, eigenvalues by cyclic Jacobi in double precision, input read per the documented
# column-major layout A_k(i, j) = A[i + lda*j + lda*n*k] from the `uplo` triangle. It records
# the calls so the tests can see the chunking, the stream and the triangle tbfast passes.
FAKE_HOST_CUSOLVER = r"""
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
int tbfast_fake_cusolver_host_memory = 1;
static int calls = 0, last_uplo = -1;
static int64_t max_batch = 0;
static void* last_stream = (void*)-1;
int fake_calls(void) { return calls; }
long long fake_max_batch(void) { return max_batch; }
long long fake_last_stream(void) { return (long long)(intptr_t)last_stream; }
int fake_last_uplo(void) { return last_uplo; }
int cusolverGetVersion(int* v) { *v = 12001; return 0; }
int cusolverDnCreate(void** h) { *h = (void*)0x1; return 0; }
int cusolverDnSetStream(void* h, void* s) { last_stream = s; return h ? 0 : 1; }
int cusolverDnCreateParams(void** p) { *p = (void*)0x2; return 0; }
static size_t dev_need(int64_t n, int64_t b, int dt) { return 4096 + (size_t)(b * n) * (dt ? 8 : 4) * 3; }
static int bad_args(void* h, void* p, int jobz, int uplo, int64_t n, int dta, const void* A, int64_t lda,
                    int dtw, const void* W, int ct, int64_t b) {
  return !h || !p || !A || !W || jobz != 0 || (uplo != 0 && uplo != 1) || n < 1 || lda < n || dta != dtw ||
         dta != ct || (dta != 0 && dta != 1) || b < 1;
}
int cusolverDnXsyevBatched_bufferSize(void* h, void* p, int jobz, int uplo, int64_t n, int dta, const void* A,
                                      int64_t lda, int dtw, const void* W, int ct, size_t* dev, size_t* host,
                                      int64_t b) {
  if (bad_args(h, p, jobz, uplo, n, dta, A, lda, dtw, W, ct, b)) return 3;
  *dev = dev_need(n, b, dta);
  *host = 64;
  return 0;
}
static void jacobi(double* a, int n) {
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0, diag = 0;
    for (int p = 0; p < n; ++p) {
      diag += a[p * n + p] * a[p * n + p];
      for (int q = p + 1; q < n; ++q) off += a[p * n + q] * a[p * n + q];
    }
    if (off <= 1e-32 * diag || off == 0) return;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) {
        double apq = a[p * n + q];
        if (apq == 0) continue;
        double theta = (a[q * n + q] - a[p * n + p]) / (2 * apq);
        double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1));
        double c = 1 / sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; ++k) {
          double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {
          double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
      }
  }
}
int cusolverDnXsyevBatched(void* h, void* p, int jobz, int uplo, int64_t n, int dta, void* A, int64_t lda,
                           int dtw, void* W, int ct, void* dbuf, size_t dbytes, void* hbuf, size_t hbytes,
                           int* info, int64_t b) {
  if (bad_args(h, p, jobz, uplo, n, dta, A, lda, dtw, W, ct, b)) return 3;
  if (!dbuf || dbytes < dev_need(n, b, dta) || !hbuf || hbytes < 64 || !info) return 31;
  ++calls;
  if (b > max_batch) max_batch = b;
  last_uplo = uplo;
  double* m = malloc(sizeof(double) * n * n);
  for (int64_t k = 0; k < b; ++k) {
    int finite = 1;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        int stored = uplo == 0 ? i >= j : i <= j; /* cuBLAS lower: row >= column */
        int64_t r = stored ? i : j, c = stored ? j : i;
        int64_t at = r + lda * c + lda * n * k;
        double v = dta ? ((double*)A)[at] : ((float*)A)[at];
        finite &= isfinite(v) != 0;
        m[i * n + j] = v;
      }
    for (int64_t e = 0; e < lda * n; ++e) { /* cuSOLVER destroys its input */
      if (dta) ((double*)A)[lda * n * k + e] = -7.0; else ((float*)A)[lda * n * k + e] = -7.0f;
    }
    info[k] = finite ? 0 : (int)n;
    if (finite && m[0] == 777.0) info[k] = 1; /* "not converged": eigenvalues left as garbage */
    else if (finite) jacobi(m, (int)n);
    for (int64_t i = 0; i < n; ++i) { /* ascending: insertion sort of the diagonal */
      double v = finite ? m[i * n + i] : 0.0;
      int64_t j = i;
      double* w = (double*)W;
      float* wf = (float*)W;
      while (j > 0 && (dta ? w[n * k + j - 1] : wf[n * k + j - 1]) > v) {
        if (dta) w[n * k + j] = w[n * k + j - 1]; else wf[n * k + j] = wf[n * k + j - 1];
        --j;
      }
      if (dta) w[n * k + j] = v; else wf[n * k + j] = (float)v;
    }
  }
  free(m);
  return 0;
}
"""


@needs_ops
def test_op_indexing_chunking_and_stream_with_host_test_double(tmp_path):
    """The C++ op end to end on the host-memory test double (in a subprocess: the library stays loaded)."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler to build the test double")
    src = tmp_path / "fake_host_cusolver.c"
    src.write_text(FAKE_HOST_CUSOLVER)
    lib = tmp_path / "libcusolver_host_fake.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(lib), "-lm"], check=True,
                   capture_output=True)
    script = textwrap.dedent(f"""
        import ctypes, json, math, torch, tbfast._C
        from tbfast.ops import eig as eig_ops
        assert tbfast._C.cusolver_load({str(lib)!r}) == ""
        ops = torch.ops.tbfast_testing
        fake = ctypes.CDLL({str(lib)!r})
        fake.fake_max_batch.restype = ctypes.c_longlong
        fake.fake_last_stream.restype = ctypes.c_longlong
        gen = torch.Generator().manual_seed(1)
        B, n = 13, 9
        S = torch.randn(B, n, n, dtype=torch.float64, generator=gen)
        S = S + S.transpose(1, 2)
        junk = 1e3 * torch.randn(B, n, n, dtype=torch.float64, generator=gen)
        G = torch.tril(S) + torch.triu(junk, diagonal=1)   # only the lower triangle is meaningful
        ref = torch.linalg.eigvalsh(torch.tril(S) + torch.tril(S, -1).transpose(1, 2))
        out = {{}}
        def err(w):
            return float(((w.double() - ref).abs() / ref.abs().amax(1, keepdim=True)).max())
        G_before = G.clone()
        w, info = ops.cusolver_eigvalsh_host(G, 0)
        out["one_call"] = dict(err=err(w), info=info.tolist(), calls=fake.fake_calls(),
                               max_batch=fake.fake_max_batch(), stream=fake.fake_last_stream(),
                               uplo=fake.fake_last_uplo(), unchanged=bool(torch.equal(G, G_before)),
                               dtype=str(w.dtype))
        w32, info32 = ops.cusolver_eigvalsh_host(G.float(), 0)
        out["fp32"] = dict(err=err(w32), dtype=str(w32.dtype), stream=fake.fake_last_stream())
        elem = 8
        full = ops.cusolver_syev_batched_plan(n, B, torch.float64, -1, 0)
        # the double needs 4096 + 3*n*8 bytes per matrix of workspace, tbfast adds an n*n*8 copy:
        # room for exactly 4 matrices per call
        limit = 4096 + 4 * (3 * n * elem + n * n * elem) + 100
        chunk, dev, host = ops.cusolver_syev_batched_plan(n, B, torch.float64, -1, limit)
        out["plan"] = dict(full=list(full), chunk=chunk, dev=dev, host=host, limit=limit,
                           one=list(ops.cusolver_syev_batched_plan(n, B, torch.float64, -1, 1)),
                           ws=list(ops.cusolver_syev_batched_workspace(n, B, torch.float64, -1)))
        before = fake.fake_calls()
        w_split, _ = ops.cusolver_eigvalsh_host(G, limit)
        out["split"] = dict(calls=fake.fake_calls() - before, same=bool(torch.equal(w_split, w)),
                            max_batch_seen=fake.fake_max_batch())
        before = fake.fake_calls()
        w_one, _ = ops.cusolver_eigvalsh_host(G, 1)
        out["one_each"] = dict(calls=fake.fake_calls() - before, same=bool(torch.equal(w_one, w)))
        G_nan = G.clone(); G_nan[5, 3, 1] = math.nan
        w_nan, info_nan = ops.cusolver_eigvalsh_host(G_nan, 0)
        out["nan"] = dict(info=info_nan.tolist(), others_same=bool(torch.equal(w_nan[:5], w[:5])))
        # the retry policy on the double's output: a "not converged" matrix (magic diagonal) is
        # solved again with torch, a non-finite one gets a NaN row, the others are kept
        G_flag = G_nan.clone(); G_flag[2, 0, 0] = 777.0
        ref_flag = torch.linalg.eigvalsh(G_flag[2])
        w_f, info_f = ops.cusolver_eigvalsh_host(G_flag, 0)
        flags = []
        eig_ops.resolve_flagged(G_flag, w_f, info_f, "double", failure_flags=flags)
        fixed = eig_ops.resolve_flagged(G_flag, w_f, info_f, "double")
        out["retry"] = dict(info=info_f.tolist(), flags=flags[0].tolist(),
                            row2=float((fixed[2] - ref_flag).abs().max() / ref_flag.abs().max()),
                            nan_row=bool(fixed[5].isnan().all()),
                            kept=bool(torch.equal(fixed[6:], w[6:]) and torch.equal(fixed[:2], w[:2])))
        print(json.dumps(out))
        """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    one = out["one_call"]
    assert one["err"] < 1e-12 and one["info"] == [0] * 13 and one["dtype"] == "torch.float64"
    assert (one["calls"], one["max_batch"], one["stream"]) == (1, 13, 0)  # host memory: no stream
    assert one["uplo"] == 1  # row-major lower triangle == column-major upper (CUBLAS_FILL_MODE_UPPER)
    assert one["unchanged"]  # the solver overwrote a scratch copy, not G
    assert out["fp32"]["err"] < 1e-5 and out["fp32"]["dtype"] == "torch.float32" and out["fp32"]["stream"] == 0
    plan = out["plan"]
    assert plan["full"][0] == 13 and plan["one"][0] == 1 and plan["ws"] == plan["full"][1:]
    assert plan["chunk"] == 4 and plan["dev"] + 4 * 9 * 9 * 8 <= plan["limit"] and plan["host"] == 64
    assert out["split"] == {"calls": 4, "same": True, "max_batch_seen": 13}  # 4 + 4 + 4 + 1
    assert out["one_each"] == {"calls": 13, "same": True}
    assert out["nan"]["info"] == [0] * 5 + [9] + [0] * 7 and out["nan"]["others_same"]
    retry = out["retry"]
    assert retry["info"] == [0, 0, 1, 0, 0, 9] + [0] * 7
    assert retry["flags"] == [False, False, True, False, False, True] + [False] * 7
    assert retry["row2"] < 1e-12 and retry["nan_row"] and retry["kept"]


# ============================================================================ GPU

cuda = pytest.mark.cuda


def _require_cusolver():
    st = cs.cusolver_status()
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
    w, info = torch.ops.tbfast.cusolver_eigvalsh(G, 0)
    assert w.dtype == dtype and w.device == G.device and info.dtype == torch.int32
    assert info.cpu().eq(0).all(), info
    assert bool((w[:, 1:] >= w[:, :-1]).all()), "eigenvalues not ascending"
    assert_eigs_close(w, ref, dtype)
    assert_eigs_close(solve_cusolver(G), ref, dtype)
    assert_eigs_close(torch.ops.tbfast.eigvalsh_batched(G, 0)[0], ref, dtype)  # the op's CUDA kernel


@cuda
@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_reads_lower_triangle_only(dtype):
    _require_cusolver()
    G64 = heavy_tailed_grams(6, 64, seed=11)
    ref = reference(G64)
    junk = torch.randn(6, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 1e3
    G = (torch.tril(G64) + torch.triu(junk, diagonal=1)).to("cuda", dtype)
    assert_eigs_close(solve_cusolver(G), ref, dtype)
    # the input is not overwritten (cuSOLVER works on a copy)
    assert torch.equal(G.cpu(), (torch.tril(G64) + torch.triu(junk, diagonal=1)).to(dtype))


@cuda
@needs_ops
def test_cuda_kernel_of_eigvalsh_batched_follows_the_size_policy(monkeypatch):
    """torch.ops.tbfast.eigvalsh_batched on CUDA: cuSOLVER up to max_n, torch.linalg.eigvalsh above."""
    _require_cusolver()
    G64 = heavy_tailed_grams(24, 96, seed=2)
    calls = []
    real = eig_ops._solve
    monkeypatch.setattr(eig_ops, "_solve", lambda G, limit: calls.append(G.shape) or real(G, limit))
    w, info = torch.ops.tbfast.eigvalsh_batched(G64.cuda(), 0)
    assert info.is_cuda and info.cpu().eq(0).all() and calls == [(24, 96, 96)]
    assert_eigs_close(w, reference(G64), torch.float64)
    monkeypatch.setenv(cs.ENV_MAX_N, "64")  # 96 > 64: torch's solver, not cuSOLVER
    w2, _ = torch.ops.tbfast.eigvalsh_batched(G64.cuda(), 0)
    assert calls == [(24, 96, 96)]
    assert_eigs_close(w2, reference(G64), torch.float64)


@cuda
@needs_ops
def test_workspace_split_gives_same_result():
    _require_cusolver()
    dev = torch.cuda.current_device()
    testing = torch.ops.tbfast_testing
    n, B = 128, 72
    full_chunk, dev_bytes, _ = testing.cusolver_syev_batched_plan(n, B, torch.float64, dev, 0)
    assert full_chunk == B and dev_bytes >= 0
    ws_dev, ws_host = testing.cusolver_syev_batched_workspace(n, B, torch.float64, dev)
    assert ws_dev == dev_bytes and ws_host >= 0
    # half of what the whole batch needs (workspace + scratch copy): must split, each chunk within budget
    matrix_bytes = n * n * 8
    budget = (dev_bytes + B * matrix_bytes) // 2
    chunk, chunk_dev, _ = testing.cusolver_syev_batched_plan(n, B, torch.float64, dev, budget)
    assert 1 <= chunk < B
    assert chunk == 1 or chunk_dev + chunk * matrix_bytes <= budget
    assert testing.cusolver_syev_batched_plan(n, B, torch.float64, dev, 1)[0] == 1

    G64 = heavy_tailed_grams(B, n, seed=9)
    G = G64.cuda()
    whole = solve_cusolver(G)
    for limit in (1, budget):
        split = solve_cusolver(G, workspace_limit=limit)
        assert torch.allclose(split, whole, rtol=0, atol=1e-12 * whole.abs().max().item())
    assert_eigs_close(whole, reference(G64), torch.float64)


@cuda
@needs_ops
def test_nonconverged_matrices_are_solved_again(monkeypatch, caplog):
    _require_cusolver()
    G64 = heavy_tailed_grams(10, 48, seed=4)
    real_solve = eig_ops._solve

    def flaky_solve(G, limit):
        w, info = real_solve(G, limit)
        w, info = w.clone(), info.clone()
        w[[2, 7]] = -1.0
        info[[2, 7]] = torch.tensor([3, 11], dtype=info.dtype, device=info.device)
        return w, info

    monkeypatch.setattr(eig_ops, "_solve", flaky_solve)
    _backend._logged.discard("nonconverged-cuSOLVER cusolverDnXsyevBatched")
    with caplog.at_level(logging.WARNING):
        w = solve_cusolver(G64.cuda())
    assert_eigs_close(w, reference(G64), torch.float64)
    assert "2 of 10 matrices" in caplog.text
    flags: list = []
    w_deferred = solve_cusolver(G64.cuda(), failure_flags=flags)  # deferred: flags, no re-solve
    assert flags[0].is_cuda and flags[0].nonzero().flatten().tolist() == [2, 7]
    assert w_deferred[2].eq(-1.0).all()


@cuda
@needs_ops
def test_failure_of_the_op_falls_back_to_torch(monkeypatch, caplog):
    _require_cusolver()

    def broken(G, limit):
        raise RuntimeError("tbfast: cusolverDnXsyevBatched failed with CUSOLVER_STATUS_INTERNAL_ERROR")

    monkeypatch.setattr(eig_ops, "_solve", broken)
    G64 = heavy_tailed_grams(3, 20, seed=6)
    with caplog.at_level(logging.WARNING):
        w = solve_cusolver(G64.cuda())
    assert_eigs_close(w, reference(G64), torch.float64)


@cuda
@needs_ops
@pytest.mark.parametrize("via", ["python", "registered_op", "raw_op"])
def test_runs_on_the_current_non_default_stream(via):
    """Input written on a side stream after a long sleep: a solver on any other stream reads zeros.
    The stream comes from torch inside C++ (c10's current stream of G's device)."""
    _require_cusolver()
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
            w = solve_cusolver(G)
        elif via == "registered_op":
            w, _ = torch.ops.tbfast.eigvalsh_batched(G, 0)
        else:
            w, _ = torch.ops.tbfast.cusolver_eigvalsh(G, 0)
    side.synchronize()
    assert_eigs_close(w, ref, torch.float32)


@cuda
@needs_ops
def test_empty_and_dtype_errors():
    _require_cusolver()
    assert solve_cusolver(torch.empty(0, 5, 5, device="cuda")).shape == (0, 5)
    assert solve_cusolver(torch.empty(3, 0, 0, device="cuda")).shape == (3, 0)
    with pytest.raises(TypeError, match="float32 or float64"):
        solve_cusolver(torch.eye(4, device="cuda", dtype=torch.float16)[None])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.tbfast.cusolver_eigvalsh(torch.eye(4, device="cuda", dtype=torch.float16)[None], 0)


@cuda
@needs_ops
def test_status_on_gpu_reports_library():
    st = _require_cusolver()
    assert st["path"] and os.path.basename(st["path"]).startswith("libcusolver.so")
    assert st["version"] is None or st["version"] >= 11701
    required = cs.required_cusolver_major(torch.version.cuda)
    assert st["version"] is None or required is None or st["version"] // 1000 == required


@cuda
@needs_ops
def test_backend_info_creates_no_cuda_context():
    """A fresh process: import tbfast, backend_info() and cusolver_status() leave CUDA uninitialised."""
    script = textwrap.dedent("""
        import json, torch, tbfast
        from tbfast.ops import cusolver
        info = tbfast.backend_info()
        st = cusolver.cusolver_status()
        print(json.dumps({"initialized": torch.cuda.is_initialized(), "loaded": st["loaded"],
                          "reason": st["reason"], "eig": info["active"]["cuda"]["eigensolver"]}))
        """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["initialized"] is False, out
    assert out["loaded"], out["reason"]  # found without running CUDA work
    assert out["eig"].startswith("cuSOLVER XsyevBatched")
