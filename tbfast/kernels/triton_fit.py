"""Triton kernels for the power-law fits of a ragged batch of ESDs (GPU fast path).

Two ops with the signatures of the compiled ops in docs/ARCHITECTURE.md:

- :func:`hill_fit_triton` (SPEC section 3, the "median" fit): one program per layer; each
  program loops over its tail in blocks, first summing ``ln x`` in float64, then taking
  ``D = max_j |1 - (x_j / x_i)^(1 - alpha) - j / n|``.
- :func:`ks_scan_triton` (SPEC sections 4-5, the KS / fix-finger scan): every xmin candidate of
  every layer in parallel. Work items are (layer, block of ``block_i`` candidates); a program
  computes each candidate's suffix sum of ``ln x`` (sum of the tail beyond its block, plus a
  triangular sum inside the block), ``alpha_i``, then ``D_i`` over 2-D tiles of
  (candidate, tail element) looping over the tail. A second small kernel takes the segmented
  first argmin of ``D_i`` per layer.

Precision (decided here): everything after loading the eigenvalues runs in float64: the logs,
their sums, ``alpha``, and the per-element ``exp((1 - alpha)(ln x_j - ln x_i))`` of ``D``
(Triton's NVIDIA backend sends float64 ``exp``/``log`` to libdevice ``__nv_exp``/``__nv_log``
rather than the fp32 approximations; tests/test_triton_kernels.py checks 1e-9 agreement on the
GPU). float32 eigenvalues are upcast on load. fp64 throughput is ample for these sizes (72 layers
x 768 candidates x 768 tail is ~21M exps), and under the interpreter ``D`` agrees with a float64
loop to ~1e-16, so the argmin agrees with it except on near-ties. ``(x_j/x_i)^(1-alpha)`` is
computed as ``exp((1 - alpha)(ln x_j - ln x_i))`` with the term forced to 1 where
``ln x_j == ln x_i`` (ties), as ``pow(1, -inf) == 1`` in the reference when ``alpha`` is inf.

Semantics (ragged batch, ARCHITECTURE.md): ``values`` 1-D, ascending per layer; layer ``l`` is
``values[starts[l]:ends[l]]``; segments must be disjoint (the ragged convention), which bounds
the number of candidate blocks by ``values.numel() / block_i + L`` without a host sync.
Indices are relative to ``starts``. Outputs are float64 ``alpha``, ``D`` and int64 ``index`` of
length L on ``values``' device; ``N < 2`` (and, for the Hill fit, ``i >= N``) gives NaN, NaN, -1,
and so does a layer holding a NaN (the NaN policy of tbfast/ops/fit.py).
In the KS scan a candidate is visited when ``lo <= x_i <= hi`` (values ascending, so "skip
``x_i < lo``, stop at the first ``x_i > hi``" is the same set); unvisited candidates keep
alpha 0 and D 1; a visited one gets D 1 unless ``alpha_i > 1`` (NaN alpha counts as not > 1).
A zero eigenvalue gives ``alpha = NaN`` as in the reference; the Hill fit then reports D NaN.

No Python loop over layers or candidates and no host synchronisation: the functions return
device tensors; the caller synchronises once. triton is imported and the kernels wrapped on
first use only, so importing this module (or asking :func:`triton_available`) never imports
triton. For CPU tests, ``TRITON_INTERPRET=1`` must be set before triton is first imported in the
process (triton.language reads it at import).

Metrics (segment sums of e, e^alpha, ...) have no Triton kernel here: batched torch segment ops
do that work in tbfast.metrics.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import re

import torch

# triton is optional and imported on first use (_kernels); the kernel bodies below resolve
# these module globals when triton compiles or interprets them.
triton = None
tl = None

__all__ = ["triton_available", "version_problem", "hill_fit_triton", "ks_scan_triton"]

HILL_BLOCK = 1024
KS_BLOCK_I = 16
KS_BLOCK_J = 128
ARGMIN_BLOCK = 256


#: Oldest triton the fit kernels are supported on: tests/test_triton_kernels.py passes on triton
#: 3.2 and later (interpreter, CPU); under triton 3.0 and 3.1 (pinned by torch 2.4 and 2.5) the
#: kernels fail there (docs/install-checks/triton_versions.md).
MIN_TRITON = (3, 2)
#: Under TRITON_INTERPRET=1, triton before 3.7 converts 1-element arrays with int(), which
#: numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars").
INTERPRET_NUMPY24_TRITON = (3, 7)


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"3.0.0+git1a2b"`` -> ``(3, 0, 0)`` (leading numeric fields only)."""
    parts = []
    for field in version.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d+", field)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_version() -> str | None:
    """The installed triton's version (package metadata; triton is not imported), or None."""
    return _dist_version("triton")


