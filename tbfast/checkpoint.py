"""Layers from checkpoint files, without the model class.

Readers (all lazy: a tensor is read only when its layer's ``matrices()`` is called):

- a ``.safetensors`` file, or a directory of safetensors shards (with or without a
  ``*.safetensors.index.json``), read through ``safetensors.safe_open`` (memory-mapped);
  an index's shard names must stay inside its directory (no ``..``, not absolute; symlinks
  inside the directory are followed) and it is checked against the shards' contents;
- a ``.pt`` / ``.bin`` / ``.pth`` file or a directory of ``.bin`` shards, read with
  ``torch.load(mmap=True, weights_only=True)``;
- an in-memory state dict;
- a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` /
  ``adapter_model.bin``) merged onto a base checkpoint: ``W + s * B @ A``.

Which tensors become layers (the rule for files, where there are no module types):

- only floating-point tensors whose last name component is ``weight``; the layer name is the
  tensor name without ``.weight``; biases, buffers, 1-D tensors (norms) and integer tensors are skipped;
- 2-D: ``Embedding`` when a dotted name component starts with ``emb`` or contains ``_emb``
  (``embed_tokens``, ``word_embeddings``, ``tok_emb``, ``emb``) or is ``wte`` / ``wpe``, else ``Linear``;
- 3-D ``(out, in, k)``: ``Conv1d``, 4-D ``(out, in, kh, kw)``: ``Conv2d``; one ``out x in`` matrix per
  kernel position, scaled by ``sqrt(conv_norm)`` (SPEC section 1);
- more than 4 dims: skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .layers import Layer, block_index

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "UnsupportedDtypeError",
    "EmptyCheckpointError",
    "TensorInfo",
    "TensorStore",
    "open_checkpoint",
    "checkpoint_layers",
    "lora_layers",
    "is_peft_adapter",
    "kind_from_name",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# errors


class CheckpointError(Exception):
    """Base class for checkpoint reading errors."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path (or a shard it names) does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint file exists but cannot be parsed."""


class UnsupportedDtypeError(CheckpointError, TypeError):
    """A weight tensor has a dtype tbfast cannot analyse."""


class EmptyCheckpointError(CheckpointError, ValueError):
    """A checkpoint holds no analysable weight matrix."""


# ----------------------------------------------------------------------------------------------
# dtypes

_ANALYSABLE = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_UPCAST = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
           if hasattr(torch, n)}

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


def _natural_key(name: str) -> list:
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
        infos.sort(key=lambda i: _natural_key(i.name))
        self._infos = infos

    def _handle(self, f: Path):
        h = self._handles.get(f)
        if h is None:
            from safetensors import safe_open

            if not f.is_file():
                raise CheckpointNotFoundError(f"checkpoint file not found: {f}")
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError, OSError on truncated headers, ...
                raise CorruptCheckpointError(f"{f}: not a readable safetensors file ({e})") from e
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


_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "params", "weights")


def _torch_load(f: Path) -> Mapping[str, Any]:
    if not f.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {f}")
    try:
        try:
            obj = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            logger.info("%s: legacy (non-zip) torch file, loading without mmap", f)
            obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CorruptCheckpointError(
                f"{f}: holds pickled Python objects, not a plain state dict; tbfast loads only tensors "
                f"(torch.load weights_only=True). Save model.state_dict() instead.") from e
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


_NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|scaler|rng_state.*|trainer_state)\.(bin|pt|pth)$")


def _shard_path(index: Path, shard: Any) -> Path:
    """The file an index's ``weight_map`` names, inside the index's directory. Absolute names and
    names with ``..`` components are refused (a hostile index must not make tbfast read outside
    the checkpoint); symlinks inside the directory (Hugging Face cache snapshots) are followed."""
    if not isinstance(shard, str) or not shard:
        raise CorruptCheckpointError(f"{index}: weight_map values must be shard file names, got {shard!r}")
    if (PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute() or PureWindowsPath(shard).drive
            or ".." in re.split(r"[\\/]", shard)):
        raise CorruptCheckpointError(f"{index}: shard name {shard!r} points outside the checkpoint directory "
                                     f"(absolute path or '..'); refused")
    return index.parent / shard


