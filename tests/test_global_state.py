"""tbfast as a guest in someone else's process (issue 19, items 1 and 2): it writes no
process-wide flag, and its numbers do not depend on the caller's precision flags or autocast.

Oracles: the eigenvalues of an fp64 SVD (tests/oracle.py) for the precision combinations, and
tbfast's own result computed outside any autocast / flag for the bitwise comparisons (the claim
under test is "bitwise the same inside and outside", so the outside run is the reference).
"""
from __future__ import annotations

import contextlib
import logging
import random
import signal
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import tbfast
from oracle import svd_eigs

HAS_NEW_API = hasattr(torch.backends, "fp32_precision")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()

# -------------------------------------------------------------------------------- the caller's flags
_NEW = [("top", torch.backends), ("cuda.matmul", getattr(torch.backends.cuda, "matmul", None)),
        ("cudnn", torch.backends.cudnn), ("mkldnn", torch.backends.mkldnn)]


def _precision_flags() -> dict:
    """Every TF32 / fp32-precision flag, read through the API the caller used: reading the legacy
    flags after the new API was used raises in torch >= 2.9, so only the new ones are read then."""
    if HAS_NEW_API:
        out = {name: obj.fp32_precision for name, obj in _NEW}
        for name in ("matmul", "conv", "rnn"):
            for owner in ("cudnn", "mkldnn"):
                sub = getattr(getattr(torch.backends, owner), name, None)
                if sub is not None and hasattr(sub, "fp32_precision"):
                    out[f"{owner}.{name}"] = sub.fp32_precision
        return out
    return {"allow_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


def _set_new_api(flags: dict) -> None:
    torch.backends.fp32_precision = flags["top"]  # the top level first: it propagates downwards
    for name, obj in _NEW[1:]:
        obj.fp32_precision = flags[name]
    for key, value in flags.items():
        if key.count(".") == 1 and key != "cuda.matmul":
            owner, name = key.split(".")
            getattr(getattr(torch.backends, owner), name).fp32_precision = value


@contextlib.contextmanager
def user_precision(kind: str, value):
    """Set one precision flag as a user would; put back what was there, through the same API, so
    the test leaves no trace (torch refuses legacy reads once the two APIs disagree).
    ``kind``: 'legacy' (allow_tf32), 'top' or 'cuda.matmul' (fp32_precision)."""
    if kind != "legacy" and not HAS_NEW_API:
        pytest.skip(f"torch.backends.*.fp32_precision is new in torch 2.9; this is torch {torch.__version__}")
    legacy = torch.backends.cuda.matmul.allow_tf32 if kind == "legacy" else None
    saved = _precision_flags() if kind != "legacy" else None
    try:
        if kind == "legacy":
            torch.backends.cuda.matmul.allow_tf32 = value
        elif kind == "top":
            torch.backends.fp32_precision = value
        else:
            torch.backends.cuda.matmul.fp32_precision = value
        yield
    finally:
        if kind == "legacy":
            torch.backends.cuda.matmul.allow_tf32 = legacy
        else:
            _set_new_api(saved)


COMBOS = [("legacy", True), ("legacy", False), ("top", "tf32"), ("top", "ieee"),
          ("cuda.matmul", "tf32"), ("cuda.matmul", "ieee")]


def _model(device="cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 64),
                         nn.ReLU(), nn.Linear(64, 72), nn.ReLU(), nn.Linear(72, 8)).to(device)


def _tempbalance_lrs(model, steps: int = 2) -> list[float]:
    tb = tbfast.TempBalance(model)
    groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
    opt = torch.optim.SGD(groups, lr=0.1)
    lrs = [g["lr"] for g in opt.param_groups]
    for _ in range(steps):
        lrs += [float(v) for v in tb.step(opt, 0.1)]
    if hasattr(tb, "close"):
        tb.close()
    return lrs


def _all_results(model) -> dict:
    """Every public entry point's output on ``model`` (tensors, frames, lrs)."""
    sp = tbfast.esd(model)
    m = tbfast.layer_metrics(model)
    fit = tbfast.fit_power_law(sp, fit="ks")
    out = {"values": sp.values, "alpha": m.alpha, "D": m.D, "xmin": m.xmin, "spectral_norm": m.spectral_norm,
           "fit_alpha": fit.alpha, "fit_xmin": fit.xmin, "fix_finger": tbfast.fit_power_law(sp, fit="fix-finger").alpha,
           "lrs": torch.tensor(_tempbalance_lrs(model), dtype=torch.float64)}
    pytest.importorskip("pandas")
    out["analyze"] = tbfast.analyze(model, min_evals=0)
    out["watcher"] = tbfast.WeightWatcher(model=model).analyze()
    return out


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k  # bitwise (no tolerance)
        else:
            assert a[k].equals(b[k]), k


# -------------------------------------------------------------------------------------- item 1: TF32
@pytest.mark.parametrize("kind,value", COMBOS)
def test_caller_precision_flags_are_kept_and_do_not_change_the_esd(kind, value):
    model = _model()
    ref = tbfast.esd(model)
    want = [svd_eigs(m.weight.detach()) for m in model if isinstance(m, nn.Linear)]
    outer = torch.backends.cuda.matmul.allow_tf32 if kind == "legacy" else _precision_flags()
    with user_precision(kind, value):
        before = _precision_flags()
        sp = tbfast.esd(model)  # raised "mix of the legacy and new APIs" with the new API before
        m = tbfast.layer_metrics(model)
        lrs = _tempbalance_lrs(model)
        assert _precision_flags() == before  # read back exactly as the user set them
        if kind == "legacy":
            assert torch.backends.cuda.matmul.allow_tf32 is value
    # the test itself leaves no trace
    assert outer == (torch.backends.cuda.matmul.allow_tf32 if kind == "legacy" else _precision_flags())
    assert torch.equal(sp.values, ref.values)  # identical eigenvalues whatever the user set
    for i, w in enumerate(want):
        got = sp.eigenvalues(i).numpy()
        assert np.allclose(got, w, rtol=1e-4, atol=1e-5 * w.max())  # fp64 SVD oracle
    assert torch.equal(m.alpha, tbfast.layer_metrics(model).alpha)
    assert lrs == _tempbalance_lrs(model)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,value", COMBOS)
def test_cuda_precision_flags_do_not_change_the_esd(kind, value):
    torch.manual_seed(0)
    W = torch.randn(6, 512, 384, device="cuda")
    ref = tbfast.esd(W)
    with user_precision(kind, value):
        before = _precision_flags()
        sp = tbfast.esd(W)
        assert _precision_flags() == before
    assert torch.equal(sp.values, ref.values)  # the same bits with TF32 on or off
    for i in range(6):  # float32 exact to rounding (a TF32 Gram is off by ~1e-3 relative)
        w = svd_eigs(W[i].cpu())
        assert np.allclose(sp.eigenvalues(i).cpu().numpy(), w, rtol=2e-5, atol=1e-5 * w.max())


def test_no_module_writes_a_process_wide_torch_flag():
    """The source writes none of torch's process-wide setters (the runtime check is below)."""
    import pathlib
    import re

    root = pathlib.Path(tbfast.__file__).parent
    setters = re.compile(r"torch\.backends\.[\w.]+\s*=(?!=)|set_num_threads|set_num_interop_threads|"
                         r"set_default_dtype|set_default_tensor_type|set_flush_denormal|use_deterministic_algorithms|"
                         r"set_float32_matmul_precision|torch\.manual_seed|set_rng_state|sys\.excepthook\s*=|"
                         r"threading\.excepthook\s*=|signal\.signal\(")
    allowed = {"bench", "cli.py"}  # the command line (a process of its own) may set what it likes
    bad = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if rel.split("/")[0] in allowed:
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if rel == "_interrupt.py" and re.search(r"^\s*signal\.signal\(signal\.SIGINT,", code):
                continue  # import_guard: only in the `tbfast` command, restored after the import
            if setters.search(code):
                bad.append(f"{rel}:{n}: {line.strip()}")
    assert not bad, bad


def _global_state() -> dict:
    """A broad snapshot of process-wide and thread-local state a library could change."""
    s = {
        "precision": _precision_flags(),
        "default_dtype": torch.get_default_dtype(),
        "num_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
        "autocast": (_autocast_on("cpu"), _autocast_on("cuda")),
        "cudnn": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.enabled),
        "reduced_precision": (torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                              torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
        "rng": torch.random.get_rng_state().clone(), "np_rng": str(np.random.get_state()),
        "py_rng": random.getstate(), "np_err": np.geterr(),
        "excepthook": sys.excepthook, "threading_excepthook": threading.excepthook,
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
        "root_handlers": list(logging.getLogger().handlers), "root_level": logging.getLogger().level,
        "warning_filters": list(warnings.filters),
        "threads": sorted(t.ident for t in threading.enumerate()),
    }
    if hasattr(torch, "get_default_device"):
        s["default_device"] = torch.get_default_device()
    return s


def test_entry_points_leave_global_torch_state_unchanged():
    model = _model()
    tbfast.esd(model)  # first use: lazy imports, op registration
    before = _global_state()
    _all_results(model)
    after = _global_state()
    rng_b, rng_a = before.pop("rng"), after.pop("rng")
    assert torch.equal(rng_b, rng_a)
    assert after == before


# ---------------------------------------------------------------------------------- item 2: autocast
def test_every_entry_point_is_bitwise_the_same_under_cpu_autocast():
    model = _model()
    ref = _all_results(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # raised, or computed the Gram in bf16, before
        got = _all_results(model)
    _assert_bitwise(got, ref)
    assert ref["values"].dtype == torch.float32


def test_esd_of_raw_matrices_under_autocast_with_float64():
    torch.manual_seed(1)
    W = [torch.randn(70, 50), torch.randn(30, 90)]
    ref = tbfast.esd(W, dtype=torch.float64, min_evals=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tbfast.esd(W, dtype=torch.float64, min_evals=0)
    assert torch.equal(got.values, ref.values)
    for i, w in enumerate(W):
        assert np.allclose(got.eigenvalues(i).numpy(), svd_eigs(w), rtol=1e-10, atol=1e-12)


def test_tempbalance_callbacks_inside_autocast_match_outside():
    """The Lightning callback's ESD and apply, called inside a bf16 autocast region (as a
    mixed-precision run may call them), write the same lrs as outside."""
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from tbfast.integrations.lightning import TempBalanceCallback

    def run(ctx):
        model = _model()
        tb = tbfast.TempBalance(model)
        groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
        opt = torch.optim.SGD(groups, lr=0.1)
        cb = TempBalanceCallback(tb, interval="step", frequency=1, log=False)
        trainer = SimpleNamespace(optimizers=[opt], lr_scheduler_configs=[], global_step=1, current_epoch=0,
                                  loggers=[], logger=None, is_global_zero=True)
        with ctx:
            cb.on_train_batch_end(trainer, None, None, None, 0)  # an ESD step (the Lightning hook)
        assert cb.esd_steps == [1]
        return [g["lr"] for g in opt.param_groups]

    try:
        ref = run(contextlib.nullcontext())
    except (AttributeError, TypeError) as e:  # the callback's trainer protocol changed
        pytest.skip(f"callback internals: {e}")
    assert run(torch.autocast("cpu", dtype=torch.bfloat16)) == ref


def test_hf_callback_inside_autocast_matches_outside():
    """The Hugging Face callback's ESD steps, called inside a bf16 autocast region, write the same
    lrs as outside (bitwise)."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from tbfast.integrations.hf import TempBalanceCallback

    def run(ctx):
        model = _model()
        tb = tbfast.TempBalance(model)
        groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1)
        opt = torch.optim.SGD(groups, lr=0.1)
        cb = TempBalanceCallback(tb, esd_interval=1, log_table=False)
        args = SimpleNamespace(gradient_accumulation_steps=1, get_warmup_steps=lambda steps: 0)
        state = SimpleNamespace(global_step=0, max_steps=4, num_train_epochs=1, stateful_callbacks={})
        control = SimpleNamespace(should_save=False)  # the TrainerControl fields the callback reads
        with ctx:
            cb.on_train_begin(args, state, control, optimizer=opt)
            lrs = [g["lr"] for g in opt.param_groups]
            for step in (1, 2):
                with torch.autocast("cpu", enabled=False):  # a training step outside the ESD
                    for p in model.parameters():
                        p.data.mul_(1.0 + 0.01 * step)
                state.global_step = step
                cb.on_step_end(args, state, control, optimizer=opt)
                lrs += [g["lr"] for g in opt.param_groups]
        assert cb.esd_steps == [0, 1, 2]
        return lrs

    try:
        ref = run(contextlib.nullcontext())
    except (AttributeError, TypeError) as e:  # the callback's Trainer protocol changed
        pytest.skip(f"callback internals: {e}")
    assert run(torch.autocast("cpu", dtype=torch.bfloat16)) == ref


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_is_bitwise_the_same(dtype):
    model = _model("cuda")
    ref = _all_results(model)
    with torch.autocast("cuda", dtype=dtype):
        got = _all_results(model)
    _assert_bitwise(got, ref)


# ------------------------------------------------------------------- item 5: import and threads
_IMPORT_CHECK = r"""
import logging, signal, sys, threading
def handlers():
    sigs = {s: signal.getsignal(s) for s in signal.valid_signals()
            if s not in (signal.SIGKILL, signal.SIGSTOP)}
    return (sys.excepthook, threading.excepthook, sys.unraisablehook, sys.displayhook,
            sigs, list(logging.getLogger().handlers), logging.getLogger().level)
before = handlers()
import tbfast
after = handlers()
assert after == before, [(a, b) for a, b in zip(before, after) if a != b]
print("unchanged")
"""


@pytest.mark.parametrize("script_name", ["check.py", "tbfast"])
def test_import_changes_no_global_handler(tmp_path, script_name):
    """A subprocess imports tbfast and compares every hook and signal handler; the script named
    ``tbfast`` (a user's own wrapper script) is where the old import replaced sys.excepthook."""
    import os
    import pathlib
    import subprocess

    script = tmp_path / script_name
    script.write_text(_IMPORT_CHECK)
    root = str(pathlib.Path(tbfast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "unchanged", p.stderr[-2000:]


@pytest.mark.parametrize("state", ["default_dtype", "deterministic", "autocast"])
def test_analyze_computes_on_the_callers_thread_with_its_state(monkeypatch, state):
    pytest.importorskip("pandas")
    pipeline_mod = sys.modules["tbfast.pipeline"]
    seen = []
    inner = pipeline_mod.layer_spectra

    def recording(*args, **kwargs):
        seen.append((threading.get_ident(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                     _autocast_on("cpu")))
        return inner(*args, **kwargs)

    monkeypatch.setattr(pipeline_mod, "layer_spectra", recording)
    model = _model()
    ref = tbfast.analyze(model, min_evals=0)
    seen.clear()
    threads = set(threading.enumerate())
    saved = (torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled())
    try:
        if state == "default_dtype":
            torch.set_default_dtype(torch.float64)
            ctx = contextlib.nullcontext()
        elif state == "deterministic":
            torch.use_deterministic_algorithms(True)
            ctx = contextlib.nullcontext()
        else:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        with ctx:
            got = tbfast.analyze(model, min_evals=0)
            caller = (threading.get_ident(), torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                      _autocast_on("cpu"))
    finally:
        torch.set_default_dtype(saved[0])
        torch.use_deterministic_algorithms(saved[1])
    assert seen and all(s == caller for s in seen), (seen, caller)  # the caller's thread and state
    assert set(threading.enumerate()) == threads  # no thread left behind
    assert got["name"].equals(ref["name"])
    assert np.allclose(got["alpha"], ref["alpha"], rtol=1e-5)
    if state != "default_dtype":
        assert got.equals(ref)


def _moe_and_farms_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Module()
    model.lin = nn.Linear(150, 120, bias=False)  # FARMS windows of 75 x 150 (shrunk 100 x 200)
    model.mlp = nn.Module()
    model.mlp.experts = nn.Module()
    model.mlp.experts.down_proj = nn.Parameter(torch.randn(3, 40, 60))  # fused experts: rows down_proj[e]
    return model


def test_farms_windows_and_expert_rows_are_bitwise_the_same_under_autocast_and_touch_no_state():
    """e-htsr's ESD paths (FARMS windows, fused expert rows) run inside exact_math like every
    other layer: bf16 autocast changes no bit, the expert rows match an fp64 SVD, the global
    state is left as it was."""
    model = _moe_and_farms_model()
    tbfast.esd(model, farms=True)  # first use: lazy imports
    before = _global_state()
    ref = {"experts": tbfast.esd(model).values, "farms": tbfast.esd(model, farms=True).values,
           "alpha": tbfast.layer_metrics(model, farms=True).alpha}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = {"experts": tbfast.esd(model).values, "farms": tbfast.esd(model, farms=True).values,
               "alpha": tbfast.layer_metrics(model, farms=True).alpha}
    after = _global_state()
    for k in ref:
        assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(ref[k])), k
    rng_b, rng_a = before.pop("rng"), after.pop("rng")
    assert torch.equal(rng_b, rng_a) and after == before
    sp = tbfast.esd(model, dtype=torch.float64, min_evals=0)
    names = [l.name for l in sp.layers]
    for e in range(3):
        i = names.index(f"mlp.experts.down_proj[{e}]")
        assert np.allclose(sp.eigenvalues(i).numpy(), svd_eigs(model.mlp.experts.down_proj[e].detach()),
                           rtol=1e-10, atol=1e-12)
    assert ref["farms"].dtype == torch.float32
