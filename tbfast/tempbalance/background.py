"""The ESD in the background: a snapshot of the analysed weights, computed off the training path.

`BackgroundESD` is one worker thread that turns *snapshots* (copies of the matrices of every
analysed layer, taken on the caller's thread at a well-defined optimizer step) into ESD tables,
one at a time, in the order they were submitted. `AsyncESD` is a scheduler's side of it: the
worker (started on first use), the CUDA side streams, finished results restored from a
checkpoint, and the rule that decides which finished ESD a given step uses (`AsyncESD.due`).

Lifetime and threading (docs/TEMPBALANCE.md, "Lifetime and threading"):

- The worker thread runs only the ESD of snapshots; snapshots are taken, and results applied,
  on the caller's thread. It holds no reference to the scheduler: each job carries its own
  compute function, bound to the options at the time of the snapshot (`esd_function`), and
  the thread's only state is a `_Jobs` object shared with its `BackgroundESD`.
- It stops (its queued snapshots dropped, the one running finished) when `close` is called,
  when its `BackgroundESD` is garbage-collected (so ``del tb`` frees the scheduler and ends the
  thread), or when the interpreter exits: one `weakref.finalize` per worker (nothing else is
  registered process-wide, and it is gone once the worker is closed or collected) closes it and
  joins the thread before the interpreter tears down the C++ runtime. So leaving the process
  with an ESD in flight waits for at most that one ESD (the time a synchronous step's ESD
  takes), never aborts, and keeps the script's exit code.

On CUDA the snapshot is a device copy enqueued on a side stream after an event recorded on the
current (training) stream, and the training stream waits (on the GPU, not the host) for the copy
before it can change the weights again; the ESD then runs on that side stream. Nothing here
synchronises the host with the training stream. On the CPU the snapshot is a plain copy and the
ESD runs on the worker thread (the LAPACK and C++ kernels release the GIL while they work).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import threading
import time
import weakref
from typing import Any, Callable, Optional, Sequence

import torch

from ..layers import Layer

__all__ = ["Snapshot", "BackgroundESD", "AsyncESD", "snapshot_layers", "esd_function", "snapshot_metrics",
           "ASYNC_ON_GROUP"]

log = logging.getLogger(__name__)

ASYNC_ON_GROUP = ("TempBalance: asynchronous=True is not supported on a process group yet; pass "
                  "process_group=False (every rank computes the whole ESD) or use the synchronous mode "
                  "(the layers are split over the ranks)")

Compute = Callable[[list[Layer]], Any]


@dataclasses.dataclass
class Snapshot:
    """Copies of the analysed layers' matrices at optimizer step ``step``."""

    step: int
    layers: list[Layer]
    stream: Any = None  # the CUDA side stream the copies (and the ESD) belong to


def _frozen(layer: Layer, mats: torch.Tensor) -> Layer:
    """``layer`` with its matrices replaced by the copy ``mats`` (no reference to the module)."""
    return dataclasses.replace(layer, loader=lambda m=mats: m, module=None, lora=None)


def snapshot_layers(layers: Sequence[Layer], step: int, side_streams: Optional[dict] = None) -> Snapshot:
    """Copy the matrices of ``layers`` (all on one device) at this point of training.

    ``side_streams`` caches one CUDA side stream per device (created on first use).
    """
    layers = list(layers)
    device = layers[0].matrices().device if layers else torch.device("cpu")
    if device.type != "cuda":
        with torch.no_grad():
            copies = [_frozen(L, L.matrices().detach().clone()) for L in layers]
        return Snapshot(step=step, layers=copies)
    streams = side_streams if side_streams is not None else {}
    side = streams.get(device)
    if side is None:
        side = streams[device] = torch.cuda.Stream(device=device)
    training = torch.cuda.current_stream(device)
    weights_ready = torch.cuda.Event()
    weights_ready.record(training)
    with torch.no_grad(), torch.cuda.stream(side):
        side.wait_event(weights_ready)
        copies = [_frozen(L, L.matrices().detach().clone()) for L in layers]
        copied = torch.cuda.Event()
        copied.record(side)
    # the optimizer must not overwrite the weights before the copy has read them (GPU-side wait)
    training.wait_event(copied)
    return Snapshot(step=step, layers=copies, stream=side)


def snapshot_metrics(esd: Any, fit: Any, layers: list[Layer]) -> Any:
    """The ESD table of ``layers`` (a snapshot) with tbfast's pipeline: exactly the synchronous
    `TempBalance.compute_metrics` for the same weights and options."""
    from ..pipeline import run

    with torch.no_grad():
        return run(layers, esd, fit).metrics


