"""Alpha over training: a small MLP trained for 120 steps, checkpoints saved the way
the Hugging Face Trainer saves them (``run/checkpoint-<step>/model.safetensors`` with a
``trainer_state.json``), then every checkpoint analysed in one call and alpha plotted per layer
against the step.

    python examples/alpha_over_training.py [OUT_DIR]     # writes OUT_DIR/alpha_over_steps.png

The same from the command line: ``tbfast analyze run/checkpoint-* --csv alpha.csv --plot plots``
(or ``tbfast analyze run``).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import tbfast


def train(run: Path, steps: int = 120, every: int = 20) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (this is a script, not library code)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    X = torch.randn(512, 64)
    y = (X[:, :10] @ torch.randn(10, 10)).argmax(1)  # a learnable labelling
    for step in range(steps + 1):
        if step % every == 0:
            d = run / f"checkpoint-{step}"
            d.mkdir(parents=True)
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
            (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        i = torch.randint(0, 512, (64,))
        loss = nn.functional.cross_entropy(model(X[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(out_dir: str | None = None):
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        train(run)
        out = Path(out_dir) if out_dir else Path(d) / "plots"
        table = tbfast.analyze_series(run, fit="median", min_evals=0, plot_dir=out)
        print(table.pivot_table(index="name", columns="step", values="alpha").round(2).to_string())
        png = out / "alpha_over_steps.png"
        print(f"wrote {png} ({png.stat().st_size} bytes)")
        return table


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
