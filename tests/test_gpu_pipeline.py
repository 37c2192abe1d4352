"""The whole pipeline on CUDA (cuSOLVER eigenvalues, Triton fits) against the CPU path and an
fp64 SVD oracle. Skipped without a GPU."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import tbfast
from oracle import heavy_tailed, ks_fit, median_fit, svd_eigs

pytestmark = pytest.mark.cuda


def _roberta_like(blocks=2, seed=0):
    mats = {}
    for b in range(blocks):
        for name in ("q", "k", "v", "o"):
            mats[f"layer.{b}.{name}"] = heavy_tailed(768, 768, seed + 10 * b + len(mats))
        mats[f"layer.{b}.up"] = heavy_tailed(3072, 768, seed + 10 * b + 7)
        mats[f"layer.{b}.down"] = heavy_tailed(768, 3072, seed + 10 * b + 8)
    return mats


@pytest.mark.parametrize("fit", ["median", "ks", "fix-finger"])
def test_cuda_pipeline_matches_cpu_path_and_oracle(fit):
    assert tbfast.backend_info()["active"]["cuda"]["fits"] == "Triton kernels"
    mats = _roberta_like()
    gpu = tbfast.layer_metrics({k: v.cuda() for k, v in mats.items()}, fit=fit)
    cpu = tbfast.layer_metrics(mats, fit=fit)
    assert gpu.status == ["ok"] * len(mats)
    same = 0
    for l, W in enumerate(mats.values()):
        assert float(gpu.alpha[l]) == pytest.approx(float(cpu.alpha[l]), rel=1e-3)
        same += int(gpu.xmin_index[l]) == int(cpu.xmin_index[l])
        e = svd_eigs(W)
        if fit == "median":
            assert float(gpu.alpha[l]) == pytest.approx(median_fit(e)[0], rel=1e-3)
        elif fit == "ks":
            assert float(gpu.alpha[l]) == pytest.approx(ks_fit(e)[0], rel=1e-3)
    assert same >= 0.95 * len(mats)
    for col in ("spectral_norm", "norm", "stable_rank", "entropy", "log_alpha_norm"):
        torch.testing.assert_close(gpu[col], cpu[col], rtol=1e-3, atol=0)


def test_cuda_conv_and_fp64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Linear(64, 48)).cuda()
    m = tbfast.layer_metrics(model, dtype=torch.float64)
    w = model[0].weight.detach().cpu()
    mats = w.reshape(32, 16, 9).permute(2, 0, 1)
    e = svd_eigs(mats, scale=math.sqrt(0.5))
    assert float(m.alpha[0]) == pytest.approx(median_fit(e)[0], rel=1e-9)
    e = svd_eigs(model[1].weight.detach().cpu())
    assert float(m.alpha[1]) == pytest.approx(median_fit(e)[0], rel=1e-9)


def test_tempbalance_on_cuda_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).cuda()
    tb = tbfast.TempBalance(net, eigs_thresh=10)
    groups, n = tb.build_optimizer_param_group(untuned_lr=0.1)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    net(torch.randn(8, 64, device="cuda")).sum().backward()
    opt.step()
    lrs = tb.step(opt, 0.05)
    alphas = [median_fit(svd_eigs(net[i].weight.detach().cpu()))[0] for i in (2, 4)]
    lo, hi = min(alphas), max(alphas)
    expected = [0.05 * (0.5 + (a - lo) / (hi - lo)) for a in alphas]  # tb_linear_map onto [0.5, 1.5] x lr
    assert n == 2
    assert lrs[:2] == pytest.approx(expected, rel=1e-3)
    assert np.isfinite(lrs).all()