def esd_function(esd: Any, fit: Any) -> Compute:
    """A job's compute function: `snapshot_metrics` bound to these ESD / fit options (and to
    nothing else, so the worker never holds the scheduler)."""
    return functools.partial(snapshot_metrics, esd, fit)


class _Jobs:
    """What a `BackgroundESD` and its worker thread share (and all the worker holds)."""

    def __init__(self, keep_all: bool) -> None:
        self.cond = threading.Condition()
        self.keep_all = keep_all  # False: a newer snapshot replaces a queued one (newest-wins mode)
        self.queue: collections.deque[tuple[Snapshot, Compute]] = collections.deque()
        self.running: Optional[int] = None  # step of the snapshot being computed
        self.done: dict[int, Any] = {}  # snapshot step -> table, not handed out yet
        self.error: Optional[BaseException] = None
        self.closed = False

    def pending_steps(self) -> list[int]:
        """Steps of the snapshots queued or running (call with ``cond`` held)."""
        steps = [snap.step for snap, _ in self.queue]
        return steps if self.running is None else [self.running] + steps


def _work(jobs: _Jobs) -> None:
    """The worker thread: compute queued snapshots in order until closed."""
    while True:
        with jobs.cond:
            jobs.cond.wait_for(lambda: jobs.queue or jobs.closed)
            if jobs.closed:
                return
            snap, compute = jobs.queue.popleft()
            jobs.running = snap.step
        table, error = None, None
        try:
            if snap.stream is not None:
                with torch.cuda.stream(snap.stream):
                    table = compute(snap.layers)
            else:
                table = compute(snap.layers)
        except BaseException as exc:  # handed to the caller's thread
            error = exc
        with jobs.cond:
            jobs.running = None
            if error is not None:
                jobs.error = error
            else:
                if not jobs.keep_all:
                    jobs.done.clear()
                jobs.done[snap.step] = table
            jobs.cond.notify_all()
        del snap, compute, table, error


def _stop(jobs: _Jobs, thread: threading.Thread, pid: int) -> None:
    """Close ``jobs`` (queued snapshots dropped) and wait for the running one to finish.

    Called by `BackgroundESD.close`, when the `BackgroundESD` is collected, or at interpreter exit
    (the worker's `weakref.finalize`); never from the worker itself (a collection there does not
    wait). A forked child has no worker (and its copy of the lock may be held): nothing to do.
    """
    if os.getpid() != pid:
        return
    with jobs.cond:
        jobs.closed = True
        jobs.queue.clear()
        jobs.cond.notify_all()
    if thread is not threading.current_thread():
        thread.join()


