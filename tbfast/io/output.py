"""Output files that never destroy an input and are never left half-written.

`write_output(path, data, inputs=...)` is how tbfast writes a file the user asked for (the
``--csv`` table, each plot), by what is at ``path`` now:

- ``"-"``: standard output;
- nothing: a new file, written to a temporary file in the same directory and renamed over
  ``path`` (``os.replace``), so it appears complete or not at all; its mode is the umask's
  default (``0o666 & ~umask``, as ``open(path, "w")`` gives);
- a regular file: replaced the same way, keeping its mode (a 600 file stays 600);
- a regular file with other hard links: written **in place** (the bytes are prepared first,
  then the file is truncated and written), so every link still names the new content; an atomic
  rename would detach this name from the others;
- a symlink: the target is written by these rules, the link stays;
- a FIFO, a character or block device (``/dev/null``, a terminal): written through, never
  replaced; a FIFO without a reader is refused (opening it would block);
- ``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N``, ``/proc/self/fd/N``: written to that file
  descriptor of this process (not reopened, which would truncate a redirected file);
- a directory: refused.

Refusals are `OutputRefusedError` (a ValueError; ``tbfast analyze`` exits 2). A path that is,
through any symlink or hard link, one of the files the run reads (``inputs``: ``(st_dev, st_ino)``
pairs from `file_ids`) is always refused: the output would overwrite the input.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Union

from ..errors import TbfastError

__all__ = ["OutputRefusedError", "FileId", "STDOUT", "file_ids", "check_output", "write_output", "output_dir"]

FileId = tuple[int, int]  # (st_dev, st_ino)
Content = Union[bytes, Callable[[BinaryIO], None]]
STDOUT = "-"
_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$")
_STD_NAMES = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


class OutputRefusedError(TbfastError, ValueError):
    """An output path tbfast will not write: an input of the run, a directory, a FIFO with no reader."""


def _shown(path: str | os.PathLike) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_ids(paths: Iterable[str | os.PathLike]) -> frozenset[FileId]:
    """``(st_dev, st_ino)`` of each existing path (symlinks followed); missing paths are skipped."""
    out = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return frozenset(out)


def _fd_of(path: str) -> int | None:
    """The file descriptor a ``/dev/stdout``-style path names, else None."""
    p = os.path.normpath(path)
    if p in _STD_NAMES:
        return _STD_NAMES[p]
    m = _FD_PATH.match(p)
    return int(m.group(1)) if m else None


def check_output(path: str | os.PathLike, inputs: Iterable[FileId] = (), *, what: str = "output") -> None:
    """Refuse (`OutputRefusedError`, one line naming ``what`` and ``path``) an output path that
    is one of ``inputs`` (through any link) or a directory. A missing path passes."""
    if os.fspath(path) == STDOUT:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputRefusedError(f"{what} {_shown(path)}: cannot check it ({e.strerror or e})") from None
    if (st.st_dev, st.st_ino) in set(inputs):
        link = " (a link to it)" if os.path.islink(path) or st.st_nlink > 1 else ""
        raise OutputRefusedError(f"{what} {_shown(path)} is a file this run reads{link}; refusing to overwrite "
                                 f"it (choose another name)")
    if stat.S_ISDIR(st.st_mode):
        raise OutputRefusedError(f"{what} {_shown(path)} is a directory; give a file name")


def _bytes(data: Content) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    buf = io.BytesIO()
    data(buf)
    return buf.getvalue()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_fd(fd: int, data: bytes) -> None:
    """Write to an open descriptor of this process (stdout through Python's buffer, in order)."""
    stream = {1: sys.stdout, 2: sys.stderr}.get(fd)
    if stream is None:
        _write_all(fd, data)
        return
    stream.flush()
    if hasattr(stream, "buffer"):
        stream.buffer.write(data)
    else:  # a text-only replacement (io.StringIO and the like)
        stream.write(data.decode("utf-8", "surrogateescape"))
    stream.flush()


def _replace(target: str, data: bytes, mode: int | None, owner: tuple[int, int] | None) -> None:
    """Write ``target`` through a temporary file in its directory and ``os.replace``."""
    d = os.path.dirname(target) or "."
    base = os.path.basename(target)
    for attempt in range(100):
        tmp = os.path.join(d, f".{base}.{os.getpid()}.{attempt}.tmp")
        try:  # mode 0o666: the kernel applies the umask, as for any new file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover
        raise OSError(errno.EEXIST, f"no free temporary name next to {_shown(target)}")
    try:
        try:
            if owner is not None:
                try:
                    os.fchown(fd, *owner)
                except OSError:
                    pass  # not ours to give away: the new file keeps our ownership
            if mode is not None:
                os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_output(path: str | os.PathLike, data: Content, inputs: Iterable[FileId] = (), *,
                 what: str = "output") -> str:
    """Write ``data`` (bytes, or a function that writes to a binary file) to ``path`` by the
    rules of the module doc; never over one of ``inputs``. Returns how it was written:
    ``"stdout"``, ``"created"``, ``"replaced"``, ``"in place"`` (hard-linked file) or
    ``"through"`` (FIFO, device, descriptor)."""
    name = os.fspath(path)
    content = _bytes(data)  # prepared before anything at ``path`` is touched
    if name == STDOUT:
        _write_fd(1, content)
        return "stdout"
    fd = _fd_of(name)
    if fd is not None:
        _write_fd(fd, content)
        return "through"
    check_output(name, inputs, what=what)
    target = os.path.realpath(name) if os.path.islink(name) else name  # a link's target is written
    try:
        st = os.stat(name)
    except FileNotFoundError:  # nothing there (or a dangling link: its target is created)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        _replace(target, content, None, None)
        return "created"
    if stat.S_ISREG(st.st_mode):
        if st.st_nlink > 1:
            out = os.open(target, os.O_WRONLY | os.O_TRUNC)
            try:
                _write_all(out, content)
                os.fsync(out)
            finally:
                os.close(out)
            return "in place"
        _replace(target, content, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))
        return "replaced"
    if stat.S_ISFIFO(st.st_mode):
        try:
            out = os.open(name, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise OutputRefusedError(f"{what} {_shown(path)} is a FIFO with no reader; refusing to wait "
                                         f"for one") from None
            raise
        fcntl.fcntl(out, fcntl.F_SETFL, fcntl.fcntl(out, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        out = os.open(name, os.O_WRONLY)
    else:
        raise OutputRefusedError(f"{what} {_shown(path)} is not a file tbfast can write (a socket?)")
    try:
        _write_all(out, content)
    finally:
        os.close(out)
    return "through"


def output_dir(path: str | os.PathLike, *, what: str = "output directory") -> Path:
    """``path`` as a directory to write into, created if missing (a symlink to a directory is
    followed); anything else at ``path`` is refused."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputRefusedError(f"{what} {_shown(p)} exists and is not a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p
