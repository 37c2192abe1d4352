"""FARMS alpha (Hu et al., ICML 2025) against plain alpha on matrices of different aspect ratios.

The same heavy-tailed distribution (i.i.d. Student-t entries, df 3) is drawn into matrices of
256 rows and 256 ... 2048 columns. The plain alpha of each matrix (Hill fit of its whole ESD)
moves with the aspect ratio; FARMS alpha (the ESD pooled over 100 x 200 windows, all of one
aspect ratio) stays nearly constant, which is what FARMS is for.

    python examples/farms_alpha.py
"""
from __future__ import annotations

import numpy as np
import torch

import tbfast


def main() -> dict[str, list[float]]:
    g = np.random.default_rng(0)
    cols = [256, 512, 1024, 2048]
    mats = {f"256x{c}": torch.from_numpy((g.standard_t(3.0, size=(256, c)) / np.sqrt(c)).astype(np.float32))
            for c in cols}
    plain = tbfast.layer_metrics(mats, fit="median")
    farms = tbfast.layer_metrics(mats, fit="median", farms=True)  # or farms={"window_rows": 50, ...}
    print(f"{'matrix':>10} {'plain alpha':>12} {'FARMS alpha':>12} {'FARMS eigenvalues':>18}")
    for i, name in enumerate(plain.names):
        print(f"{name:>10} {float(plain.alpha[i]):12.3f} {float(farms.alpha[i]):12.3f} {int(farms.num_evals[i]):18d}")
    spread = lambda t: float(t.max() - t.min())  # noqa: E731
    print(f"spread over aspect ratios: plain {spread(plain.alpha):.3f}, FARMS {spread(farms.alpha):.3f}")
    return {"plain": plain.alpha.tolist(), "farms": farms.alpha.tolist()}


if __name__ == "__main__":
    main()
