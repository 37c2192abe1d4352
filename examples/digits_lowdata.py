"""Low-data demo on real data: scikit-learn's bundled digits (1797 8x8 images, offline).

For each training-subset ratio and seed, trains the same small CNN (with BatchNorm) three ways,
same seeds, same subset, same number of optimizer steps and the same cosine base-lr schedule:

- baseline: SGD at the base lr,
- TempBalance with the original's defaults (tb_linear_map onto [0.5, 1.5] x lr),
- TempBalance with TB_Sigmoid (tau=10, s=0.5),

TempBalance recomputing the ESD once per "epoch" (every ``--steps // --epochs`` steps), as the
original does. Prints test accuracy mean and std per ratio over the seeds.

    python examples/digits_lowdata.py                # the table in docs/TEMPBALANCE.md
    python examples/digits_lowdata.py --ratios 0.05 0.5 --seeds 0 1 --steps 200
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

import tbfast


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(64)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = nn.functional.max_pool2d(x, 2)  # 4x4
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.conv4(x)))
        x = x.mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def load_digits_split(test_fraction: float = 0.3, split_seed: int = 1234):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def subsample(y: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Class-stratified subset indices (at least one example per class)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = []
    for c in range(10):
        cls = torch.nonzero(y == c).flatten()
        k = max(1, round(len(cls) * ratio))
        idx.append(cls[torch.randperm(len(cls), generator=g)[:k]])
    return torch.cat(idx)


def run(method: str, xtr, ytr, xte, yte, seed: int, steps: int, epochs: int, lr: float, batch: int) -> float:
    torch.manual_seed(seed)
    model = DigitsCNN()
    base_lr = lambda step: 0.5 * lr * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    tb = None
    if method == "baseline":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    else:
        kw = dict(assign_func="tb_linear_map") if method == "tb_linear_map" else dict(
            assign_func="tb_sigmoid", tau=10.0, s=0.5)
        tb = tbfast.Tempbalance(model, **kw)
        groups, _ = tb.build_optimizer_param_group(untuned_lr=lr, initialize=True)
        opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    per_epoch = max(1, steps // epochs)
    n = len(ytr)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        if (step + 1) % per_epoch == 0 and step + 1 < steps:
            if tb is not None:
                tb.step(opt, base_lr(step + 1))
            else:
                for grp in opt.param_groups:
                    grp["lr"] = base_lr(step + 1)
    model.eval()
    with torch.no_grad():
        return float((model(xte).argmax(1) == yte).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["baseline", "tb_linear_map", "tb_sigmoid"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=10, help="ESD / base-lr updates per run")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    xtr, ytr, xte, yte = load_digits_split()
    t0 = time.time()
    results = {}
    for ratio in args.ratios:
        for seed in args.seeds:
            sub = subsample(ytr, ratio, seed)
            for m in args.methods:
                acc = run(m, xtr[sub], ytr[sub], xte, yte, seed, args.steps, args.epochs, args.lr, args.batch)
                results.setdefault((ratio, m), []).append(acc)
                results[(ratio, "n")] = len(sub)
    elapsed = time.time() - t0

    print(f"digits: {len(ytr)} train / {len(yte)} test images; {args.steps} SGD steps, batch {args.batch}, "
          f"lr {args.lr} cosine, ESD every {max(1, args.steps // args.epochs)} steps; seeds {args.seeds}")
    head = "| ratio | train images | " + " | ".join(args.methods) + " |"
    print(head)
    print("|" + "---|" * (2 + len(args.methods)))
    for ratio in args.ratios:
        cells = []
        for m in args.methods:
            a = 100 * np.array(results[(ratio, m)])
            cells.append(f"{a.mean():.2f} +- {a.std():.2f}")
        print(f"| {ratio:g} | {results[(ratio, 'n')]} | " + " | ".join(cells) + " |")
    print(f"test accuracy %, mean +- std over {len(args.seeds)} seeds; total time {elapsed:.0f} s")


if __name__ == "__main__":
    main()
