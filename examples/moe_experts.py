"""Alpha of every expert of a mixture-of-experts model (fused 3-D expert parameters).

A tiny random Mixtral-style model is built here with the current Hugging Face layout: per block
``mlp.experts.gate_up_proj`` ``[experts, 2 * intermediate, hidden]`` and
``mlp.experts.down_proj`` ``[experts, hidden, intermediate]``. tbfast gives one row per expert
(``...gate_up_proj[3]``, type ``Expert``), from the model or straight from a safetensors file
(one expert's slice read at a time), and the experts can then be ranked, e.g. for AlphaQ-style
bit widths or expert pruning (lower alpha: heavier tail, better trained).

    python examples/moe_experts.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tbfast

HIDDEN, INTER, EXPERTS, BLOCKS = 64, 96, 8, 4


def build(seed: int = 0) -> nn.Module:
    g = np.random.default_rng(seed)

    def t(shape, df):
        return nn.Parameter(torch.from_numpy((g.standard_t(df, size=shape) / np.sqrt(shape[-1])).astype(np.float32)))

    model = nn.Module()
    model.layers = nn.ModuleList()
    for b in range(BLOCKS):
        blk = nn.Module()
        blk.self_attn = nn.Module()
        blk.self_attn.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        blk.mlp = nn.Module()
        blk.mlp.experts = nn.Module()
        # each expert its own tail: df from 2.2 (heavy) to 8 (light)
        dfs = np.linspace(2.2, 8.0, EXPERTS)
        blk.mlp.experts.gate_up_proj = nn.Parameter(torch.cat([t((1, 2 * INTER, HIDDEN), d) for d in dfs]))
        blk.mlp.experts.down_proj = nn.Parameter(torch.cat([t((1, HIDDEN, INTER), d) for d in dfs]))
        model.layers.append(blk)
    return model


def main() -> "object":
    model = build()
    df = tbfast.analyze(model, fit="median", types=("Expert",))  # only the expert rows
    print(df[["name", "type", "N", "M", "alpha"]].head(10).to_string(index=False))
    df["expert"] = df["name"].str.extract(r"\[(\d+)\]$")[0].astype(int)
    per_expert = df.groupby("expert")["alpha"].mean()
    print("mean alpha per expert index:", ", ".join(f"{e}: {a:.2f}" for e, a in per_expert.items()))
    with tempfile.TemporaryDirectory() as d:
        from safetensors.torch import save_file

        path = Path(d) / "model.safetensors"
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
        from_file = tbfast.analyze(path, fit="median", types=("Expert",))
    same = np.allclose(from_file.set_index("name").loc[df["name"], "alpha"].to_numpy(), df["alpha"].to_numpy())
    print(f"{len(df)} expert rows; from the safetensors file: {len(from_file)} rows, same alphas: {same}")
    return df


if __name__ == "__main__":
    main()
