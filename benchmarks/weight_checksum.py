"""Time of `tbfast.lora.cache.weight_checksum` (the base-weight check of every LoRA cache lookup)
on one 11008 x 4096 float32 weight and on the 7 float32 weights of one LLaMA-7B block (q, k, v, o
4096 x 4096; gate, up 11008 x 4096; down 4096 x 11008; 772 MiB), best of REPEATS, wall time, and the
legacy SHA-256 form (`sha256_checksum`) where this checkout has it.

    PYTHONPATH=. python benchmarks/weight_checksum.py [THREADS] [REPEATS]

(PYTHONPATH=. : the checkout's tbfast, not another installed copy.)
"""
import json
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
torch.set_num_threads(threads)
from tbfast.lora import cache as cache_mod  # noqa: E402

g = torch.Generator().manual_seed(0)
layer = torch.randn(11008, 4096, generator=g)
block = [torch.randn(4096, 4096, generator=g) for _ in range(4)]
block += [torch.randn(11008, 4096, generator=g) for _ in range(2)] + [torch.randn(4096, 11008, generator=g)]
block_bytes = sum(w.numel() * w.element_size() for w in block)


def best(f):
    f()  # warm-up (page faults, thread pool)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


out = {"threads": threads, "repeats": repeats, "block_MiB": block_bytes / 2**20}
fns = {"weight_checksum": cache_mod.weight_checksum}
if hasattr(cache_mod, "sha256_checksum"):
    fns["sha256_checksum"] = cache_mod.sha256_checksum
for name, fn in fns.items():
    t_layer = best(lambda: fn(layer))
    t_block = best(lambda: [fn(w) for w in block])
    out[name] = {"layer_s": round(t_layer, 4), "block_s": round(t_block, 4),
                 "block_GB_per_s": round(block_bytes / t_block / 1e9, 2), "example": fn(block[0])}
print(json.dumps(out, indent=1))
