"""tbfast.analyze: the DataFrame against an fp64 numpy SVD and the SPEC formulas written plainly here."""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from tbfast.analyze import COLUMNS, analyze, summary
from tbfast.checkpoint import MappingStore

F64 = torch.float64  # exactness tests compute in float64 (the default is float32)

pd = pytest.importorskip("pandas")
safetensors_torch = pytest.importorskip("safetensors.torch")


# ---------------------------------------------------------------------------------------------
# oracles (SPEC sections 2-4)


def esd_oracle(w: np.ndarray, conv_norm: float = 0.5) -> np.ndarray:
    """Ascending eigenvalues of W^T W by SVD; conv weights pooled over kernel positions."""
    if w.ndim == 2:
        mats, scale = [w], 1.0
    else:
        mats = [w[:, :, i, j] for i in range(w.shape[2]) for j in range(w.shape[3])]
        scale = conv_norm
    sv = np.concatenate([np.linalg.svd(m.astype(np.float64), compute_uv=False) for m in mats])
    return np.sort(sv ** 2 * scale)


def hill(e: np.ndarray, i: int) -> tuple[float, float]:
    n = len(e) - i
    x = e[i:]
    a = 1 + n / (np.sum(np.log(x)) - n * np.log(e[i]))
    D = np.max(np.abs(1 - (x / e[i]) ** (1 - a) - np.arange(n) / n)) if a > 1 else 1.0
    return a, D


def ks_oracle(e: np.ndarray) -> tuple[float, float, float]:
    best = (math.inf, None, None)
    for i in range(len(e) - 1):
        a, D = hill(e, i)
        if D < best[0]:
            best = (D, a, e[i])
    D, a, xmin = best
    return a, D, xmin


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(120, 24)
        self.conv = nn.Conv2d(12, 6, 3)
        self.fc1 = nn.Linear(24, 40)
        self.tiny = nn.Linear(24, 4)  # 4 eigenvalues: below WeightWatcher's 10
        self.fc2 = nn.Linear(40, 30)
        with torch.no_grad():
            for p in self.parameters():
                # heavy-tailed entries so the fits are well away from ties
                p.copy_(torch.distributions.StudentT(3.0).sample(p.shape) * 0.1 if p.dim() > 1 else p)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


def _weights(net):
    return {n: m.weight.detach().numpy() for n, m in net.named_modules() if hasattr(m, "weight")}


def test_model_rows_match_oracle(net):
    df = analyze(net, dtype=F64)
    assert list(df.columns) == list(COLUMNS)
    assert list(df["name"]) == ["emb", "conv", "fc1", "fc2"]  # module order; tiny (4 evals) left out
    assert list(df["type"]) == ["Embedding", "Conv2d", "Linear", "Linear"]
    assert list(df["layer_id"]) == [1, 2, 3, 5]  # position in named_modules()
    ws = _weights(net)
    for row in df.itertuples(index=False):
        w = ws[row.name]
        e = esd_oracle(w)
        a, D, xmin = ks_oracle(e)
        assert row.status == "ok"
        assert row.num_evals == len(e)
        assert (row.N, row.M) == (max(w.shape[:2]), min(w.shape[:2]))
        assert row.rf == (9 if row.name == "conv" else 1)
        assert row.alpha == pytest.approx(a, rel=1e-9)
        assert row.D == pytest.approx(D, rel=1e-8)
        assert row.xmin == pytest.approx(xmin, rel=1e-9)
        assert row.spectral_norm == pytest.approx(e[-1], rel=1e-10)
        assert row.xmax == pytest.approx(e[-1], rel=1e-10)
        assert row.norm == pytest.approx(e.sum(), rel=1e-10)
        assert row.log_norm == pytest.approx(np.log10(e.sum()), rel=1e-10)
        assert row.log_spectral_norm == pytest.approx(np.log10(e[-1]), rel=1e-10)
        assert row.alpha_weighted == pytest.approx(a * np.log10(e[-1]), rel=1e-9)
        assert row.log_alpha_norm == pytest.approx(np.log10(np.sum(e ** a)), rel=1e-9)
        assert row.stable_rank == pytest.approx(e.sum() / e[-1], rel=1e-10)
        sv = np.sqrt(e)
        rank = np.sum(sv > sv[-1] * max(w.shape[:2]) * np.finfo(np.float64).eps)
        p = e / e.sum() + 1e-10
        assert row.entropy == pytest.approx(-np.sum(p * np.log(p)) / np.log(rank + 1e-10), rel=1e-9)
        assert row.warning == ("over-trained" if a < 2 else "under-trained" if a > 6 else "")


