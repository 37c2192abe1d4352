"""Layers of checkpoint files and PEFT adapter directories (front ends over the stores).

Which tensors become layers (the rule for files, where there are no module types):

- only floating-point tensors whose last name component is ``weight``; the layer name is the
  tensor name without ``.weight``; biases, buffers, 1-D tensors (norms) and integer tensors are skipped;
- the kind comes from the name and the number of dims (`tbfast.layers.core.kind_from_name`):
  2-D ``Embedding`` or ``Linear``, 3-D ``Conv1d``, 4-D ``Conv2d`` (one ``out x in`` matrix per
  kernel position, scaled by ``sqrt(conv_norm)``, SPEC section 1); more than 4 dims: skipped.

Every matrix rule (kinds, conv reshape, delta, LoRA merge and scaling) is `tbfast.layers.core`'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, EmptyCheckpointError, UnsupportedDtypeError
from ..layers.experts import EXPERT_KIND, expert_layers, is_expert_tensor
from ..layers.core import (Layer, as_matrices, delta_dtype, evals_in_range, kind_from_name, lora_scale, merge_lora,
                           name_filter, wanted_kinds, weight_delta, weight_layer)
from .peft import (ADAPTER_FILES, adapter_config, adapter_settings, adapter_weights_file, is_peft_adapter,
                   lora_factors, no_base_error)
from .stores import MappingStore, TensorInfo, TensorStore, natural_key, open_checkpoint, to_float

__all__ = ["checkpoint_layers", "lora_layers"]

logger = logging.getLogger(__name__)


def _layer_name(tensor_name: str) -> str | None:
    if tensor_name == "weight":
        return ""
    if tensor_name.endswith(".weight"):
        return tensor_name[: -len(".weight")]
    return None


def _find_key(name: str, keys: Iterable[str], suffix: str = ".weight") -> str | None:
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
    wanted = wanted_kinds(types, include_embedding, default=("Linear", "Conv2d", "Conv1d", EXPERT_KIND))
    selected = name_filter(include, exclude)
    infos = store.infos()
    if not infos:
        raise EmptyCheckpointError(f"{store.description}: the checkpoint holds no tensors")

    layers: list[Layer] = []
    int_weights: list[TensorInfo] = []
    missing_in_base: list[str] = []
    too_many_dims: list[str] = []
    for index, info in enumerate(infos):
        if is_expert_tensor(info.name, info.shape) and info.is_float and info.supported:
            if EXPERT_KIND in wanted:  # fused MoE experts: one row per expert
                layers += _expert_rows(store, info, index, selected, min_evals, max_evals, bstore, bkeys,
                                       missing_in_base)
            continue
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
            too_many_dims.append(info.name)
            continue
        if kind not in wanted or not selected(lname):
            continue
        layer = weight_layer(lname, kind, info.shape, index=index, conv_norm=conv_norm)
        if not evals_in_range(layer.num_evals, min_evals, max_evals):
            continue
        if layer.rows == 0 or layer.cols == 0 or layer.k == 0:
            logger.info("skipping %r: empty shape %s", info.name, info.shape)
            continue
        bname = None
        if bstore is not None:
            bname = _find_key(lname, bkeys)
            if bname is None:
                missing_in_base.append(lname)
                continue
            if bkeys[bname].shape != info.shape:
                raise ValueError(f"layer {lname!r}: base weight {bname!r} has shape {bkeys[bname].shape}, "
                                 f"the checkpoint's has shape {info.shape}")
        layer.loader = _file_loader(store, info.name, bstore, bname)
        layers.append(layer)
    if too_many_dims:
        logger.warning("%s: %d weight tensor(s) with more than 4 dims are not analysed: %s", store.description,
                       len(too_many_dims), ", ".join(too_many_dims[:5]) + (" ..." if len(too_many_dims) > 5 else ""))
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


def _expert_rows(store: TensorStore, info: TensorInfo, index: int, selected: Callable[[str], bool], min_evals: int,
                 max_evals: int | None, bstore: TensorStore | None, bkeys: Mapping[str, TensorInfo],
                 missing_in_base: list[str]) -> list[Layer]:
    """The expert rows of one fused 3-D tensor (`tbfast.layers.experts`); each loader reads one
    expert's slice of the file."""
    bname = None
    if bstore is not None:
        bname = info.name if info.name in bkeys else _find_key(info.name, bkeys, suffix="")
        if bname is None:
            missing_in_base.append(info.name)
            return []
        if bkeys[bname].shape != info.shape:
            raise ValueError(f"layer {info.name!r}: base tensor {bname!r} has shape {bkeys[bname].shape}, "
                             f"the checkpoint's has shape {info.shape}")

    def load(e: int) -> torch.Tensor:
        w = to_float(store.load_expert(info.name, e))
        if bstore is None:
            return w
        wb = to_float(bstore.load_expert(bname, e))
        return weight_delta(w, wb, delta_dtype(w.dtype, wb.dtype))

    rows = expert_layers(info.name, info.shape, load, index=index)
    return [l for l in rows if selected(l.name) and evals_in_range(l.num_evals, min_evals, max_evals)
            and l.rows > 0 and l.cols > 0]


