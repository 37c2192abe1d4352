"""THE BASELINE: the reference ESD estimator and TempBalance scheduler, written from SPEC.md.

This is what tbfast is compared against, implemented the way the published reference code bases
work (SPEC sections 1-6): one ``torch.linalg.svdvals`` per layer, a sort, ``.item()`` host syncs
for every scalar, a Python loop over xmin candidates for the KS / fix-finger scans, and one fit per
layer. It is deliberately *not* optimised; it exists so benchmarks race tbfast against the method
users run today, on the same weights and the same device. tests/test_bench_reference.py checks it
against an fp64 SVD oracle and against tbfast, so the race is fair.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["layer_matrices", "reference_esd", "reference_fit", "ReferenceTempBalance",
           "ASSIGN_FUNCS"]

_DEFAULT_TYPES = (nn.Linear, nn.Conv2d)


def layer_matrices(module: nn.Module, conv_norm: float = 0.5) -> torch.Tensor:
    """SPEC section 1: the (k, rows, cols) matrices whose singular values make a layer's ESD."""
    w = module.weight.detach()
    if isinstance(module, nn.Linear):
        return w.unsqueeze(0)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        # (out, in, *kernel) -> one (out x in) matrix per kernel position, scaled by sqrt(conv_norm)
        return w.flatten(2).permute(2, 0, 1) * math.sqrt(conv_norm)
    raise TypeError(f"reference ESD: unsupported module type {type(module).__name__}")


def _hill_at(nz: torch.Tensor, log_nz: torch.Tensor, i: int) -> tuple[torch.Tensor, int]:
    n = nz.numel() - i
    alpha = 1 + n / (torch.sum(log_nz[i:]) - n * log_nz[i])
    return alpha, n


def _ks_distance(nz: torch.Tensor, i: int, alpha: torch.Tensor, n: int) -> torch.Tensor:
    seq = torch.arange(n, device=nz.device, dtype=nz.dtype)
    return torch.max(torch.abs(1 - (nz[i:] / nz[i]) ** (1 - alpha) - seq / n))


def reference_fit(nz: torch.Tensor, pl_fitting: str = "median", xmin_pos: float = 2.0,
                  bins: int = 100, xmin_min_quirk: bool = True) -> tuple[float, float, int]:
    """Fit one layer's ascending eigenvalues ``nz``: returns (alpha, D, xmin_index) as Python
    numbers, one host sync per scalar (and per candidate in the scans), like the references."""
    N = nz.numel()
    log_nz = torch.log(nz)
    if pl_fitting == "median":
        i = int(N / xmin_pos)
        alpha, n = _hill_at(nz, log_nz, i)
        D = _ks_distance(nz, i, alpha, n)
        return alpha.item(), D.item(), i
    if pl_fitting in ("goodness-of-fit", "ks", "fix-finger"):
        if pl_fitting == "fix-finger":
            log10 = torch.log10(nz)
            lo, hi = log10.min().item(), log10.max().item()
            counts = torch.histc(log10, bins=bins, min=lo, max=hi)
            ih = int(torch.argmax(counts).item())
            xmin2 = 10 ** (lo + ih * (hi - lo) / bins)
            xmin_min = math.log10(0.95 * xmin2) if xmin_min_quirk else 0.95 * xmin2
            xmax = 1.5 * xmin2
        else:
            xmin_min, xmax = -math.inf, math.inf
        alphas = torch.zeros(N - 1, device=nz.device, dtype=nz.dtype)
        Ds = torch.ones(N - 1, device=nz.device, dtype=nz.dtype)
        for i in range(N - 1):
            x = nz[i]
            if x < xmin_min:   # host sync per candidate, as in the references
                continue
            if x > xmax:
                break
            alpha, n = _hill_at(nz, log_nz, i)
            alphas[i] = alpha
            if alpha > 1:
                Ds[i] = _ks_distance(nz, i, alpha, n)
        k = int(torch.argmin(Ds).item())
        return alphas[k].item(), Ds[k].item(), k
    raise ValueError(f"reference_fit: unknown pl_fitting {pl_fitting!r}")


