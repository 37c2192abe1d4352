"""LLR-like TempBalance (refresh every N steps, ramp M, lr factors in [1, 5], median fit) on every
rank of a 2-process gloo DDP group; run by tests/test_balancing.py.

Each rank trains on its own batches (DDP averages the gradients, so the weights agree) and writes
the lrs TempBalance returned at every step (float hex), and the tuned layers' weights at every
refresh, plus the ``esd_of='grad'`` alphas and gradients of one step, to the output directory.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

LR, N_REFRESH, RAMP, LO, HI, STEPS = 0.05, 3, 4, 1.0, 5.0, 10
TUNED = (2, 4, 6)  # Sequential indices of the scheduled Linear layers (first and last are left out)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 72), nn.ReLU(), nn.Linear(72, 56),
                         nn.ReLU(), nn.Linear(56, 60), nn.ReLU(), nn.Linear(60, 4))


def batch(rank: int, step: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples; a gradient ESD needs ``n`` above the layer widths (a batch gradient has rank <= n)."""
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(n, 24, generator=g), torch.randn(n, 4, generator=g)


def llr_run(model: nn.Module, inner: nn.Module, rank: int) -> tuple[list[list[float]], dict[int, list[torch.Tensor]]]:
    """build + STEPS x (SGD step, tb.step): the lrs of every step (step 0: the built groups) and the
    tuned weights at every refresh (step count 0 and every multiple of N_REFRESH)."""
    import tbfast

    tb = tbfast.TempBalance(model, lr_min_ratio=LO, lr_max_ratio=HI, pl_fitting="median", refresh_every=N_REFRESH,
                            ramp_steps=RAMP, dtype=torch.float64,
                            process_group=dist.group.WORLD)  # split the layers over the ranks
    weights = {0: [inner[i].weight.detach().double().clone() for i in TUNED]}
    groups, _ = tb.build_optimizer_param_group(untuned_lr=LR)
    opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    lrs = [[g["lr"] for g in groups]]
    for c in range(1, STEPS + 1):
        x, y = batch(rank, c)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if c % N_REFRESH == 0:
            weights[c] = [inner[i].weight.detach().double().clone() for i in TUNED]
        lrs.append([float(v) for v in tb.step(opt, LR)])
    return lrs, weights


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import tbfast

    inner = tiny_model()
    ddp = nn.parallel.DistributedDataParallel(inner)
    lrs, weights = llr_run(ddp, inner, rank)
    # esd_of='grad' on the same DDP model: the all-reduced gradients of one more step
    x, y = batch(rank, 99, n=256)
    ddp.zero_grad()
    nn.functional.mse_loss(ddp(x), y).backward()
    tb = tbfast.TempBalance(ddp, esd_of="grad", dtype=torch.float64, process_group=dist.group.WORLD)
    tb.update()
    torch.save({"weights": weights, "grads": [inner[i].weight.grad.double().clone() for i in TUNED]},
               os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"lrs_hex": [[v.hex() for v in step] for step in lrs], "names": list(tb.metrics.names),
                   "grad_alpha": [float(a) for a in tb.metrics.alpha],
                   "owner": tb.metrics.extra["distributed"]["owner"]}, f)
    dist.destroy_process_group()
