"""The table's trip between ranks: fixed-size float64 rows (numbers, plus the status / warning
strings as UTF-8 bytes) and an error header per rank, exchanged with one tensor ``all_gather``.
Nothing is pickled; an error on one rank reaches every rank with its class when that is a known
one (`_error_classes`), so no rank waits forever."""

from __future__ import annotations

import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import errors
from ..layers import Layer
from ..metrics import METRIC_COLUMNS, ESDMetrics
from ..powerlaw import PowerLawFit
from ..spectra import Spectra

__all__ = ["comm_device", "check_same_layers", "encode_rows", "header", "gather_rows", "raise_remote",
           "sync_error", "metrics_from_rows", "gather_spectra", "ROW"]

_STR_BYTES = 128  # status / warning bytes per row (longer strings are cut on a UTF-8 boundary)
_FIT_COLUMNS = ("fit_start", "fit_end")  # fit window relative to the layer's first eigenvalue
_NUM = len(METRIC_COLUMNS) + len(_FIT_COLUMNS)
ROW = _NUM + 2 * _STR_BYTES
_HEADER = 4  # header row: error flag, seconds, message length, class-name length, then bytes


# errors that travel between ranks keep their class when it is one of these (no unpickling)
def _error_classes() -> dict[str, type]:
    classes = [ValueError, KeyError, TypeError, RuntimeError, FileNotFoundError, ImportError,
               errors.CheckpointError, errors.CheckpointNotFoundError, errors.CorruptCheckpointError,
               errors.UnsupportedDtypeError, errors.EmptyCheckpointError, errors.NoLayersError,
               errors.BackendUnavailableError]
    return {c.__name__: c for c in classes}


def comm_device(group: Any) -> torch.device:
    """Where the group's collectives take their tensors (CUDA for NCCL, else the CPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _signature(layers: Sequence[Layer]) -> int:
    text = "|".join(f"{l.name}:{l.kind}:{l.rows}x{l.cols}x{l.k}" for l in layers)
    return zlib.crc32(text.encode())


def check_same_layers(layers: Sequence[Layer], group: Any, extra_ok: bool) -> bool:
    """All ranks must see the same layer list; returns whether ``extra_ok`` holds on every rank."""
    ws = dist.get_world_size(group)
    dev = comm_device(group)
    mine = torch.tensor([_signature(layers), len(layers), int(extra_ok)], dtype=torch.int64, device=dev)
    allv = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(allv, mine, group=group)
    got = torch.stack(allv).cpu()
    if not bool((got[:, :2] == got[0, :2]).all()):
        raise RuntimeError(
            "ranks see different layer lists (number of layers per rank: "
            f"{got[:, 1].tolist()}): every rank must analyse the same model / checkpoint with the same options")
    return bool(got[:, 2].all())


def _encode(text: str, n: int) -> np.ndarray:
    b = text.encode("utf-8")[:n]
    b = b.decode("utf-8", errors="ignore").encode("utf-8")
    out = np.zeros(n, dtype=np.float64)
    out[:len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def _decode(row: np.ndarray) -> str:
    b = row.astype(np.uint8).tobytes().rstrip(b"\0")
    return b.decode("utf-8", errors="replace")


def encode_rows(m: ESDMetrics, pl: PowerLawFit, offsets: torch.Tensor) -> np.ndarray:
    """One float64 row of width `ROW` per layer of ``m``: metrics, fit window, status, warning."""
    L = len(m)
    out = np.zeros((L, ROW), dtype=np.float64)
    for j, c in enumerate(METRIC_COLUMNS):
        out[:, j] = getattr(m, c).to(torch.float64).numpy()
    first = offsets[:-1].numpy()
    out[:, len(METRIC_COLUMNS)] = pl.starts.cpu().numpy() - first
    out[:, len(METRIC_COLUMNS) + 1] = pl.ends.cpu().numpy() - first
    for i in range(L):
        out[i, _NUM:_NUM + _STR_BYTES] = _encode(m.status[i], _STR_BYTES)
        out[i, _NUM + _STR_BYTES:] = _encode(m.warning[i], _STR_BYTES)
    return out


def header(error: Optional[BaseException], seconds: float) -> np.ndarray:
    """A rank's header row: its compute seconds and its error (class name and message), if any."""
    h = np.zeros(ROW, dtype=np.float64)
    h[1] = seconds
    if error is not None:
        msg = _encode(str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error),
                      ROW - _HEADER - 64)
        name = _encode(type(error).__name__, 64)
        h[0] = 1
        h[2] = int((msg > 0).sum())
        h[_HEADER:_HEADER + 64] = name
        h[_HEADER + 64:] = msg
    return h