def reference_esd(net: nn.Module, *, EVALS_THRESH: float = 1e-5, bins: int = 100,
                  xmin_pos: float = 2.0, conv_norm: float = 0.5, filter_zeros: bool = False,
                  pl_fitting: str = "median", layer_types: Sequence[type] = _DEFAULT_TYPES,
                  max_layers: int | None = None, only: set[str] | None = None
                  ) -> dict[str, list[Any]]:
    """The reference ESD estimator: metrics of every ``layer_types`` module in module order.

    Returns a dict of lists (one entry per layer): name, num_evals, spectral_norm, norm, alpha,
    alphahat, D, xmin, xmin_index, stable_rank, norm_stable_rank. ``max_layers`` stops after that
    many layers and ``only`` keeps just the named layers (to run the slow KS scan on a subset).
    """
    out: dict[str, list[Any]] = {k: [] for k in (
        "name", "num_evals", "spectral_norm", "norm", "alpha", "alphahat", "D", "xmin",
        "xmin_index", "stable_rank", "norm_stable_rank")}
    for name, m in net.named_modules():
        if not isinstance(m, tuple(layer_types)) or (only is not None and name not in only):
            continue
        if max_layers is not None and len(out["name"]) >= max_layers:
            break
        mats = layer_matrices(m, conv_norm).float()
        eigs = torch.square(torch.linalg.svdvals(mats).flatten())
        eigs, _ = torch.sort(eigs, descending=False)
        spectral_norm = eigs[-1].item()
        fnorm = torch.sum(eigs).item()
        if filter_zeros:
            nz = eigs[eigs > EVALS_THRESH]
            if nz.numel() == 0:
                nz = eigs
        else:
            nz = eigs
        alpha, D, idx = reference_fit(nz, pl_fitting, xmin_pos, bins)
        out["name"].append(name)
        out["num_evals"].append(eigs.numel())
        out["spectral_norm"].append(spectral_norm)
        out["norm"].append(fnorm)
        out["alpha"].append(alpha)
        out["alphahat"].append(alpha * math.log10(spectral_norm))
        out["D"].append(D)
        out["xmin"].append(nz[idx].item())
        out["xmin_index"].append(idx)
        out["stable_rank"].append(torch.sum(nz).item() / nz[-1].item())
        out["norm_stable_rank"].append(torch.sum(nz).item() / nz.numel())
    return out


# ----------------------------------------------------------------------------------------------
# TempBalance scheduler, SPEC section 6 (and TB_Sigmoid of section 7, per layer)

def _tb_linear_map(s: np.ndarray, lr: float, lo: float, hi: float) -> np.ndarray:
    return np.interp(s, (s.min(), s.max()), (lo * lr, hi * lr))


def _tb_sqrt(s: np.ndarray, lr: float, lo: float, hi: float) -> np.ndarray:
    return np.sqrt(s) / np.sum(np.sqrt(s)) * len(s) * lr


def _tb_log2(s: np.ndarray, lr: float, lo: float, hi: float) -> np.ndarray:
    return np.log2(s) / np.sum(np.log2(s)) * len(s) * lr


def _tb_step(s: np.ndarray, lr: float, lo: float, hi: float) -> np.ndarray:
    n = len(s)
    ranks = np.empty(n)
    ranks[np.argsort(s, kind="stable")] = np.arange(n)
    return lr * (lo + (hi - lo) * ranks / n)


ASSIGN_FUNCS = {"tb_linear_map": _tb_linear_map, "tb_sqrt": _tb_sqrt, "tb_log2": _tb_log2,
                "tb_step": _tb_step}


