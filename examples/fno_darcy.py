"""FNO on 2D Darcy flow in low-data regimes: baseline vs TempBalance (the paper's Table 23, reduced).

Reproduces, at CPU scale, the protocol of Liu et al. (EMNLP 2024), Appendix D.3 / E.7: an FNO-2D
(PDEBench configuration) trained with Adam and a step decay of the learning rate (gamma 0.5) on
subsets of a DarcyFlow (beta = 100) training set, without and with TempBalance (TB_Sigmoid),
same seeds, subsets and budget; test nRMSE (PDEBench's definition), mean +- std over seeds.

Data are made in-process, no download:

- PDE: ``-div(a(x) grad u(x)) = beta`` on the unit square, ``u = 0`` on the boundary.
- ``a(x)``: PDEBench's DarcyFlow construction (its data_gen ReactionDiffusionEq 2D script): a
  sum of 5 Gaussian bumps ``exp(-|x - m_k|^2 / w_k)`` with centres ``m_k`` uniform on the square
  and widths ``w_k = 0.5 * U(0, 1)``, thresholded at its mean into ``1`` (above) and ``0.1``
  (below). PDEBench thresholds at the mean over a batch of 200 fields; here at the field's own
  mean, so that a sample depends only on its seed.
- Solver: 5-point finite differences on the ``res x res`` node grid ``x_i = i / (res - 1)``
  (boundary nodes included, held at 0), face coefficients the arithmetic mean of the two
  neighbouring nodes (as PDEBench's flux), one sparse LU solve per sample (scipy.sparse).
- Sample ``i`` of a split is drawn from ``numpy.random.default_rng([split_seed, i])``: the data
  are deterministic per seed. Datasets are cached as ``.npz`` under ``--cache`` (default
  ``out/fno_darcy/cache``, gitignored).

Model and protocol (PDEBench FNO2d for DarcyFlow: 4 Fourier layers, each a spectral convolution
plus a 1x1 ``nn.Conv2d`` skip, GELU, lift ``fc0`` from (a, x, y), projection ``fc1 -> fc2``,
width 20, padding 2; MSE loss on u). Reduced for the CPU: a 24x24 grid (PDEBench 128x128), 8
Fourier modes (PDEBench 12), batch 25 (the paper 50), a 1000-sample training pool (the paper
9000), 300 optimizer steps per run. TempBalance analyses the ``nn.Linear`` / ``nn.Conv2d``
layers (the 1x1 skips and ``fc1``; ``fc0`` and ``fc2`` are removed as first / last layers), not
the complex spectral weights, which stay at the untuned lr -- as in the paper's code. SciML
settings of the paper: per-layer, ``xmin_pos=2``, ``filter_zeros=True``, ``eigs_thresh=20``,
``tau=10``, ESD once per epoch (every ``ceil(n_train / batch)`` optimizer steps). Every run has
the same number of optimizer steps (``--steps``), the base lr halved 5 times at equal intervals
(the paper: 500 epochs, halved every 100); weight decay per ratio from the paper's Table 12.
The base lr is chosen for the baseline on a validation set from ``--lr-grid``, then ``s`` for
TempBalance at that lr from ``--s-grid``, both on one seed at one ratio (``--select-ratio``).

    PYTHONPATH=. python examples/fno_darcy.py --quick          # about a minute
    PYTHONPATH=. OMP_NUM_THREADS=1 python examples/fno_darcy.py --jobs 4 --out out/fno_darcy/full  # docs/FNO_DARCY.md

Results (JSON and a markdown table) are rewritten after every run, so an interrupted run leaves
a partial table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from torch import nn

import tbfast

BETA = 100.0
#: weight decay per subsampling ratio, the paper's Table 12 (FNO column)
PAPER_WEIGHT_DECAY = {1.0: 1e-6, 0.1: 1e-4, 0.05: 1e-3, 0.025: 1e-3, 0.006: 1e-2}
#: the paper's Table 23, FNO: ratio -> (baseline nRMSE, TB nRMSE, error reduced %)
PAPER_TABLE23_FNO = {
    1.0: (2.58e-3, 2.52e-3, 2.33),
    0.1: (1.04e-2, 1.01e-2, 2.88),
    0.05: (1.76e-2, 1.62e-2, 7.95),
    0.025: (2.88e-2, 2.64e-2, 8.33),
    0.006: (6.28e-2, 5.67e-2, 9.71),
}


# ----------------------------------------------------------------------------- data
def darcy_coefficient(rng: np.random.Generator, res: int, n_bumps: int = 5,
                      high: float = 1.0, low: float = 0.1) -> np.ndarray:
    """PDEBench-style piecewise-constant coefficient on the ``res x res`` node grid."""
    x = np.linspace(0.0, 1.0, res)
    centres = rng.uniform(0.0, 1.0, size=(n_bumps, 2))
    widths = 0.5 * rng.uniform(0.0, 1.0, size=n_bumps)
    widths = np.maximum(widths, 1e-3)  # a zero width would give exp(-r^2/0) -> nan at r = 0
    field = np.zeros((res, res))
    for (mx, my), w in zip(centres, widths):
        field += np.exp(-((x[:, None] - mx) ** 2 + (x[None, :] - my) ** 2) / w)
    return np.where(field > field.mean(), high, low)


def darcy_matrix(a: np.ndarray) -> sp.csr_matrix:
    """Sparse FD matrix of ``-div(a grad .)`` on the interior nodes (Dirichlet 0 boundary)."""
    n = a.shape[0]
    if a.ndim != 2 or a.shape[1] != n or n < 3:
        raise ValueError(f"coefficient must be a square grid of at least 3x3 nodes, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError("coefficient a(x) must be finite and > 0 everywhere")
    h2 = (1.0 / (n - 1)) ** 2
    m = n - 2
    idx = np.arange(m * m).reshape(m, m)  # unknown (i, j) <-> node (i + 1, j + 1)
    ac = a[1:-1, 1:-1]
    # face coefficients: arithmetic mean of the two nodes
    a_e = 0.5 * (a[1:-1, 1:-1] + a[2:, 1:-1])   # (i+1/2, j)
    a_w = 0.5 * (a[1:-1, 1:-1] + a[:-2, 1:-1])  # (i-1/2, j)
    a_n = 0.5 * (a[1:-1, 1:-1] + a[1:-1, 2:])   # (i, j+1/2)
    a_s = 0.5 * (a[1:-1, 1:-1] + a[1:-1, :-2])  # (i, j-1/2)
    del ac
    rows = [idx.ravel()]
    cols = [idx.ravel()]
    vals = [((a_e + a_w + a_n + a_s) / h2).ravel()]
    for coef, sl_from, sl_to in (
        (a_e, (slice(0, m - 1), slice(None)), (slice(1, m), slice(None))),
        (a_w, (slice(1, m), slice(None)), (slice(0, m - 1), slice(None))),
        (a_n, (slice(None), slice(0, m - 1)), (slice(None), slice(1, m))),
        (a_s, (slice(None), slice(1, m)), (slice(None), slice(0, m - 1))),
    ):
        rows.append(idx[sl_from].ravel())
        cols.append(idx[sl_to].ravel())
        vals.append((-coef[sl_from] / h2).ravel())
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m * m, m * m))


def solve_darcy(a: np.ndarray, f: "float | np.ndarray" = BETA) -> np.ndarray:
    """Solve ``-div(a grad u) = f`` on the unit square, ``u = 0`` on the boundary; returns ``u`` on the node grid."""
    n = a.shape[0]
    rhs = np.broadcast_to(np.asarray(f, dtype=np.float64), (n, n))[1:-1, 1:-1].ravel()
    u = np.zeros((n, n))
    u[1:-1, 1:-1] = spla.spsolve(darcy_matrix(a).tocsc(), rhs).reshape(n - 2, n - 2)
    return u


def make_darcy_dataset(n: int, res: int, split_seed: int, beta: float = BETA) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (coefficient, solution) pairs, float32 arrays ``(n, res, res)``; sample ``i`` from seed ``[split_seed, i]``."""
    a = np.empty((n, res, res), dtype=np.float32)
    u = np.empty((n, res, res), dtype=np.float32)
    for i in range(n):
        ai = darcy_coefficient(np.random.default_rng([split_seed, i]), res)
        a[i] = ai
        u[i] = solve_darcy(ai, beta)
    return a, u


