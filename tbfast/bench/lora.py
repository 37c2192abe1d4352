"""``tbfast bench --lora``: the exact LoRA ESD refresh against the merged-weight eigensolves.

Workload: one LLaMA-7B decoder block (q, k, v, o 4096 x 4096; gate, up 11008 x 4096; down
4096 x 11008; ``--lora-scale`` shrinks every dimension, e.g. 0.5 for a 2-core CPU) with a PEFT
LoRA adapter (rank ``--lora-rank``, alpha = 2 r) on all seven Linears; base weights heavy-tailed,
LoRA B non-zero (a trained adapter). Timed, in one process:

- ``cache build``: the base-spectrum cache (one float64 eigendecomposition with vectors per layer);
- ``update``: `tbfast.lora_esd` with the warm cache (secular updates; the refresh of TempBalance);
- ``default fp32``: `tbfast.esd` on the model (merge, float32 Gram, float32 eigensolve: tbfast's
  current default path);
- ``fp64``: the same in float64.

Accuracy of each against numpy's float64 ``eigvalsh`` of the merged weights' Gram (merged in
float64): the largest error in units of lambda_max, and the largest relative error on the top half.
A break-even sweep times the update against a float64 eigensolve (Gram included) on square
``n x n`` layers at the same rank.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from .workloads import heavy_tailed

__all__ = ["llama_block_with_lora", "run_lora_benchmark", "format_lora"]

_LLAMA = [("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 4096), ("self_attn.v_proj", 4096, 4096),
          ("self_attn.o_proj", 4096, 4096), ("mlp.gate_proj", 11008, 4096), ("mlp.up_proj", 11008, 4096),
          ("mlp.down_proj", 4096, 11008)]


class _Block(nn.Module):
    def __init__(self, shapes: list[tuple[str, int, int]], seed: int) -> None:
        super().__init__()
        rng = np.random.default_rng(seed)
        for i, (name, rows, cols) in enumerate(shapes):
            part, proj = name.split(".")
            if not hasattr(self, part):
                self.add_module(part, nn.Module())
            lin = nn.Linear(cols, rows, bias=False)
            with torch.no_grad():
                lin.weight.copy_(heavy_tailed(rows, cols, 3.0 + 0.5 * i, rng))
            getattr(self, part).add_module(proj, lin)


def llama_block_with_lora(scale: float = 1.0, rank: int = 8, seed: int = 0) -> nn.Module:
    """A PEFT model: one LLaMA-7B-shaped block (dimensions times ``scale``) with LoRA rank ``rank``."""
    import peft  # noqa: PLC0415 - optional dependency of this benchmark

    shapes = [(n, max(1, round(r * scale)), max(1, round(c * scale))) for n, r, c in _LLAMA]
    block = _Block(shapes, seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(block, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _merged_oracle(model: nn.Module) -> list[np.ndarray]:
    out = []
    for _, mod in model.named_modules():
        if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict):
            W = mod.base_layer.weight.detach().double()
            W = W + mod.scaling["default"] * (mod.lora_B["default"].weight.detach().double()
                                              @ mod.lora_A["default"].weight.detach().double())
            G = W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T
            out.append(np.linalg.eigvalsh(G.numpy()))
    return out


def _errors(spectra, oracle: list[np.ndarray]) -> dict[str, float]:
    abs_err, rel_top = 0.0, 0.0
    for i, want in enumerate(oracle):
        got = spectra.eigenvalues(i).cpu().numpy()
        top = float(want.max())
        abs_err = max(abs_err, float(np.abs(got - np.clip(want, 0, None)).max()) / top)
        h = want[len(want) // 2:]
        keep = h > 1e-4 * top
        rel_top = max(rel_top, float((np.abs(got[len(want) // 2:] - h)[keep] / h[keep]).max(initial=0.0)))
    return {"max_err_over_lambda_max": abs_err, "max_rel_err_top_half": rel_top}


def _timed(fn, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def break_even(rank: int, sizes: tuple[int, ...], seed: int = 0) -> list[dict[str, float]]:
    """Update (warm cache) vs the full paths on square ``n x n`` layers of rank ``rank``: float64
    Gram + eigensolve, and tbfast's default (merge, float32 Gram + eigensolve). Medians of three
    timings up to n = 1024, one above."""
    import tbfast  # noqa: PLC0415
    from ..lora import BaseSpectrumCache, LoRAItem, lora_eigenvalues  # noqa: PLC0415

    rows = []
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        w0 = torch.randn(n, n, generator=g) / n ** 0.5
        A = torch.randn(rank, n, generator=g) / n ** 0.5
        B = torch.randn(n, rank, generator=g) * 0.02
        item = LoRAItem("l", w0, [(A, B, 2.0, False)])
        cache = BaseSpectrumCache(memory_budget=None)
        cache.lookup("l", w0)
        reps = 3 if n <= 1024 else 1
        t_upd, _ = _timed(lambda: lora_eigenvalues([item], cache), reps)

        def full64() -> torch.Tensor:
            W = w0.double() + 2.0 * B.double() @ A.double()
            return torch.linalg.eigvalsh(W.T @ W)
        t_full, _ = _timed(full64, reps)
        t32, _ = _timed(lambda: tbfast.esd({"l": w0 + 2.0 * (B @ A)}), reps)
        rows.append({"n": n, "r": rank, "n_over_r": n / rank, "update_s": t_upd, "fp64_gram_eig_s": t_full,
                     "speedup": t_full / t_upd, "default_fp32_s": t32, "speedup_vs_fp32": t32 / t_upd})
    return rows


def break_even_point(rows: list[dict[str, float]], key: str = "speedup") -> float | None:
    """The smallest measured n/r from which the update is faster (``rows[key] >= 1``) at every
    larger measured n (one noisy fast point at a small n does not count); None if the largest n is
    not faster."""
    point = None
    for r in sorted(rows, key=lambda r: r["n"], reverse=True):
        if r[key] < 1.0:
            break
        point = r["n_over_r"]
    return point


def run_lora_benchmark(scale: float = 1.0, rank: int = 8, repeats: int = 1, oracle: bool = True,
                       sweep: tuple[int, ...] = (128, 256, 512, 1024, 2048), seed: int = 0) -> dict[str, Any]:
    """Times and errors of the LoRA refresh paths on the LLaMA-7B-shaped block (see the module doc)."""
    import tbfast  # noqa: PLC0415 - the public API, as a user calls it
    from ..lora import BaseSpectrumCache  # noqa: PLC0415

    model = llama_block_with_lora(scale, rank, seed)
    cache = BaseSpectrumCache(memory_budget=None)
    t0 = time.perf_counter()
    first = tbfast.lora_esd(model, cache=cache)
    t_cold = time.perf_counter() - t0
    t_upd, upd = _timed(lambda: tbfast.lora_esd(model, cache=cache), repeats)
    t_cache = t_cold - t_upd  # the cold call = cache build + one refresh
    t32, sp32 = _timed(lambda: tbfast.esd(model), repeats)
    t64, sp64 = _timed(lambda: tbfast.esd(model, dtype=torch.float64), repeats)
    shapes = [list(l.shape) for l in upd.spectra.layers]
    res: dict[str, Any] = {
        "workload": f"llama7b-block x {scale:g}, LoRA r={rank} on q,k,v,o,gate,up,down",
        "scale": scale, "rank": rank, "shapes": shapes, "esd_path": upd.esd_path,
        "cache_bytes": cache.nbytes, "cache_build_s": t_cache, "cold_first_refresh_s": t_cold,
        "update_s": t_upd, "default_fp32_s": t32, "fp64_s": t64,
        "speedup_vs_default_fp32": t32 / t_upd, "speedup_vs_fp64": t64 / t_upd, "repeats": repeats,
    }
    assert first.esd_path == upd.esd_path
    if oracle:
        want = _merged_oracle(model)
        res["errors"] = {"update": _errors(upd.spectra, want), "default_fp32": _errors(sp32, want),
                         "fp64": _errors(sp64, want)}
    res["break_even"] = break_even(rank, sweep, seed)
    res["break_even_n_over_r"] = break_even_point(res["break_even"])
    res["break_even_n_over_r_vs_fp32"] = break_even_point(res["break_even"], "speedup_vs_fp32")
    res["threads"] = torch.get_num_threads()
    if scale != 1.0:  # the update is O(n^2 r), the eigensolves O(n^3): projections, labelled
        res["projected_full_block"] = {"update_s": t_upd / scale ** 2, "default_fp32_s": t32 / scale ** 3,
                                       "fp64_s": t64 / scale ** 3, "note": "projected from the scaled run "
                                       "(update ~ n^2, eigensolves ~ n^3); not measured"}
    block = res.get("projected_full_block", res)
    res["projected_llama7b_32_blocks"] = {k: 32 * block[k] for k in ("update_s", "default_fp32_s", "fp64_s")}
    return res


def format_lora(res: dict[str, Any]) -> str:
    """The benchmark as a short markdown table."""
    lines = [f"{res['workload']} (shapes {res['shapes'][0]}, {res['shapes'][4]}, {res['shapes'][6]})", "",
             "| path | refresh s | speedup of update | max err / lambda_max | max rel err top half |",
             "|---|---|---|---|---|"]
    errs = res.get("errors", {})
    for key, label, t in (("update", "update (warm cache)", res["update_s"]),
                          ("default_fp32", "default (fp32 Gram + eig)", res["default_fp32_s"]),
                          ("fp64", "fp64 Gram + eig", res["fp64_s"])):
        e = errs.get(key, {})
        lines.append(f"| {label} | {t:.3f} | {t / res['update_s']:.2f}x | "
                     f"{e.get('max_err_over_lambda_max', float('nan')):.1e} | {e.get('max_rel_err_top_half', float('nan')):.1e} |")
    lines += ["", f"cache build {res['cache_build_s']:.2f} s ({res['cache_bytes'] / 2**20:.0f} MiB); "
              f"break-even n/r = {res['break_even_n_over_r']} against float64, "
              f"{res.get('break_even_n_over_r_vs_fp32')} against the default float32 path", "",
              "| n | r | update s | fp64 Gram+eig s | speedup | default fp32 s | speedup |", "|---|---|---|---|---|---|---|"]
    for r in res["break_even"]:
        lines.append(f"| {r['n']} | {r['r']} | {r['update_s']:.4f} | {r['fp64_gram_eig_s']:.4f} | {r['speedup']:.2f}x | "
                     f"{r.get('default_fp32_s', float('nan')):.4f} | {r.get('speedup_vs_fp32', float('nan')):.2f}x |")
    proj = res.get("projected_llama7b_32_blocks")
    if proj:
        lines += ["", "LLaMA-7B (32 blocks) refresh, projected from this block: " + ", ".join(
            f"{k.removesuffix('_s')} {v:.1f} s" for k, v in proj.items() if k.endswith("_s"))]
    return "\n".join(lines)
