"""The base-spectrum cache of the exact LoRA ESD: ``G0 = M0^T M0 = V diag(l0) V^T`` per frozen base weight.

``M0`` is the base weight on its Gram side (``W0`` when ``cols <= rows``, else ``W0^T``), so the
Gram is ``n x n`` with ``n = min(rows, cols)``. An entry holds ``l0`` (ascending) and ``V``,
float64 by default (float32 on request: half the memory, eigenvalues then known to about
``1e-7 * lambda_max`` only), and a checksum of the base weight (`weight_checksum`: its dtype,
shape and the 128-bit digest ``tbfast::weight_digest`` of its bytes, tbfast/ops/digest.py,
computed on the weight's device at every lookup): a base weight that changed is recomputed,
never used stale. Entries of files written before the digest carry the legacy SHA-256 form
(`sha256_checksum`); `BaseSpectrumCache.lookup` verifies such an entry once with SHA-256 and
re-keys it to the digest (a mismatch recomputes). Entries are kept while they fit
``memory_budget`` bytes; a weight whose entry does not fit gets None (its layer takes the
full eigensolve). `BaseSpectrumCache.save` / `load` write and read a safetensors file (no code
runs on load) so many adapters or checkpoints of one base reuse one cache; each saved entry carries
the digests of its stored eigenvalues and eigenvectors, and `load` drops (with a warning) an entry
that fails them, so a damaged file costs a recomputation, never a wrong spectrum (files saved
before the digests carry none and are read as they are).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..ops.digest import digest_hex

__all__ = ["BaseSpectrum", "BaseSpectrumCache", "weight_checksum", "sha256_checksum", "is_sha256_checksum",
           "gram_side", "DEFAULT_CACHE_BUDGET", "CACHE_FORMAT"]

logger = logging.getLogger("tbfast.lora")

#: Default bound of a cache's eigenvectors and eigenvalues, in bytes (2 GiB).
DEFAULT_CACHE_BUDGET = 2 << 30
#: The ``format`` metadata of a saved cache file.
CACHE_FORMAT = "tbfast-base-spectrum-1"


def gram_side(w: torch.Tensor) -> torch.Tensor:
    """``w`` (rows, cols) on its Gram side: ``w`` when ``cols <= rows``, else ``w.T`` (a view)."""
    return w if w.shape[1] <= w.shape[0] else w.T


def _prefix(w: torch.Tensor) -> str:
    return f"{w.dtype}|{'x'.join(map(str, w.shape))}|"


def weight_checksum(w: torch.Tensor) -> str:
    """A checksum of a weight's dtype, shape and bytes: ``"{dtype}|{shape}|d128:{32 hex}"`` with
    the digest of `tbfast.ops.digest` (``tbfast::weight_digest``), computed on the weight's device
    (no host copy of a GPU weight). The C++ CPU kernel is memory-bandwidth bound (an 11008 x 4096
    float32 weight on a quiet 2-core AVX-512 Xeon: 0.013 s on two threads, 0.026 s on one, where
    the SHA-256 of `sha256_checksum` took 0.084 s / 0.156 s). A check against accidental change,
    not forgery."""
    return f"{_prefix(w)}d128:{digest_hex(w)}"


#: Bytes per piece of the legacy checksum: `sha256_checksum` hashes the SHA-256 digests of the
#: pieces (a fixed size, so the checksum does not depend on how many threads hash them).
CHECKSUM_PIECE = 16 << 20
_SHA256_FORM = re.compile(r"[^|]*\|[0-9x]*\|[0-9a-f]{64}")


def is_sha256_checksum(checksum: str) -> bool:
    """True when ``checksum`` has the legacy form of `sha256_checksum` (cache files written
    before `weight_checksum` used the digest)."""
    return _SHA256_FORM.fullmatch(checksum) is not None


def sha256_checksum(w: torch.Tensor) -> str:
    """The legacy checksum (``"{dtype}|{shape}|{64 hex}"``): SHA-256 of the SHA-256 digests of the
    weight's pieces of `CHECKSUM_PIECE` bytes, hashed on up to ``torch.get_num_threads()``
    threads (hashlib releases the GIL; about 1.1 GB/s per core). Kept to verify cache entries
    saved with it, once each (`BaseSpectrumCache.lookup`)."""
    flat = w.detach().to("cpu").contiguous().reshape(-1)
    buf = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    starts = range(0, max(len(buf), 1), CHECKSUM_PIECE)
    digests = [b""] * len(starts)

    def hash_pieces(first: int, step: int) -> None:
        for i in range(first, len(starts), step):
            digests[i] = hashlib.sha256(buf[starts[i]:starts[i] + CHECKSUM_PIECE]).digest()

    workers = min(len(starts), torch.get_num_threads())
    threads = [threading.Thread(target=hash_pieces, args=(k, workers), name="tbfast-checksum", daemon=True)
               for k in range(1, workers)]
    for t in threads:
        t.start()
    try:
        hash_pieces(0, workers)
    finally:
        for t in threads:
            t.join()
    return f"{_prefix(w)}{hashlib.sha256(b''.join(digests)).hexdigest()}"


@dataclass(frozen=True)
class BaseSpectrum:
    """One base weight's Gram spectrum: ``evals`` (n,) ascending, ``evecs`` (n, n) columns,
    ``checksum`` of the weight and its ``shape``."""

    evals: torch.Tensor
    evecs: torch.Tensor
    checksum: str
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.evals.numel() * self.evals.element_size() + self.evecs.numel() * self.evecs.element_size()


def _entry_bytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    n = min(shape)
    return (n * n + n) * torch.finfo(dtype).bits // 8


class BaseSpectrumCache:
    """Base spectra by layer name, bounded by ``memory_budget`` bytes (None: no bound).

    ``dtype``: float64 (default, exact to float64 rounding) or float32 (half the memory)."""

    def __init__(self, memory_budget: int | None = DEFAULT_CACHE_BUDGET, dtype: torch.dtype = torch.float64) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"BaseSpectrumCache: dtype must be torch.float32 or torch.float64, got {dtype}")
        if memory_budget is not None and memory_budget < 0:
            raise ValueError(f"BaseSpectrumCache: memory_budget must be >= 0 bytes, got {memory_budget}")
        self.memory_budget = memory_budget
        self.dtype = dtype
        self._entries: dict[str, BaseSpectrum] = {}
        self.builds = 0  # eigendecompositions computed by this cache (misses, stale entries)
        self.damaged = 0  # entries `load` dropped because their stored spectrum failed its digest

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries."""
        return sum(e.nbytes for e in self._unique().values())

    def _unique(self) -> dict[int, BaseSpectrum]:
        """The distinct entries (several names may share one: the same base weight)."""
        return {id(e): e for e in self._entries.values()}

    def _fits(self, extra: int) -> bool:
        return self.memory_budget is None or self.nbytes + extra <= self.memory_budget

    def entry(self, name: str) -> BaseSpectrum | None:
        """The stored entry of ``name`` (no checksum test); None if absent."""
        return self._entries.get(name)

    def lookup(self, name: str, weight: torch.Tensor, *, checksum: str | None = None) -> BaseSpectrum | None:
        """The base spectrum of ``weight`` (2-D) under ``name``: the stored one when its checksum
        matches, else an entry of the same base weight stored under another name (shared, not
        copied), else computed now (one float64 eigendecomposition of the Gram) and stored. None
        when it does not fit the memory budget (the caller takes the full path). An entry with a
        legacy SHA-256 checksum (a file saved before the digest) is verified with
        `sha256_checksum` once and re-keyed to ``checksum`` / `weight_checksum`."""
        if weight.dim() != 2:
            raise ValueError(f"layer {name!r}: base weight must be 2-D, got shape {tuple(weight.shape)}")
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        cs = weight_checksum(weight) if checksum is None else checksum
        old = self._entries.get(name)
        if old is not None and old.checksum != cs and old.shape == shape and is_sha256_checksum(old.checksum):
            if sha256_checksum(weight) == old.checksum:
                logger.info("layer %r: legacy SHA-256 checksum verified; entry re-keyed to %s", name, cs)
                old = self._entries[name] = replace(old, checksum=cs)
        if old is not None:
            if old.checksum == cs and old.shape == shape:
                return old
            logger.info("base weight of layer %r changed; its cached spectrum is recomputed", name)
            del self._entries[name]
        # the same base weight under another name (a PeftModel's `base_model.model.` names against
        # the same adapter read from its directory, or tied weights): share that entry
        twin = next((e for e in self._unique().values() if e.checksum == cs and e.shape == shape), None)
        if twin is not None:
            logger.info("layer %r: base spectrum found under another name (the same base weight)", name)
            self._entries[name] = twin
            return twin
        if not self._fits(_entry_bytes(shape, self.dtype)):
            return None
        if not bool(torch.isfinite(weight).all()):
            return None  # the full path reports non-finite weights
        m = gram_side(weight.detach()).to(torch.float64)
        evals, evecs = torch.linalg.eigh(m.mT @ m)
        e = BaseSpectrum(evals=evals.to(self.dtype).cpu(), evecs=evecs.to(self.dtype).cpu(), checksum=cs, shape=shape)
        self._entries[name] = e
        self.builds += 1
        return e

    def clear(self) -> None:
        self._entries.clear()

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the entries to a safetensors file ``path`` (its directory created if missing;
        written to a temporary name, then renamed over it), each with the digests of its stored
        eigenvalues and eigenvectors, which `load` verifies. A failure is an OSError naming
        ``path``."""
        from safetensors import SafetensorError  # noqa: PLC0415 - optional dependency
        from safetensors.torch import save_file  # noqa: PLC0415
        p = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        index = {}
        names: dict[int, list[str]] = {}
        for name, e in self._entries.items():
            names.setdefault(id(e), []).append(name)
        for i, (key, e) in enumerate(self._unique().items()):
            tensors[f"{i}.evals"] = e.evals.contiguous()
            tensors[f"{i}.evecs"] = e.evecs.contiguous()
            index[str(i)] = {"name": names[key][0], "aliases": names[key][1:], "checksum": e.checksum,
                             "shape": list(e.shape), "evals_digest": weight_checksum(e.evals),
                             "evecs_digest": weight_checksum(e.evecs)}
        meta = {"format": CACHE_FORMAT, "entries": json.dumps(index)}
        tmp = p.with_name(p.name + ".tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, p)
        except (OSError, SafetensorError) as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # e.g. its directory is not one
            raise OSError(f"{p}: cannot write the base-spectrum cache ({exc})") from None
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, memory_budget: int | None = DEFAULT_CACHE_BUDGET,
             dtype: torch.dtype | None = None) -> BaseSpectrumCache:
        """A cache read from a file written by `save`; entries past ``memory_budget`` are left
        on disk (their layers recompute or take the full path). ``dtype``: that of the file's
        entries unless given."""
        from safetensors import SafetensorError, safe_open  # noqa: PLC0415 - optional dependency
        p = Path(path)
        if p.is_dir():
            raise ValueError(f"{p}: is a directory, not a tbfast base-spectrum cache file")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CACHE_FORMAT:
                    raise ValueError(f"{p}: not a tbfast base-spectrum cache (format {meta.get('format')!r})")
                index = json.loads(meta.get("entries", "{}"))
                cache: BaseSpectrumCache | None = None
                for i, info in index.items():
                    evals, evecs = f.get_tensor(f"{i}.evals"), f.get_tensor(f"{i}.evecs")
                    shape = tuple(int(s) for s in info["shape"])
                    n = min(shape) if len(shape) == 2 else -1
                    if evals.shape != (n,) or evecs.shape != (n, n) or evals.dtype != evecs.dtype:
                        raise ValueError(f"{p}: entry {info.get('name')!r} has tensors of shapes "
                                         f"{tuple(evals.shape)}, {tuple(evecs.shape)} for a weight of shape {shape}")
                    if cache is None:
                        cache = cls(memory_budget, dtype or evals.dtype)
                    if "evals_digest" in info and (weight_checksum(evals) != info["evals_digest"]
                                                   or weight_checksum(evecs) != info.get("evecs_digest")):
                        # a damaged entry is dropped, never used: its layer recomputes it
                        logger.warning("%s: the stored spectrum of layer %r does not match its digest (the file "
                                       "is damaged); that entry is recomputed", p, info.get("name"))
                        cache.damaged += 1
                        continue
                    e = BaseSpectrum(evals.to(cache.dtype), evecs.to(cache.dtype), str(info["checksum"]), shape)
                    if cache._fits(e.nbytes):
                        for name in [info["name"], *info.get("aliases", [])]:
                            cache._entries[str(name)] = e
        except (SafetensorError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{p}: not a readable tbfast base-spectrum cache ({type(exc).__name__}: {exc})") from None
        except OSError as exc:
            raise ValueError(f"{p}: cannot read the base-spectrum cache ({exc.strerror or exc})") from None
        return cache if cache is not None else cls(memory_budget, dtype or torch.float64)