class BackgroundESD:
    """One worker thread computing ``compute(snapshot.layers) -> table`` for submitted snapshots.

    ``keep_all=True`` (the lagged mode): every snapshot is computed, in order, and its table kept
    until `collect` hands it out. ``keep_all=False`` (newest-wins mode): a newer snapshot replaces
    one still queued and only the newest finished table is kept. An error in the worker is
    re-raised by the next `collect` / `wait` in the caller's thread.
    """

    def __init__(self, keep_all: bool = True, name: str = "tbfast-esd") -> None:
        self._jobs = _Jobs(keep_all)
        self._thread = threading.Thread(target=_work, args=(self._jobs,), name=name, daemon=True)
        self._thread.start()
        # closes and joins the worker when this object is collected, or at exit if still alive
        self._finalizer = weakref.finalize(self, _stop, self._jobs, self._thread, os.getpid())

    @property
    def thread(self) -> threading.Thread:
        """The worker thread (alive until `close`)."""
        return self._thread

    # -- caller side
    def submit(self, snap: Snapshot, compute: Compute, keep_all: Optional[bool] = None) -> None:
        """Queue ``snap``, to be turned into a table by ``compute`` (``keep_all``: switch the mode)."""
        jobs = self._jobs
        with jobs.cond:
            if jobs.closed:
                raise RuntimeError("BackgroundESD is closed")
            if keep_all is not None:
                jobs.keep_all = keep_all
            if not jobs.keep_all and jobs.queue:
                log.debug("background ESD: snapshot of step %d replaced by step %d", jobs.queue[-1][0].step, snap.step)
                jobs.queue.clear()
            jobs.queue.append((snap, compute))
            jobs.cond.notify_all()

    @property
    def busy(self) -> bool:
        """Whether a snapshot is queued or being computed."""
        with self._jobs.cond:
            return bool(self._jobs.pending_steps())

    @property
    def in_flight_step(self) -> Optional[int]:
        """Step of the newest snapshot queued or being computed (None when idle)."""
        with self._jobs.cond:
            steps = self._jobs.pending_steps()
            return max(steps) if steps else None

    def collect(self, upto: float = math.inf, wait: bool = True) -> dict[int, Any]:
        """Hand out (once) the finished tables of the snapshots of steps ``<= upto``, by step.

        With ``wait``, first block until no snapshot of a step ``<= upto`` is queued or running.
        """
        jobs = self._jobs
        with jobs.cond:
            if wait:
                jobs.cond.wait_for(lambda: jobs.error is not None or jobs.closed
                                   or not any(s <= upto for s in jobs.pending_steps()))
            self._raise_pending()
            out = {s: t for s, t in jobs.done.items() if s <= upto}
            for s in out:
                del jobs.done[s]
            return out

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until no snapshot is queued or running; False if ``timeout`` ran out first."""
        jobs = self._jobs
        with jobs.cond:
            done = jobs.cond.wait_for(lambda: not jobs.pending_steps() or jobs.error is not None or jobs.closed,
                                      timeout=timeout)
            self._raise_pending()
            return bool(done)

    def close(self) -> None:
        """Stop the worker: queued snapshots are dropped, a running ESD finishes (its result is
        dropped); returns once the thread has ended. Idempotent."""
        self._finalizer()

    def _raise_pending(self) -> None:
        if self._jobs.error is not None:
            err, self._jobs.error = self._jobs.error, None
            raise RuntimeError(f"background ESD failed: {err}") from err


class AsyncESD:
    """A scheduler's asynchronous ESD: a `BackgroundESD` started on the first `submit`, the CUDA
    side streams of its snapshots, finished results restored from a checkpoint, and the time the
    caller spent waiting for results (``wait_seconds``)."""

    def __init__(self) -> None:
        self.worker: Optional[BackgroundESD] = None
        self.restored: dict[int, Any] = {}  # snapshot step -> finished table from a checkpoint
        self.wait_seconds = 0.0  #: time `due` / `newest` spent blocked on the worker
        self._side_streams: dict = {}

    def submit(self, options: Any, layers: Sequence[Layer], step: int) -> None:
        """Snapshot ``layers`` at optimizer step ``step`` and queue their ESD with ``options`` (a
        `TempBalanceOptions`; the job keeps its ESD / fit options only). The first call starts the
        worker (``options.async_lag=None``: newest-wins mode, else every snapshot is kept)."""
        from ..distributed import active_group

        if active_group(options.process_group, list(layers)) is not None:  # a group, or sharded weights
            raise ValueError(ASYNC_ON_GROUP)
        keep_all = options.async_lag is not None
        if self.worker is None:
            self.worker = BackgroundESD(keep_all)
        compute = esd_function(options.esd_options(), options.fit_options())
        self.worker.submit(snapshot_layers(layers, step, self._side_streams), compute, keep_all)

    def due(self, step_count: int, lag: Optional[int]) -> Optional[tuple[int, Any]]:
        """The ESD a scheduler at ``step_count`` must use now, or None (keep the current one).

        ``lag`` k: the newest snapshot of a step ``<= step_count - k``, waiting for it if it is
        still computing (older due ones are dropped); so the ESD of step s is applied at exactly
        step s + k whatever the thread timing. ``lag=None``: the newest finished ESD, no waiting.
        """
        if lag is None:
            return self._newest(math.inf, wait=False)
        return self._newest(step_count - lag, wait=True)

    def newest(self) -> Optional[tuple[int, Any]]:
        """Wait for every ESD in flight; the newest one not handed out yet, or None."""
        return self._newest(math.inf, wait=True)

    def _newest(self, upto: float, wait: bool) -> Optional[tuple[int, Any]]:
        found = {s: t for s, t in self.restored.items() if s <= upto}
        for s in found:
            del self.restored[s]
        if self.worker is not None:
            t0 = time.perf_counter()
            found.update(self.worker.collect(upto, wait=wait))
            self.wait_seconds += time.perf_counter() - t0
        if not found:
            return None
        step = max(found)
        return step, found[step]

    def close(self) -> None:
        """Stop the worker (queued ESDs dropped, a running one finished and dropped)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def to_state(self) -> Optional[list]:
        """Wait for the ESDs in flight and keep their results pending (not handed out); the pending
        results as a list of ``{"step", "table"}`` of plain values (None: nothing pending)."""
        if self.worker is not None:
            self.worker.wait()
            self.restored.update(self.worker.collect(wait=False))
        if not self.restored:
            return None
        return [{"step": s, "table": self.restored[s].to_state()} for s in sorted(self.restored)]

    def load_state(self, pending: Any) -> None:
        """Restore the pending results saved by `to_state` (also the single dict of older versions);
        ESDs in flight from before are dropped (their worker is stopped)."""
        from ..metrics import ESDMetrics

        self.close()

        pending = [] if pending is None else [pending] if isinstance(pending, dict) else list(pending)
        self.restored = {int(p["step"]): ESDMetrics.from_state(p["table"]) for p in pending}
