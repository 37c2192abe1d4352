"""PEFT LoRA adapter directories: recognising one, its ``adapter_config.json`` and its tensor names.

Only the reading lives here; the merge ``W + s * B @ A`` and the scaling are layer rules
(`tbfast.layers.core.merge_lora`, `lora_scale`), applied by `tbfast.checkpoint.lora_layers`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, CorruptCheckpointError

__all__ = ["ADAPTER_FILES", "is_peft_adapter", "adapter_config", "adapter_weights_file", "no_base_error",
           "AdapterSettings", "adapter_settings", "lora_factors"]

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")


def is_peft_adapter(path: str | os.PathLike) -> bool:
    """True for a directory holding ``adapter_config.json`` and an adapter weights file."""
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file() and any((p / f).is_file() for f in ADAPTER_FILES)


def adapter_weights_file(d: Path) -> Path:
    """The adapter's weights file (safetensors preferred)."""
    return next(d / f for f in ADAPTER_FILES if (d / f).is_file())


def adapter_config(d: Path) -> dict:
    """The parsed ``adapter_config.json`` of adapter directory ``d``."""
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
    for pat in cfg.get("alpha_pattern") or {}:
        try:
            re.compile(pat)
            re.compile(rf"(.*\.)?{pat}")
        except re.error as e:
            raise CorruptCheckpointError(f"{f}: alpha_pattern key {pat!r} is not a valid regular expression "
                                         f"({e})") from None
    return cfg


def no_base_error(d: Path) -> ValueError:
    """The error for an adapter directory without ``base``. The adapter config's
    ``base_model_name_or_path`` is only quoted, never opened: tbfast reads only the paths the
    user names."""
    try:
        b = adapter_config(d).get("base_model_name_or_path")
    except CheckpointError:
        b = None
    hint = f" (its adapter_config.json names {b!r})" if isinstance(b, str) and b else ""
    return ValueError(f"{d} is a PEFT LoRA adapter: pass the base checkpoint it was trained on with base=... "
                      f"(CLI: --base PATH){hint}; the adapter alone is not analysed")


def _pattern_value(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
    for pat, val in patterns.items():
        if module == pat or module.endswith("." + pat) or re.fullmatch(rf"(.*\.)?{pat}", module):
            return val
    return default


@dataclass(frozen=True)
class AdapterSettings:
    """What an adapter config says about the merge: ``lora_alpha`` (default ``r``, else 8),
    its per-module ``alpha_pattern``, ``use_rslora`` and ``fan_in_fan_out``."""

    alpha: float
    alpha_pattern: Mapping[str, Any]
    rslora: bool
    fan_in_fan_out: bool

    def alpha_of(self, module: str) -> float:
        """``lora_alpha`` of ``module`` (its ``alpha_pattern`` entry if one matches)."""
        return float(_pattern_value(module, self.alpha_pattern, self.alpha))


def adapter_settings(d: Path, cfg: Mapping[str, Any]) -> AdapterSettings:
    """Check that ``cfg`` is a plain LoRA config and read its merge settings."""
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{d}: peft_type {cfg.get('peft_type')!r} is not supported (only LoRA)")
    if cfg.get("use_dora"):
        raise ValueError(f"{d}: DoRA adapters are not supported (only plain LoRA)")
    try:
        alpha0 = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    except (TypeError, ValueError):
        raise CorruptCheckpointError(f"{d / 'adapter_config.json'}: lora_alpha {cfg.get('lora_alpha')!r} "
                                     f"is not a number") from None
    return AdapterSettings(alpha=alpha0, alpha_pattern=cfg.get("alpha_pattern") or {},
                           rslora=bool(cfg.get("use_rslora", False)),
                           fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)))


def _strip_peft_prefix(name: str) -> str:
    for pre in ("base_model.model.", "base_model."):
        if name.startswith(pre):
            return name[len(pre):]
    return name


def lora_factors(names: Iterable[str]) -> tuple[dict[str, dict[str, str]], set[str], list[str]]:
    """Group adapter tensor names by module: ``{module: {"A": name, "B": name}}`` (module names
    without PEFT's ``base_model.model.`` prefix), the modules whose factors are embedding factors
    (``lora_embedding_A/B``), and the names that are not LoRA factors."""
    pairs: dict[str, dict[str, str]] = {}
    emb: set[str] = set()
    other: list[str] = []
    for name in names:
        m = _LORA_RE.match(name)
        if m is None:
            other.append(name)
            continue
        mod = _strip_peft_prefix(m.group("module"))
        pairs.setdefault(mod, {})[m.group("ab")] = name
        if m.group("emb"):
            emb.add(mod)
    return pairs, emb, other
