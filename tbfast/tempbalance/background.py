"""The ESD in the background: a snapshot of the analysed weights, computed off the training path.

`BackgroundESD` runs one job at a time on a worker thread: a *snapshot* (copies of the matrices
of every analysed layer, taken on the caller's thread at a well-defined point of training) and a
function that turns a snapshot into an ESD table. At most one job runs; a newer snapshot
replaces one that is still queued. A finished table waits in `ready` until the owner takes it. `AsyncESD` is a scheduler's side of
it: the worker (started on first use), the side streams, and a result restored from a checkpoint.

On CUDA the snapshot is a device copy enqueued on a side stream after an event recorded on the
current (training) stream, and the training stream waits (on the GPU, not the host) for the copy
before it can change the weights again; the ESD then runs on that side stream. Nothing here
synchronises the host with the training stream. On the CPU the snapshot is a plain copy and the
ESD runs on the worker thread (the LAPACK and C++ kernels release the GIL while they work).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, Callable, Optional, Sequence

import torch

from ..layers import Layer

__all__ = ["Snapshot", "BackgroundESD", "AsyncESD", "snapshot_layers"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Snapshot:
    """Copies of the analysed layers' matrices at optimizer step ``step``."""

    step: int
    layers: list[Layer]
    stream: Any = None  # the CUDA side stream the copies (and the ESD) belong to


def _frozen(layer: Layer, mats: torch.Tensor) -> Layer:
    """``layer`` with its matrices replaced by the copy ``mats`` (no reference to the module)."""
    return dataclasses.replace(layer, loader=lambda m=mats: m, module=None)


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


class BackgroundESD:
    """One worker thread computing ``compute(layers) -> table`` for the latest snapshot.

    `submit` queues a snapshot (replacing a queued one); `take` returns the newest finished
    ``(step, table)`` once, or None; `wait` blocks until nothing is queued or running. An error
    in the worker is re-raised by the next `take` / `wait` in the caller's thread.
    """

    def __init__(self, compute: Callable[[list[Layer]], Any], name: str = "tbfast-esd") -> None:
        self._compute = compute
        self._cond = threading.Condition()
        self._queued: Optional[Snapshot] = None
        self._running: Optional[Snapshot] = None
        self._ready: Optional[tuple[int, Any]] = None
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- caller side
    def submit(self, snap: Snapshot) -> None:
        """Queue ``snap`` for the worker; a snapshot still waiting in the queue is dropped."""
        with self._cond:
            if self._closed:
                raise RuntimeError("BackgroundESD is closed")
            if self._queued is not None:
                log.debug("background ESD: snapshot of step %d replaced by step %d", self._queued.step, snap.step)
            self._queued = snap
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        """Whether a snapshot is queued or being computed."""
        with self._cond:
            return self._queued is not None or self._running is not None

    @property
    def in_flight_step(self) -> Optional[int]:
        """Step of the newest snapshot queued or being computed (None when idle)."""
        with self._cond:
            snap = self._queued or self._running
            return None if snap is None else snap.step

    def take(self) -> Optional[tuple[int, Any]]:
        """The newest finished ``(snapshot step, table)``, handed out once; None if none finished."""
        with self._cond:
            self._raise_pending()
            out, self._ready = self._ready, None
            return out

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until no snapshot is queued or running; False if ``timeout`` ran out first."""
        with self._cond:
            done = self._cond.wait_for(lambda: self._queued is None and self._running is None or self._error,
                                       timeout=timeout)
            self._raise_pending()
            return bool(done)

    def close(self) -> None:
        """Stop the worker after its current job (queued work is dropped)."""
        with self._cond:
            self._closed = True
            self._queued = None
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"background ESD failed: {err}") from err

    # -- worker side
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued is not None or self._closed)
                if self._closed:
                    return
                snap, self._queued = self._queued, None
                self._running = snap
            try:
                if snap.stream is not None:
                    with torch.cuda.stream(snap.stream):
                        table = self._compute(snap.layers)
                else:
                    table = self._compute(snap.layers)
                result: Optional[tuple[int, Any]] = (snap.step, table)
                error = None
            except BaseException as exc:  # handed to the caller's thread
                result, error = None, exc
            with self._cond:
                self._running = None
                if error is not None:
                    self._error = error
                else:
                    self._ready = result
                self._cond.notify_all()
            del snap

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter shutdown
        try:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
        except Exception:
            pass


class AsyncESD:
    """A scheduler's asynchronous ESD: a `BackgroundESD` started on the first `submit`, the CUDA
    side streams of its snapshots, and a finished result restored from a checkpoint (`restored`),
    which `newest` hands out unless the worker has a newer one."""

    def __init__(self) -> None:
        self.worker: Optional[BackgroundESD] = None
        self.restored: Optional[tuple[int, Any]] = None
        self._side_streams: dict = {}

    def submit(self, compute: Callable[[list[Layer]], Any], layers: Sequence[Layer], step: int) -> None:
        """Snapshot ``layers`` at optimizer step ``step`` and queue their ESD; the first call starts
        the worker, which turns every snapshot into a table with ``compute``."""
        if self.worker is None:
            self.worker = BackgroundESD(compute)
        self.worker.submit(snapshot_layers(layers, step, self._side_streams))

    def newest(self) -> Optional[tuple[int, Any]]:
        """The newest finished ``(step, table)`` not handed out yet, or None."""
        done, self.restored = self.restored, None
        newer = self.worker.take() if self.worker is not None else None
        return newer if newer is not None else done

    def wait(self) -> None:
        """Block until the ESD in flight (if any) has finished."""
        if self.worker is not None:
            self.worker.wait()

    def close(self) -> None:
        """Stop the worker (a running ESD finishes; its result is dropped)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def to_state(self) -> Optional[dict]:
        """Wait for the ESD in flight and keep its result pending (not handed out); the pending
        result as ``{"step", "table"}`` of plain values, or None."""
        self.wait()
        ready = self.worker.take() if self.worker is not None else None
        if ready is not None:
            self.restored = ready
        if self.restored is None:
            return None
        return {"step": self.restored[0], "table": self.restored[1].to_state()}

    def load_state(self, pending: Optional[dict]) -> None:
        """Restore the pending result saved by `to_state` (None: nothing pending)."""
        if pending is None:
            self.restored = None
            return
        from ..metrics import ESDMetrics

        self.restored = (int(pending["step"]), ESDMetrics.from_state(pending["table"]))
