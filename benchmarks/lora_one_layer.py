"""One 4096 x 4096 layer with LoRA r = 8: process CPU time (1 torch thread) of the exact update
(warm base-spectrum cache) vs merge + float32 Gram + eigensolve (tbfast's default path) vs float64,
and each one's error against numpy float64 eigvalsh of the float64-merged Gram.

    OMP_NUM_THREADS=1 python benchmarks/lora_one_layer.py [OUT.json]
"""
import json
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)
from tbfast.lora import BaseSpectrumCache, LoRAItem, lora_eigenvalues
import tbfast
n, r = 4096, 8
g = torch.Generator().manual_seed(0)
w0 = (torch.distributions.StudentT(torch.tensor(3.0)).sample((n, n)) / n ** 0.5).float()
A = torch.randn(r, n, generator=g) / n ** 0.5
B = torch.randn(n, r, generator=g) * 0.02
item = LoRAItem("q", w0, [(A, B, 2.0, False)])
def cpu(f):
    c, t = time.process_time(), time.perf_counter(); out = f(); return time.process_time() - c, time.perf_counter() - t, out
cache = BaseSpectrumCache(memory_budget=None)
cb = cpu(lambda: cache.lookup("q", w0))
up = cpu(lambda: lora_eigenvalues([item], cache))
merged = w0 + 2.0 * (B @ A)
f32 = cpu(lambda: tbfast.esd({"q": merged}))
f64 = cpu(lambda: tbfast.esd({"q": merged}, dtype=torch.float64))
W = w0.double() + 2.0 * B.double() @ A.double()
want = np.linalg.eigvalsh((W.T @ W).numpy())
err = lambda v: float(np.abs(np.asarray(v, dtype=np.float64) - np.clip(want, 0, None)).max() / want.max())
res = {"n": n, "r": r, "threads": 1, "cache_build_cpu_s": cb[0], "cache_build_wall_s": cb[1],
       "update_cpu_s": up[0], "update_wall_s": up[1], "default_fp32_cpu_s": f32[0], "default_fp32_wall_s": f32[1],
       "fp64_cpu_s": f64[0], "fp64_wall_s": f64[1], "path": up[2][0][1],
       "err_update": err(up[2][0][0].numpy()), "err_fp32": err(f32[2].eigenvalues(0).numpy()),
       "err_fp64": err(f64[2].eigenvalues(0).numpy()),
       "speedup_cpu_vs_fp32": f32[0] / up[0], "speedup_cpu_vs_fp64": f64[0] / up[0]}
print(json.dumps(res, indent=1))
if len(sys.argv) > 1:
    json.dump(res, open(sys.argv[1], "w"), indent=1)
