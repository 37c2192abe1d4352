"""Ctrl-C for the ``tbfast`` command: prompt during long native calls, one line, exit code 130.

Python runs signal handlers only in the main thread, between bytecodes: while that thread is
inside one long C++ call (a LAPACK ``?syevd`` of a 10000 x 10000 Gram matrix, a big matmul), a
KeyboardInterrupt waits until the call returns. `interruptible` runs a function in a worker
thread instead (torch ops and tbfast's C++ ops release the GIL) while the calling main thread
waits, so Ctrl-C raises KeyboardInterrupt in the caller at once. The native call in flight cannot
be cancelled: it finishes in the background (a daemon thread) and its result is dropped; the
``tbfast`` command then ends the process right away with exit code 130.

Only the command line (`tbfast.cli`) uses this: library calls (`tbfast.analyze`, ...) compute on
the caller's own thread, with the caller's autocast, precision and default-device state, and a
Ctrl-C raises KeyboardInterrupt there when the native call in flight returns (docs/ANALYZE.md).
The only handler installed here is `import_guard`'s, in the ``tbfast`` command only, for the
duration of ``import tbfast``'s own imports (torch's among them); a library import installs
none. This module stays free of heavy imports: `exit_if_cli` runs when a Ctrl-C interrupts
``import tbfast`` (and torch) in the ``tbfast`` command.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import sys
import threading
import warnings
from typing import Any, Callable, Iterator, TypeVar

__all__ = ["interruptible", "busy", "exit_interrupted", "exit_if_cli", "started_as_cli", "import_guard",
           "EXIT_INTERRUPTED"]

logger = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C

F = TypeVar("F", bound=Callable[..., Any])

_local = threading.local()  # .inside: True in a worker thread started here
_abandoned: list[threading.Event] = []  # "done" events of workers whose caller was interrupted


def busy() -> bool:
    """True while a worker whose caller was interrupted is still running its native call."""
    return not all(done.is_set() for done in _abandoned)


def _default_device(torch):
    """The caller's default device, ``with torch.device(...)`` blocks included: torch 2.4's
    ``get_default_device`` sees only ``set_default_device``, so look for the innermost device
    mode on the torch-function mode stack first."""
    if not hasattr(torch, "get_default_device"):
        return None
    try:
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
        for mode in reversed(_get_current_function_mode_stack()):
            if isinstance(mode, DeviceContext):
                return mode.device
    except (ImportError, AttributeError):  # private API moved: the public answer below
        pass
    return torch.get_default_device()


def _torch_state() -> Callable[[], Any]:
    """Capture the caller's thread-local torch state (grad mode, inference mode, default device,
    CUDA device and stream) and return a function that restores it in another thread."""
    torch = sys.modules.get("torch")
    if torch is None:
        return contextlib.nullcontext
    grad = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    default_device = _default_device(torch)
    cuda_device = stream = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_device = torch.cuda.current_device()
        stream = torch.cuda.current_stream(cuda_device)

    def restore() -> Any:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode(inference))
        stack.enter_context(torch.set_grad_enabled(grad))
        if default_device is not None and default_device != torch.get_default_device():
            torch.set_default_device(default_device)  # thread-local: this worker only
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)
            stack.enter_context(torch.cuda.stream(stream))
        return stack

    return restore


def interruptible(fn: F) -> F:
    """Decorator: called from the main thread, run ``fn`` in a worker thread and wait for it so
    that Ctrl-C raises KeyboardInterrupt in the caller promptly, even inside a long native call.

    Results and exceptions are handed back unchanged. Called from any other thread (or nested
    inside another `interruptible` call) ``fn`` simply runs in place.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "inside", False) or threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        restore = _torch_state()
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            _local.inside = True
            try:
                with restore():
                    box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller below
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name=f"tbfast-{fn.__name__}", daemon=True).start()
        try:
            # not Thread.join(): on Python < 3.12 a KeyboardInterrupt inside join() can mark the
            # thread as stopped while it still runs (bpo-45274 handling)
            while not done.wait(0.1):
                pass
        except KeyboardInterrupt:
            if not _abandoned:
                atexit.register(_wait_at_exit)
            _abandoned.append(done)
            logger.debug("%s interrupted; the native call in flight finishes in the background", fn.__name__)
            raise
        if "error" in box:
            exc = box.pop("error")
            try:
                raise exc
            finally:
                del exc
        return box["value"]

    return wrapper  # type: ignore[return-value]


