"""The exact LoRA ESD used automatically (issue 23 item 3): TempBalance on a PEFT LoRA model, and
`tbfast.esd` / `analyze` / the CLI with a base-spectrum cache (``lora_cache=`` / ``--lora-cache``).

Oracles, written here: numpy float64 ``eigvalsh`` of the Gram of the merged weight
``W0 + s B A`` (merged in float64), the SPEC section 3 median Hill formula
``alpha = 1 + n / (sum ln x[i:] - n ln x[i])`` (``i = floor(N / 2)``, ``n = N - i``), and SPEC
section 6's ``tb_linear_map`` (numpy ``interp`` of the alphas onto ``[0.5 lr, 1.5 lr]``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tbfast
from tbfast.lora import BaseSpectrumCache

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(256, 256)  # LoRA r=2: n / r = 128, above the float32 break-even -> update path
        self.k = nn.Linear(64, 64)  # LoRA r=2: n / r = 32, below it -> full path under TempBalance
        self.v = nn.Linear(256, 320)  # LoRA r=2: n = 256
        self.o = nn.Linear(320, 64)  # not adapted


def lora_model(seed: int = 0):
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():
        for mod in (m.q, m.k, m.v, m.o):
            mod.weight.copy_(torch.distributions.StudentT(torch.tensor(2.5)).sample(mod.weight.shape) * 0.05)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k", "v"]))
    perturb(pm, 0.2)
    return pm


def perturb(pm, std: float) -> None:
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.add_(torch.randn_like(p) * std)


def merged(pm) -> dict[str, np.ndarray]:
    """Every analysed layer's weight, LoRA merged in float64 (the oracle's own merge)."""
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict):
            W = mod.base_layer.weight.detach().double().numpy()
            B, A = mod.lora_B["default"].weight.detach().double().numpy(), mod.lora_A["default"].weight.detach().double().numpy()
            out[name] = W + mod.scaling["default"] * B @ A
        elif isinstance(mod, nn.Linear) and not name.endswith(("lora_A.default", "lora_B.default", "base_layer")):
            out[name] = mod.weight.detach().double().numpy()
    return out


def oracle_evals(W: np.ndarray) -> np.ndarray:
    G = W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T
    return np.clip(np.linalg.eigvalsh(G), 0, None)


def median_hill(e: np.ndarray, xmin_pos: float = 2.0) -> float:
    N = len(e)
    i = int(N / xmin_pos)
    n = N - i
    return 1 + n / (np.sum(np.log(e[i:])) - n * np.log(e[i]))


# ------------------------------------------------------------------------------------ TempBalance


def test_tempbalance_takes_the_update_path_automatically():
    pm = lora_model()
    # float64 full path: break-even at n = 64 r
    tb = tbfast.TempBalance(net=pm, remove_first_layer=False, remove_last_layer=False, dtype=torch.float64)
    groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1, initialize=True)
    opt = torch.optim.SGD(groups, lr=0.1)
    for refresh in range(2):
        perturb(pm, 0.1)  # training moves the adapters, never the base
        tb.step(opt, untuned_lr=0.1)
        m = tb.metrics
        # q and v (n / r = 128 >= 64) take the update path; k (n / r = 32) and o (no LoRA) the full one
        assert m.extra["esd_path"] == ["update", "full", "update", "full"], refresh
        W = merged(pm)
        assert list(W) == m.names
        ev = {n: oracle_evals(w) for n, w in W.items()}
        for i, n in enumerate(m.names):
            exact = m.extra["esd_path"][i] == "update"
            assert float(m.alpha[i]) == pytest.approx(median_hill(ev[n]), rel=0, abs=1e-8 if exact else 1e-6)
            assert float(m.spectral_norm[i]) == pytest.approx(ev[n][-1], rel=1e-12 if exact else 1e-6)
        alphas = np.array([median_hill(ev[n]) for n in m.names])
        want = np.interp(alphas, [alphas.min(), alphas.max()], [0.05, 0.15])  # SPEC 6 tb_linear_map
        got = np.array([tb.layer_lrs[n] for n in m.names])
        assert np.allclose(got, want, rtol=1e-5, atol=0)
    assert tb.lora.cache.builds == 2  # q and v: base spectra built at the first refresh only
    assert sorted(tb.lora.cache.names) == ["base_model.model.q", "base_model.model.v"]
    # against the default float32 full path the break-even is n = 96 r: q and v (n / r = 128) are
    # above it and take the update path, k (n / r = 32) keeps the full one
    tb32 = tbfast.TempBalance(net=pm, remove_first_layer=False, remove_last_layer=False)
    assert tb32.compute_metrics().extra["esd_path"] == ["update", "full", "update", "full"]
    assert sorted(tb32.lora.cache.names) == ["base_model.model.q", "base_model.model.v"]


def test_tempbalance_lora_cache_false_and_given_cache():
    pm = lora_model()
    off = tbfast.TempBalance(net=pm, remove_first_layer=False, remove_last_layer=False, lora_cache=False)
    m = off.compute_metrics()
    assert "esd_path" not in m.extra and off.lora.cache is None
    cache = BaseSpectrumCache()
    given = tbfast.TempBalance(net=pm, remove_first_layer=False, remove_last_layer=False, lora_cache=cache)
    m = given.compute_metrics()
    # a cache the user gives is used for every LoRA layer, whatever n / r
    assert m.extra["esd_path"] == ["update", "update", "update", "full"]
    assert cache.builds == 3
    e = oracle_evals(merged(pm)["base_model.model.k"])
    assert float(m.alpha[1]) == pytest.approx(median_hill(e), rel=0, abs=1e-8)
    with pytest.raises(TypeError, match="lora_cache"):
        tbfast.TempBalance(net=pm, lora_cache="yes")


def test_tempbalance_without_lora_layers_is_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    tb = tbfast.TempBalance(net=net, remove_first_layer=False, remove_last_layer=False)
    m = tb.compute_metrics()
    assert "esd_path" not in m.extra and tb.lora.cache is None


# ------------------------------------------------------------------------------ esd / analyze


def test_esd_and_analyze_with_a_cache_on_a_peft_model():
    pm = lora_model()
    W = merged(pm)
    cache = BaseSpectrumCache()
    sp = tbfast.esd(pm, lora_cache=cache)
    assert sp.esd_path == ["update", "update", "update", "full"] and sp.values.dtype == torch.float64
    for i, n in enumerate(sp.names):
        want = oracle_evals(W[n])
        err = np.abs(sp.eigenvalues(i).numpy() - want).max()
        assert err <= (1e-12 if sp.esd_path[i] == "update" else 1e-5) * want[-1], n
    assert cache.builds == 3
    df = tbfast.analyze(pm, lora_cache=cache, fit="median", min_evals=0)
    assert cache.builds == 3  # warm: nothing rebuilt
    assert list(df["esd_path"]) == ["update", "update", "update", "full"]
    for row in df.itertuples(index=False):
        e = oracle_evals(W[row.name])
        tol = 1e-8 if row.esd_path == "update" else 1e-4
        assert row.alpha == pytest.approx(median_hill(e), rel=0, abs=tol), row.name
        assert row.spectral_norm == pytest.approx(e[-1], rel=1e-12 if row.esd_path == "update" else 1e-5)
    m = tbfast.layer_metrics(pm, lora_cache=cache)
    assert m.extra["esd_path"] == ["update", "update", "update", "full"]


def test_without_a_cache_results_are_unchanged():
    pm = lora_model()
    from tbfast.analyze import COLUMNS, analyze_spectra
    res = analyze_spectra(pm, fit="median", min_evals=0)
    assert list(res.details.columns) == list(COLUMNS)  # no esd_path column
    assert res.spectra.values.dtype == torch.float32 and res.spectra.esd_path is None
    assert tbfast.esd(pm).esd_path is None
    W = merged(pm)
    for row in res.details.itertuples(index=False):
        assert row.alpha == pytest.approx(median_hill(oracle_evals(W[row.name])), rel=1e-4)
    with pytest.raises(TypeError, match="BaseSpectrumCache"):
        tbfast.esd(pm, lora_cache="cache.safetensors")


def save_adapter(pm, tmp_path):
    from safetensors.torch import save_file
    base = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, nn.Linear) and not name.endswith(("lora_A.default", "lora_B.default")):
            base[name.replace(".base_layer", "") + ".weight"] = mod.weight.detach().clone().contiguous()
    save_file(base, str(tmp_path / "base.safetensors"))
    pm.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter", tmp_path / "base.safetensors"


def test_analyze_adapter_directory_with_base_and_cache(tmp_path):
    pm = lora_model()
    W = {n.replace("base_model.model.", ""): w for n, w in merged(pm).items()}
    adapter, base = save_adapter(pm, tmp_path)
    cache = BaseSpectrumCache()
    df = tbfast.analyze(adapter, base=base, lora_cache=cache, fit="median", min_evals=0)
    assert list(df["name"]) == ["k", "q", "v"] and list(df["esd_path"]) == ["update"] * 3
    for row in df.itertuples(index=False):
        e = oracle_evals(W[row.name])
        assert row.alpha == pytest.approx(median_hill(e), rel=0, abs=1e-8), row.name
        assert row.spectral_norm == pytest.approx(e[-1], rel=1e-12)
    assert cache.builds == 3
    sp = tbfast.esd(adapter, base=base, lora_cache=cache)
    assert sp.esd_path == ["update"] * 3 and cache.builds == 3


def test_cli_lora_cache_file(tmp_path, capsys):
    import pandas as pd

    from tbfast import cli
    pm = lora_model()
    W = {n.replace("base_model.model.", ""): w for n, w in merged(pm).items()}
    adapter, base = save_adapter(pm, tmp_path)
    cfile, csv = tmp_path / "base.spectra.safetensors", tmp_path / "out.csv"
    args = ["analyze", str(adapter), "--base", str(base), "--lora-cache", str(cfile), "--fit", "median",
            "--min-evals", "0", "--csv", str(csv), "--no-progress"]
    assert cli.main(args) == cli.EXIT_OK
    assert "esd_path" in capsys.readouterr().out
    saved = BaseSpectrumCache.load(cfile)
    assert sorted(saved.names) == ["k", "q", "v"]
    w0 = pm.base_model.model.q.base_layer.weight.detach().double().numpy()
    assert np.allclose(saved.entry("q").evals.numpy(), np.linalg.eigvalsh(w0.T @ w0), rtol=0,
                       atol=1e-12 * np.linalg.eigvalsh(w0.T @ w0)[-1])
    assert cli.main(args) == cli.EXIT_OK  # the second run reads the file
    df = pd.read_csv(csv)
    assert list(df["esd_path"]) == ["update"] * 3
    for row in df.itertuples(index=False):
        assert row.alpha == pytest.approx(median_hill(oracle_evals(W[row.name])), rel=0, abs=1e-8)
    # an input given as the cache file is refused; a file that is not a cache is a one-line error
    with_cache = lambda f: args[:5] + [str(f)] + args[6:10] + ["--no-progress"]  # noqa: E731
    assert cli.main(with_cache(base)) == cli.EXIT_USAGE
    assert "--lora-cache" in capsys.readouterr().err
    assert cli.main(with_cache("-")) == cli.EXIT_USAGE
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert cli.main(with_cache(bad)) == cli.EXIT_ERROR
    assert "--lora-cache" in capsys.readouterr().err


def test_backend_info_says_where_the_update_path_is_used():
    info = tbfast.backend_info()["lora_update"]
    assert info["break_even_n_over_r"] == {"float64": 64.0, "float32": 96.0}
    assert "lora_cache" in info["used_by"] and "TempBalance" in info["used_by"]
    assert set(info["kernels"]) == {"cpu", "cuda"}


def test_lora_esd_on_an_adapter_directory(tmp_path):
    pm = lora_model()
    W = {n.replace("base_model.model.", ""): w for n, w in merged(pm).items()}
    adapter, base = save_adapter(pm, tmp_path)
    res = tbfast.lora_esd(adapter, base=base)
    assert res.esd_path == ["update"] * 3  # formerly "dense": the adapter's layers carry no module
    for i, n in enumerate(res.spectra.names):
        want = oracle_evals(W[n])
        assert np.abs(res.spectra.eigenvalues(i).numpy() - want).max() <= 1e-12 * want[-1]
