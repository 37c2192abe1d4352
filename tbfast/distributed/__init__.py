"""ESD, power-law fits and metrics on a torch.distributed process group, each rank doing its share.

The analysed layers are assigned to ranks by estimated cost (`layer_cost`: Gram + eigensolve
flops, or measured seconds per size class) with a longest-processing-time-first greedy
(`plan`), so the slowest rank sets the time. Each rank runs the ordinary single-process
pipeline (`tbfast.pipeline.run`) on its share only; one tensor ``all_gather`` of
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

Modules: `planning` (cost model, LPT plan), `gather` (row encoding, all_gather, errors from other
ranks), `fsdp` (FSDP1 / FSDP2 weights materialised on the owner), `pipeline` (`run`,
`layer_metrics`). See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist

from .fsdp import fsdp1_units
from .pipeline import layer_metrics, model_layers, run
from .planning import EIG_FLOP_WEIGHT, layer_cost, plan, plan_loads

__all__ = ["active_group", "is_sharded", "layer_cost", "plan", "plan_loads", "run", "layer_metrics", "model_layers", "is_main_process",
           "init_from_env", "EIG_FLOP_WEIGHT"]


def active_group(process_group: Any = None, source: Any = None) -> Optional[Any]:
    """The process group to split work over, or None for a run on this rank alone.

    The rule (docs/DISTRIBUTED.md): a call waits for other ranks only when they must take part.
    ``process_group=<a group>``: that group (None if it has one rank). ``process_group=None``
    (the default): None, so a call made on one rank never waits for the others, unless the
    weights of ``source`` (a model, state dict or list of `Layer`) are sharded (FSDP1, FSDP2 /
    DTensor), where every rank holds a part and must take part anyway: then the default group.
    ``False``: never distributed (a sharded model then raises where its weights are read).
    """
    if process_group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group was given but torch.distributed is not initialised")
        return None
    if process_group is None:
        if source is None or not is_sharded(source):
            return None
        process_group = dist.group.WORLD
    return process_group if dist.get_world_size(process_group) > 1 else None


def is_sharded(source: Any) -> bool:
    """Whether ``source`` holds sharded weights: an FSDP1-wrapped model, or DTensor (FSDP2
    ``fully_shard``) parameters in a model, a state dict or a list of `Layer`."""
    if fsdp1_units(source):
        return True
    import sys

    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before it is imported
    DT = getattr(mod, "DTensor", None) if mod is not None else None
    if DT is None:
        return False
    if isinstance(source, torch.nn.Module):
        tensors: Any = source.parameters()
    elif isinstance(source, Mapping):
        tensors = source.values()
    elif isinstance(source, (list, tuple)):
        tensors = (getattr(getattr(x, "module", None), "weight", x) for x in source)
    else:
        return False
    return any(isinstance(t, DT) for t in tensors)


def is_main_process(process_group: Any = None, source: Any = None) -> bool:
    """True on rank 0 of the group `active_group` picks (and in a run on one rank alone): the
    rank that prints and writes."""
    group = active_group(process_group, source)
    return group is None or dist.get_rank(group) == 0


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
