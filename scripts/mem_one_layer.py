"""Peak anonymous memory of tbfast.analyze on one n x n fp32 layer, float64 compute, by memory budget.

    python scripts/mem_one_layer.py N BUDGET_MIB    # e.g. 4096 64 (writes /tmp/tbfast_one_N.safetensors)

With a budget below the layer's need, tbfast logs the memory_budget warning (printed here) with
the bytes it estimates; the script prints the measured peak (RssAnon sampled every 2 ms) beside it.
"""
import logging
import sys
import threading
import time

import torch
from safetensors.torch import save_file

logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
n, budget = int(sys.argv[1]), int(sys.argv[2]) << 20
f = f"/tmp/tbfast_one_{n}.safetensors"
save_file({"fc.weight": torch.randn(n, n, generator=torch.Generator().manual_seed(0))}, f)


def anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
    return 0


peak, stop = [0], [False]


def sampler() -> None:
    while not stop[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)


from tbfast.analyze import analyze  # noqa: E402

start = anon()
threading.Thread(target=sampler, daemon=True).start()
t = time.perf_counter()
analyze(f, memory_budget=budget, dtype=torch.float64)
elapsed = time.perf_counter() - t
stop[0] = True
print(f"{n}x{n} fp32 layer, float64, memory_budget {budget >> 20} MiB: peak anonymous memory above start "
      f"{(peak[0] - start) / 2**20:.0f} MiB; {elapsed:.1f} s")
