"""`memory_budget` exceeded by a single layer is warned about (once, with the bytes it needs);
a CUDA device requested without CUDA is a clear one-line error, from the API and the CLI.

Oracles: the budget formula of docs/ANALYZE.md written out here, and an fp64 SVD."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tbfast import cli
from tbfast.analyze import analyze

safetensors_torch = pytest.importorskip("safetensors.torch")


def _needed_bytes(shape: tuple[int, ...], elem: int) -> int:
    """docs/ANALYZE.md: k matrices of out x in, read + converted copy, Gram n x n + solver copy."""
    out, inp = shape[:2]
    k = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    n = min(out, inp)
    return k * (2 * out * inp + 2 * n * n) * elem


def _sd():
    g = torch.Generator().manual_seed(0)
    return {"big.weight": torch.randn(96, 40, generator=g),
            "conv.weight": torch.randn(8, 6, 3, 3, generator=g),
            "small.weight": torch.randn(12, 10, generator=g)}


def _budget_warnings(caplog):
    return [r for r in caplog.records if r.name == "tbfast.spectra" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("dtype,elem", [(torch.float32, 4), (torch.float64, 8)])
def test_one_layer_over_budget_warns_once_with_its_bytes(caplog, dtype, elem):
    sd = _sd()
    need = {n[:-len(".weight")]: _needed_bytes(tuple(v.shape), elem) for n, v in sd.items()}
    assert need["big"] > need["conv"] > need["small"]
    budget = need["big"] - 1  # only "big" exceeds it
    with caplog.at_level(logging.WARNING, logger="tbfast.spectra"):
        small = analyze(sd, memory_budget=budget, min_evals=0, dtype=dtype)
    (rec,) = _budget_warnings(caplog)
    msg = rec.getMessage()
    assert "'big'" in msg and f"{need['big']} bytes" in msg and str(budget) in msg and "more layer" not in msg

    # two layers over: still one warning, naming the largest and counting the other
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tbfast.spectra"):
        analyze(sd, memory_budget=need["conv"] - 1, min_evals=0, dtype=dtype)
    (rec,) = _budget_warnings(caplog)
    assert "'big'" in rec.getMessage() and "1 more layer" in rec.getMessage()

    # within budget: silent; the results do not depend on the budget (fp64 SVD oracle for lambda_max)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tbfast.spectra"):
        roomy = analyze(sd, memory_budget=sum(need.values()), min_evals=0, dtype=dtype)
    assert _budget_warnings(caplog) == []
    np.testing.assert_allclose(small["spectral_norm"], roomy["spectral_norm"], rtol=1e-12)
    top = torch.linalg.svdvals(sd["big.weight"].double())[0].item() ** 2
    row = small.set_index("name").loc["big"]
    assert row["spectral_norm"] == pytest.approx(top, rel=1e-5 if dtype == torch.float32 else 1e-10)


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    model = torch.nn.Linear(16, 12)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(RuntimeError, match="CUDA is not available") as e:
            analyze(model, device=device, min_evals=0)
        assert len(str(e.value).splitlines()) == 1 and "'cuda" in str(e.value)
    f = tmp_path / "m.safetensors"
    safetensors_torch.save_file({"fc.weight": torch.randn(16, 12)}, str(f))
    assert cli.main(["analyze", str(f), "--device", "cuda", "--min-evals", "0"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is not available" in err


@pytest.mark.cuda
def test_cuda_index_beyond_the_visible_devices():
    n = torch.cuda.device_count()
    with pytest.raises(RuntimeError, match=f"only {n} CUDA device"):
        analyze(torch.nn.Linear(16, 12), device=f"cuda:{n}", min_evals=0)


def test_unknown_device_name():
    with pytest.raises(ValueError, match="invalid device 'gpu'"):
        analyze(torch.nn.Linear(16, 12), device="gpu", min_evals=0)
