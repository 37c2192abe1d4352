"""File checks shared by the checkpoint readers: what a path really is, and names the readers can open.

- `regular_file`: a path that must be a readable regular file (after following symlinks);
  a FIFO, socket or device is refused with what it is (``not a regular file: FIFO``), checked
  with ``os.stat`` before anything is opened, so a FIFO never blocks the reader;
- `openable_name`: a name for the file that native readers (safetensors' Rust reader, torch's
  C++ zip reader) accept even when the file name is not valid UTF-8 (Python keeps such bytes as
  surrogate escapes, which those readers refuse): the file is opened by its bytes name and
  read through ``/proc/self/fd/N``;
- `shown`: a path as text that prints everywhere (undecodable bytes as ``\\xNN``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["regular_file", "file_kind", "openable_name", "shown"]

_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"))


def shown(path: str | os.PathLike) -> str:
    """``path`` as printable text: bytes that are not UTF-8 appear as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words (``regular file``, ``FIFO (named pipe)``, ...)."""
    if stat.S_ISREG(mode):
        return "regular file"
    return next((name for test, name in _KINDS if test(mode)), "special file")


def regular_file(path: str | os.PathLike, what: str = "checkpoint file") -> Path:
    """``path`` if it is (through symlinks) a regular file; else `CheckpointNotFoundError`
    (missing, or a dangling link) or `CorruptCheckpointError` naming what it is instead."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        dangling = os.path.islink(p)
        raise CheckpointNotFoundError(f"{what} not found: {shown(p)}"
                                      + (" (a symlink whose target does not exist)" if dangling else "")) from None
    except OSError as e:
        raise CorruptCheckpointError(f"{shown(p)}: cannot read the {what} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        link = f" (through a symlink to {shown(os.path.realpath(p))})" if os.path.islink(p) else ""
        raise CorruptCheckpointError(f"{shown(p)}: not a regular file: {file_kind(st.st_mode)}{link}; "
                                     f"a {what} must be a regular file")
    return p


@contextlib.contextmanager
def openable_name(path: str | os.PathLike) -> Iterator[str]:
    """A name native readers can open for ``path``: the path itself when it is valid UTF-8,
    else ``/proc/self/fd/N`` (or ``/dev/fd/N``) of the file opened by its bytes name, valid
    while the context is open (readers that memory-map the file keep it mapped afterwards)."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield name
        return
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    if not os.path.isdir(fd_dir):
        raise CorruptCheckpointError(f"{shown(path)}: the file name is not valid UTF-8 and this system has no "
                                     f"/proc/self/fd to open it by; rename the file")
    fd = os.open(os.fsencode(name), os.O_RDONLY)
    try:
        yield f"{fd_dir}/{fd}"
    finally:
        os.close(fd)
