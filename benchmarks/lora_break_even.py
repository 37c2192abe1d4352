"""Break-even n/r of the exact LoRA update (warm base-spectrum cache) against tbfast's full paths,
in process CPU time on ONE torch thread (so a busy machine moves it little): square n x n layers,
LoRA rank r, medians of three; the update against merge + float32 Gram + eigensolve (tbfast's
default) and against the float64 Gram + eigensolve.

    OMP_NUM_THREADS=1 python benchmarks/lora_break_even.py [OUT.json] [--rank R] [--sizes 256,512,...]
"""
import argparse
import json
import statistics
import time

import torch

torch.set_num_threads(1)
import tbfast  # noqa: E402
from tbfast.bench.lora import break_even_point  # noqa: E402
from tbfast.lora import BaseSpectrumCache, LoRAItem, lora_eigenvalues  # noqa: E402


def cpu_time(fn, repeats=3):
    times = []
    for _ in range(repeats):
        c = time.process_time()
        fn()
        times.append(time.process_time() - c)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sizes", default="256,512,768,1024,1536,2048,3072")
    args = ap.parse_args()
    r = args.rank
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in map(int, args.sizes.split(",")):
        w0 = (torch.distributions.StudentT(torch.tensor(3.0)).sample((n, n)) / n ** 0.5).float()
        A = torch.randn(r, n, generator=g) / n ** 0.5
        B = torch.randn(n, r, generator=g) * 0.02
        item = LoRAItem("l", w0, [(A, B, 2.0, False)])
        cache = BaseSpectrumCache(memory_budget=None)
        build = cpu_time(lambda: cache.lookup("l", w0), 1)
        upd = cpu_time(lambda: lora_eigenvalues([item], cache))
        merged = w0 + 2.0 * (B @ A)
        f32 = cpu_time(lambda: tbfast.esd({"l": merged}))
        f64 = cpu_time(lambda: tbfast.esd({"l": merged}, dtype=torch.float64))
        row = {"n": n, "r": r, "n_over_r": n / r, "cache_build_cpu_s": build, "update_cpu_s": upd,
               "default_fp32_cpu_s": f32, "fp64_cpu_s": f64, "speedup_vs_fp32": f32 / upd, "speedup_vs_fp64": f64 / upd}
        rows.append(row)
        print(json.dumps(row), flush=True)

    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__, "threads": 1,
           "cpu_simd": tbfast.backend_info()["lora_update"]["cpu_simd"], "rows": rows,
           "break_even_n_over_r_vs_fp32": break_even_point(rows, "speedup_vs_fp32"),
           "break_even_n_over_r_vs_fp64": break_even_point(rows, "speedup_vs_fp64")}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
