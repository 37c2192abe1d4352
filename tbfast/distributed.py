"""ESD, power-law fits and metrics on a torch.distributed process group, each rank doing its share.

The analysed layers are assigned to ranks by estimated cost (`layer_cost`: Gram + eigensolve
flops, or measured seconds per size class) with a longest-processing-time-first greedy
(`plan`), so the slowest rank sets the time. Each rank runs the ordinary single-process
pipeline (`tbfast.metrics.esd_fit_metrics`) on its share only; one tensor ``all_gather`` of
fixed-size float64 rows (numbers, plus the status / warning strings as UTF-8 bytes) then gives
every rank the whole table, bit-identical on every rank. Nothing is pickled.

Sharded parameters (FSDP2 ``fully_shard``: DTensor weights) are materialised only on the rank
that analyses the layer: for a 1-D mesh sharded on dim 0 (FSDP2's layout) the shards are sent
to that rank with one ``gather`` per layer, layer by layer in the same global order on every
rank (a collective must be entered by all ranks in the same order); any other DTensor layout
falls back to ``full_tensor()`` on every rank, kept only by the owner. A rank therefore holds
the full weights of the layers it analyses, never the whole model.

An error on one rank (a corrupt tensor it reads, NaN weights in a layer it owns) travels in the
same gather, so every rank raises it instead of waiting forever.

See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .layers import Layer
from .metrics import METRIC_COLUMNS, ESDMetrics, esd_fit_metrics
from .powerlaw import PowerLawFit
from .spectra import Spectra

__all__ = ["active_group", "layer_cost", "plan", "plan_loads", "esd_fit_metrics_distributed",
           "layer_metrics", "is_main_process", "init_from_env", "EIG_FLOP_WEIGHT"]

logger = logging.getLogger(__name__)

#: relative cost of one eigensolver flop against one Gram (GEMM) flop; the eigenvalue-only
#: solvers (tridiagonal reduction) run far below GEMM speed. Calibrated on the 2-core CPU
#: (see BENCHMARKS.md, "Distributed"); override with ``costs=`` for a measured table.
EIG_FLOP_WEIGHT = 6.0

_STR_BYTES = 128  # status / warning bytes per row (longer strings are cut on a UTF-8 boundary)
_FIT_COLUMNS = ("fit_start", "fit_end")  # fit window relative to the layer's first eigenvalue
_NUM = len(METRIC_COLUMNS) + len(_FIT_COLUMNS)
_ROW = _NUM + 2 * _STR_BYTES
_HEADER = 4  # header row: error flag, seconds, message length, class-name length, then bytes

# errors that travel between ranks keep their class when it is one of these (no unpickling)
def _error_classes() -> dict[str, type]:
    from . import checkpoint as ck

    classes = [ValueError, KeyError, TypeError, RuntimeError, FileNotFoundError, ImportError,
               ck.CheckpointError, ck.CheckpointNotFoundError, ck.CorruptCheckpointError,
               ck.UnsupportedDtypeError, ck.EmptyCheckpointError]
    return {c.__name__: c for c in classes}


# ---------------------------------------------------------------------------------------------- groups
def active_group(process_group: Any = None) -> Optional[Any]:
    """The process group to split work over, or None for a single-process run.

    ``process_group=None``: the default group when torch.distributed is initialised with more
    than one rank; a group: that group (None if it has one rank); ``False``: never distributed.
    """
    if process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group was given but torch.distributed is not initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def is_main_process(process_group: Any = None) -> bool:
    """True on rank 0 of the group (and in a single-process run): the rank that prints and writes."""
    group = active_group(process_group)
    return group is None or dist.get_rank(group) == 0


# ---------------------------------------------------------------------------------------------- planning
def layer_cost(layer: Layer, costs: Optional[dict[int, float]] = None) -> float:
    """Estimated cost of one layer's ESD.

    Without ``costs``: flops of the Gram matrices (``2 * k * N * n^2`` for ``k`` matrices of
    ``N x n``, ``n`` the smaller side) plus ``EIG_FLOP_WEIGHT * k * (4/3) n^3`` for the
    eigenvalue-only solve. With ``costs`` (measured seconds per matrix for some Gram sizes
    ``n``, e.g. from ``tbfast bench``'s scale benchmark): ``k * costs[n]`` scaled by the
    ``N / n`` aspect ratio's Gram share, the nearest measured size scaled by ``n^3`` otherwise.
    """
    n = layer.gram_size
    big = max(layer.rows, layer.cols)
    if costs:
        if n in costs:
            base = costs[n]
        else:
            ref_n = min(costs, key=lambda m: abs(math.log(m) - math.log(max(n, 1))))
            base = costs[ref_n] * (n / ref_n) ** 3
        gram_share = 2.0 / (2.0 + EIG_FLOP_WEIGHT * 4.0 / 3.0)
        return layer.k * base * (1.0 + gram_share * (big / n - 1.0))
    return layer.k * (2.0 * big * n * n + EIG_FLOP_WEIGHT * (4.0 / 3.0) * n ** 3)


def plan(layers: Sequence[Layer], world_size: int,
         cost: Callable[[Layer], float] = layer_cost) -> list[int]:
    """Owner rank of every layer: longest-processing-time-first greedy on ``cost``.

    Layers are taken in decreasing cost (ties: layer order) and each goes to the rank with the
    least load so far (ties: lowest rank). Deterministic, so every rank computes the same plan.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    costs = [float(cost(l)) for l in layers]
    order = sorted(range(len(layers)), key=lambda i: (-costs[i], i))
    load = [0.0] * world_size
    owner = [0] * len(layers)
    for i in order:
        r = min(range(world_size), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += costs[i]
    return owner


def plan_loads(layers: Sequence[Layer], owner: Sequence[int], world_size: int,
               cost: Callable[[Layer], float] = layer_cost) -> list[float]:
    """Total estimated cost per rank of a plan (the maximum is the critical path)."""
    load = [0.0] * world_size
    for l, r in zip(layers, owner):
        load[r] += float(cost(l))
    return load


# ---------------------------------------------------------------------------------------------- comms
def _comm_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _signature(layers: Sequence[Layer]) -> int:
    text = "|".join(f"{l.name}:{l.kind}:{l.rows}x{l.cols}x{l.k}" for l in layers)
    return zlib.crc32(text.encode())


def _check_same_layers(layers: Sequence[Layer], group: Any, extra_ok: bool) -> bool:
    """All ranks must see the same layer list; returns whether ``extra_ok`` holds on every rank."""
    ws = dist.get_world_size(group)
    dev = _comm_device(group)
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


# ---------------------------------------------------------------------------------------------- DTensor
def _dtensor_type() -> Optional[type]:
    """DTensor, if its module is loaded (no DTensor can exist otherwise; the import is slow)."""
    import sys

    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def _sharded_weight(layer: Layer) -> Optional[torch.Tensor]:
    DT = _dtensor_type()
    w = getattr(layer.module, "weight", None) if layer.module is not None else None
    if DT is not None and isinstance(w, DT):
        return w
    return None


def _gather_to_owner_ok(w: Any, group: Any) -> bool:
    """Whether ``w`` is laid out as FSDP2 does (1-D mesh over ``group``'s ranks, Shard(0), chunked
    like torch.chunk), so the owner can receive the shards with one ``gather``."""
    from torch.distributed.tensor import Shard

    mesh = w.device_mesh
    if mesh.ndim != 1 or len(w.placements) != 1 or not isinstance(w.placements[0], Shard) \
            or w.placements[0].dim != 0:
        return False
    if dist.get_process_group_ranks(mesh.get_group()) != dist.get_process_group_ranks(group):
        return False
    ws, r = dist.get_world_size(group), dist.get_rank(group)
    rows = w.shape[0]
    c = -(-rows // ws)
    expect = min(c, max(0, rows - r * c))
    local = w.to_local()
    return tuple(local.shape) == (expect, *w.shape[1:])


def _materialise(layers: list[Layer], owner: list[int], group: Any, stats: dict) -> list[Layer]:
    """Replace the loaders of DTensor layers: the owner gets the full weight, the others nothing."""
    sharded = [(i, w) for i, l in enumerate(layers) if (w := _sharded_weight(l)) is not None]
    for l in layers:
        if l.kind == "LoRA" and l.module is not None:
            base = getattr(l.module, "base_layer", l.module)
            if _dtensor_type() is not None and isinstance(getattr(base, "weight", None), _dtensor_type()):
                raise TypeError(f"layer {l.name!r}: LoRA layers with sharded (DTensor) weights are not supported")
    fast = all(_gather_to_owner_ok(w, group) for _, w in sharded)
    fast = _check_same_layers(layers, group, fast)
    if not sharded:
        return layers
    me, ws = dist.get_rank(group), dist.get_world_size(group)
    out = list(layers)
    held = 0
    for i, w in sharded:  # global layer order: the same sequence of collectives on every rank
        with torch.no_grad():
            if fast:
                rows = w.shape[0]
                c = -(-rows // ws)
                local = w.to_local().detach()
                buf = local.new_zeros((c, *w.shape[1:]))
                buf[:local.shape[0]] = local
                dst = dist.get_global_rank(group, owner[i])
                # the owner receives straight into one buffer (no second copy from concatenating)
                whole = local.new_empty((c * ws, *w.shape[1:])) if me == owner[i] else None
                bufs = list(whole.chunk(ws)) if whole is not None else None
                dist.gather(buf, bufs, dst=dst, group=group)
                full = whole[:rows] if whole is not None else None
            else:
                full = w.full_tensor().detach()
        if me != owner[i]:
            del full
            continue
        held += full.untyped_storage().nbytes()
        stats["materialized"].append(layers[i].name)
        out[i] = _full_layer(layers[i], full)
    stats["materialized_bytes"] = held
    return out


def _full_layer(layer: Layer, full: torch.Tensor) -> Layer:
    if layer.kind in ("Conv1d", "Conv2d"):
        def loader(full=full):
            return full.reshape(full.shape[0], full.shape[1], -1).permute(2, 0, 1)
    else:
        def loader(full=full):
            return full.unsqueeze(0)
    return dataclasses.replace(layer, loader=loader)


# ---------------------------------------------------------------------------------------------- pipeline
def _rows(m: ESDMetrics, pl: PowerLawFit, offsets: torch.Tensor) -> np.ndarray:
    L = len(m)
    out = np.zeros((L, _ROW), dtype=np.float64)
    for j, c in enumerate(METRIC_COLUMNS):
        out[:, j] = getattr(m, c).to(torch.float64).numpy()
    first = offsets[:-1].numpy()
    out[:, len(METRIC_COLUMNS)] = pl.starts.cpu().numpy() - first
    out[:, len(METRIC_COLUMNS) + 1] = pl.ends.cpu().numpy() - first
    for i in range(L):
        out[i, _NUM:_NUM + _STR_BYTES] = _encode(m.status[i], _STR_BYTES)
        out[i, _NUM + _STR_BYTES:] = _encode(m.warning[i], _STR_BYTES)
    return out


def _header(error: Optional[BaseException], seconds: float) -> np.ndarray:
    h = np.zeros(_ROW, dtype=np.float64)
    h[1] = seconds
    if error is not None:
        msg = _encode(str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error),
                      _ROW - _HEADER - 64)
        name = _encode(type(error).__name__, 64)
        h[0] = 1
        h[2] = int((msg > 0).sum())
        h[_HEADER:_HEADER + 64] = name
        h[_HEADER + 64:] = msg
    return h


def _raise_remote(headers: np.ndarray, me: int, local_error: Optional[BaseException]) -> None:
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


def esd_fit_metrics_distributed(
    layers: list[Layer], *, group: Any, with_spectra: bool = False, costs: Optional[dict[int, float]] = None,
    on_invalid: str = "raise", **options: Any,
) -> tuple[Optional[Spectra], Optional[PowerLawFit], ESDMetrics]:
    """`tbfast.metrics.esd_fit_metrics` over ``group``: each rank computes its share of ``layers``.

    Returns the full table on every rank. With ``with_spectra`` the eigenvalues (and the fit
    windows) are gathered too, so every rank also gets the full `Spectra` and `PowerLawFit`;
    otherwise those two are None. ``extra["distributed"]`` of the table records this rank's
    share, what it materialised and every rank's compute seconds.
    """
    if on_invalid not in ("raise", "mark"):
        raise ValueError(f"on_invalid must be 'raise' or 'mark', got {on_invalid!r}")
    if not layers:
        raise ValueError("no analysable layer found (nothing matched the layer types, filters and min_evals)")
    ws, me = dist.get_world_size(group), dist.get_rank(group)
    owner = plan(layers, ws, cost=lambda l: layer_cost(l, costs))
    stats: dict[str, Any] = {"rank": me, "world_size": ws, "owner": owner, "materialized": [],
                             "materialized_bytes": 0, "loaded": []}
    layers = _materialise(list(layers), owner, group, stats)
    mine = [i for i in range(len(layers)) if owner[i] == me]
    shares = [[i for i in range(len(layers)) if owner[i] == r] for r in range(ws)]
    width = max(len(s) for s in shares)

    t0 = time.perf_counter()
    error: Optional[BaseException] = None
    rows = np.zeros((0, _ROW))
    local_values: Optional[torch.Tensor] = None
    if mine:
        try:
            watched = [_watched(layers[i], stats) for i in mine]
            sp, pl, m = esd_fit_metrics(watched, on_invalid="mark", **options)
            rows = _rows(m, pl, sp.offsets)
            # absolute units (float64): the ESD may have been computed on a power-of-two scaled copy
            local_values = torch.cat([sp.eigenvalues(i) for i in range(len(sp))]) if len(sp) else None
        except Exception as exc:  # travels to every rank below
            error = exc
    seconds = time.perf_counter() - t0

    dev = _comm_device(group)
    send = np.zeros((1 + width, _ROW), dtype=np.float64)
    send[0] = _header(error, seconds)
    if error is None:
        send[1:1 + len(rows)] = rows
    mine_t = torch.from_numpy(send).to(dev)
    got = [torch.empty_like(mine_t) for _ in range(ws)]
    dist.all_gather(got, mine_t, group=group)
    allrows = torch.stack(got).cpu().numpy()
    _raise_remote(allrows[:, 0], me, error)
    stats["rank_seconds"] = allrows[:, 0, 1].tolist()

    table = np.zeros((len(layers), _ROW))
    for r, share in enumerate(shares):
        table[share] = allrows[r, 1:1 + len(share)]
    m = _metrics_from_rows(layers, table, options.get("fit", "median"), stats)

    spectra = fit = None
    if with_spectra:
        spectra, fit = _gather_spectra(layers, shares, table, local_values, options, group, dev)
    if on_invalid == "raise":
        bad = [n for n, s in zip(m.names, m.status) if s == "weights contain NaN or Inf"]
        if bad:
            raise ValueError(f"weights contain NaN or Inf in layer(s): {', '.join(bad)}")
    logger.info("rank %d/%d: %d of %d layers in %.3f s (slowest rank %.3f s)", me, ws, len(mine), len(layers),
                seconds, max(stats["rank_seconds"]))
    return spectra, fit, m


def _watched(layer: Layer, stats: dict) -> Layer:
    inner = layer.loader

    def loader():
        stats["loaded"].append(layer.name)
        return inner()

    return dataclasses.replace(layer, loader=loader)


def _metrics_from_rows(layers: list[Layer], table: np.ndarray, fit: str, stats: dict) -> ESDMetrics:
    from .powerlaw import canonical_fit

    cols: dict[str, Any] = {}
    for j, c in enumerate(METRIC_COLUMNS):
        v = torch.from_numpy(table[:, j].copy())
        cols[c] = v.to(torch.int64) if c in ("num_evals", "xmin_index") else v
    return ESDMetrics(
        names=[l.name for l in layers], kinds=[l.kind for l in layers], shapes=[l.shape for l in layers],
        blocks=[l.block for l in layers], **cols,
        warning=[_decode(table[i, _NUM + _STR_BYTES:]) for i in range(len(layers))],
        status=[_decode(table[i, _NUM:_NUM + _STR_BYTES]) for i in range(len(layers))],
        fit=canonical_fit(fit), extra={"eig_failed": False, "distributed": stats},
    )


def _gather_spectra(layers: list[Layer], shares: list[list[int]], table: np.ndarray,
                    local_values: Optional[torch.Tensor], options: dict, group: Any,
                    dev: torch.device) -> tuple[Spectra, PowerLawFit]:
    dtype = torch.float64  # gathered in absolute units (see esd_fit_metrics_distributed)
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
    fit = PowerLawFit(alpha=col["alpha"], D=col["D"], xmin=col["xmin"],
                      xmin_index=col["xmin_index"].to(torch.int64),
                      starts=first + torch.from_numpy(table[:, nm].copy()).to(torch.int64),
                      ends=first + torch.from_numpy(table[:, nm + 1].copy()).to(torch.int64),
                      fit=options.get("fit", "median"))
    return Spectra(values=values, offsets=torch.from_numpy(offsets), layers=layers), fit


def layer_metrics(source: Any, *, group: Any, fit: str = "median", xmin_pos: float = 2.0,
                  filter_zeros: bool = False, evals_thresh: float = 1e-5, bins: int = 100,
                  xmin_bound: str = "reference", sr_mid_pos: Optional[float] = None, method: str = "auto",
                  dtype: torch.dtype = torch.float32, backend: str = "auto", on_invalid: str = "raise",
                  costs: Optional[dict[int, float]] = None, **layer_options: Any) -> ESDMetrics:
    """`tbfast.layer_metrics` of a model (plain, DDP-wrapped or FSDP2-sharded) over ``group``."""
    from .spectra import resolve_layers

    esd_keys = ("device", "memory_budget", "progress", "eig_backend", "allow_tf32")
    esd_opts = {k: layer_options.pop(k) for k in esd_keys if k in layer_options}
    if _fsdp1_units(source):
        layers = _fsdp1_layers(source, group, costs, **layer_options)
    else:
        layers = resolve_layers(source, **layer_options)
    return esd_fit_metrics_distributed(
        layers, group=group, costs=costs, on_invalid=on_invalid, fit=fit, xmin_pos=xmin_pos,
        filter_zeros=filter_zeros, evals_thresh=evals_thresh, bins=bins, xmin_bound=xmin_bound,
        sr_mid_pos=sr_mid_pos, method=method, dtype=dtype, backend=backend, **esd_opts)[2]


def init_from_env(device: Optional[str] = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1).

    Backend: NCCL when ``device`` is a CUDA device (each rank on ``cuda:LOCAL_RANK``), gloo
    otherwise. Returns True when this call initialised it (the caller then destroys it).
    """
    import os

    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


# ---------------------------------------------------------------------------------------------- FSDP1
def _fsdp1_units(model: Any) -> list:
    """FSDP1 (``FullyShardedDataParallel``) units of ``model`` in module order; [] if none."""
    if not isinstance(model, torch.nn.Module):
        return []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDP)]


def _weight_shape(module: torch.nn.Module, kind: str) -> tuple[int, ...]:
    if kind == "Linear":
        return (module.out_features, module.in_features)
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def _fsdp1_layers(model: torch.nn.Module, group: Any, costs: Optional[dict[int, float]], *,
                  types: Any = None, conv_norm: float = 0.5, include: Optional[str] = None,
                  exclude: Optional[str] = None, min_evals: int = 0, **unsupported: Any) -> list[Layer]:
    """Layers of an FSDP1 model (``use_orig_params=True``): shapes from the modules' attributes,
    full weights only on the owning rank, gathered one FSDP unit at a time with
    ``summon_full_params(unit, recurse=False, writeback=False)``."""
    import re

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from .layers import block_index

    if unsupported:
        raise TypeError(f"options {sorted(unsupported)} are not supported for FSDP1 models")
    wanted = set(types) if types is not None else {"Linear", "Conv1d", "Conv2d"}
    classes = {"Linear": torch.nn.Linear, "Conv1d": torch.nn.Conv1d, "Conv2d": torch.nn.Conv2d}
    inc, exc = (re.compile(include) if include else None), (re.compile(exclude) if exclude else None)
    unit_of: dict[int, Any] = {}

    def walk(module: torch.nn.Module, unit: Any) -> None:
        for child in module.children():
            walk(child, child if isinstance(child, FSDP) else unit)
        unit_of[id(module)] = unit

    walk(model, model if isinstance(model, FSDP) else None)
    layers: list[Layer] = []
    for index, (name, module) in enumerate(model.named_modules()):
        kind = next((k for k, c in classes.items() if k in wanted and isinstance(module, c)), None)
        if kind is None or (inc is not None and not inc.search(name)) or (exc is not None and exc.search(name)):
            continue
        shape = _weight_shape(module, kind)
        k = int(math.prod(shape[2:])) if len(shape) > 2 else 1
        layer = Layer(name=name, kind=kind, shape=shape, rows=shape[0], cols=shape[1], k=k,
                      scale=math.sqrt(conv_norm) if kind != "Linear" else 1.0, block=block_index(name),
                      index=index, loader=None, module=module)
        if layer.num_evals >= min_evals:
            layers.append(layer)
    owner = plan(layers, dist.get_world_size(group), cost=lambda l: layer_cost(l, costs))
    me = dist.get_rank(group)
    error: Optional[BaseException] = None
    by_unit: dict[int, list[int]] = {}
    for i, l in enumerate(layers):
        u = unit_of.get(id(l.module))
        if u is None:
            raise TypeError(f"layer {l.name!r} is not inside an FSDP unit")
        by_unit.setdefault(id(u), []).append(i)
    for u, unit in enumerate(_fsdp1_units(model)):  # module order: the same collectives on every rank
        idx = by_unit.get(id(unit), [])
        if not idx and u > 0:  # the outermost unit goes first even without layers: it must be the root
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False), torch.no_grad():
            for i in idx:
                w = layers[i].module.weight
                if owner[i] != me or error is not None:
                    continue
                if tuple(w.shape) != layers[i].shape:  # kept until every rank is past its collectives
                    error = ValueError(f"layer {layers[i].name!r}: full weight has shape {tuple(w.shape)}, "
                                       f"expected {layers[i].shape} (FSDP1 needs use_orig_params=True)")
                    continue
                layers[i] = _full_layer(layers[i], w.detach().clone())
    _sync_error(error, group)
    return layers


def _sync_error(error: Optional[BaseException], group: Any) -> None:
    """Raise on every rank if ``error`` is set on any rank (one small all_gather)."""
    h = torch.from_numpy(_header(error, 0.0)).to(_comm_device(group))
    got = [torch.empty_like(h) for _ in range(dist.get_world_size(group))]
    dist.all_gather(got, h, group=group)
    _raise_remote(torch.stack(got).cpu().numpy(), dist.get_rank(group), error)
