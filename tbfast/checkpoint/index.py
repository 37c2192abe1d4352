"""Sharded-checkpoint indexes (``*.safetensors.index.json``, ``*.bin.index.json``).

`read_index` reads an index's ``weight_map`` (tensor name -> shard file). Path safety: a shard
name must stay inside the index's directory (no ``..`` component, not absolute; symlinks inside
the directory are followed), so a hostile index never makes tbfast read outside what the user
named. `check_index` compares the index with what the shards hold.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from .files import regular_file

__all__ = ["read_index", "check_index", "shard_path", "NOT_WEIGHTS"]

logger = logging.getLogger(__name__)

#: Files of a training run's directory that are not model weights.
NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|scaler|rng_state.*|trainer_state)\.(bin|pt|pth)$")


def shard_path(index: Path, shard: Any) -> Path:
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


def read_index(index: Path) -> tuple[list[Path], dict[str, Path]]:
    """The shard files an index names (in first-use order) and its tensor -> shard map."""
    regular_file(index, "shard index")  # a FIFO or device is refused before it is opened
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
        p = where[name] = shard_path(index, shard)
        if p not in files:
            if not p.exists():
                raise CheckpointNotFoundError(f"{index} names shard {shard!r}, which does not exist in {index.parent}")
            regular_file(p, "shard")
            files.append(p)
    return files, where


def check_index(index: Path, files: Iterable[Path], where: Mapping[str, Path], held: Mapping[str, Path],
                safetensors: bool) -> None:
    """Check an index against its shards (``held``: tensor -> shard file that holds it): a tensor
    the index places in a shard that does not hold it is an error; shard files in the directory
    that the index does not list, and tensors the index does not list, are warned about."""
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
                   if not NOT_WEIGHTS.match(q.name))
    files = list(files)
    extra = sorted(q.name for q in present if q not in files)
    if extra:
        logger.warning("%s: %d shard file(s) in %s are not listed in the index, ignored: %s", index, len(extra),
                       index.parent, ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