class ReferenceTempBalance:
    """THE BASELINE TempBalance scheduler (SPEC section 6), on :func:`reference_esd`.

    Same constructor defaults and methods as the original: ``build_optimizer_param_group`` and
    ``step(optimizer, untuned_lr)``; lrs are written into the param groups by position.
    """

    def __init__(self, net: nn.Module, EVALS_THRESH: float = 1e-5, bins: int = 100,
                 conv_norm: float = 0.5, pl_fitting: str = "median", xmin_pos: float = 2,
                 filter_zeros: bool = False, remove_first_layer: bool = True,
                 remove_last_layer: bool = True, eigs_thresh: int = 50,
                 esd_metric_for_tb: str = "alpha", assign_func: str = "tb_linear_map",
                 lr_min_ratio: float = 0.5, lr_max_ratio: float = 1.5, batchnorm: bool = True,
                 batchnorm_type: str = "name", layernorm: bool = False):
        if assign_func not in ASSIGN_FUNCS:
            raise ValueError(f"unknown assign_func {assign_func!r}; known: {list(ASSIGN_FUNCS)}")
        self.net = net
        self.esd_kwargs = dict(EVALS_THRESH=EVALS_THRESH, bins=bins, xmin_pos=xmin_pos,
                               conv_norm=conv_norm, filter_zeros=filter_zeros,
                               pl_fitting=pl_fitting)
        self.remove_first_layer, self.remove_last_layer = remove_first_layer, remove_last_layer
        self.eigs_thresh, self.esd_metric_for_tb = eigs_thresh, esd_metric_for_tb
        self.assign_func, self.lr_min_ratio, self.lr_max_ratio = assign_func, lr_min_ratio, lr_max_ratio
        self.batchnorm, self.batchnorm_type, self.layernorm = batchnorm, batchnorm_type, layernorm

    def _scores(self) -> tuple[list[str], np.ndarray]:
        m = reference_esd(self.net, **self.esd_kwargs)
        rows = list(range(len(m["name"])))
        if self.remove_first_layer:
            rows = rows[1:]
        if self.remove_last_layer:
            rows = rows[:-1]
        rows = [r for r in rows if m["num_evals"][r] >= self.eigs_thresh]
        return [m["name"][r] for r in rows], np.array([m[self.esd_metric_for_tb][r] for r in rows])

    def layer_lrs(self, untuned_lr: float) -> dict[str, float]:
        """Recompute the ESD and return ``{layer name: lr}`` for the tuned layers."""
        names, scores = self._scores()
        lrs = ASSIGN_FUNCS[self.assign_func](scores, untuned_lr, self.lr_min_ratio, self.lr_max_ratio)
        return dict(zip(names, (float(x) for x in lrs)))

    def build_optimizer_param_group(self, untuned_lr: float = 0.1, initialize: bool = True):
        """Param groups: one per tuned layer (plus coupled BN/LN), then the untuned rest."""
        lrs = self.layer_lrs(untuned_lr)
        modules = list(self.net.named_modules())
        groups: list[dict] = []
        tuned_ids: set[int] = set()
        prev_conv, prev_linear = None, None
        for name, m in modules:
            lr = None
            if name in lrs:
                lr = lrs[name]
            elif self.batchnorm and isinstance(m, nn.BatchNorm2d):
                if self.batchnorm_type == "name":
                    lr = lrs.get(name.replace("bn", "conv"))
                else:
                    lr = lrs.get(prev_conv) if prev_conv is not None else None
            elif self.layernorm and isinstance(m, nn.LayerNorm) and prev_linear is not None:
                lr = lrs.get(prev_linear)
            if isinstance(m, nn.Conv2d):
                prev_conv = name
            if isinstance(m, nn.Linear):
                prev_linear = name
            elif not isinstance(m, nn.LayerNorm) and list(m.parameters(recurse=False)):
                prev_linear = None
            if lr is None:
                continue
            params = [p for p in m.parameters() if id(p) not in tuned_ids]
            tuned_ids.update(id(p) for p in params)
            groups.append({"params": params, "lr": lr})
        layer_count = len(groups)
        rest = [p for p in self.net.parameters() if id(p) not in tuned_ids]
        groups.append({"params": rest, "lr": untuned_lr})
        if not initialize:
            return [g["lr"] for g in groups], layer_count
        return groups, layer_count

    def step(self, optimizer: torch.optim.Optimizer, untuned_lr: float) -> None:
        """Recompute the ESD and write lrs into ``optimizer.param_groups`` by position."""
        lrs, layer_count = self.build_optimizer_param_group(untuned_lr, initialize=False)
        for j, group in enumerate(optimizer.param_groups):
            group["lr"] = lrs[j] if j < layer_count else untuned_lr