def raise_remote(headers: np.ndarray, me: int, local_error: Optional[BaseException]) -> None:
    """Raise this rank's error, else the first failed rank's, if any rank failed."""
    failed = [r for r in range(len(headers)) if headers[r, 0]]
    if not failed:
        return
    if local_error is not None:
        raise local_error
    r = failed[0]
    name = _decode(headers[r, _HEADER:_HEADER + 64])
    msg = _decode(headers[r, _HEADER + 64:])
    cls = _error_classes().get(name, RuntimeError)
    raise cls(f"{msg} (on rank {r})")


def gather_rows(error: Optional[BaseException], seconds: float, rows: np.ndarray, width: int,
                group: Any) -> np.ndarray:
    """Every rank's header and rows (padded to ``width``), ``(world, 1 + width, ROW)``; raises
    on every rank if any rank sent an error."""
    send = np.zeros((1 + width, ROW), dtype=np.float64)
    send[0] = header(error, seconds)
    if error is None:
        send[1:1 + len(rows)] = rows
    mine = torch.from_numpy(send).to(comm_device(group))
    got = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, mine, group=group)
    allrows = torch.stack(got).cpu().numpy()
    raise_remote(allrows[:, 0], dist.get_rank(group), error)
    return allrows


def sync_error(error: Optional[BaseException], group: Any) -> None:
    """Raise on every rank if ``error`` is set on any rank (one small all_gather)."""
    h = torch.from_numpy(header(error, 0.0)).to(comm_device(group))
    got = [torch.empty_like(h) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, h, group=group)
    raise_remote(torch.stack(got).cpu().numpy(), dist.get_rank(group), error)


def metrics_from_rows(layers: list[Layer], table: np.ndarray, fit: str, stats: dict) -> ESDMetrics:
    """The `ESDMetrics` of ``layers`` from their gathered rows (``fit``: the canonical fit name)."""
    cols: dict[str, Any] = {}
    for j, c in enumerate(METRIC_COLUMNS):
        v = torch.from_numpy(table[:, j].copy())
        cols[c] = v.to(torch.int64) if c in ("num_evals", "xmin_index") else v
    return ESDMetrics(
        names=[l.name for l in layers], kinds=[l.kind for l in layers], shapes=[l.shape for l in layers],
        blocks=[l.block for l in layers], **cols,
        warning=[_decode(table[i, _NUM + _STR_BYTES:]) for i in range(len(layers))],
        status=[_decode(table[i, _NUM:_NUM + _STR_BYTES]) for i in range(len(layers))],
        fit=fit, extra={"eig_failed": False, "distributed": stats},
    )


def gather_spectra(layers: list[Layer], shares: list[list[int]], table: np.ndarray,
                   local_values: Optional[torch.Tensor], fit: str, group: Any) -> tuple[Spectra, PowerLawFit]:
    """The full `Spectra` (float64, absolute units) and `PowerLawFit` on every rank from each
    rank's eigenvalues and the gathered rows."""
    dev = comm_device(group)
    dtype = torch.float64  # gathered in absolute units (see tbfast.distributed.run)
    counts = np.array([l.num_evals for l in layers], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    per_rank = [int(counts[s].sum()) for s in shares]
    width = max(per_rank)
    buf = torch.zeros(width, dtype=dtype, device=dev)
    if local_values is not None:
        buf[:local_values.numel()] = local_values.to(dev, dtype)
    got = [torch.empty_like(buf) for _ in shares]
    dist.all_gather(got, buf, group=group)
    values = torch.empty(int(offsets[-1]), dtype=dtype, device=dev)
    for r, share in enumerate(shares):
        pos = 0
        for i in share:
            values[offsets[i]:offsets[i + 1]] = got[r][pos:pos + counts[i]]
            pos += int(counts[i])
    first = torch.from_numpy(offsets[:-1].copy())
    nm = len(METRIC_COLUMNS)
    col = {c: torch.from_numpy(table[:, j].copy()) for j, c in enumerate(METRIC_COLUMNS)}
    pl = PowerLawFit(alpha=col["alpha"], D=col["D"], xmin=col["xmin"],
                     xmin_index=col["xmin_index"].to(torch.int64),
                     starts=first + torch.from_numpy(table[:, nm].copy()).to(torch.int64),
                     ends=first + torch.from_numpy(table[:, nm + 1].copy()).to(torch.int64),
                     fit=fit)
    return Spectra(values=values, offsets=torch.from_numpy(offsets), layers=layers), pl
