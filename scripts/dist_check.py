"""GPU check of tbfast's distributed path (run by scripts/device_check.sh; writes dist_gpu.json).

Two ranks analyse a heavy-tailed 12-layer model on the GPU(s): NCCL with one GPU per rank when
there are two or more GPUs (plus TempBalance on an FSDP2 model), otherwise gloo with both ranks
computing on cuda:0. Each rank compares the gathered table with its own single-process run.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same weights on every call and every rank
    layers = []
    for i in range(12):
        lin = nn.Linear(256 + 32 * i, 384, bias=False)
        w = torch.distributions.StudentT(2.5 + 0.3 * i).sample((384, 256 + 32 * i)) / 16
        lin.weight.data.copy_(w)
        layers.append(lin)
    return nn.Sequential(*layers).to(device)


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    import tbfast

    ngpu = torch.cuda.device_count()
    nccl = ngpu >= 2
    device = torch.device("cuda", rank if nccl else 0)
    torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if nccl else "gloo", rank=rank, world_size=world)
    net = model(device)
    t0 = time.perf_counter()
    got = tbfast.analyze(net, min_evals=0, device=device)
    t_dist = time.perf_counter() - t0
    want = tbfast.analyze(net, min_evals=0, device=device, process_group=False)
    res = {"rank": rank, "backend": dist.get_backend(), "device": str(device), "seconds": t_dist,
           "max_alpha_abs_diff": float((got["alpha"] - want["alpha"]).abs().max()),
           "same_names": list(got["name"]) == list(want["name"])}
    if nccl:
        from torch.distributed.fsdp import fully_shard

        sharded = model(device)
        for m in sharded:
            fully_shard(m)
        fully_shard(sharded)
        lrs = tbfast.TempBalance(sharded).build_optimizer_param_group(0.1, initialize=False)
        ref = tbfast.TempBalance(model(device), process_group=False).build_optimizer_param_group(0.1, initialize=False)
        res["fsdp2_max_lr_rel_diff"] = max(abs(a - b) / b for a, b in zip(lrs, ref))
    with open(os.path.join(out, f"dist_rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    if not torch.cuda.is_available():
        print("dist_check: no CUDA device, skipped")
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(2, port, out), nprocs=2, join=True)
    res = [json.load(open(os.path.join(out, f"dist_rank{r}.json"))) for r in range(2)]
    ok = all(r["same_names"] and r["max_alpha_abs_diff"] < 1e-5 and r.get("fsdp2_max_lr_rel_diff", 0) < 1e-5
             for r in res)
    with open(os.path.join(out, "dist_gpu.json"), "w") as f:
        json.dump({"ok": ok, "ranks": res}, f, indent=2)
    print(json.dumps({"ok": ok, "ranks": res}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
