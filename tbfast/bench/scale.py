"""Scale benchmark: the distributed ESD on N ranks, measured and projected.

- ``measure_ranks``: runs the distributed analysis of a workload on 1, 2, ... ranks of a gloo
  (CPU) or NCCL (CUDA) group started here, and reports every rank's compute time and the
  critical path (the slowest rank) next to the wall time.
- ``measure_shape_costs``: seconds per matrix (ESD + fit + metrics) for each matrix shape.
- ``project``: the planner (`tbfast.distributed.plan`) on a model's layers with those measured
  costs: per-rank time, critical path and load imbalance for N ranks, e.g. the full
  LLaMA-7B-shaped model (224 matrices, Gram size 4096) on 1, 4 and 8 devices.
- ``llama7b_layers``: the 32-block LLaMA-7B shapes as lazily generated heavy-tailed layers
  (a matrix exists only while the ESD stage's memory budget chunk that holds it is processed).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..distributed import layer_cost, plan, plan_loads
from ..layers import Layer, weight_layer
from ..options import ESDOptions, FitOptions, split_options
from ..pipeline import run
from .workloads import get_workload, heavy_tailed

__all__ = ["llama7b_layers", "LLAMA7B_SHAPES", "measure_shape_costs", "project", "measure_ranks",
           "format_scale"]

#: one LLaMA-7B decoder block: (name, rows, cols)
LLAMA7B_SHAPES = tuple([(f"self_attn.{n}_proj", 4096, 4096) for n in "qkvo"]
                       + [("mlp.gate_proj", 11008, 4096), ("mlp.up_proj", 11008, 4096),
                          ("mlp.down_proj", 4096, 11008)])

_FIT_OPTS = dict(fit="median", xmin_pos=2.0, filter_zeros=False, evals_thresh=1e-5, bins=100,
                 xmin_bound="reference", sr_mid_pos=None, method="auto", backend="auto")


def _options(dtype: torch.dtype) -> tuple[ESDOptions, FitOptions]:
    opts = split_options({**_FIT_OPTS, "dtype": dtype}, allowed=(ESDOptions, FitOptions))
    return opts[ESDOptions], opts[FitOptions]


def llama7b_layers(blocks: int = 32, seed: int = 0, device: Optional[torch.device] = None) -> list[Layer]:
    """The LLaMA-7B decoder matrices (7 per block, 224 for 32 blocks) as lazy `Layer` records.

    Each loader generates its heavy-tailed fp32 matrix from its own seed when called, so memory
    is bounded by the ESD stage's ``memory_budget`` chunks, never the 26 GB of the whole model.
    """
    layers = []
    for b in range(blocks):
        for j, (name, rows, cols) in enumerate(LLAMA7B_SHAPES):
            full = f"model.layers.{b}.{name}"
            df = 2.5 + 3.5 * j / (len(LLAMA7B_SHAPES) - 1)

            def loader(rows=rows, cols=cols, df=df, s=seed * 100003 + b * 7 + j):
                w = heavy_tailed(rows, cols, df, np.random.default_rng(s))
                return (w if device is None else w.to(device)).unsqueeze(0)

            layers.append(weight_layer(full, "Linear", (rows, cols), index=len(layers), loader=loader))
    return layers


def _workload_layers(name: str, device: torch.device) -> list[Layer]:
    if name == "llama7b":
        return llama7b_layers(device=device)
    from ..layers import find_layers

    return find_layers(get_workload(name).build(0).to(device), types=("Linear", "Conv2d"))


def measure_shape_costs(shapes: Sequence[tuple[int, int]], device: torch.device, repeats: int = 1,
                        dtype: torch.dtype = torch.float32) -> dict[tuple[int, int], float]:
    """Median seconds per matrix of ESD + median fit + metrics, per ``(rows, cols)`` shape."""
    from ..layers import layers_from_matrices

    out = {}
    for rows, cols in shapes:
        w = heavy_tailed(rows, cols, 3.0, np.random.default_rng(rows * 31 + cols)).to(device)
        layers = layers_from_matrices([w])
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(layers, *_options(dtype))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[(rows, cols)] = statistics.median(times[1:])
    return out


def project(layers: Sequence[Layer], shape_costs: dict[tuple[int, int], float],
            ranks: Sequence[int] = (1, 4, 8)) -> list[dict[str, Any]]:
    """Planned per-rank time, critical path and imbalance for each rank count (no communication)."""
    def cost(l: Layer) -> float:
        c = shape_costs.get((l.rows, l.cols))
        return l.k * c if c is not None else layer_cost(l)

    missing = {(l.rows, l.cols) for l in layers} - set(shape_costs)
    if missing:
        raise ValueError(f"no measured cost for matrix shapes {sorted(missing)}")
    rows = []
    for n in ranks:
        owner = plan(layers, n, cost=cost)
        loads = plan_loads(layers, owner, n, cost=cost)
        mean = sum(loads) / n
        rows.append({"ranks": n, "critical_path_s": max(loads), "mean_rank_s": mean,
                     "imbalance": max(loads) / mean - 1.0, "per_rank_s": loads,
                     "matrices_per_rank": [owner.count(r) for r in range(n)]})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, workload: str, device_type: str, threads: int,
               out_dir: str) -> None:
    import torch.distributed as dist

    from ..distributed import run as run_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    layers = _workload_layers(workload, device)
    dist.barrier()
    t0 = time.perf_counter()
    m = run_distributed(layers, *_options(torch.float32), group=dist.group.WORLD).metrics
    dist.barrier()
    wall = time.perf_counter() - t0
    st = m.extra["distributed"]
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"ranks": world, "wall_s": wall, "per_rank_s": st["rank_seconds"],
                       "critical_path_s": max(st["rank_seconds"]),
                       "matrices_per_rank": [st["owner"].count(r) for r in range(world)],
                       "alpha": m.alpha.tolist()}, f)
    dist.destroy_process_group()


def measure_ranks(workload: str, ranks: Sequence[int], device: torch.device) -> list[dict[str, Any]]:
    """Distributed analysis of ``workload`` on each rank count (processes started here).

    On the CPU every run gets the same cores: ``N`` ranks use ``cores // N`` threads each.
    """
    import torch.multiprocessing as mp

    cores = os.cpu_count() or 1
    out = []
    for n in ranks:
        if device.type == "cuda" and n > torch.cuda.device_count():
            out.append({"ranks": n, "skipped": f"only {torch.cuda.device_count()} GPU(s)"})
            continue
        with tempfile.TemporaryDirectory() as d:
            if n == 1:
                _single(workload, device, cores, d)
            else:
                mp.spawn(_rank_main, args=(n, _free_port(), workload, device.type, max(1, cores // n), d),
                         nprocs=n, join=True)
            with open(os.path.join(d, "result.json")) as f:
                out.append(json.load(f))
    ref = out[0].get("alpha")
    for r in out:
        if ref is not None and "alpha" in r:
            r["alpha_max_abs_diff_vs_1_rank"] = float(np.max(np.abs(np.subtract(r.pop("alpha"), ref))))
    out[0].pop("alpha", None)
    return out


def _single(workload: str, device: torch.device, threads: int, out_dir: str) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layers = _workload_layers(workload, device)
        t0 = time.perf_counter()
        m = run(layers, *_options(torch.float32)).metrics
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({"ranks": 1, "wall_s": wall, "per_rank_s": [wall], "critical_path_s": wall,
                   "matrices_per_rank": [len(layers)], "alpha": m.alpha.tolist()}, f)


def format_scale(measured: list[dict], costs: dict[tuple[int, int], float], projected: list[dict],
                 workload: str, markdown: bool) -> str:
    """The three tables of the scale benchmark as text."""
    def table(headers, rows):
        if markdown:
            return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                             + ["| " + " | ".join(r) + " |" for r in rows])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        return "\n".join(["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
                         + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows])

    parts = [f"distributed ESD + median fit + metrics of {workload}, measured:"]
    rows = []
    for r in measured:
        if "skipped" in r:
            rows.append([str(r["ranks"]), "skipped: " + r["skipped"], "", "", "", ""])
            continue
        rows.append([str(r["ranks"]), f"{r['wall_s']:.3f} s", f"{r['critical_path_s']:.3f} s",
                     ", ".join(f"{x:.3f}" for x in r["per_rank_s"]),
                     ", ".join(str(x) for x in r["matrices_per_rank"]),
                     f"{r.get('alpha_max_abs_diff_vs_1_rank', 0.0):.1e}"])
    parts.append(table(["ranks", "wall", "critical path", "per-rank compute (s)", "matrices per rank",
                        "max |alpha - 1 rank|"], rows))
    parts.append("\ncost per matrix (ESD + median fit + metrics, fp32):")
    parts.append(table(["shape", "seconds"], [[f"{a}x{b}", f"{c:.3f}"] for (a, b), c in costs.items()]))
    parts.append("\nLLaMA-7B-shaped model (32 blocks, 224 matrices, Gram size 4096), planned from those costs:")
    parts.append(table(["ranks", "critical path", "mean per rank", "imbalance", "matrices per rank"],
                       [[str(p["ranks"]), f"{p['critical_path_s']:.1f} s", f"{p['mean_rank_s']:.1f} s",
                         f"{abs(100 * p['imbalance']):.1f}%", ", ".join(str(x) for x in p["matrices_per_rank"])]
                        for p in projected]))
    return "\n".join(parts)


def parse_shape_costs(text: str) -> dict[tuple[int, int], float]:
    """``"4096x4096=1.4,11008x4096=1.9"`` -> ``{(4096, 4096): 1.4, (11008, 4096): 1.9}``."""
    out = {}
    try:
        for item in text.split(","):
            shape, sec = item.split("=")
            r, c = shape.lower().split("x")
            out[(int(r), int(c))] = float(sec)
    except ValueError:
        raise ValueError(f"shape costs must look like 4096x4096=1.4,11008x4096=1.9; got {text!r}") from None
    return out


def run_scale(workload: str, ranks: Sequence[int], project_ranks: Sequence[int], device: torch.device,
              repeats: int = 1, shape_costs: Optional[dict[tuple[int, int], float]] = None) -> dict[str, Any]:
    """Measured runs on ``ranks``, LLaMA-7B per-shape costs (measured unless ``shape_costs``), projection."""
    measured = measure_ranks(workload, ranks, device)
    shapes = sorted({(r, c) for _, r, c in LLAMA7B_SHAPES})
    costs = shape_costs if shape_costs is not None else measure_shape_costs(shapes, device, repeats=repeats)
    projected = project(llama7b_layers(), costs, project_ranks)
    return {"workload": workload, "measured": measured,
            "costs": {f"{a}x{b}": c for (a, b), c in costs.items()}, "_costs": costs,
            "costs_source": "given" if shape_costs is not None else "measured",
            "llama7b_projection": projected}
