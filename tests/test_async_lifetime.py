"""Lifetime of asynchronous TempBalance's worker thread (issue 19, item 6).

Oracles: the process's own exit status and stderr (a script that leaves with an ESD in flight
must keep its exit code and never abort), `threading.enumerate()` (no worker thread left after
close / ``with`` / ``del``), weak references (the worker holds no strong reference to the
scheduler) and `gc.get_objects()` (no exit finalizer outlives its worker).
"""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import weakref

import pytest
import torch
from oracle import without_fallback_notice
from torch import nn

import tbfast
from tbfast import _backend
from tbfast.tempbalance import background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# an ESD of about a second on a 2-core CPU: still running when the script ends
SCRIPT = textwrap.dedent("""
    import sys, torch, tbfast
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(768, 768) for _ in range(8)])
    tb = tbfast.TempBalance(model, eigs_thresh=10, asynchronous=True)
    groups, _ = tb.build_optimizer_param_group(0.1)
    opt = torch.optim.SGD(groups, lr=0.1)
    model(torch.randn(4, 768)).pow(2).mean().backward()
    opt.step()
    tb.step(opt, 0.1)
    print("in flight:", tb._async.worker.busy, flush=True)
    how = sys.argv[1]
    if how == "exit3":
        sys.exit(3)
    if how == "raise":
        raise KeyError("boom")
""")


def _run_script(how):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, env=env,
                          timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("how, rc", [("exit3", 3), ("end", 0), ("raise", 1)])
def test_leaving_with_an_esd_in_flight_keeps_the_exit_code(how, rc):
    runs = 3 if how != "raise" else 1
    for _ in range(runs):
        out = _run_script(how)
        assert "in flight: True" in out.stdout, out  # the case under test: an ESD still running
        assert out.returncode == rc, (out.returncode, out.stderr[-2000:])
        assert "terminate" not in out.stderr and "Abort" not in out.stderr, out.stderr[-2000:]
        if how == "raise":
            assert "KeyError: 'boom'" in out.stderr
        else:
            assert without_fallback_notice(out.stderr, _backend.extension_loaded()) == "", out.stderr[-2000:]


def _stack(n=4, width=64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def _workers():
    return [t for t in threading.enumerate() if t.name == "tbfast-esd"]


def _exit_finalizers():
    """Live `weakref.finalize` objects that would stop a worker at exit."""
    return [f for f in gc.get_objects() if type(f) is weakref.finalize and f.alive
            and (f.peek() or (None, None))[1] is background._stop]


def _started(model, **kw):
    tb = tbfast.TempBalance(model, eigs_thresh=10, asynchronous=True, **kw)
    groups, _ = tb.build_optimizer_param_group(0.1)
    opt = torch.optim.SGD(groups, lr=0.1)
    tb.step(opt, 0.1)  # starts the worker with an ESD in flight
    return tb, opt


def test_close_stops_the_worker_and_its_exit_hook():
    before = set(_workers())
    tb, opt = _started(_stack())
    worker = tb._async.worker.thread
    assert worker.is_alive() and worker not in before
    assert len(_exit_finalizers()) >= 1
    tb.close()
    assert not worker.is_alive()
    assert set(_workers()) <= before
    assert not any(f.peek()[2][1] is worker for f in _exit_finalizers())
    tb.close()  # idempotent
    # used again after close: a fresh worker, closed again
    tb.step(opt, 0.1)
    again = tb._async.worker.thread
    assert again.is_alive() and again is not worker
    tb.close()
    assert not again.is_alive()


def test_context_manager_stops_the_worker():
    before = set(_workers())
    with tbfast.TempBalance(_stack(), eigs_thresh=10, asynchronous=True) as tb:
        groups, _ = tb.build_optimizer_param_group(0.1)
        opt = torch.optim.SGD(groups, lr=0.1)
        tb.step(opt, 0.1)
        tb.step(opt, 0.1)
        worker = tb._async.worker.thread
        assert worker.is_alive()
    assert not worker.is_alive()
    assert set(_workers()) <= before
    # an exception inside the block closes it too, and propagates
    with pytest.raises(KeyError):
        with tbfast.TempBalance(_stack(), eigs_thresh=10, asynchronous=True) as tb2:
            groups, _ = tb2.build_optimizer_param_group(0.1)
            tb2.step(torch.optim.SGD(groups, lr=0.1), 0.1)
            worker2 = tb2._async.worker.thread
            raise KeyError("x")
    assert not worker2.is_alive()


@pytest.mark.parametrize("in_flight", [True, False])
def test_del_frees_the_scheduler_and_ends_the_worker(in_flight, monkeypatch):
    if in_flight:  # every ESD takes at least half a second: still running at ``del``
        inner = background.snapshot_metrics
        monkeypatch.setattr(background, "snapshot_metrics", lambda *a: (time.sleep(0.5), inner(*a))[1])
    before = set(_workers())
    tb, opt = _started(_stack(n=6, width=256))
    if not in_flight:
        tb._async.worker.wait()
    assert tb._async.worker.busy == in_flight
    worker = tb._async.worker.thread
    ref = weakref.ref(tb)
    del tb
    gc.collect()
    assert ref() is None  # the worker (and its queued job) held no strong reference to it
    worker.join(60)
    assert not worker.is_alive()
    assert set(_workers()) <= before
    assert not any(f.peek()[2][1] is worker for f in _exit_finalizers())


def test_worker_references_no_scheduler_while_computing(monkeypatch):
    """While a job is running, nothing the worker thread holds reaches the TempBalance."""
    gate = threading.Event()
    inner = background.snapshot_metrics

    def slow(esd, fit, layers):
        assert gate.wait(60)
        return inner(esd, fit, layers)

    monkeypatch.setattr(background, "snapshot_metrics", slow)
    tb, opt = _started(_stack())
    jobs = tb._async.worker._jobs
    for _ in range(600):
        with jobs.cond:
            if jobs.running is not None:
                break
        time.sleep(0.01)
    # everything reachable from the worker's shared state: no TempBalance, model or optimizer
    seen, todo = set(), [jobs]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, type(sys))):
            continue
        seen.add(id(obj))
        assert not isinstance(obj, (tbfast.TempBalance, nn.Module, torch.optim.Optimizer)), type(obj)
        if isinstance(obj, types.FunctionType):  # its closure and defaults, not its module's globals
            todo.extend([c.cell_contents for c in obj.__closure__ or ()] + list(obj.__defaults__ or ()))
        else:
            todo.extend(gc.get_referents(obj))
    gate.set()
    tb.close()
