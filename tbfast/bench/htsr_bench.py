"""Benchmarks of the HT-SR tools built on tbfast: FARMS alpha and MoE expert rows.

- ``--farms``: FARMS alpha (100 x 200 windows, 10 x 10 per matrix, median fit) of every analysed
  layer of a workload, `tbfast.layer_metrics(farms=True)` (all windows of all layers through the
  batched eigensolver) against a per-window loop doing the same work: for each layer and window
  the smaller Gram matrix and one ``torch.linalg.eigvalsh``, then the pooled ESD sorted and the
  reference's median fit (`tbfast.bench.reference.reference_fit`, one host sync per scalar).
- ``--moe``: a Mixtral-shaped expert count (32 blocks x 8 experts x 3 matrices = 768 matrices;
  sides scaled down by ``--moe-scale``, default 16: hidden 256, intermediate 896, on a CPU),
  stored as fused 3-D parameters, analysed by `tbfast.layer_metrics` from the model and from a
  safetensors file, against the reference estimator (`reference_esd`: per-matrix ``svdvals``)
  on the same weights kept as a ``ModuleList`` of ``nn.Linear``.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from ..layers import find_layers
from ..layers.farms import farms_layer, grid_starts, window_shape
from ..options import FarmsOptions
from ..pipeline import layer_metrics
from .esd_bench import time_call
from .reference import reference_esd, reference_fit
from .workloads import get_workload, heavy_tailed

__all__ = ["FARMS_WORKLOADS", "farms_window_loop", "run_farms_benchmark", "mixtral_shaped", "run_moe_benchmark",
           "format_htsr"]

FARMS_WORKLOADS = ("minilm", "roberta-base-shaped")


def farms_window_loop(layers: list, options: FarmsOptions = FarmsOptions()) -> list[float]:
    """FARMS median alpha per layer, one ``torch.linalg.eigvalsh`` per window (the loop being beaten)."""
    out = []
    for layer in layers:
        mats = layer.matrices().float()
        r, c = window_shape(layer.rows, layer.cols, options)
        evals = []
        for M in mats:
            for i in grid_starts(layer.rows, r, options.windows_per_dim):
                for j in grid_starts(layer.cols, c, options.windows_per_dim):
                    X = M[i:i + r, j:j + c] * layer.scale
                    G = X @ X.T if r <= c else X.T @ X
                    evals.append(torch.linalg.eigvalsh(G).clamp(min=0))
        e, _ = torch.sort(torch.cat(evals))
        out.append(reference_fit(e, "median")[0])
    return out


def run_farms_benchmark(workloads: list[str], device: torch.device, repeats: int = 3) -> list[dict[str, Any]]:
    """Time FARMS (tbfast, batched) against the per-window loop on each workload (medians)."""
    rows = []
    for name in workloads:
        model = get_workload(name).build(0).to(device)
        layers = find_layers(model, types=("Linear", "Conv2d"))
        t_tb, m = time_call(lambda: layer_metrics(layers, farms=True), device, repeats)
        t_loop, ref = time_call(lambda: farms_window_loop(layers), device, repeats, warmup=0)
        windows = sum(farms_layer(l, FarmsOptions()).k for l in layers)
        rows.append({"workload": name, "layers": len(layers), "windows": windows,
                     "tbfast_s": statistics.median(t_tb), "loop_s": statistics.median(t_loop),
                     "tbfast_runs": t_tb, "loop_runs": t_loop,
                     "ratio": statistics.median(t_loop) / statistics.median(t_tb),
                     "max_abs_alpha_diff": float(np.max(np.abs(m.alpha.numpy() - np.asarray(ref))))})
    return rows


def mixtral_shaped(scale: int = 16, blocks: int = 32, experts: int = 8, seed: int = 0,
                   fused: bool = True) -> nn.Module:
    """Mixtral-8x7B's expert matrices (hidden 4096, intermediate 14336; sides divided by
    ``scale``), heavy-tailed random: fused ``[experts, out, in]`` parameters ``gate_proj``,
    ``up_proj``, ``down_proj`` per block (``fused``), or a ``ModuleList`` of experts with
    ``nn.Linear`` ``w1``, ``w3``, ``w2`` holding the same matrices."""
    h, inter = 4096 // scale, 14336 // scale
    g = np.random.default_rng(seed)
    root = nn.Module()
    root.layers = nn.ModuleList()
    for b in range(blocks):
        mats = {p: torch.stack([heavy_tailed(rows, cols, 2.5 + 3.5 * ((b * experts + e) % 17) / 16, g)
                                for e in range(experts)])
                for p, rows, cols in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter))}
        blk = nn.Module()
        blk.experts = nn.Module() if fused else nn.ModuleList()
        if fused:
            for p, w in mats.items():
                blk.experts.register_parameter(p, nn.Parameter(w, requires_grad=False))
        else:
            for e in range(experts):
                ex = nn.Module()
                for p, attr in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                    w = mats[p][e]
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                    lin.weight = nn.Parameter(w, requires_grad=False)
                    ex.add_module(attr, lin)
                blk.experts.append(ex)
        root.layers.append(blk)
    return root


def run_moe_benchmark(device: torch.device, scale: int = 16, repeats: int = 3) -> dict[str, Any]:
    """Time the expert rows of a Mixtral-shaped model: tbfast from the fused model, from a
    safetensors file of it, and from the ModuleList model; the reference on the ModuleList model."""
    from safetensors.torch import save_file

    fused, split = mixtral_shaped(scale, fused=True).to(device), mixtral_shaped(scale, fused=False).to(device)
    t_fused, m = time_call(lambda: layer_metrics(fused), device, repeats)
    t_list, _ = time_call(lambda: layer_metrics(split), device, repeats)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in fused.state_dict().items()}, path)
        t_file, mf = time_call(lambda: layer_metrics(path, device=device), device, repeats)
    t_ref, ref = time_call(lambda: reference_esd(split), device, repeats, warmup=0)
    ref_alpha = dict(zip(ref["name"], ref["alpha"]))
    diffs = []
    for name, a in zip(m.names, m.alpha.tolist()):  # layers.B.experts.P[e] <-> layers.B.experts.e.wK
        base, e = name[:-1].split("[")
        blk, p = base.rsplit(".", 1)
        w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[p]
        diffs.append(abs(a - ref_alpha[f"{blk}.{e}.{w}"]))
    h, inter = 4096 // scale, 14336 // scale
    return {"matrices": len(m), "shape": f"32 blocks x 8 experts x 3 ({inter}x{h}, {inter}x{h}, {h}x{inter})",
            "scale": scale, "tbfast_fused_s": statistics.median(t_fused), "tbfast_file_s": statistics.median(t_file),
            "tbfast_modulelist_s": statistics.median(t_list), "reference_s": statistics.median(t_ref),
            "runs": {"fused": t_fused, "file": t_file, "modulelist": t_list, "reference": t_ref},
            "ratio_fused": statistics.median(t_ref) / statistics.median(t_fused),
            "ratio_file": statistics.median(t_ref) / statistics.median(t_file),
            "rows_from_file": len(mf), "max_abs_alpha_diff": max(diffs)}


def format_htsr(farms: list[dict] | None, moe: dict | None, markdown: bool) -> str:
    """The tables of `run_farms_benchmark` / `run_moe_benchmark`."""
    lines = []
    bar = "|" if markdown else " "
    if farms:
        lines.append("FARMS alpha (100x200 windows, 10x10 per matrix, median fit): batched tbfast vs per-window loop")
        lines.append(f"{bar} workload {bar} layers {bar} windows {bar} tbfast (s) {bar} per-window loop (s) {bar} "
                     f"speed-up {bar} max abs alpha diff {bar}")
        if markdown:
            lines.append("|---|---|---|---|---|---|---|")
        for r in farms:
            lines.append(f"{bar} {r['workload']} {bar} {r['layers']} {bar} {r['windows']} {bar} {r['tbfast_s']:.3f} "
                         f"{bar} {r['loop_s']:.3f} {bar} {r['ratio']:.1f}x {bar} {r['max_abs_alpha_diff']:.1e} {bar}")
    if moe:
        lines.append("")
        lines.append(f"MoE experts, Mixtral-shaped count ({moe['shape']}, sides / {moe['scale']}), median fit")
        lines.append(f"{bar} what {bar} seconds {bar} speed-up vs reference {bar}")
        if markdown:
            lines.append("|---|---|---|")
        ref = moe["reference_s"]
        for label, key in (("reference (per-matrix svdvals, ModuleList)", "reference_s"),
                           ("tbfast, fused 3-D parameters (model)", "tbfast_fused_s"),
                           ("tbfast, fused, from safetensors", "tbfast_file_s"),
                           ("tbfast, ModuleList of nn.Linear", "tbfast_modulelist_s")):
            lines.append(f"{bar} {label} {bar} {moe[key]:.3f} {bar} {ref / moe[key]:.1f}x {bar}")
        lines.append(f"{moe['matrices']} expert rows; max abs(alpha - reference alpha) {moe['max_abs_alpha_diff']:.1e}")
    return "\n".join(lines)