def _read_index(index: Path) -> tuple[list[Path], dict[str, Path]]:
    """The shard files an index names (in first-use order) and its tensor -> shard map."""
    try:
        meta = json.loads(index.read_text())
    except (ValueError, OSError) as e:
        raise CorruptCheckpointError(f"{index}: not a valid shard index ({e})") from e
    weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        got = ("nothing" if weight_map is None else "an empty map" if weight_map == {}
               else f"a {type(weight_map).__name__}")
        raise CorruptCheckpointError(f"{index}: not a valid shard index (needs a 'weight_map' object of "
                                     f"tensor name -> shard file; got {got})")
    where: dict[str, Path] = {}
    files: list[Path] = []
    for name, shard in weight_map.items():
        p = where[name] = _shard_path(index, shard)
        if p not in files:
            if not p.is_file():
                raise CheckpointNotFoundError(f"{index} names shard {shard!r}, which does not exist in {index.parent}")
            files.append(p)
    return files, where


def _index_store(index: Path) -> TensorStore:
    """A store over the shards an index names, checked against the index: a tensor the index
    places in a shard that does not hold it is an error; shard files in the directory that the
    index does not list, and tensors the index does not list, are warned about."""
    files, where = _read_index(index)
    safetensors = index.name.lower().endswith(".safetensors.index.json")
    store: SafetensorsStore | TorchFileStore = (SafetensorsStore if safetensors else TorchFileStore)(
        files, str(index.parent))
    held = store._where
    for name, p in where.items():
        if held.get(name) != p:
            other = f" (it is in {held[name].name})" if name in held else ""
            raise CorruptCheckpointError(f"{index}: the weight_map places tensor {name!r} in {p.name}, "
                                         f"which does not hold it{other}")
    unlisted = [n for n in held if n not in where]
    if unlisted:
        logger.warning("%s: %d tensor(s) in the shards are not listed in the index, read anyway: %s", index,
                       len(unlisted), ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else ""))
    if safetensors:
        present = index.parent.glob("*.safetensors")
    else:
        present = (q for ext in ("bin", "pt", "pth") for q in index.parent.glob(f"*.{ext}")
                   if not _NOT_WEIGHTS.match(q.name))
    extra = sorted(q.name for q in present if q not in files)
    if extra:
        logger.warning("%s: %d shard file(s) in %s are not listed in the index, ignored: %s", index, len(extra),
                       index.parent, ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
    return store


def _dir_store(d: Path) -> TensorStore:
    idx = sorted(d.glob("*.safetensors.index.json"))
    if idx:
        return _index_store(idx[0])
    st = sorted(d.glob("*.safetensors"), key=lambda p: _natural_key(p.name))
    if st:
        return SafetensorsStore(st, str(d))
    idx = sorted(d.glob("*.bin.index.json"))
    if idx:
        return _index_store(idx[0])
    tf = sorted(d.glob("pytorch_model*.bin"), key=lambda p: _natural_key(p.name))
    if not tf:
        tf = sorted((p for ext in ("bin", "pt", "pth") for p in d.glob(f"*.{ext}") if not _NOT_WEIGHTS.match(p.name)),
                    key=lambda p: _natural_key(p.name))
    if tf:
        return TorchFileStore(tf, str(d))
    raise EmptyCheckpointError(f"{d}: no checkpoint files (*.safetensors, *.bin, *.pt, *.pth) in this directory")


def open_checkpoint(source: str | os.PathLike | Mapping[str, Any] | TensorStore) -> TensorStore:
    """A lazy `TensorStore` over a file, a directory of shards, or an in-memory state dict."""
    if isinstance(source, TensorStore):
        return source
    if isinstance(source, Mapping):
        return MappingStore(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path or a state dict, got {type(source).__name__}")
    p = Path(source).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {p}")
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


# ----------------------------------------------------------------------------------------------
# layer discovery


_EMBED_RE = re.compile(r"(^|_)emb")


def kind_from_name(name: str, ndim: int) -> str | None:
    """The layer kind the file rule gives a ``name`` (without ``.weight``) of ``ndim`` dims."""
    if ndim == 2:
        parts = name.lower().split(".")
        if any(_EMBED_RE.search(p) for p in parts) or parts[-1] in ("wte", "wpe"):
            return "Embedding"
        return "Linear"
    if ndim == 3:
        return "Conv1d"
    if ndim == 4:
        return "Conv2d"
    return None


def _layer_name(tensor_name: str) -> str | None:
    if tensor_name == "weight":
        return ""
    if tensor_name.endswith(".weight"):
        return tensor_name[: -len(".weight")]
    return None


def _to_float(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32) if t.dtype in _UPCAST else t


def _as_matrices(t: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (1, out, in); (out, in, *kernel) -> (k, out, in), one matrix per kernel position."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], t.shape[1], -1).permute(2, 0, 1)


def _delta_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _resolve(name: str, keys: Iterable[str], suffix: str = ".weight") -> str | None:
    """The key for layer ``name`` in another checkpoint: exact, or a unique match up to a prefix
    (``bert.encoder.x`` vs ``encoder.x``)."""
    keys = keys if isinstance(keys, (set, dict)) else set(keys)
    exact = name + suffix
    if exact in keys:
        return exact
    cands = [k for k in keys if k.endswith(suffix) and
             (k.endswith("." + exact) or exact.endswith("." + k))]
    return cands[0] if len(cands) == 1 else None


def _base_store(base: Any) -> TensorStore:
    from torch import nn

    if isinstance(base, nn.Module):
        return MappingStore(base.state_dict(), "base model")
    return open_checkpoint(base)


def checkpoint_layers(
    source: str | os.PathLike | Mapping[str, Any] | TensorStore,
    *,
    base: Any = None,
    include_embedding: bool = True,
    types: Iterable[str] | None = None,
    conv_norm: float = 0.5,
    include: str | None = None,
    exclude: str | None = None,
    min_evals: int = 0,
    max_evals: int | None = None,
    lora_scaling: bool = True,
) -> list[Layer]:
    """`Layer` records for every weight matrix of a checkpoint (see the module doc for the rule).

    ``base`` (a path, state dict or model) turns each layer into ``W - W_base``; layers the base
    lacks are skipped with a warning. ``types`` restricts kinds; ``include`` / ``exclude`` are
    regular expressions searched in layer names; layers with fewer than ``min_evals`` or more
    than ``max_evals`` eigenvalues are dropped. Nothing is read from disk except headers.
    A PEFT LoRA adapter directory goes to `lora_layers` (``base`` required; ``lora_scaling``
    applies to adapters only).
    """
    if conv_norm <= 0:
        raise ValueError(f"conv_norm must be positive, got {conv_norm}")
    if isinstance(source, (str, os.PathLike)) and is_peft_adapter(source):
        return lora_layers(source, base, lora_scaling=lora_scaling, include=include, exclude=exclude,
                           min_evals=min_evals, max_evals=max_evals)
    store = open_checkpoint(source)
    bstore = _base_store(base) if base is not None else None
    bkeys = {i.name: i for i in bstore.infos()} if bstore is not None else {}
    wanted = set(types) if types is not None else {"Linear", "Conv1d", "Conv2d"} | (
        {"Embedding"} if include_embedding else set())
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    infos = store.infos()
    if not infos:
        raise EmptyCheckpointError(f"{store.description}: the checkpoint holds no tensors")

    layers: list[Layer] = []
    int_weights: list[TensorInfo] = []
    missing_in_base: list[str] = []
    for index, info in enumerate(infos):
        lname = _layer_name(info.name)
        if lname is None or len(info.shape) < 2:
            continue
        if not info.is_float:
            int_weights.append(info)
            continue
        if not info.supported:
            raise UnsupportedDtypeError(
                f"{store.description}: tensor {info.name!r} has dtype {info.dtype}, which tbfast cannot analyse "
                f"(supported: float16, bfloat16, float32, float64, float8)")
        kind = kind_from_name(lname, len(info.shape))
        if kind is None:
            logger.info("skipping %r: %d-D weight", info.name, len(info.shape))
            continue
        if kind not in wanted:
            continue
        if (inc is not None and not inc.search(lname)) or (exc is not None and exc.search(lname)):
            continue
        shape = info.shape
        k = int(math.prod(shape[2:])) if len(shape) > 2 else 1
        rows, cols = shape[0], shape[1]
        if k * min(rows, cols) < min_evals or (max_evals is not None and k * min(rows, cols) > max_evals):
            continue
        if rows == 0 or cols == 0 or k == 0:
            logger.info("skipping %r: empty shape %s", info.name, shape)
            continue
        scale = math.sqrt(conv_norm) if kind.startswith("Conv") else 1.0

        bname = None
        if bstore is not None:
            bname = _resolve(lname, bkeys)
            if bname is None:
                missing_in_base.append(lname)
                continue
            if bkeys[bname].shape != shape:
                raise ValueError(f"layer {lname!r}: base weight {bname!r} has shape {bkeys[bname].shape}, "
                                 f"the checkpoint's has shape {shape}")
        loader = _make_loader(store, info.name, bstore, bname)
        layers.append(Layer(name=lname, kind=kind, shape=shape, rows=rows, cols=cols, k=k, scale=scale,
                            block=block_index(lname), index=index, loader=loader))
    if missing_in_base:
        logger.warning("%d layer(s) not in the base checkpoint, skipped: %s", len(missing_in_base),
                       ", ".join(missing_in_base[:5]) + (" ..." if len(missing_in_base) > 5 else ""))
    if not layers:
        if int_weights and not any(i.is_float and _layer_name(i.name) and len(i.shape) >= 2 for i in infos):
            ex = ", ".join(f"{i.name} ({i.dtype})" for i in int_weights[:3])
            raise UnsupportedDtypeError(
                f"{store.description}: no floating-point weight matrices, only integer ones ({ex}); "
                f"quantized checkpoints are not supported")
        if bstore is not None and missing_in_base:
            raise EmptyCheckpointError(f"{store.description}: no layer has a matching weight in the base checkpoint")
        raise EmptyCheckpointError(
            f"{store.description}: no analysable weight matrices ({len(infos)} tensors; layers are "
            f"floating-point '*.weight' tensors with 2 to 4 dims, selected by type/name/eigenvalue count)")
    return layers


def _make_loader(store: TensorStore, name: str, bstore: TensorStore | None,
                 bname: str | None) -> Callable[[], torch.Tensor]:
    def loader() -> torch.Tensor:
        w = _to_float(store.load(name))
        if bstore is not None:
            wb = _to_float(bstore.load(bname))
            dt = _delta_dtype(w.dtype, wb.dtype)
            w = w.to(dt) - wb.to(dt)
        return _as_matrices(w)

    return loader


# ----------------------------------------------------------------------------------------------
# PEFT LoRA adapters

_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """True for a directory holding ``adapter_config.json`` and an adapter weights file."""
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file() and any((p / f).is_file() for f in _ADAPTER_FILES)


def _no_base_error(d: Path) -> ValueError:
    """The error for an adapter directory without ``base``. The adapter config's
    ``base_model_name_or_path`` is only quoted, never opened: tbfast reads only the paths the
    user names."""
    try:
        b = _adapter_config(d).get("base_model_name_or_path")
    except CheckpointError:
        b = None
    hint = f" (its adapter_config.json names {b!r})" if isinstance(b, str) and b else ""
    return ValueError(f"{d} is a PEFT LoRA adapter: pass the base checkpoint it was trained on with base=... "
                      f"(CLI: --base PATH){hint}; the adapter alone is not analysed")


def _adapter_config(d: Path) -> dict:
    f = d / "adapter_config.json"
    try:
        cfg = json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise CorruptCheckpointError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CorruptCheckpointError(f"{f}: expected a JSON object, got a {type(cfg).__name__}")
    if cfg.get("alpha_pattern") is not None and not isinstance(cfg["alpha_pattern"], dict):
        raise CorruptCheckpointError(f"{f}: 'alpha_pattern' must be an object (module pattern -> alpha), "
                                     f"got a {type(cfg['alpha_pattern']).__name__}")
    return cfg


def _pattern_value(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
    for pat, val in patterns.items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(rf"(.*\.)?{pat}", module):
            return val
    return default


def _strip_peft_prefix(name: str) -> str:
    for pre in ("base_model.model.", "base_model."):
        if name.startswith(pre):
            return name[len(pre):]
    return name


def lora_layers(
    adapter: str | os.PathLike,
    base: Any,
    *,
    lora_scaling: bool = True,
    include: str | None = None,
    exclude: str | None = None,
    min_evals: int = 0,
    max_evals: int | None = None,
) -> list[Layer]:
    """Merged layers ``W + s * B @ A`` of a PEFT LoRA adapter directory on its ``base`` checkpoint
    (path, state dict or model), kind ``"LoRA"``, one per adapted module.

    ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``; ``rank_pattern`` and
    ``alpha_pattern`` honoured; ``r`` is read from ``A``'s shape). ``lora_scaling=False`` uses
    ``s = 1`` (the reference quirk, SPEC section 1). Names drop PEFT's ``base_model.model.`` prefix.
    ``base`` is required: the config's ``base_model_name_or_path`` is never opened (a ValueError
    quotes it).
    """
    d = Path(adapter)
    if not d.is_dir():
        raise CheckpointNotFoundError(f"LoRA adapter directory not found: {d}")
    if not is_peft_adapter(d):
        raise CheckpointNotFoundError(f"{d}: not a PEFT adapter (needs adapter_config.json and one of {_ADAPTER_FILES})")
    if base is None:
        raise _no_base_error(d)
    cfg = _adapter_config(d)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{d}: peft_type {cfg.get('peft_type')!r} is not supported (only LoRA)")
    if cfg.get("use_dora"):
        raise ValueError(f"{d}: DoRA adapters are not supported (only plain LoRA)")
    wfile = next(d / f for f in _ADAPTER_FILES if (d / f).is_file())
    astore = open_checkpoint(wfile)
    bstore = _base_store(base)
    bkeys = {i.name: i for i in bstore.infos()}

    pairs: dict[str, dict[str, str]] = {}
    emb: set[str] = set()
    for info in astore.infos():
        m = _LORA_RE.match(info.name)
        if m is None:
            logger.info("adapter tensor %r is not a LoRA factor, ignored", info.name)
            continue
        mod = _strip_peft_prefix(m.group("module"))
        pairs.setdefault(mod, {})[m.group("ab")] = info.name
        if m.group("emb"):
            emb.add(mod)
    if not pairs:
        raise EmptyCheckpointError(f"{wfile}: no LoRA factors (lora_A / lora_B tensors)")

    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    try:
        alpha0 = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    except (TypeError, ValueError):
        raise CorruptCheckpointError(f"{d / 'adapter_config.json'}: lora_alpha {cfg.get('lora_alpha')!r} "
                                     f"is not a number") from None
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    ainfos = {i.name: i for i in astore.infos()}
    layers: list[Layer] = []
    for index, (mod, ab) in enumerate(sorted(pairs.items(), key=lambda kv: _natural_key(kv[0]))):
        if set(ab) != {"A", "B"}:
            raise CorruptCheckpointError(f"{wfile}: module {mod!r} has lora_{set('AB') - set(ab)} missing")
        if (inc is not None and not inc.search(mod)) or (exc is not None and exc.search(mod)):
            continue
        bname = _resolve(mod, bkeys)
        if bname is None:
            raise KeyError(f"LoRA module {mod!r}: no matching '{mod}.weight' in the base checkpoint")
        shape = bkeys[bname].shape
        if len(shape) != 2:
            raise ValueError(f"LoRA module {mod!r}: base weight has shape {shape}; only 2-D weights are supported")
        r = ainfos[ab["A"]].shape[0]  # lora_A and lora_embedding_A are (r, in)
        alpha = float(_pattern_value(mod, cfg.get("alpha_pattern") or {}, alpha0))
        s = (alpha / math.sqrt(r) if rslora else alpha / r) if lora_scaling else 1.0
        rows, cols = shape
        if min(rows, cols) < min_evals or (max_evals is not None and min(rows, cols) > max_evals):
            continue
        transpose = mod in emb or fan_in_fan_out

        def loader(a=ab["A"], b=ab["B"], bname=bname, s=s, transpose=transpose, mod=mod):
            w = _to_float(bstore.load(bname))
            dt = _delta_dtype(w.dtype, torch.float32)
            A = astore.load(a).to(dt)
            B = astore.load(b).to(dt)
            delta = (B @ A) * s
            if transpose:
                delta = delta.T
            if tuple(delta.shape) != tuple(w.shape):
                raise ValueError(f"LoRA module {mod!r}: B @ A has shape {tuple(delta.shape)}, "
                                 f"base weight {tuple(w.shape)}")
            return (w.to(dt) + delta).unsqueeze(0)

        layers.append(Layer(name=mod, kind="LoRA", shape=tuple(shape), rows=rows, cols=cols, k=1, scale=1.0,
                            block=block_index(mod), index=index, loader=loader))
    if not layers:
        raise EmptyCheckpointError(f"{d}: no LoRA layer left after selection")
    return layers