def version_problem(version: str | None = None) -> str | None:
    """Why triton ``version`` (default: the installed one) cannot run the fit kernels, or None."""
    version = installed_version() if version is None else version
    if version is None:
        return None
    if _version_tuple(version) < MIN_TRITON:
        need = ".".join(map(str, MIN_TRITON))
        return f"triton {version} is older than triton {need}, the oldest the Triton fit kernels support"
    if _interpreting() and _version_tuple(version) < INTERPRET_NUMPY24_TRITON:
        numpy = _dist_version("numpy")
        if numpy is not None and _version_tuple(numpy) >= (2, 4):
            return (f"the interpreter of triton {version} fails under numpy {numpy} (needs numpy < 2.4 "
                    f"or triton >= {'.'.join(map(str, INTERPRET_NUMPY24_TRITON))}; TRITON_INTERPRET=1)")
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> tuple[bool, str]:
    """Whether the Triton fit kernels can run here, and why (for ``backend_info``).

    True on a CUDA machine with a supported triton (>= :data:`MIN_TRITON`) importable, or under
    ``TRITON_INTERPRET=1`` (CPU tensors, for tests).
    """
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    version = installed_version() or "?"
    problem = version_problem(version) if version != "?" else None
    if problem is not None:
        return False, problem
    if _interpreting():
        return True, f"triton {version} interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, f"triton {version} installed but no CUDA device"
    return True, f"triton {version} on CUDA"


# --------------------------------------------------------------------------- kernels
# Plain functions, wrapped with triton.jit on first use (see _kernels()).