def _file_loader(store: TensorStore, name: str, bstore: TensorStore | None,
                 bname: str | None) -> Callable[[], torch.Tensor]:
    def loader() -> torch.Tensor:
        w = to_float(store.load(name))
        if bstore is not None:
            wb = to_float(bstore.load(bname))
            w = weight_delta(w, wb, delta_dtype(w.dtype, wb.dtype))
        return as_matrices(w)

    return loader


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
        raise CheckpointNotFoundError(f"{d}: not a PEFT adapter (needs adapter_config.json and one of {ADAPTER_FILES})")
    if base is None:
        raise no_base_error(d)
    settings = adapter_settings(d, adapter_config(d))
    wfile = adapter_weights_file(d)
    astore = open_checkpoint(wfile)
    bstore = _base_store(base)
    bkeys = {i.name: i for i in bstore.infos()}
    ainfos = {i.name: i for i in astore.infos()}
    pairs, emb, other = lora_factors(ainfos)
    if other:  # e.g. modules_to_save weights: data the analysis leaves out, so say it at warning level
        logger.warning("%s: %d adapter tensor(s) are not LoRA factors and are not analysed: %s", wfile, len(other),
                       ", ".join(other[:5]) + (" ..." if len(other) > 5 else ""))
    if not pairs:
        raise EmptyCheckpointError(f"{wfile}: no LoRA factors (lora_A / lora_B tensors)")

    selected = name_filter(include, exclude)
    layers: list[Layer] = []
    for index, (mod, ab) in enumerate(sorted(pairs.items(), key=lambda kv: natural_key(kv[0]))):
        if set(ab) != {"A", "B"}:
            raise CorruptCheckpointError(f"{wfile}: module {mod!r} has lora_{set('AB') - set(ab)} missing")
        if not selected(mod):
            continue
        bname = _find_key(mod, bkeys)
        if bname is None:
            raise KeyError(f"LoRA module {mod!r}: no matching '{mod}.weight' in the base checkpoint")
        shape = bkeys[bname].shape
        if len(shape) != 2:
            raise ValueError(f"LoRA module {mod!r}: base weight has shape {shape}; only 2-D weights are supported")
        r = ainfos[ab["A"]].shape[0]  # lora_A and lora_embedding_A are (r, in)
        if r == 0:
            raise CorruptCheckpointError(f"{wfile}: module {mod!r} has LoRA rank 0 (lora_A shape "
                                         f"{ainfos[ab['A']].shape}): no update to merge, and s = lora_alpha / r "
                                         f"is undefined")
        s = lora_scale(settings.alpha_of(mod), r, rslora=settings.rslora, enabled=lora_scaling)
        layer = weight_layer(mod, "LoRA", shape, index=index)
        if not evals_in_range(layer.num_evals, min_evals, max_evals):
            continue
        transpose = mod in emb or settings.fan_in_fan_out

        def loader(a=ab["A"], b=ab["B"], bname=bname, s=s, transpose=transpose, mod=mod):
            w = to_float(bstore.load(bname))
            dt = delta_dtype(w.dtype, torch.float32)
            return merge_lora(mod, w, [(astore.load(a), astore.load(b), s, transpose)], dt).unsqueeze(0)

        def parts(a=ab["A"], b=ab["B"], bname=bname, s=s, transpose=transpose):
            return to_float(bstore.load(bname)), [(astore.load(a), astore.load(b), s, transpose)]

        layer.loader = loader
        layer.lora = parts  # the exact LoRA ESD's factors (tbfast.lora.stage)
        layers.append(layer)
    if not layers:
        raise EmptyCheckpointError(f"{d}: no LoRA layer left after selection")
    return layers
