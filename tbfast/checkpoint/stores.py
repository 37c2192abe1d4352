"""Lazy tensor stores over checkpoint files (the reading layer of `tbfast.checkpoint`).

- `SafetensorsStore`: one or more ``.safetensors`` files through ``safetensors.safe_open``
  (memory-mapped; headers read at construction);
- `TorchFileStore`: one or more ``torch.save`` state dicts, ``torch.load(weights_only=True)``,
  memory-mapped when the file is in the zip format (legacy files are read whole);
- `MappingStore`: a state dict in memory;
- `open_checkpoint`: the right store for a file, a directory of shards (with or without a
  shard index, see `tbfast.checkpoint.index`) or a state dict.

Dtype rules: fp16/bf16/fp32/fp64 are analysed as stored, float8 is upcast to float32 on load;
integer, bool and complex tensors are reported (`TensorInfo.supported`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, CorruptCheckpointError, EmptyCheckpointError
from ..layers.core import FLOAT_DTYPES
from .files import openable_name, regular_file, shown
from .index import NOT_WEIGHTS, check_index, read_index
from .peft import is_peft_adapter

__all__ = ["TensorInfo", "TensorStore", "MappingStore", "SafetensorsStore", "TorchFileStore", "open_checkpoint",
           "checkpoint_files", "to_float", "natural_key"]

logger = logging.getLogger(__name__)

_ANALYSABLE = set(FLOAT_DTYPES)
_UPCAST = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
           if hasattr(torch, n)}
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format starts with a zip local file header

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one stored tensor (``dtype`` is a torch dtype or, for a
    safetensors dtype torch does not know, its string)."""

    name: str
    shape: tuple[int, ...]
    dtype: Any

    @property
    def is_float(self) -> bool:
        """Floating point (including dtypes tbfast cannot analyse, such as complex or fp4)."""
        if isinstance(self.dtype, str):
            return self.dtype.startswith(("F", "C"))
        return self.dtype.is_floating_point or self.dtype.is_complex

    @property
    def supported(self) -> bool:
        return self.dtype in _ANALYSABLE or self.dtype in _UPCAST


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------------
# tensor stores