def cached_dataset(cache: Optional[Path], n: int, res: int, split_seed: int, beta: float = BETA):
    """`make_darcy_dataset`, read from / written to ``cache`` when given."""
    if cache is None:
        return make_darcy_dataset(n, res, split_seed, beta)
    path = Path(cache) / f"darcy_beta{beta:g}_res{res}_n{n}_seed{split_seed}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return z["a"], z["u"]
    a, u = make_darcy_dataset(n, res, split_seed, beta)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, a=a, u=u)
    os.replace(tmp, path)
    return a, u


def nrmse(pred: torch.Tensor, true: torch.Tensor) -> float:
    """PDEBench's nRMSE: per sample ``||pred - true||_2 / ||true||_2`` over space, averaged over samples."""
    dims = tuple(range(1, true.ndim))
    err = torch.sqrt(((pred - true) ** 2).sum(dims)) / torch.sqrt((true ** 2).sum(dims))
    return float(err.mean())


# ----------------------------------------------------------------------------- model
class SpectralConv2d(nn.Module):
    """Fourier layer: keep the lowest ``modes`` frequencies (both signs along dim -2), multiply by complex weights."""

    def __init__(self, width: int, modes: int) -> None:
        super().__init__()
        self.modes = modes
        scale = 1.0 / (width * width)
        self.w_pos = nn.Parameter(scale * torch.rand(width, width, modes, modes, dtype=torch.cfloat))
        self.w_neg = nn.Parameter(scale * torch.rand(width, width, modes, modes, dtype=torch.cfloat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        m = self.modes
        xf = torch.fft.rfft2(x)
        out = torch.zeros(b, self.w_pos.shape[1], h, w // 2 + 1, dtype=torch.cfloat, device=x.device)
        out[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", xf[:, :, :m, :m], self.w_pos)
        out[:, :, -m:, :m] = torch.einsum("bixy,ioxy->boxy", xf[:, :, -m:, :m], self.w_neg)
        return torch.fft.irfft2(out, s=(h, w))


class FNO2d(nn.Module):
    """PDEBench's FNO2d layout: lift (a, x, y) -> width, 4 x (spectral conv + 1x1 conv, GELU), project 128 -> 1."""

    def __init__(self, modes: int = 12, width: int = 20, layers: int = 4, padding: int = 2) -> None:
        super().__init__()
        self.padding = padding
        self.fc0 = nn.Linear(3, width)
        self.spectral = nn.ModuleList(SpectralConv2d(width, modes) for _ in range(layers))
        self.w = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(layers))
        self.fc1 = nn.Linear(width, 128)
        self.fc2 = nn.Linear(128, 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """``a``: ``(batch, res, res)`` coefficient -> ``(batch, res, res)`` predicted ``u``."""
        b, h, w = a.shape
        gx = torch.linspace(0, 1, h, device=a.device).view(1, h, 1).expand(b, h, w)
        gy = torch.linspace(0, 1, w, device=a.device).view(1, 1, w).expand(b, h, w)
        x = self.fc0(torch.stack([a, gx, gy], dim=-1)).permute(0, 3, 1, 2)
        p = self.padding
        x = nn.functional.pad(x, [0, p, 0, p])
        last = len(self.w) - 1
        for k, (spec, conv) in enumerate(zip(self.spectral, self.w)):
            x = spec(x) + conv(x)
            if k < last:
                x = nn.functional.gelu(x)
        x = x[..., :h, :w].permute(0, 2, 3, 1)
        return self.fc2(nn.functional.gelu(self.fc1(x))).squeeze(-1)


# ----------------------------------------------------------------------------- training
@dataclass
class RunResult:
    method: str
    ratio: float
    seed: int
    n_train: int
    lr: float
    s: Optional[float]
    weight_decay: float
    steps: int
    test_nrmse: float
    val_nrmse: float
    loss_first: float  #: mean training loss over the first 10% of steps
    loss_last: float   #: mean training loss over the last 10% of steps
    train_s: float
    tb_s: float = 0.0
    esd_calls: int = 0
    alpha_std_last: Optional[float] = None
    extra: dict = field(default_factory=dict)


def weight_decay_for(ratio: float) -> float:
    """The paper's weight decay (Table 12) for the nearest subsampling ratio in log scale."""
    key = min(PAPER_WEIGHT_DECAY, key=lambda r: abs(math.log(r) - math.log(ratio)))
    return PAPER_WEIGHT_DECAY[key]


def train_fno(a_tr: torch.Tensor, u_tr: torch.Tensor, evals: dict, *, method: str, lr: float, s: float = 1.0,
              weight_decay: float = 1e-4, steps: int = 500, batch: int = 50, seed: int = 0,
              modes: int = 12, width: int = 20, n_decays: int = 5) -> tuple[dict, dict]:
    """Train one FNO; returns ``({split: nRMSE}, info)``. ``method`` is 'baseline' or 'tb'."""
    if method not in ("baseline", "tb"):
        raise ValueError(f"method must be 'baseline' or 'tb', got {method!r}")
    torch.manual_seed(seed)
    model = FNO2d(modes=modes, width=width)
    tb = None
    t_tb = 0.0
    if method == "tb":
        t0 = time.perf_counter()
        tb = tbfast.TempBalance(model, xmin_pos=2, filter_zeros=True, eigs_thresh=min(20, width),
                                assign_func="tb_sigmoid", tau=10.0, s=s, batchnorm=False)
        groups, _ = tb.build_optimizer_param_group(untuned_lr=lr, initialize=True)
        t_tb += time.perf_counter() - t0
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = a_tr.shape[0]
    bs = min(batch, n)
    per_epoch = math.ceil(n / bs)
    decay_every = max(1, steps // (n_decays + 1))
    g = torch.Generator().manual_seed(1_000 + seed)
    losses = []
    esd_calls = 0
    perm = torch.randperm(n, generator=g)
    pos = 0
    model.train()
    t_build = t_tb  # the initial ESD in build_optimizer_param_group
    t_start = time.perf_counter()
    for step in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + bs]
        pos += bs
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(a_tr[idx]), u_tr[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if done < steps:
            base = lr * 0.5 ** (done // decay_every)
            if tb is not None and done % per_epoch == 0:
                t0 = time.perf_counter()
                tb.step(opt, base)  # an ESD once per epoch, lrs = base lr x TB_Sigmoid factor
                t_tb += time.perf_counter() - t0
                esd_calls += 1
            elif done % decay_every == 0:
                if tb is not None:
                    tb.apply(opt, base)  # decay without a new ESD
                else:
                    for grp in opt.param_groups:
                        grp["lr"] = base
    train_s = time.perf_counter() - t_start + t_build  # wall time of training, TempBalance included
    model.eval()
    out = {}
    with torch.no_grad():
        for name, (a_e, u_e) in evals.items():
            out[name] = nrmse(model(a_e), u_e)
    k = max(1, steps // 10)
    info = dict(loss_first=float(np.mean(losses[:k])), loss_last=float(np.mean(losses[-k:])), train_s=train_s,
                tb_s=t_tb, esd_calls=esd_calls, losses=losses)
    if tb is not None and tb.metrics is not None:
        alphas = [tb.scores[nm] for nm in tb.tuned_layers]
        info["alpha_std_last"] = float(np.std(alphas))
        info["lr_factors_last"] = {k_: float(v) for k_, v in tb.ratios.items()}
    return out, info


# ----------------------------------------------------------------------------- experiment
@dataclass
class Config:
    res: int = 24
    n_full: int = 1000
    n_val: int = 100
    n_test: int = 200
    ratios: Sequence[float] = (1.0, 0.1, 0.025, 0.006)
    seeds: Sequence[int] = (0, 1, 2)
    steps: int = 300
    batch: int = 25  #: the paper uses 50; 25 halves the CPU time (and is the full batch at the 2.5% selection ratio)
    modes: int = 8
    width: int = 20
    lr_grid: Sequence[float] = (5e-3, 1.5e-2, 5e-2)
    s_grid: Sequence[float] = (0.25, 0.75, 1.5)
    select_ratio: float = 0.025
    select_seed: int = 0
    lr: Optional[float] = None
    s: Optional[float] = None
    methods: Sequence[str] = ("baseline", "tb")
    data_seeds: tuple = (20240, 20241, 20242)  #: train pool, validation, test


def n_train_for(ratio: float, n_full: int) -> int:
    """Size of the subset for ``ratio`` (at least 2 samples)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"subsampling ratio must be in (0, 1], got {ratio}")
    return max(2, int(round(ratio * n_full)))


def _fmt(x: float) -> str:
    return f"{x:.3e}"


def markdown_table(res: dict) -> str:
    """The comparison table: ours (mean +- std over seeds) next to the paper's FNO column."""
    cfg = res["config"]
    lines = [
        f"| ratio | n train | baseline nRMSE | TB nRMSE | error reduced | TB wins (seeds) | TB share of time "
        f"| paper baseline | paper TB | paper reduced |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in cfg["ratios"]:
        rows = [r for r in res["runs"] if r["ratio"] == ratio]
        b = {r["seed"]: r["test_nrmse"] for r in rows if r["method"] == "baseline"}
        t = {r["seed"]: r["test_nrmse"] for r in rows if r["method"] == "tb"}
        seeds = sorted(set(b) & set(t))
        if not seeds:
            continue
        bb = np.array([b[s_] for s_ in seeds])
        tt = np.array([t[s_] for s_ in seeds])
        red = 100.0 * (bb.mean() - tt.mean()) / bb.mean()
        wins = int(np.sum(tt < bb))
        tbr = [r for r in rows if r["method"] == "tb" and r["seed"] in seeds]
        share = 100.0 * sum(r["tb_s"] for r in tbr) / max(1e-12, sum(r["train_s"] for r in tbr))
        p = PAPER_TABLE23_FNO.get(ratio)
        pcols = f"{_fmt(p[0])} | {_fmt(p[1])} | {p[2]:.2f}%" if p else "- | - | -"
        lines.append(
            f"| {ratio * 100:g}% | {rows[0]['n_train']} | {_fmt(bb.mean())} +- {_fmt(bb.std())} | "
            f"{_fmt(tt.mean())} +- {_fmt(tt.std())} | {red:.2f}% | {wins}/{len(seeds)} | {share:.1f}% | {pcols} |"
        )
    return "\n".join(lines)


_DATA: dict = {}  #: per-process data for `_run_task` (set by `_set_data`, also in pool workers)


def _set_data(a_pool, u_pool, evals_np, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    _DATA["pool"] = (torch.from_numpy(a_pool), torch.from_numpy(u_pool))
    _DATA["evals"] = {k: (torch.from_numpy(a), torch.from_numpy(u)) for k, (a, u) in evals_np.items()}


def _run_task(task: tuple) -> dict:
    """One training run ``(method, ratio, seed, lr, s, cfg_dict)`` on the data set by `_set_data`."""
    method, ratio, seed, lr, s, c = task
    a_pool, u_pool = _DATA["pool"]
    n = n_train_for(ratio, c["n_full"])
    wd = weight_decay_for(ratio)
    scores, info = train_fno(a_pool[:n], u_pool[:n], _DATA["evals"], method=method, lr=lr, s=s, weight_decay=wd,
                             steps=c["steps"], batch=c["batch"], seed=seed, modes=c["modes"], width=c["width"])
    info.pop("losses")
    extra = {k: info.pop(k) for k in ("lr_factors_last",) if k in info}
    return asdict(RunResult(method=method, ratio=ratio, seed=seed, n_train=n, lr=lr, s=s if method == "tb" else None,
                            weight_decay=wd, steps=c["steps"], test_nrmse=scores["test"], val_nrmse=scores["val"],
                            extra=extra, **info))


def run_experiment(cfg: Config, out: Optional[Path], cache: Optional[Path], log=print, jobs: int = 1) -> dict:
    """Data, lr / s selection on validation, then every (seed, ratio, method); results rewritten after each run.

    Runs are ordered seed by seed, smallest ratio first, so that an interrupted run leaves a
    complete table for the first seeds. ``jobs > 1`` trains that many runs at once in worker
    processes (one thread each); results do not depend on ``jobs``.
    """
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    a_pool, u_pool = cached_dataset(cache, cfg.n_full, cfg.res, cfg.data_seeds[0])
    evals_np = {"val": cached_dataset(cache, cfg.n_val, cfg.res, cfg.data_seeds[1]),
                "test": cached_dataset(cache, cfg.n_test, cfg.res, cfg.data_seeds[2])}
    data_s = time.perf_counter() - t0
    log(f"data: {cfg.n_full} train pool / {cfg.n_val} val / {cfg.n_test} test at {cfg.res}x{cfg.res} ({data_s:.1f} s)")
    c = asdict(cfg)
    res = dict(
        config={k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in c.items()},
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        device=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{jobs} worker process(es) x 1 thread",
        data_s=data_s, selection=dict(lr=[], s=[]), runs=[],
    )

    def save() -> None:
        res["elapsed_s"] = time.perf_counter() - t_all
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        (out / "table.md").write_text(markdown_table(res) + "\n")

    pool = None
    if jobs > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(jobs, initializer=_set_data, initargs=(a_pool, u_pool, evals_np, 1))
        run_many = lambda tasks: pool.imap(_run_task, tasks)  # noqa: E731  (in task order)
    else:
        _set_data(a_pool, u_pool, evals_np, torch.get_num_threads())
        run_many = lambda tasks: map(_run_task, tasks)  # noqa: E731
    try:
        # selection on the validation set: lr for the baseline, then s for TempBalance at that lr
        lr = cfg.lr
        if lr is None:
            tasks = [("baseline", cfg.select_ratio, cfg.select_seed, cand, 1.0, c) for cand in cfg.lr_grid]
            for cand, r in zip(cfg.lr_grid, run_many(tasks)):
                res["selection"]["lr"].append(dict(lr=cand, val_nrmse=r["val_nrmse"], test_nrmse=r["test_nrmse"]))
                log(f"select lr={cand:g}: val nRMSE {r['val_nrmse']:.4e} ({r['train_s']:.0f} s)")
                save()
            lr = min(res["selection"]["lr"], key=lambda d: d["val_nrmse"])["lr"]
        s = cfg.s
        if s is None:
            tasks = [("tb", cfg.select_ratio, cfg.select_seed, lr, cand, c) for cand in cfg.s_grid]
            for cand, r in zip(cfg.s_grid, run_many(tasks)):
                res["selection"]["s"].append(dict(s=cand, val_nrmse=r["val_nrmse"], test_nrmse=r["test_nrmse"]))
                log(f"select s={cand:g}: val nRMSE {r['val_nrmse']:.4e} ({r['train_s']:.0f} s)")
                save()
            s = min(res["selection"]["s"], key=lambda d: d["val_nrmse"])["s"]
        res["chosen"] = dict(lr=lr, s=s)
        log(f"chosen: lr={lr:g}, s={s:g}")
        save()

        tasks = [(method, ratio, seed, lr, s, c) for seed in cfg.seeds for ratio in sorted(cfg.ratios)
                 for method in cfg.methods]
        for r in run_many(tasks):
            res["runs"].append(r)
            log(f"ratio {r['ratio']:g} (n={r['n_train']}) seed {r['seed']} {r['method']}: test nRMSE "
                f"{r['test_nrmse']:.4e}, loss {r['loss_first']:.3g} -> {r['loss_last']:.3g}, {r['train_s']:.0f} s"
                + (f", TB {r['tb_s']:.1f} s / {r['esd_calls']} ESDs" if r["method"] == "tb" else ""))
            save()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    res["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    save()
    return res


QUICK = dict(res=16, n_full=64, n_val=16, n_test=32, ratios=(1.0, 0.25), seeds=(0,), steps=40, batch=16,
             modes=4, width=8, lr_grid=(5e-3, 2e-2), s_grid=(1.0,), select_ratio=0.25)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (16x16 grid, 64 samples, 40 steps)")
    ap.add_argument("--out", type=Path, default=Path("out/fno_darcy"), help="folder for results.json and table.md")
    ap.add_argument("--cache", type=Path, default=Path("out/fno_darcy/cache"), help="dataset cache folder")
    ap.add_argument("--no-cache", action="store_true")
    d = Config()
    ap.add_argument("--res", type=int, default=d.res)
    ap.add_argument("--n-full", type=int, default=d.n_full)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(d.ratios))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr-grid", type=float, nargs="+", default=list(d.lr_grid))
    ap.add_argument("--s-grid", type=float, nargs="+", default=list(d.s_grid))
    ap.add_argument("--select-ratio", type=float, default=d.select_ratio)
    ap.add_argument("--lr", type=float, default=None, help="skip the lr selection")
    ap.add_argument("--s", type=float, default=None, help="skip the s selection")
    ap.add_argument("--methods", nargs="+", choices=("baseline", "tb"), default=list(d.methods))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (with --jobs 1)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once in worker processes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        cfg = Config(**QUICK)
        cfg.lr, cfg.s = args.lr, args.s
    else:
        cfg = Config(res=args.res, n_full=args.n_full, ratios=tuple(args.ratios), seeds=tuple(args.seeds),
                     steps=args.steps, batch=args.batch, lr_grid=tuple(args.lr_grid), s_grid=tuple(args.s_grid),
                     select_ratio=args.select_ratio, lr=args.lr, s=args.s, methods=tuple(args.methods))
    res = run_experiment(cfg, args.out, None if args.no_cache else args.cache,
                         log=lambda m: print(m, flush=True), jobs=args.jobs)
    print(markdown_table(res))
    print(f"total {res['elapsed_s']:.0f} s")
    return res


if __name__ == "__main__":
    main()
