"""tbfast._backend (loading the extension, op lookup, one-time fallback logs) and tbfast._info.backend_info()."""

from __future__ import annotations

import importlib
import logging
import os
import re

import pytest
import torch

import tbfast
from tbfast import _backend, _info
from childproc import run_json

EXT_BUILT = _backend.extension_loaded()


@pytest.mark.skipif(os.environ.get("TBFAST_REQUIRE_EXTENSION", "") != "1",
                    reason="TBFAST_REQUIRE_EXTENSION=1 not set (CI sets it)")
def test_extension_required_and_loaded():
    info = _info.backend_info()
    assert info["extension"]["loaded"], f"tbfast._C failed to load: {info['extension']['reason']}"
    for op in ("eigvalsh_batched", "hill_fit", "ks_scan"):
        assert _backend.has_op(op), op
    assert info["lapack"]["syevd"], info["lapack"]
    assert info["active"]["cpu"] == {"eigensolver": "C++ batched LAPACK ?syevd", "fits": "C++ kernels"}
    assert info["triton"]["available"], "CI must exercise the Triton kernels (interpreter on CPU)"
    # the fast paths are the ones the dispatchers pick
    from tbfast.ops.fit import pick_backend
    assert pick_backend(torch.zeros(3), "auto") == "cpp"


def test_backend_info_fields():
    info = tbfast.backend_info()
    assert info["extension"]["loaded"] is EXT_BUILT
    assert info["torch"]["version"] == torch.__version__
    assert info["devices"]["cpu"] is True
    assert info["devices"]["cuda"] is torch.cuda.is_available()
    assert isinstance(info["triton"]["available"], bool)
    assert isinstance(info["triton"]["interpret"], bool)
    assert "loaded" in info["cusolver"]
    assert set(info["ops"]) >= {"eigvalsh_batched", "hill_fit", "ks_scan"}
    if EXT_BUILT:
        ext = info["extension"]
        assert ext["reason"] is None and ext["path"].endswith((".so", ".pyd"))
        # built against the torch that runs it, or a stable-ABI build for an older torch
        # (a regular build for another torch is not even loaded: tests/test_packaging.py)
        if ext["build"]["stable_abi"]:
            release = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
            assert tuple(int(p) for p in ext["build"]["torch_min"].split(".")) <= release
            assert ext["path"].endswith(".abi3.so")
        else:
            assert ext["build"]["torch_version"] == torch.__version__
        assert isinstance(ext["build"]["openmp"], bool)
        assert isinstance(info["lapack"]["syevd"], bool) and info["lapack"]["source"]
        assert all(info["ops"][n] for n in ("eigvalsh_batched", "hill_fit", "ks_scan"))
    else:
        assert info["extension"]["reason"]
        assert not any(info["ops"].values())


def test_triton_interpret_flag_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _info.backend_info()["triton"]["interpret"] is True
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _info.backend_info()["triton"]["interpret"] is False


@pytest.mark.skipif(not EXT_BUILT, reason="tbfast._C extension not built")
def test_lapack_found_where_torch_exports_it():
    # torch built with MKL or OpenBLAS LAPACK exports ?syevd_; the op must find it there
    if "LAPACK is enabled" not in torch.__config__.show():
        pytest.skip("this torch has no LAPACK")
    import ctypes

    try:
        ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).dsyevd_
    except (OSError, AttributeError):
        pytest.skip("libtorch_cpu does not export dsyevd_")
    assert _backend.lapack_info()["syevd"] is True
    assert _info.backend_info()["lapack"]["syevd"] is True


def test_has_op_unknown_name():
    assert _backend.has_op("no_such_op_anywhere") is False


def test_log_fallback_once(caplog):
    with caplog.at_level(logging.WARNING, logger="tbfast._backend"):
        _backend.log_fallback_once("test-key-once", "first message")
        _backend.log_fallback_once("test-key-once", "second message")
        _backend.log_fallback_once("test-key-other", "other message")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("first message") == 1
    assert "second message" not in msgs and "other message" in msgs


