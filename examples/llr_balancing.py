"""LLR / AlphaDecay-style balancing with tbfast.TempBalance, on CPU in seconds.

LLR (layer-wise learning rates): a new ESD every ``refresh_every`` optimizer steps, the new lr
factors ramped in linearly over ``ramp_steps`` steps, factors in [1, 5] from the median-Hill
alpha (here of the weights; ``esd_of="grad"`` or ``"exp_avg"`` take the gradients or Adam's first
moment). AlphaDecay: the same on the weight decay only (``balance="weight_decay"``) in [0.67, 3].

Run:  PYTHONPATH=. python examples/llr_balancing.py
The script checks every step's factors against the formulas written out below (numpy fp64 SVD).
"""
import numpy as np
import torch
from torch import nn

import tbfast

LR, WD, STEPS, REFRESH, RAMP = 3e-3, 0.1, 40, 10, 5


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 80), nn.GELU(),
                         nn.Linear(80, 64), nn.GELU(), nn.Linear(64, 8))


def hill_alpha(w: torch.Tensor) -> float:
    """Median-xmin Hill estimator of the squared singular values (SPEC section 3)."""
    e = np.sort(np.linalg.svd(w.detach().double().numpy(), compute_uv=False) ** 2)
    i = len(e) // 2
    n = len(e) - i
    return 1 + n / (np.sum(np.log(e[i:])) - n * np.log(e[i]))


def train(balance: str, **ranges) -> float:
    net = model()
    tb = tbfast.TempBalance(net, balance=balance, refresh_every=REFRESH, ramp_steps=RAMP, dtype=torch.float64,
                            **ranges)
    groups, _ = tb.build_optimizer_param_group(untuned_lr=LR)
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=WD)
    tuned = [m for m in net if isinstance(m, nn.Linear)][1:-1]  # first and last layers are not scheduled
    lo, hi = ranges.get("wd_min_ratio", 1.0), ranges.get("wd_max_ratio", 5.0)
    if balance == "lr":
        lo, hi = ranges["lr_min_ratio"], ranges["lr_max_ratio"]
    g = torch.Generator().manual_seed(1)
    target_w = torch.randn(32, 8, generator=g)
    worst, prev, start, old, new = 0.0, None, 0, None, None
    for step in range(STEPS + 1):
        if step:
            x = torch.randn(64, 32, generator=g)
            loss = nn.functional.mse_loss(net(x), x @ target_w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tb.step(opt)  # every optimizer step; a new ESD when step % REFRESH == 0
        if step % REFRESH == 0:  # the formula: linear map of alpha onto [lo, hi], ramped in from the old factors
            a = np.array([hill_alpha(m.weight) for m in tuned])
            target = lo + (a - a.min()) / (a.max() - a.min()) * (hi - lo)
            old, new, start = (target if prev is None else prev), target, step
        want = old + (new - old) * min(1.0, (step - start + 1) / RAMP)
        prev = want
        if balance == "lr":
            got = np.array([opt.param_groups[i]["lr"] / LR for i in range(len(tuned))]) if step else None
        else:
            got = np.array([opt.param_groups[i]["weight_decay"] / WD for i in range(len(tuned))]) if step else None
        if got is not None:
            worst = max(worst, float(np.max(np.abs(got - want))))
    for rec in tb.history:
        factors = rec["lr_factor"] if balance == "lr" else rec["wd_factor"]
        print(f"  refresh {rec['refresh']} at step {rec['step']:2d}: alpha "
              + " ".join(f"{rec['alpha'][n]:.3f}" for n in rec["tuned"])
              + " -> factors " + " ".join(f"{f:.3f}" for f in factors.values()))
    print(f"  max |factor - formula| over {STEPS} steps: {worst:.2e}")
    return worst


if __name__ == "__main__":
    print(f"LLR-style: lr factors in [1, 5], ESD every {REFRESH} steps, ramp {RAMP} steps")
    e1 = train("lr", lr_min_ratio=1.0, lr_max_ratio=5.0)
    print("AlphaDecay-style: weight-decay factors in [0.67, 3], lr untuned")
    e2 = train("weight_decay", wd_min_ratio=0.67, wd_max_ratio=3.0)
    assert max(e1, e2) < 1e-9, "factors differ from the formulas"