def _wait_at_exit() -> None:
    """At interpreter exit, let an abandoned worker finish its native call first: a daemon thread
    that returns from C++ into a finalizing interpreter aborts the process (``terminate called
    without an active exception``). A second Ctrl-C ends the process at once (exit code 130)."""
    if not busy():
        return
    # a warning, not a log record: the process seems to hang otherwise, and logging may be off
    warnings.warn("tbfast: waiting for the interrupted eigensolve to finish before exiting "
                  "(Ctrl-C again to quit now)", RuntimeWarning, stacklevel=1)
    try:
        for done in _abandoned:
            while not done.wait(0.1):
                pass
    except KeyboardInterrupt:
        exit_interrupted("tbfast: interrupted")


def exit_interrupted(message: str) -> None:
    """Print ``message`` (one line) on stderr, flush, and end the process with exit code 130.

    Uses ``os._exit``: a worker thread may still be inside a native call that cannot be
    cancelled, and a normal interpreter shutdown would wait for it or tear the runtime down
    under it."""
    try:
        sys.stdout.flush()
    except Exception:  # a closed pipe: nothing left to save
        pass
    try:
        print(message, file=sys.stderr, flush=True)
    except Exception:
        pass
    os._exit(EXIT_INTERRUPTED)


def started_as_cli() -> bool:
    """True when this process is the ``tbfast`` command (console script or ``python -m tbfast``)."""
    argv = list(getattr(sys, "orig_argv", None) or [])[1:]
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-c":  # interpreter options
        a = argv[i]
        if a.startswith("-m"):
            name = a[2:] or (argv[i + 1] if i + 1 < len(argv) else "")
            return name in ("tbfast", "tbfast.cli")
        i += 2 if a in ("-W", "-X") else 1
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "tbfast"


@contextlib.contextmanager
def import_guard(active: bool | None = None) -> Iterator[None]:
    """Around ``import tbfast``'s imports in the ``tbfast`` command (``active``, by default
    `started_as_cli`; elsewhere it does nothing): a Ctrl-C that arrives meanwhile always ends them
    with a KeyboardInterrupt, even where the importing code swallows it.

    torch 2.4's C module (``torch._C``) imports numpy while it initialises and drops any exception
    from that import. A SIGINT that arrives while libtorch's shared libraries load runs Python's
    handler at the first bytecode after them, which is that numpy import: the KeyboardInterrupt is
    lost (``import torch`` completes, with a "Failed to initialize NumPy" warning) or leaves numpy
    half-imported (an ImportError later). So, in the command, where SIGINT has Python's default
    handler and this is the main thread, a handler that behaves the same (raises
    KeyboardInterrupt) and also notes the signal is installed for the block, and the default one
    restored after it. If a SIGINT came, the block ends in KeyboardInterrupt: raised after the
    block if it was swallowed, chained to any other exception it caused, and the warnings raised
    inside the block (side effects of the interruption) are dropped; otherwise those warnings are
    shown as usual when the block ends, whether it ends normally or with an error.
    """
    import signal

    try:
        guard = ((started_as_cli() if active is None else active)
                 and threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    except (ValueError, AttributeError):
        guard = False
    if not guard:
        yield
        return
    seen: list[int] = []

    def noted(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    caught: list[warnings.WarningMessage] = []
    signal.signal(signal.SIGINT, noted)
    try:
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            except Exception as exc:
                if seen:
                    raise KeyboardInterrupt from exc
                raise
        if seen:
            raise KeyboardInterrupt
    finally:
        if signal.getsignal(signal.SIGINT) is noted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if not seen:  # no Ctrl-C: the block's warnings, as they would have been shown
            for w in caught:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def exit_if_cli(message: str) -> None:
    """In the ``tbfast`` command only (`started_as_cli`): `exit_interrupted` with ``message``.
    Elsewhere (a library import) it returns and the caller re-raises the KeyboardInterrupt.
    Used where no ``try`` of `tbfast.cli.main` can catch it yet: Ctrl-C while ``import tbfast``
    loads torch (see `import_guard`)."""
    if started_as_cli():
        exit_interrupted(message)