def test_missing_extension_falls_back_with_one_warning(monkeypatch, caplog):
    """Simulate an unbuilt extension: no ops, one warning naming the reason, info says why."""
    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "tbfast._C":
            raise ImportError("simulated: no compiled module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(_backend.importlib, "import_module", fake_import)
    monkeypatch.setattr(_backend, "_loaded", None)
    monkeypatch.setattr(_backend, "_module", None)
    monkeypatch.setattr(_backend, "_reason", None)
    monkeypatch.setattr(_backend, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="tbfast._backend"):
        assert _backend.has_op("ks_scan") is False
        info = _info.backend_info()
        assert _backend.has_op("eigvalsh_batched") is False
    assert info["extension"]["loaded"] is False
    assert "simulated: no compiled module" in info["extension"]["reason"]
    assert info["lapack"]["syevd"] is False
    warnings = [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(warnings) == 1 and "simulated: no compiled module" in warnings[0].getMessage()


def test_cusolver_failure_is_reported_not_raised(monkeypatch):
    def broken(refresh=False):
        raise OSError("simulated: unreadable library")

    monkeypatch.setattr(_info.eig_op.cusolver, "cusolver_status", broken)
    cus = _info._cusolver_info()
    assert cus["loaded"] is False and "simulated: unreadable library" in cus["reason"]


def test_backend_info_reports_the_eig_op_registration():
    info = tbfast.backend_info()["eig_op"]
    assert info["name"] == "tbfast::eigvalsh_batched" and info["fake"] is True
    assert info["reference"] == "torch.linalg.eigvalsh (CompositeExplicitAutograd)"
    assert info["CUDA"].startswith("cuSOLVER where it pays")
    # the C++ kernel is registered for CPU exactly when the extension is loaded
    assert info["CPU"] == ("C++ LAPACK kernel (tbfast._C)" if EXT_BUILT else "torch reference")


def test_backend_info_runs_no_cuda_work(monkeypatch):
    """Even where CUDA is available, backend_info() neither initialises CUDA (get_device_name
    would) nor runs a probe eigensolve nor creates a CUDA tensor (today's main did all three)."""
    calls: list[str] = []

    class RecordCuda(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "cuda" in str(kwargs.get("device", "")) or getattr(func, "__name__", "") == "eigvalsh":
                calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: calls.append("_lazy_init"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: calls.append("get_device_name") or "GPU")
    with RecordCuda():
        info = _info.backend_info()
        _info.eig_op.cusolver.cusolver_status(refresh=True)
    assert calls == []
    assert info["devices"]["cuda"] is True and info["devices"]["cuda_name"] is None
    assert "not initialised" in info["devices"]["cuda_name_note"]
    assert "cuda" in info["active"]


# ------------------------------------------------------------------------------ extension ABI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _abi_in_source() -> int:
    """TBFAST_ABI as csrc/module.cpp defines it (the number the build stamps into build_info)."""
    with open(os.path.join(ROOT, "csrc", "module.cpp"), encoding="utf-8") as f:
        return int(re.search(r"^#define TBFAST_ABI (\d+)$", f.read(), re.M).group(1))


@pytest.mark.skipif(not EXT_BUILT, reason="tbfast._C extension not built")
def test_built_extension_reports_the_source_abi():
    abi = _abi_in_source()
    assert _backend.EXTENSION_ABI == abi
    assert tbfast.backend_info()["extension"]["build"]["abi"] == abi


_STALE_SCRIPT = """
import json, sys, types
stale = types.ModuleType("tbfast._C")  # stands in for a _C built from an older checkout
stale.__file__ = "/old/checkout/tbfast/_C.so"
stale.build_info = lambda: {build_info!r}
sys.modules["tbfast._C"] = stale
errors = []
for _ in range(2):  # the refusal sticks: a second import fails the same way
    try:
        import tbfast
        errors.append(None)
    except ImportError as exc:
        errors.append(str(exc))
    for name in [m for m in sys.modules if m.startswith("tbfast") and m != "tbfast._C"]:
        del sys.modules[name]
print(json.dumps(errors))
"""


@pytest.mark.parametrize("build_info, found", [
    ('{"torch_version": "2.13.0", "openmp": true}', "no ABI number"),  # before ABI stamping
    ('{"abi": 1, "torch_version": "2.13.0"}', "ABI 1"),
])
def test_stale_extension_is_a_one_line_import_error(build_info, found):
    script = _STALE_SCRIPT.format(build_info=build_info)
    errors = run_json(script, ROOT)
    want = (f"stale tbfast._C extension /old/checkout/tbfast/_C.so: it has {found}, this tbfast needs ABI "
            f"{_abi_in_source()}; rebuild it with `pip install --no-build-isolation -e .` or "
            "`python setup.py build_ext --inplace`")
    assert errors == [want, want]


@pytest.mark.skipif(not EXT_BUILT, reason="tbfast._C extension not built")
def test_namespace_holds_only_tensor_ops_and_loader_is_plain():
    """Every torch op in namespace tbfast takes tensors (each has opcheck tests in test_ops*.py);
    the cuSOLVER loader is two plain functions of tbfast._C."""
    ops = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("tbfast::")}
    assert ops == {"tbfast::eigvalsh_batched", "tbfast::cusolver_eigvalsh", "tbfast::hill_fit", "tbfast::ks_scan",
                   "tbfast::eigvalsh_update", "tbfast::weight_digest"}
    assert ops == {f"tbfast::{n}" for n in _info.OP_NAMES}
    ext = _backend.extension_module()
    loaded, path, version, last_error = ext.cusolver_status()
    assert isinstance(loaded, bool) and isinstance(path, str) and isinstance(version, int)
    assert isinstance(last_error, str)
    with pytest.raises(TypeError):
        ext.cusolver_load(3)


@pytest.mark.parametrize("version,supported", [
    ("3.0.0", False), ("3.1.0", False), ("2.3.1", False), ("3.2.0", True), ("3.9.0", True),
    ("3.10.0+git1a2b", True),  # numeric, not string, comparison: 3.10 > 3.2
])
def test_triton_version_floor(version, supported, monkeypatch):
    """Triton fit kernels need triton >= 3.2 (3.0, pinned by torch 2.4, fails the kernel tests)."""
    from tbfast.kernels import triton_fit
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter's numpy check aside
    problem = triton_fit.version_problem(version)
    if supported:
        assert problem is None
    else:
        assert problem is not None and f"triton {version}" in problem and "triton 3.2" in problem


def test_old_triton_is_never_picked_and_refused_explicitly(monkeypatch, caplog):
    """On triton 3.0: backend 'auto' falls back to the torch reference, backend_info says why, an
    explicit backend='triton' is a one-line BackendUnavailableError naming both versions."""
    pytest.importorskip("triton")
    from tbfast.errors import BackendUnavailableError
    from tbfast.kernels import triton_fit, triton_fit_available
    from tbfast.ops import fit as fit_op
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # would make a supported triton usable on CPU
    monkeypatch.setattr(triton_fit, "installed_version", lambda: "3.0.0")
    ok, why = triton_fit_available()
    assert not ok and "triton 3.0.0" in why and "3.2" in why
    fit_op._cuda_backend.cache_clear()
    try:
        assert fit_op._cuda_backend() == "torch"
    finally:
        fit_op._cuda_backend.cache_clear()
    with pytest.raises(BackendUnavailableError) as err:
        fit_op.hill_fit(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([0]),
                        torch.tensor([3]), 2.0, backend="triton")
    msg = str(err.value)
    assert "\n" not in msg and "triton 3.0.0" in msg and "triton 3.2" in msg
    info = _info.backend_info()["triton"]
    assert info["fit_kernels"]["usable"] is False and "triton 3.0.0" in info["fit_kernels"]["reason"]
    # the same calls on a supported version: usable under the interpreter
    monkeypatch.setattr(triton_fit, "installed_version", lambda: "3.9.0")
    monkeypatch.setattr(triton_fit, "_dist_version", lambda name: "2.3.0")  # numpy < 2.4
    assert triton_fit_available()[0]
    assert _info.backend_info()["triton"]["fit_kernels"]["usable"] is True


def test_triton_interpreter_numpy_gate(monkeypatch):
    """Under TRITON_INTERPRET=1, triton < 3.7 with numpy >= 2.4 is refused with the reason."""
    from tbfast.kernels import triton_fit
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_fit, "_dist_version", lambda name: "2.4.6")
    problem = triton_fit.version_problem("3.6.0")
    assert problem is not None and "triton 3.6.0" in problem and "numpy 2.4.6" in problem
    assert triton_fit.version_problem("3.7.0") is None
    monkeypatch.setattr(triton_fit, "_dist_version", lambda name: "2.3.5")
    assert triton_fit.version_problem("3.2.0") is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels: numpy is not involved
    monkeypatch.setattr(triton_fit, "_dist_version", lambda name: "2.4.6")
    assert triton_fit.version_problem("3.2.0") is None