class TensorStore:
    """Read-only, lazy name -> tensor mapping over one checkpoint."""

    description: str = "state dict"

    def infos(self) -> list[TensorInfo]:
        """Every stored tensor, in checkpoint order."""
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor (on the CPU, in its stored dtype)."""
        raise NotImplementedError

    def keys(self) -> list[str]:
        return [i.name for i in self.infos()]

    def load_expert(self, name: str, e: int) -> torch.Tensor:
        """``load(name)[e]``: one expert of a fused 3-D tensor (file stores read only that slice)."""
        return self.load(name)[e]


class MappingStore(TensorStore):
    """A state dict held in memory."""

    def __init__(self, sd: Mapping[str, Any], description: str = "state dict"):
        self._sd = sd
        self.description = description
        self._infos = [TensorInfo(k, tuple(v.shape), v.dtype) for k, v in sd.items() if isinstance(v, torch.Tensor)]

    def infos(self) -> list[TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        return self._sd[name].detach()


class SafetensorsStore(TensorStore):
    """One or more safetensors files, memory-mapped; headers are read at construction."""

    def __init__(self, files: Sequence[Path], description: str | None = None):
        from safetensors import safe_open  # noqa: F401  (fail early if missing)

        self.files = [Path(f) for f in files]
        self.description = description or str(self.files[0] if len(self.files) == 1 else self.files[0].parent)
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        infos = []
        for f in self.files:
            h = self._handle(f)
            for name in h.keys():
                if name in self._where:
                    raise CorruptCheckpointError(
                        f"tensor {name!r} is stored twice: in {self._where[name]} and in {f}")
                sl = h.get_slice(name)
                dt = sl.get_dtype()
                infos.append(TensorInfo(name, tuple(int(s) for s in sl.get_shape()), _ST_DTYPES.get(dt, dt)))
                self._where[name] = f
        infos.sort(key=lambda i: natural_key(i.name))
        self._infos = infos

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            from safetensors import safe_open

            regular_file(f)
            try:
                with openable_name(f) as name:  # memory-mapped: stays readable after the name is closed
                    h = safe_open(name, framework="pt", device="cpu")
            except Exception as e:  # SafetensorError, OSError on truncated headers, ...
                raise CorruptCheckpointError(f"{shown(f)}: not a readable safetensors file ({e})") from e
            self._handles[f] = h
        return h

    def infos(self) -> list[TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        f = self._where[name]
        try:
            return self._handle(f).get_tensor(name)
        except Exception as e:
            raise CorruptCheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from e

    def load_expert(self, name: str, e: int) -> torch.Tensor:
        f = self._where[name]
        try:
            return self._handle(f).get_slice(name)[e:e + 1][0]
        except Exception as exc:
            raise CorruptCheckpointError(f"{f}: cannot read expert {e} of tensor {name!r} ({exc})") from exc


_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "params", "weights")


def _is_zip(f: Path) -> bool:
    """True for the zip format of ``torch.save`` (memory-mappable); False for the legacy format."""
    with open(f, "rb") as fh:
        return fh.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC


def _torch_load(f: Path) -> Mapping[str, Any]:
    regular_file(f)
    try:
        mmap = _is_zip(f)
        if not mmap:
            logger.info("%s: legacy (non-zip) torch file, loading without mmap", shown(f))
        with openable_name(f) as name:
            obj = torch.load(name, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:  # the weights-only unpickler refused (or could not parse) it
        raise CorruptCheckpointError(
            f"{f}: holds pickled Python objects, not a plain state dict; tbfast loads only tensors "
            f"(torch.load weights_only=True). Save model.state_dict() instead.") from e
    except Exception as e:
        raise CorruptCheckpointError(f"{f}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, torch.Tensor):
        raise CorruptCheckpointError(f"{f}: holds a single tensor, not a state dict")
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(f"{f}: holds a {type(obj).__name__}, not a state dict")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                logger.info("%s: using the state dict under key %r", f, key)
                return inner
    return obj


class TorchFileStore(TensorStore):
    """One or more ``torch.save`` files (state dicts), memory-mapped, opened on first use."""

    def __init__(self, files: Sequence[Path], description: str | None = None,
                 weight_map: Mapping[str, str] | None = None):
        self.files = [Path(f) for f in files]
        self.description = description or str(self.files[0] if len(self.files) == 1 else self.files[0].parent)
        self._sds: dict[Path, Mapping[str, Any]] = {}
        self._where: dict[str, Path] = {}
        infos: list[TensorInfo] = []
        # torch files have no separate header: each is opened (mmap, so no data is read) once here
        for f in self.files:
            sd = self._sd(f)
            for name, v in sd.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if name in self._where:
                    raise CorruptCheckpointError(
                        f"tensor {name!r} is stored twice: in {self._where[name]} and in {f}")
                self._where[name] = f
                infos.append(TensorInfo(name, tuple(v.shape), v.dtype))
        self._infos = infos

    def _sd(self, f: Path) -> Mapping[str, Any]:
        sd = self._sds.get(f)
        if sd is None:
            sd = self._sds[f] = _torch_load(f)
        return sd

    def infos(self) -> list[TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        return self._sd(self._where[name])[name].detach()


def to_float(t: torch.Tensor) -> torch.Tensor:
    """A loaded tensor in an analysable dtype: float8 is upcast to float32, others kept."""
    return t.to(torch.float32) if t.dtype in _UPCAST else t


def _index_store(index: Path) -> TensorStore:
    """A store over the shards an index names, checked against the index (`check_index`)."""
    files, where = read_index(index)
    safetensors = index.name.lower().endswith(".safetensors.index.json")
    store: SafetensorsStore | TorchFileStore = (SafetensorsStore if safetensors else TorchFileStore)(
        files, str(index.parent))
    check_index(index, files, where, store._where, safetensors)
    return store


def _dir_choice(d: Path) -> tuple[str, list[Path]]:
    """What a directory of shards holds, in the order tried: ``("index", [index])``,
    ``("safetensors", files)`` or ``("torch", files)``."""
    idx = sorted(d.glob("*.safetensors.index.json"))
    if idx:
        return "index", idx[:1]
    st = sorted(d.glob("*.safetensors"), key=lambda p: natural_key(p.name))
    if st:
        return "safetensors", st
    idx = sorted(d.glob("*.bin.index.json"))
    if idx:
        return "index", idx[:1]
    tf = sorted(d.glob("pytorch_model*.bin"), key=lambda p: natural_key(p.name))
    if not tf:
        tf = sorted((p for ext in ("bin", "pt", "pth") for p in d.glob(f"*.{ext}") if not NOT_WEIGHTS.match(p.name)),
                    key=lambda p: natural_key(p.name))
    if tf:
        return "torch", tf
    raise EmptyCheckpointError(f"{d}: no checkpoint files (*.safetensors, *.bin, *.pt, *.pth) in this directory")


def _dir_store(d: Path) -> TensorStore:
    kind, files = _dir_choice(d)
    if kind == "index":
        return _index_store(files[0])
    return (SafetensorsStore if kind == "safetensors" else TorchFileStore)(files, str(d))


def checkpoint_files(source: Any) -> list[Path]:
    """The files reading ``source`` opens (a checkpoint file, an index and its shards, a
    directory's shards, an adapter directory's config and weights); nothing for an in-memory
    source. Nothing is parsed but an index; where the selection itself fails (the reading
    will report why), every file directly in the directory is listed instead."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    p = Path(source).expanduser()
    try:
        if p.is_dir():
            if is_peft_adapter(p):
                from .peft import adapter_weights_file

                return [p / "adapter_config.json", adapter_weights_file(p)]
            kind, files = _dir_choice(p)
        else:
            kind, files = ("index" if p.name.lower().endswith(".index.json") else "file"), [p]
        if kind == "index":
            files = files + read_index(files[0])[0]
        return files
    except (CheckpointError, OSError):
        d = p if p.is_dir() else p.parent
        return [p] + (sorted(q for q in d.iterdir() if q.is_file()) if d.is_dir() else [])


def open_checkpoint(source: str | os.PathLike | Mapping[str, Any] | TensorStore) -> TensorStore:
    """A lazy `TensorStore` over a file, a directory of shards, or an in-memory state dict."""
    if isinstance(source, TensorStore):
        return source
    if isinstance(source, Mapping):
        return MappingStore(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or a state dict, got {type(source).__name__}")
    p = Path(source).expanduser()
    if not p.is_dir():
        regular_file(p, "checkpoint")  # missing, or a FIFO / device / socket: say which, open nothing
    if p.is_dir():
        if is_peft_adapter(p):
            raise ValueError(f"{p} is a PEFT adapter directory; open it with lora_layers(adapter, base)")
        return _dir_store(p)
    name = p.name.lower()
    if name.endswith(".index.json"):
        return _index_store(p)
    if name.endswith(".safetensors"):
        return SafetensorsStore([p])
    if name.endswith((".pt", ".bin", ".pth", ".ckpt")):
        return TorchFileStore([p])
    # unknown extension: try safetensors first, then torch
    try:
        return SafetensorsStore([p])
    except CorruptCheckpointError:
        try:
            return TorchFileStore([p])
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"{p}: neither a safetensors nor a torch checkpoint") from e
