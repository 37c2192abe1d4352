"""`tbfast.pipeline.run` over a process group: each rank runs the ordinary pipeline on its share
of the layers, one ``all_gather`` of the table's rows gives every rank the whole table."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import NoLayersError
from ..layers import Layer
from ..metrics import ESDMetrics
from ..options import ESDOptions, FitOptions, take_options
from ..pipeline import PipelineResult, check_on_invalid, raise_nonfinite
from ..pipeline import run as run_local
from ..spectra import esd_layers
from .fsdp import fsdp1_layers, fsdp1_units, materialise
from .gather import ROW, encode_rows, gather_rows, gather_spectra, metrics_from_rows
from .planning import layer_cost, plan
from .replicas import CHECK_WIDTH, raise_on_disagreement, replica_checks

__all__ = ["run", "layer_metrics", "model_layers"]

logger = logging.getLogger(__name__)


def run(layers: list[Layer], esd_options: ESDOptions = ESDOptions(), fit_options: FitOptions = FitOptions(), *,
        group: Any, with_spectra: bool = False, costs: Optional[dict[int, float]] = None,
        on_invalid: str = "raise") -> PipelineResult:
    """`tbfast.pipeline.run` over ``group``: each rank computes its share of ``layers``.

    Returns the full table on every rank. Layers whose weights every rank holds whole are
    checksummed on every rank; ranks that disagree (or NaN/Inf on a rank that does not own the
    layer) raise `tbfast.distributed.replicas.ReplicaMismatchError` on every rank. With ``with_spectra`` the eigenvalues (float64,
    absolute units) and the fit windows are gathered too, so every rank also gets the full
    `Spectra` and `PowerLawFit`; otherwise those two are None. ``extra["distributed"]`` of the
    table records this rank's share, what it materialised and every rank's compute seconds.
    """
    check_on_invalid(on_invalid)
    if not layers:
        raise NoLayersError("no analysable layer found (nothing matched the layer types, filters and min_evals)")
    ws, me = dist.get_world_size(group), dist.get_rank(group)
    owner = plan(layers, ws, cost=lambda l: layer_cost(l, costs))
    stats: dict[str, Any] = {"rank": me, "world_size": ws, "owner": owner, "materialized": [],
                             "materialized_bytes": 0, "loaded": []}
    layers = materialise(list(layers), owner, group, stats)
    mine = [i for i in range(len(layers)) if owner[i] == me]
    shares = [[i for i in range(len(layers)) if owner[i] == r] for r in range(ws)]

    checks = replica_checks(layers)
    t0 = time.perf_counter()
    error: Optional[BaseException] = None
    rows = np.zeros((0, ROW))
    local_values: Optional[torch.Tensor] = None
    if mine:
        try:
            res = run_local([_watched(layers[i], stats) for i in mine], esd_options, fit_options, on_invalid="mark")
            sp = res.spectra
            rows = encode_rows(res.metrics, res.fit, sp.offsets)
            # absolute units (float64): the ESD may have been computed on a power-of-two scaled copy
            local_values = torch.cat([sp.eigenvalues(i) for i in range(len(sp))]) if len(sp) else None
        except Exception as exc:  # travels to every rank below
            error = exc
    seconds = time.perf_counter() - t0

    # this rank's checksums of every replicated layer travel with its rows (docs/DISTRIBUTED.md)
    width = max(len(s) for s in shares)
    nck = -(-len(layers) * CHECK_WIDTH // ROW)
    send = np.zeros((width + nck, ROW))
    send[:len(rows)] = rows
    send[width:].reshape(-1)[:len(layers) * CHECK_WIDTH] = checks.reshape(-1)
    allrows = gather_rows(error, seconds, send, width + nck, group)
    allchecks = allrows[:, 1 + width:].reshape(ws, -1)[:, :len(layers) * CHECK_WIDTH].reshape(ws, len(layers), -1)
    raise_on_disagreement(allchecks, owner, [l.name for l in layers])  # the same verdict on every rank
    stats["rank_seconds"] = allrows[:, 0, 1].tolist()
    table = np.zeros((len(layers), ROW))
    for r, share in enumerate(shares):
        table[share] = allrows[r, 1:1 + len(share)]
    m = metrics_from_rows(layers, table, fit_options.fit, stats)

    spectra = fit = None
    if with_spectra:
        spectra, fit = gather_spectra(layers, shares, table, local_values, fit_options.fit, group)
    if on_invalid == "raise":
        raise_nonfinite(m)
    logger.info("rank %d/%d: %d of %d layers in %.3f s (slowest rank %.3f s)", me, ws, len(mine), len(layers),
                seconds, max(stats["rank_seconds"]))
    return PipelineResult(spectra=spectra, fit=fit, metrics=m)


def _watched(layer: Layer, stats: dict) -> Layer:
    inner = layer.loader

    def loader():
        stats["loaded"].append(layer.name)
        return inner()

    return dataclasses.replace(layer, loader=loader)


def layer_metrics(source: Any, *, group: Any, on_invalid: str = "raise", costs: Optional[dict[int, float]] = None,
                  **options: Any) -> ESDMetrics:
    """`tbfast.layer_metrics` of a model (plain, DDP-wrapped, FSDP1 or FSDP2-sharded) over
    ``group``; the same keyword options."""
    check_on_invalid(on_invalid)
    opts, layer_options = take_options(options, where="tbfast.distributed.layer_metrics")
    layers = model_layers(source, group, costs, **layer_options)
    return run(layers, opts[ESDOptions], opts[FitOptions], group=group, costs=costs, on_invalid=on_invalid).metrics


def model_layers(source: Any, group: Any, costs: Optional[dict[int, float]] = None, **layer_options: Any) -> list[Layer]:
    """The layers of ``source`` for a run over ``group``: an FSDP1-wrapped model's flat
    parameters are gathered per layer on the owner (`fsdp.fsdp1_layers`); any other source as
    `tbfast.esd` reads it."""
    if fsdp1_units(source):
        return fsdp1_layers(source, group, costs, **layer_options)
    return esd_layers(source, **layer_options)