def _hill_kernel(x_ptr, starts_ptr, ends_ptr, i_ptr, alpha_ptr, d_ptr, index_ptr,
                 BLOCK: tl.constexpr):
    layer = tl.program_id(0)
    start = tl.load(starts_ptr + layer)
    end = tl.load(ends_ptr + layer)
    i = tl.load(i_ptr + layer)
    size = end - start
    ok = (size >= 2) & (i < size) & (i >= 0)
    base = start + i
    stop = tl.where(ok, end, base)  # an empty loop for rejected layers
    n = (end - base).to(tl.float64)
    lxmin = tl.log(tl.load(x_ptr + base, mask=ok, other=1.0).to(tl.float64))

    # NaN policy: a layer holding a NaN (head or tail) gets NaN, NaN, -1
    nans = tl.zeros([BLOCK], dtype=tl.int32)
    head_stop = tl.where(ok, base, start)
    for t0 in range(start, head_stop, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + t, mask=t < head_stop, other=1.0)
        nans += (v != v).to(tl.int32)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for t0 in range(base, stop, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        m = t < stop
        v = tl.load(x_ptr + t, mask=m, other=1.0).to(tl.float64)
        nans += (v != v).to(tl.int32)
        acc += tl.where(m, tl.log(v), 0.0)
    alpha = 1.0 + n / (tl.sum(acc, axis=0) - n * lxmin)
    ok = ok & (tl.sum(nans, axis=0) == 0)

    inv_n = 1.0 / n
    dmax = tl.zeros([BLOCK], dtype=tl.float64)
    for t0 in range(base, stop, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        m = t < stop
        diff = tl.log(tl.load(x_ptr + t, mask=m, other=1.0).to(tl.float64)) - lxmin
        p = tl.where(diff == 0.0, 1.0, tl.exp((1.0 - alpha) * diff))
        dev = tl.abs(1.0 - p - (t - base).to(tl.float64) * inv_n)
        dmax = tl.maximum(dmax, tl.where(m, dev, 0.0))
    d = tl.max(dmax, axis=0)

    nan = float("nan")
    d = tl.where(alpha == alpha, d, nan)  # NaN alpha (zero xmin) -> NaN D, as the reference
    tl.store(alpha_ptr + layer, tl.where(ok, alpha, nan))
    tl.store(d_ptr + layer, tl.where(ok, d, nan))
    tl.store(index_ptr + layer, tl.where(ok, i, -1))


def _ks_candidates_kernel(x_ptr, lx_ptr, starts_ptr, ends_ptr, lo_ptr, hi_ptr,
                          prog_layer_ptr, blk_begin_ptr, alpha_c_ptr, d_c_ptr, num_layers,
                          BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(prog_layer_ptr + pid)
    if layer < num_layers:  # spare programs (the grid is an upper bound) do nothing
        start = tl.load(starts_ptr + layer)
        end = tl.load(ends_ptr + layer)
        lo = tl.load(lo_ptr + layer)
        hi = tl.load(hi_ptr + layer)
        size = end - start
        c0 = (pid - tl.load(blk_begin_ptr + layer)) * BLOCK_I  # first candidate, relative
        rows = tl.arange(0, BLOCK_I)
        ci = c0 + rows
        is_cand = ci < size - 1  # candidates are i = 0 .. N-2
        pos = start + ci
        in_layer = ci < size
        x_i = tl.load(x_ptr + pos, mask=is_cand, other=0.0).to(tl.float64)
        lx_blk = tl.load(lx_ptr + pos, mask=in_layer, other=0.0)

        # suffix sum of ln x: tail beyond this block + triangular sum inside the block
        acc = tl.zeros([BLOCK_J], dtype=tl.float64)
        for t0 in range(start + c0 + BLOCK_I, end, BLOCK_J):
            t = t0 + tl.arange(0, BLOCK_J)
            m = t < end
            acc += tl.load(lx_ptr + t, mask=m, other=0.0)
        upper = rows[None, :] >= rows[:, None]
        s = tl.sum(tl.where(upper, lx_blk[None, :], 0.0), axis=1) + tl.sum(acc, axis=0)

        n = (size - ci).to(tl.float64)
        alpha = 1.0 + n / (s - n * lx_blk)
        visited = is_cand & (x_i >= lo) & (x_i <= hi)
        active = visited & (alpha > 1.0)

        # D_i = max over the tail j >= i of |1 - exp((1 - alpha_i)(ln x_j - ln x_i)) - (j-i)/n_i|
        any_active = tl.max(active.to(tl.int32), axis=0)
        stop = tl.where(any_active > 0, end, start + c0)
        neg_slope = 1.0 - alpha
        inv_n = 1.0 / n
        dmax = tl.zeros([BLOCK_I], dtype=tl.float64)
        for t0 in range(start + c0, stop, BLOCK_J):
            t = t0 + tl.arange(0, BLOCK_J)
            lx_t = tl.load(lx_ptr + t, mask=t < end, other=0.0)
            diff = lx_t[None, :] - lx_blk[:, None]
            p = tl.where(diff == 0.0, 1.0, tl.exp(neg_slope[:, None] * diff))
            j = (t[None, :] - pos[:, None]).to(tl.float64)
            dev = tl.abs(1.0 - p - j * inv_n[:, None])
            m = (t[None, :] >= pos[:, None]) & (t[None, :] < end)
            dmax = tl.maximum(dmax, tl.max(tl.where(m, dev, 0.0), axis=1))

        tl.store(alpha_c_ptr + pos, tl.where(visited, alpha, 0.0), mask=is_cand)
        tl.store(d_c_ptr + pos, tl.where(active, dmax, 1.0), mask=is_cand)


def _ks_argmin_kernel(x_ptr, starts_ptr, ends_ptr, alpha_c_ptr, d_c_ptr, alpha_ptr, d_ptr, index_ptr,
                      BLOCK: tl.constexpr):
    layer = tl.program_id(0)
    start = tl.load(starts_ptr + layer)
    end = tl.load(ends_ptr + layer)
    num_cand = end - start - 1
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    big = 9223372036854775807
    best_d = tl.full([BLOCK], float("inf"), dtype=tl.float64)
    best_i = tl.full([BLOCK], big, dtype=tl.int64)
    for c0 in range(0, num_cand, BLOCK):
        c = c0 + lanes
        m = c < num_cand
        d = tl.load(d_c_ptr + start + c, mask=m, other=float("inf"))
        better = d < best_d  # strict: each lane keeps its first minimum
        best_i = tl.where(better, c, best_i)
        best_d = tl.where(better, d, best_d)
    d_min = tl.min(best_d, axis=0)
    k = tl.min(tl.where(best_d == d_min, best_i, big), axis=0)  # first index among the minima
    nans = tl.zeros([BLOCK], dtype=tl.int32)  # NaN policy: a layer holding a NaN gets NaN, NaN, -1
    for c0 in range(0, num_cand + 1, BLOCK):
        c = c0 + lanes
        v = tl.load(x_ptr + start + c, mask=c <= num_cand, other=1.0)
        nans += (v != v).to(tl.int32)
    ok = (num_cand >= 1) & (tl.sum(nans, axis=0) == 0)
    k = tl.where(ok, k, 0)
    alpha = tl.load(alpha_c_ptr + start + k, mask=ok, other=float("nan"))
    d = tl.load(d_c_ptr + start + k, mask=ok, other=float("nan"))
    tl.store(alpha_ptr + layer, alpha)
    tl.store(d_ptr + layer, d)
    tl.store(index_ptr + layer, tl.where(ok, k, -1))


@functools.lru_cache(maxsize=1)
def _jit_kernels():
    """Wrap the kernels with triton.jit, once."""
    return (triton.jit(_hill_kernel), triton.jit(_ks_candidates_kernel),
            triton.jit(_ks_argmin_kernel))


def _kernels():
    global triton, tl
    if triton is None:
        try:
            import triton as _triton
            import triton.language as _tl
        except ImportError as exc:
            raise RuntimeError("tbfast Triton fit kernels need triton (pip install triton)") from exc
        triton, tl = _triton, _tl
    return _jit_kernels()


# --------------------------------------------------------------------------- host side


def _check_pow2(name: str, value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")


def _check_batch(op: str, values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> None:
    """Metadata checks only (no host sync); value-level checks are the caller's job."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        raise ValueError(f"{op}: values must be a 1-D tensor, got {getattr(values, 'shape', values)}")
    if values.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: values must be float32 or float64, got {values.dtype}")
    for name, t in (("starts", starts), ("ends", ends)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{op}: {name} must be a 1-D int64 tensor")
        if t.dtype != torch.int64:
            raise ValueError(f"{op}: {name} must be int64, got {t.dtype}")
        if t.device != values.device:
            raise ValueError(f"{op}: {name} is on {t.device}, values on {values.device}")
    if starts.numel() != ends.numel():
        raise ValueError(f"{op}: starts has {starts.numel()} layers, ends {ends.numel()}")
    if values.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), "
                         f"got values on {values.device}")


def _as_layer_f64(op: str, name: str, t, num_layers: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64, device=device)
    if t.dim() == 0:
        t = t.expand(num_layers)
    if t.shape != (num_layers,):
        raise ValueError(f"{op}: {name} must have one entry per layer ({num_layers}), "
                         f"got shape {tuple(t.shape)}")
    return t.contiguous()


def _device_guard(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _empty_result(num_layers: int, device: torch.device):
    nan = torch.full((num_layers,), float("nan"), dtype=torch.float64, device=device)
    return nan, nan.clone(), torch.full((num_layers,), -1, dtype=torch.int64, device=device)


def hill_fit_triton(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                    xmin_pos: float, *, block: int = HILL_BLOCK
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hill ("median") power-law fit of every layer in one launch (SPEC section 3).

    ``i = int(N / xmin_pos)``; returns float64 ``alpha``, ``D`` and int64 ``index`` (= i),
    each of length L on ``values``' device; NaN, NaN, -1 where ``N < 2`` or ``i >= N``.
    """
    _check_batch("hill_fit_triton", values, starts, ends)
    xmin_pos = float(xmin_pos)
    if not xmin_pos > 0.0:
        raise ValueError(f"hill_fit_triton: xmin_pos must be > 0, got {xmin_pos}")
    _check_pow2("block", block)
    num_layers = starts.numel()
    if num_layers == 0 or values.numel() == 0:
        return _empty_result(num_layers, values.device)
    hill, _, _ = _kernels()
    starts = starts.contiguous()
    ends = ends.contiguous()
    # i = int(N / xmin_pos): the same float64 division as Python's, then truncation (N >= 0)
    size = (ends - starts).clamp_min(0)
    i = torch.floor(size.to(torch.float64) / xmin_pos).to(torch.int64)
    alpha = torch.empty(num_layers, dtype=torch.float64, device=values.device)
    d = torch.empty_like(alpha)
    index = torch.empty(num_layers, dtype=torch.int64, device=values.device)
    with _device_guard(values.device):
        hill[(num_layers,)](values.contiguous(), starts, ends, i, alpha, d, index, BLOCK=block)
    return alpha, d, index


def ks_scan_triton(values: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                   lo: torch.Tensor, hi: torch.Tensor, *, block_i: int = KS_BLOCK_I,
                   block_j: int = KS_BLOCK_J, argmin_block: int = ARGMIN_BLOCK
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KS / fix-finger xmin scan of every layer, all candidates in parallel (SPEC sections 4-5).

    ``lo``, ``hi``: float64 (L,) window on xmin candidates (``-inf``/``+inf`` for the plain KS
    scan). Returns float64 ``alpha``, ``D`` and int64 ``index`` (first argmin of ``D_i``,
    relative to ``starts``) of length L on ``values``' device; NaN, NaN, -1 where ``N < 2``.
    """
    op = "ks_scan_triton"
    _check_batch(op, values, starts, ends)
    for name, value in (("block_i", block_i), ("block_j", block_j), ("argmin_block", argmin_block)):
        _check_pow2(name, value)
    num_layers = starts.numel()
    device = values.device
    lo = _as_layer_f64(op, "lo", lo, num_layers, device)
    hi = _as_layer_f64(op, "hi", hi, num_layers, device)
    if num_layers == 0 or values.numel() == 0:
        return _empty_result(num_layers, device)
    _, candidates, argmin = _kernels()
    starts = starts.contiguous()
    ends = ends.contiguous()
    values = values.contiguous()
    log_values = torch.log(values.to(torch.float64))

    # Work items: (layer, block of block_i candidates), laid out layer after layer. Disjoint
    # segments give sum(ceil((N-1)/block_i)) <= numel/block_i + L, a host-known grid size;
    # programs past the last block find layer == L and return.
    size = (ends - starts).clamp_min(0)
    num_blocks = torch.div(size - 1 + block_i - 1, block_i, rounding_mode="floor").clamp_min(0)
    blk_end = torch.cumsum(num_blocks, 0)
    blk_begin = blk_end - num_blocks
    grid = -(-values.numel() // block_i) + num_layers
    prog_layer = torch.searchsorted(blk_end, torch.arange(grid, device=device), right=True)

    alpha_c = torch.empty(values.numel(), dtype=torch.float64, device=device)
    d_c = torch.empty_like(alpha_c)
    alpha = torch.empty(num_layers, dtype=torch.float64, device=device)
    d = torch.empty_like(alpha)
    index = torch.empty(num_layers, dtype=torch.int64, device=device)
    with _device_guard(device):
        candidates[(grid,)](values, log_values, starts, ends, lo, hi, prog_layer, blk_begin,
                            alpha_c, d_c, num_layers, BLOCK_I=block_i, BLOCK_J=block_j)
        argmin[(num_layers,)](values, starts, ends, alpha_c, d_c, alpha, d, index, BLOCK=argmin_block)
    return alpha, d, index
