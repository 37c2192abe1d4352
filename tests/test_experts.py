"""MoE experts: one row per expert, from fused 3-D parameters and from ModuleLists of nn.Linear,
from a model and from safetensors files; every expert's alpha against a per-matrix numpy oracle
(fp64 SVD, eigenvalues = squared singular values, SPEC section 3 Hill / section 4 KS written
plainly here)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tbfast

H, I, E, NL = 24, 40, 4, 2  # hidden, intermediate, experts, blocks


def _hill(x, xmin_pos=2.0):
    N = len(x)
    i = int(N / xmin_pos)
    n = N - i
    return 1 + n / (np.sum(np.log(x[i:])) - n * np.log(x[i]))


def _ks(x):
    N, best = len(x), (np.inf, None)
    for i in range(N - 1):
        n = N - i
        alpha = 1 + n / (np.sum(np.log(x[i:])) - n * np.log(x[i]))
        D = np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - alpha) - np.arange(n) / n)) if alpha > 1 else 1.0
        if D < best[0]:
            best = (D, alpha)
    return best[1]


def _evals(W):
    return np.sort(np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False) ** 2)


def _t(shape, df, g):
    return torch.from_numpy((g.standard_t(df, size=shape) / math.sqrt(shape[-1])).astype(np.float32))


class FusedExperts(nn.Module):
    """Current HF layout (Mixtral / Qwen-MoE / DeepSeek): [experts, out, in] parameters."""

    def __init__(self, g):
        super().__init__()
        self.gate_up_proj = nn.Parameter(_t((E, 2 * I, H), 3.0, g))
        self.down_proj = nn.Parameter(_t((E, H, I), 4.0, g))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H, 1))  # a 3-D bias is not a matrix


class ExpertMLP(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(H, I, bias=False), nn.Linear(I, H, bias=False), nn.Linear(H, I, bias=False)
        for lin, df in ((self.w1, 3.0), (self.w2, 4.5), (self.w3, 2.5)):
            lin.weight.data = _t(tuple(lin.weight.shape), df, g)


def _moe_model(seed=0):
    g = np.random.default_rng(seed)
    root = nn.Module()
    layers = nn.ModuleList()
    for _ in range(NL):
        blk = nn.Module()
        blk.q_proj = nn.Linear(H, H, bias=False)
        blk.mlp = nn.Module()
        blk.mlp.experts = FusedExperts(g)
        blk.block_sparse_moe = nn.Module()
        blk.block_sparse_moe.experts = nn.ModuleList([ExpertMLP(g) for _ in range(E)])
        layers.append(blk)
    root.layers = layers
    return root


def _expected(model):
    """name -> matrix for every row tbfast should produce, in module order."""
    out = {}
    for b, blk in enumerate(model.layers):
        out[f"layers.{b}.q_proj"] = blk.q_proj.weight
        for p in ("gate_up_proj", "down_proj"):
            for e in range(E):
                out[f"layers.{b}.mlp.experts.{p}[{e}]"] = getattr(blk.mlp.experts, p)[e]
        for e in range(E):
            for w in ("w1", "w2", "w3"):
                out[f"layers.{b}.block_sparse_moe.experts.{e}.{w}"] = getattr(blk.block_sparse_moe.experts[e], w).weight
    return {k: v.detach().numpy() for k, v in out.items()}


def test_every_expert_is_a_row_with_the_oracle_alpha_from_a_model():
    model = _moe_model()
    want = _expected(model)
    m = tbfast.layer_metrics(model)  # median fit, float32
    assert sorted(m.names) == sorted(want)
    kinds = dict(zip(m.names, m.kinds))
    assert kinds["layers.1.mlp.experts.down_proj[3]"] == "Expert"
    assert kinds["layers.1.block_sparse_moe.experts.3.w2"] == "Linear"
    for i, name in enumerate(m.names):
        assert abs(float(m.alpha[i]) - _hill(_evals(want[name]))) < 1e-4, name
    # TempBalance's own selection (Linear, Conv2d) is unchanged: no fused expert rows
    assert not any("[" in l.name for l in tbfast.find_layers(model, types=("Linear", "Conv2d")))
    only = tbfast.find_layers(model, types=("Expert",), include=r"down_proj\[2\]")
    assert [l.name for l in only] == [f"layers.{b}.mlp.experts.down_proj[2]" for b in range(NL)]


def test_experts_straight_from_safetensors_read_one_slice_each(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from tbfast.checkpoint.stores import SafetensorsStore

    model = _moe_model(1)
    want = _expected(model)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    real_load = SafetensorsStore.load

    def no_whole_expert_tensor(self, name):
        assert "experts.gate_up_proj" not in name and "experts.down_proj" not in name, name
        return real_load(self, name)

    monkeypatch.setattr(SafetensorsStore, "load", no_whole_expert_tensor)
    df = tbfast.analyze(path, dtype=torch.float64)  # KS fit (WeightWatcher's), fp64
    assert sorted(df.name) == sorted(want)
    for name, alpha, typ in zip(df.name, df.alpha, df.type):
        assert abs(alpha - _ks(_evals(want[name]))) < 1e-8, name
        assert typ == ("Expert" if "[" in name else "Linear")
    row = df[df.name == "layers.0.mlp.experts.gate_up_proj[1]"].iloc[0]
    assert (row.N, row.M, row.block) == (2 * I, H, 0)


def test_thousands_of_expert_rows_stay_within_the_memory_budget(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import tbfast.spectra as spectra

    g = np.random.default_rng(3)
    n_exp, blocks = 128, 8  # 8 blocks x 2 tensors x 128 experts = 2048 rows
    sd = {}
    for b in range(blocks):
        sd[f"model.layers.{b}.mlp.experts.gate_up_proj"] = _t((n_exp, 32, 16), 3.0, g)
        sd[f"model.layers.{b}.mlp.experts.down_proj"] = _t((n_exp, 16, 16), 4.0, g)
    save_file(sd, str(tmp_path / "moe.safetensors"))
    budget = 1 << 20
    seen = []
    real = spectra._chunk_eigenvalues

    def watch(layers, chunk, *a, **kw):
        seen.append(sum(spectra._layer_bytes(layers[i], 4) for i in chunk))
        return real(layers, chunk, *a, **kw)

    monkeypatch.setattr(spectra, "_chunk_eigenvalues", watch)
    m = tbfast.layer_metrics(tmp_path / "moe.safetensors", memory_budget=budget)
    assert len(m) == 2 * blocks * n_exp
    assert len(seen) > 1 and max(seen) <= budget and sum(seen) > budget
    for name in ("model.layers.5.mlp.experts.gate_up_proj[77]", "model.layers.7.mlp.experts.down_proj[127]"):
        base, e = name[:-1].split("[")
        i = m.names.index(name)
        assert abs(float(m.alpha[i]) - _hill(_evals(sd[base][int(e)].numpy()))) < 1e-4


def test_expert_base_deltas_from_a_model():
    model, base = _moe_model(4), _moe_model(5)
    m = tbfast.layer_metrics(model, base=base, types=("Expert",), dtype=torch.float64)
    W = model.layers[1].mlp.experts.down_proj[2] - base.layers[1].mlp.experts.down_proj[2]
    i = m.names.index("layers.1.mlp.experts.down_proj[2]")
    assert abs(float(m.alpha[i]) - _hill(_evals(W.detach().numpy()))) < 1e-9
    assert len(m) == NL * 2 * E
