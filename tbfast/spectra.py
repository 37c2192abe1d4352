"""Layer matrices -> eigenvalues, all layers at once (the ESD stage).

Layers are grouped by Gram size ``n = min(rows, cols)``; each group is cut into chunks that fit a
memory budget; each chunk forms its Gram matrices (the smaller side, batched matmul per shape)
and goes through one batched eigensolve. The result is a `Spectra`: a ragged batch of ascending
eigenvalues on the compute device (see ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import math
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ._progress import progress_bar
from ._transfer import to_device
from .errors import NoLayersError, NonFiniteWeightsError
from .layers import Layer
from .ops.eig import eigvalsh_batched
from .options import ESD_METHODS, ESDOptions, LayerOptions, either, split_options
from .sources import build_layers

__all__ = ["Spectra", "esd", "layer_spectra", "esd_layers", "exact_math", "gram", "DEFAULT_MEMORY_BUDGET",
           "ESD_METHODS"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of matrices + Gram matrices held at once per chunk


@dataclass
class Spectra:
    """Ascending eigenvalues of L layers: ``values[offsets[l]:offsets[l+1]]`` is layer ``l``."""

    values: torch.Tensor
    offsets: torch.Tensor  # int64, (L+1,), on the host
    layers: list[Layer]
    # float64 (L,) on the values' device: layer l's eigenvalues are values * eig_scale[l]. None
    # (or 1) except for layers whose weights are so large or small that their Gram matrix would
    # overflow or underflow: those are normalised by a power of two first (see _pow2_normalisers)
    eig_scale: torch.Tensor | None = None
    #: per layer, with a LoRA cache (`layer_spectra`'s ``lora_cache``): ``"update"`` (exact LoRA
    #: ESD, tbfast/lora) or ``"full"`` (an eigensolve); None without one
    esd_path: list[str] | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.values[int(self.offsets[i]):int(self.offsets[i + 1])]

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def counts(self) -> torch.Tensor:
        """Number of eigenvalues per layer (host int64)."""
        return self.offsets[1:] - self.offsets[:-1]

    def to_list(self) -> list[torch.Tensor]:
        return [self[i] for i in range(len(self))]

    def scales(self) -> torch.Tensor:
        """Per-layer factor (float64, values' device) from ``values`` to eigenvalues."""
        if self.eig_scale is None:
            return torch.ones(len(self), dtype=torch.float64, device=self.values.device)
        return self.eig_scale

    def eigenvalues(self, i: int) -> torch.Tensor:
        """Layer ``i``'s eigenvalues in float64 and absolute units (``values * eig_scale``)."""
        return self[i].double() * self.scales()[i]

    def device_offsets(self) -> torch.Tensor:
        """``offsets`` on the values' device (copied once, without a host sync)."""
        cached = self.__dict__.get("_device_offsets")
        if cached is None or cached.device != self.values.device:
            cached = to_device(self.offsets, self.values.device)
            self.__dict__["_device_offsets"] = cached
        return cached


def esd_layers(source: Any, **layer_options: Any) -> list[Layer]:
    """Layers from a model, a list of `Layer`, a checkpoint path, or raw matrices (a tensor, a
    sequence or a mapping of tensors): `tbfast.sources.build_layers` with ``mapping="matrices"``.
    ``layer_options`` are `LayerOptions` fields (another keyword is a TypeError naming `tbfast.esd`)."""
    options = split_options(layer_options, allowed=(LayerOptions,), where="tbfast.esd")[LayerOptions]
    return build_layers(source, options, mapping="matrices")


def _layer_bytes(L: Layer, elem: int) -> int:
    """Bytes the ESD stage counts against ``memory_budget`` for one layer: the matrices as read
    plus their converted copy, the Gram matrices and the solver's copy."""
    n = L.gram_size
    return L.k * (2 * L.rows * L.cols + 2 * n * n) * elem


def _warn_over_budget(layers: list[Layer], elem: int, budget: int) -> None:
    """One warning when layers need more than the budget on their own (a layer is never split,
    so it is computed alone and the budget is exceeded)."""
    over = [(b, l.name) for l in layers if (b := _layer_bytes(l, elem)) > budget]
    if not over:
        return
    need, name = max(over)
    more = f"; {len(over) - 1} more layer(s) also exceed it" if len(over) > 1 else ""
    log.warning("memory_budget of %d bytes exceeded: layer %r alone needs %d bytes (%.1f MiB) of weights and "
                "Gram matrices; it is computed by itself%s", budget, name, need, need / 2**20, more)


def _chunks(items: list[int], layers: list[Layer], elem: int, budget: int) -> Iterator[list[int]]:
    chunk: list[int] = []
    used = 0
    for i in items:
        cost = _layer_bytes(layers[i], elem)
        if chunk and used + cost > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(i)
        used += cost
    if chunk:
        yield chunk


def gram_lower(M: torch.Tensor) -> torch.Tensor:
    """``M^T M`` for a batch ``(B, r, n)``; on the CPU only the lower triangle (and the diagonal
    blocks) is computed, in column blocks, which saves up to ~40% of the flops. The symmetric
    eigensolvers read the lower triangle only; the rest is zero on the CPU."""
    n = M.shape[-1]
    k = min(6, n // 128)
    if M.device.type != "cpu" or k < 2:
        return M.mT @ M
    G = M.new_zeros((M.shape[0], n, n))
    edges = [n * i // k for i in range(k + 1)]
    for j in range(k):
        rows = slice(edges[j], edges[j + 1])
        # block row j, columns 0 .. end of block j: every entry on or below the diagonal
        G[:, rows, : edges[j + 1]] = M[..., rows].mT @ M[..., : edges[j + 1]]
    return G


def _autocast_types(devices: set[str]) -> list[str]:
    """The device types among ``devices`` (plus cpu and cuda) whose autocast is on in this thread."""
    out = []
    for t in sorted(devices | {"cpu", "cuda"}):
        try:
            on = torch.is_autocast_enabled(t)
        except (TypeError, RuntimeError):  # torch < 2.4 (no device argument) or an unknown type
            on = {"cpu": torch.is_autocast_cpu_enabled, "cuda": torch.is_autocast_enabled}.get(t, bool)()
        if on:
            out.append(t)
    return out


@contextlib.contextmanager
def exact_math(*devices: torch.device | str | None) -> Iterator[None]:
    """The ESD engine's numerics, independent of the caller's thread state: autocast off (for
    cpu, cuda and the given devices' types), so every matmul runs in the dtype tbfast chose.
    Thread-local and restored on exit; no process-wide flag is read or written."""
    types = {torch.device(d).type for d in devices if d is not None}
    with contextlib.ExitStack() as stack:
        for t in _autocast_types(types):
            stack.enter_context(torch.autocast(t, enabled=False))
        yield


def gram(M: torch.Tensor, allow_tf32: bool = False) -> torch.Tensor:
    """``M^T M`` for a batch ``(B, r, n)`` whose precision does not depend on process flags.

    On the CPU (TF32 does not apply) `gram_lower`. On CUDA a float32 Gram is accumulated in
    float64 and rounded once to float32: exact to float32 rounding whatever the caller set with
    ``torch.backends.cuda.matmul.allow_tf32`` / ``fp32_precision`` (tbfast neither reads nor
    writes those flags). ``allow_tf32=True`` opts out: a plain float32 matmul, which follows
    the process's own matmul precision setting (TF32 if the caller enabled it)."""
    if M.device.type == "cpu" or M.dtype != torch.float32 or allow_tf32:
        return gram_lower(M)
    B, r, n = M.shape
    # float64 copies in pieces: at most about the float32 batch's own size extra at a time
    step = max(1, (B * r * n) // (2 * (r * n + n * n)))
    out = torch.empty((B, n, n), dtype=M.dtype, device=M.device)
    for s in range(0, B, step):
        m = M[s:s + step].double()
        out[s:s + step] = m.mT @ m
    return out


def _pow2_normalisers(amax: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer power-of-two normalisation from each layer's largest absolute weight ``amax``.

    A layer whose ``amax`` lies outside ``[2^-E, 2^E]`` (``E`` = a quarter of ``dtype``'s
    exponent range: 2^31 for float32) would have Gram entries near the overflow or underflow
    threshold; its matrices are multiplied by ``2^-e`` (``amax = m 2^e``, ``0.5 <= m < 1``),
    which is exact, and its eigenvalues come back in units of ``4^e``. Other layers (and
    all-zero or non-finite ones) are left alone. Returns (matrix factor, eigenvalue factor),
    float64, on ``amax``'s device; no host sync."""
    lim = 2.0 ** (int(math.log2(torch.finfo(dtype).max)) // 4)
    a = amax.double()
    _, ex = torch.frexp(a)
    need = torch.isfinite(a) & (a > 0) & ((a > lim) | (a < 1.0 / lim))
    ex = torch.where(need, ex, torch.zeros_like(ex)).double()
    return torch.exp2(-ex), torch.exp2(2.0 * ex)


def _chunk_eigenvalues(layers: list[Layer], chunk: list[int], method: str, dtype: torch.dtype,
                       device: torch.device | None, eig_backend: str, failure_flags: list | None,
                       allow_tf32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(sum k, n)`` of every matrix of the chunk's layers, in chunk order, in units
    of each layer's eigenvalue factor (second result, float64 ``(len(chunk),)``)."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for pos, i in enumerate(chunk):
        by_shape[(layers[i].rows, layers[i].cols)].append(pos)
    mats_per_pos: list[torch.Tensor | None] = [None] * len(chunk)
    for pos, i in enumerate(chunk):
        m = layers[i].matrices()
        mats_per_pos[pos] = m
    dev = device if device is not None else mats_per_pos[0].device
    n = layers[chunk[0]].gram_size
    ks = [layers[i].k for i in chunk]
    first = np.concatenate([[0], np.cumsum(ks)])
    total = int(first[-1])
    if method == "svd":
        out = torch.empty((total, n), dtype=dtype, device=dev)
    else:
        G = torch.empty((total, n, n), dtype=dtype, device=dev)
    eig_scale = torch.ones(len(chunk), dtype=torch.float64, device=dev)
    with exact_math(dev):  # also a device type other than cpu / cuda (the weights' own)
        for (rows, cols), poss in by_shape.items():
            M = torch.cat([mats_per_pos[p].to(device=dev, dtype=dtype) for p in poss], dim=0)
            sl = np.concatenate([np.arange(first[p], first[p + 1]) for p in poss])
            idx = to_device(sl, dev)
            M = _normalise(M, poss, ks, eig_scale, dtype)
            if method == "svd":
                sv = torch.linalg.svdvals(M)
                out.index_copy_(0, idx, sv.square().flip(-1))
            else:
                Gs = gram(M, allow_tf32) if rows >= cols else gram(M.mT, allow_tf32)
                if len(poss) == len(chunk) and sl[0] == 0 and np.all(np.diff(sl) == 1):
                    G = Gs
                else:
                    G.index_copy_(0, idx, Gs)
        if method != "svd":
            out = eigvalsh_batched(G, backend=eig_backend, failure_flags=failure_flags)
        scales = [layers[i].scale for i in chunk]
        if any(s != 1.0 for s in scales):
            sq = to_device(np.repeat(np.square(scales), ks), dev, dtype)
            out = out * sq.unsqueeze(1)
    return out.clamp_(min=0), eig_scale


def _normalise(M: torch.Tensor, poss: list[int], ks: list[int], eig_scale: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Scale the matrices ``M`` (the layers at chunk positions ``poss``, ``ks[p]`` matrices each)
    by their layer's power of two from `_pow2_normalisers`; record the eigenvalue factors in
    ``eig_scale``. On the CPU, ordinary weights skip the multiplication."""
    lo, hi = torch.aminmax(M.flatten(1), dim=1)
    per_matrix = torch.maximum(lo.abs(), hi.abs())
    owner = to_device(np.repeat(np.arange(len(poss)), [ks[p] for p in poss]), M.device)
    amax = torch.zeros(len(poss), dtype=per_matrix.dtype, device=M.device)
    amax = amax.scatter_reduce(0, owner, per_matrix, reduce="amax", include_self=False)
    mult, escale = _pow2_normalisers(amax, dtype)
    eig_scale.index_copy_(0, to_device(np.asarray(poss), M.device), escale)
    if M.device.type == "cpu" and not bool((mult != 1).any()):
        return M
    f = mult[owner]
    # two exact power-of-two steps: 2^-e alone may be subnormal in float32
    half = torch.exp2(torch.trunc(torch.log2(f) / 2))
    return M.mul_(half.to(dtype).view(-1, 1, 1)).mul_((f / half).to(dtype).view(-1, 1, 1))  # M is a fresh cat


def _layer_values(layers: list[Layer], method: str, dtype: torch.dtype, device: torch.device | None,
                  memory_budget: int, progress: bool, eig_backend: str,
                  failure_flags: list | None, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = np.array([l.num_evals for l in layers], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    elem = torch.finfo(dtype).bits // 8
    groups: dict[int, list[int]] = defaultdict(list)
    for i, l in enumerate(layers):
        groups[l.gram_size].append(i)
    chunks = [c for n in groups for c in _chunks(groups[n], layers, elem, memory_budget)]
    _warn_over_budget(layers, elem, memory_budget)
    bar = progress_bar(progress, len(layers), "ESD")
    out: torch.Tensor | None = None
    eig_scale: torch.Tensor | None = None
    for chunk in chunks:
        w, sc = _chunk_eigenvalues(layers, chunk, method, dtype, device, eig_backend, failure_flags, allow_tf32)
        if out is None:
            out = torch.empty(int(offsets[-1]), dtype=dtype, device=w.device)
            eig_scale = torch.ones(len(layers), dtype=torch.float64, device=w.device)
        dst = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in chunk])
        out.index_copy_(0, to_device(dst, w.device), w.reshape(-1))
        eig_scale.index_copy_(0, to_device(np.asarray(chunk), w.device), sc)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    assert out is not None
    if any(l.k > 1 for l in layers):
        # pooled layers (convolutions): sort each segment; two stable sorts keep segments apart
        seg = to_device(np.repeat(np.arange(len(layers)), counts), out.device)
        order = torch.argsort(out, stable=True)
        order = order[torch.argsort(seg[order], stable=True)]
        out = out[order]
    return out, torch.as_tensor(offsets), eig_scale


def layer_spectra(layers: list[Layer], options: ESDOptions = ESDOptions(), *,
                  failure_flags: list | None = None, lora_cache: Any = None, lora_min_ratio: float = 0.0,
                  lora_cpu_only: bool = False) -> Spectra:
    """The ESD stage on a list of `Layer`: every layer's eigenvalues as one `Spectra`, computed
    as ``options`` says. No host sync and no finiteness check (see `raise_on_nonfinite`).
    ``failure_flags``: a list that receives the GPU eigensolver's per-matrix failure flags
    (device bool tensors) instead of checking them here, so the caller checks them with its own
    single host sync (see `tbfast.pipeline.run`). ``lora_cache``: a
    `tbfast.lora.BaseSpectrumCache`; LoRA layers then take the exact update path
    (`tbfast.lora.stage`, with ``lora_min_ratio`` / ``lora_cpu_only``), the result is float64
    and says each layer's ``esd_path``."""
    if lora_cache is not None:
        return _lora_spectra(layers, options, failure_flags, lora_cache, lora_min_ratio, lora_cpu_only)
    if not layers:
        raise NoLayersError("no analysable layer found (nothing matched the layer types, filters and min_evals)")
    for l in layers:
        if l.rows == 0 or l.cols == 0 or l.k == 0:
            raise ValueError(f"layer {l.name!r}: empty weight of shape {l.shape}")
    if options.farms is not None:  # FARMS: each layer's ESD pooled over its windows (tbfast.layers.farms)
        from .layers.farms import farms_layers

        layers = farms_layers(layers, options.farms)
    budget = DEFAULT_MEMORY_BUDGET if options.memory_budget is None else options.memory_budget
    # autocast off and no process-wide precision flag touched: the same numbers in any caller state
    with exact_math(options.device):
        values, offsets, eig_scale = _layer_values(
            layers, "svd" if options.method == "svd" else "gram", options.dtype, options.device, budget,
            options.progress, options.eig_backend, failure_flags, options.allow_tf32)
    return Spectra(values=values, offsets=offsets, layers=layers, eig_scale=eig_scale)


def _lora_spectra(layers: list[Layer], options: ESDOptions, failure_flags: list | None, cache: Any,
                  min_ratio: float, cpu_only: bool) -> Spectra:
    """`layer_spectra` with a LoRA cache: the eligible LoRA layers by the update path (float64,
    CPU), the others as ``options`` say; one float64 `Spectra` on the others' device (else
    ``options.device``, else the CPU)."""
    from .lora.cache import BaseSpectrumCache
    from .lora.stage import update_path_values

    if not isinstance(cache, BaseSpectrumCache):
        raise TypeError(f"lora_cache must be a tbfast.lora.BaseSpectrumCache, got {type(cache).__name__}")
    if not layers:
        raise NoLayersError("no analysable layer found (nothing matched the layer types, filters and min_evals)")
    with torch.no_grad():
        upd = update_path_values(layers, cache, min_ratio=min_ratio, cpu_only=cpu_only)
    per_layer: list[Any] = [None] * len(layers)
    paths = ["full"] * len(layers)
    for i, v, p in zip(upd.positions, upd.values, upd.paths):
        per_layer[i], paths[i] = v, p
    rest = [i for i in range(len(layers)) if per_layer[i] is None]
    dev = options.device
    if rest:
        sp = layer_spectra([layers[i] for i in rest], options, failure_flags=failure_flags)
        dev = sp.values.device
        for j, i in enumerate(rest):
            per_layer[i] = sp.eigenvalues(j)
    dev = torch.device("cpu") if dev is None else torch.device(dev)
    values = torch.cat([v.to(dev, torch.float64) for v in per_layer])
    offsets = torch.zeros(len(layers) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([v.numel() for v in per_layer], dtype=torch.int64), 0)
    return Spectra(values=values, offsets=offsets, layers=layers, esd_path=paths)


def esd(
    source: Any,
    *,
    method: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
    eig_backend: str = "auto",
    allow_tf32: bool = False,
    farms: Any = None,
    check_finite: bool = True,
    failure_flags: list | None = None,
    eig_checks: list | None = None,
    lora_cache: Any = None,
    **layer_options: Any,
) -> Spectra:
    """Empirical spectral densities of every layer of ``source`` as one ragged batch.

    ``source``: an ``nn.Module`` (layers chosen by `find_layers` with ``layer_options``), a list
    of `Layer`, or raw matrices (a 2-D/3-D tensor, a sequence or a mapping of tensors).
    ``method``: ``gram`` (eigenvalues of the smaller Gram matrix, batched per size), ``svd``
    (squared ``svdvals``, the oracle) or ``auto`` (= ``gram``). ``dtype``: float32 (default) or
    float64 compute precision; fp16/bf16 weights are upcast. Eigenvalues live on ``device``
    (default: the weights' device). ``memory_budget`` (bytes, default 1 GiB) bounds the matrices
    and Gram matrices held at once; results do not depend on it. ``eig_backend``: the
    eigensolver. With ``check_finite`` a layer whose weights hold NaN or Inf raises a
    `tbfast.errors.NonFiniteWeightsError` (a ValueError) naming it (one host sync).
    ``failure_flags``: a list that receives the GPU eigensolver's per-matrix failure flags
    instead of checking them here (so the caller can check them with its own single host sync);
    ``eig_checks=`` is its former name, still accepted. The result does not depend on the
    caller's autocast or TF32 settings (`exact_math`, `gram`); ``allow_tf32=True`` lets a CUDA
    float32 Gram follow the process's own matmul precision instead. ``farms``: True (or a
    `tbfast.options.FarmsOptions` / dict of its fields) pools each layer's ESD over FARMS
    windows of one aspect ratio (`tbfast.layers.farms`); ``Spectra.layers`` are then the window layers. ``lora_cache``: a
    `tbfast.lora.BaseSpectrumCache`; PEFT LoRA layers (of a model, or of an adapter directory
    with ``base=``) then take the exact update path, the result is float64 and
    ``spectra.esd_path`` says each layer's path (docs/ARCHITECTURE.md, exact LoRA ESD). Without
    one every layer takes the full path (a cache costs more than one eigensolve to build).
    """
    failure_flags = either("failure_flags", failure_flags, "eig_checks", eig_checks)
    options = ESDOptions(method=method, dtype=dtype, device=device, memory_budget=memory_budget,
                         progress=progress, eig_backend=eig_backend, allow_tf32=allow_tf32, farms=farms)
    spectra = layer_spectra(esd_layers(source, **layer_options), options, failure_flags=failure_flags,
                            lora_cache=lora_cache)
    if check_finite:
        raise_on_nonfinite(spectra)
    return spectra


def nonfinite_layers(spectra: Spectra, finite_per_value: torch.Tensor | None = None) -> list[str]:
    """Names of layers whose eigenvalues are not all finite (their weights hold NaN/Inf)."""
    ok = torch.isfinite(spectra.values) if finite_per_value is None else finite_per_value
    ok = ok.cpu().numpy()
    off = spectra.offsets.numpy()
    return [spectra.layers[l].name for l in range(len(spectra)) if not ok[off[l]:off[l + 1]].all()]


def raise_on_nonfinite(spectra: Spectra) -> None:
    """Raise a `NonFiniteWeightsError` (a ValueError) naming every layer whose weights hold NaN or Inf."""
    if bool(torch.isfinite(spectra.values).all()):
        return
    raise NonFiniteWeightsError(nonfinite_layers(spectra))