def test_median_fit_and_selection(net):
    df = analyze(net, fit="median", xmin_pos=1.5, min_evals=0, include_embedding=False, dtype=F64)
    assert list(df["name"]) == ["conv", "fc1", "tiny", "fc2"]
    ws = _weights(net)
    for row in df.itertuples(index=False):
        e = esd_oracle(ws[row.name])
        i = int(len(e) / 1.5)
        a, D = hill(e, i)
        assert row.alpha == pytest.approx(a, rel=1e-9)
        assert row.xmin == pytest.approx(e[i], rel=1e-10)
    assert list(analyze(net, max_evals=30)["name"]) == ["emb", "fc1", "fc2"]  # conv: 9 * 6 = 54
    assert list(analyze(net, max_n=30)["name"]) == ["conv"]  # WeightWatcher's max_N: larger side <= 30


def test_file_matches_model(net, tmp_path):
    f = tmp_path / "net.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(f))
    from_file = analyze(f, dtype=F64).set_index("name")
    from_model = analyze(net, dtype=F64).set_index("name")
    assert set(from_file.index) == set(from_model.index)
    for name in from_model.index:
        assert from_file.loc[name, "type"] == from_model.loc[name, "type"]
        for c in ("alpha", "D", "xmin", "spectral_norm", "entropy"):
            assert from_file.loc[name, c] == pytest.approx(from_model.loc[name, c], rel=1e-12)


def test_delta_against_base(net):
    base = {k: v + 0.05 * torch.randn_like(v) for k, v in net.state_dict().items()}
    df = analyze(net.state_dict(), base=base, min_evals=0, dtype=F64)
    ws = _weights(net)
    for row in df.itertuples(index=False):
        d = ws[row.name] - base[row.name + ".weight"].numpy()
        e = esd_oracle(d)
        assert row.spectral_norm == pytest.approx(e[-1], rel=1e-9)
        assert row.alpha == pytest.approx(ks_oracle(e)[0], rel=1e-9)
    # same with a model source and a base state dict
    dm = analyze(net, base=base, min_evals=0, dtype=F64).set_index("name")
    for row in df.itertuples(index=False):
        assert dm.loc[row.name, "alpha"] == pytest.approx(row.alpha, rel=1e-12)


def test_lora_adapter_directory(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(base_sd, str(tmp_path / "base.bin"))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                     init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "adapter"))
    merged = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    df = analyze(tmp_path / "adapter", base=tmp_path / "base.bin", dtype=F64)
    assert list(df["name"]) == ["0", "2"] and set(df["type"]) == {"LoRA"}
    for row in df.itertuples(index=False):
        e = esd_oracle(merged[row.name + ".weight"])
        assert row.alpha == pytest.approx(ks_oracle(e)[0], rel=1e-6)
        assert row.spectral_norm == pytest.approx(e[-1], rel=1e-6)


def test_summary_is_mean_of_fitted_rows(net):
    df = analyze(net)
    df.loc[1, "status"] = "pretend this fit failed"
    s = summary(df)
    ok = df.drop(index=1)
    assert s["num_layers"] == 3
    for c in ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm", "stable_rank", "D"):
        assert s[c] == pytest.approx(float(np.mean(ok[c].to_numpy())), rel=1e-12)


class TrackingStore(MappingStore):
    """Records how many loaded tensors are still alive whenever a new one is loaded."""

    def __init__(self, sd):
        super().__init__(sd)
        self.refs: list[weakref.ref] = []
        self.max_alive = 0

    def load(self, name):
        alive = sum(r() is not None for r in self.refs)
        self.max_alive = max(self.max_alive, alive + 1)
        t = super().load(name).clone()  # a fresh tensor per load, as a file reader returns
        self.refs.append(weakref.ref(t))
        return t


def test_memory_budget_bounds_tensors_held():
    g = torch.Generator().manual_seed(5)
    sd = {f"layers.{i}.weight": torch.randn(64, 48, generator=g) for i in range(8)}
    per_layer = (64 * 48 + 2 * 48 * 48) * 4  # fp32 weights + Gram bytes, as the ESD stage counts
    store = TrackingStore(sd)
    small = analyze(store, memory_budget=2 * per_layer)
    assert store.max_alive <= 2  # at most two layers' weights in memory at once
    big = analyze(sd)
    np.testing.assert_allclose(small["alpha"], big["alpha"], rtol=1e-12)
    assert len(small) == 8


def test_progress_bar(net, capsys):
    pytest.importorskip("tqdm")
    analyze(net, progress=True)
    assert "layer" in capsys.readouterr().err


def test_bad_input(net):
    with pytest.raises(TypeError, match="cannot analyse"):
        analyze(42)
    with pytest.raises(ValueError, match="unknown fit"):
        analyze(net, fit="least-squares")
    with pytest.raises(ValueError, match="eigenvalues"):
        analyze(net, min_evals=10_000)


def test_nan_weights_name_the_layer(net):
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["fc1.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc1"):
        analyze(sd)


def test_public_entry_points():
    import tbfast

    assert callable(tbfast.analyze) and callable(tbfast.summary)
    assert tbfast.analyze is analyze and tbfast.summary is summary
    assert callable(tbfast.analyze)  # a second access still gives the function, not the submodule
