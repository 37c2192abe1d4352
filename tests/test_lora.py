"""Exact LoRA ESD (tbfast.lora, tbfast.lora_esd): a cached base spectrum refreshed by secular updates.

Oracles: numpy float64 eigvalsh of the Gram of the merged weight W0 + s B A, merged here in float64;
alphas of tbfast's fits on a float64 dense ESD of those merged weights (the same fit code, an
independent spectrum). Acceptance (issue 23): eigenvalues within 1e-10 relative on the top half
and 1e-12 x lambda_max everywhere; alphas within 1e-8.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import tbfast
from tbfast.lora import BaseSpectrumCache, LoRAItem, lora_eigenvalues
from tbfast.lora import update as lora_update
from tbfast.ops import secular


def merged_eigvalsh(w0: torch.Tensor, updates) -> np.ndarray:
    W = w0.double().numpy().copy()
    for A, B, s, transpose in updates:
        D = s * (B.double().numpy() @ A.double().numpy())
        W += D.T if transpose else D
    G = W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T
    return np.linalg.eigvalsh(G)


def assert_exact(w: torch.Tensor, want: np.ndarray) -> None:
    w = w.numpy()
    top = want.max()
    assert np.abs(w - want).max() <= 1e-12 * top, f"{np.abs(w - want).max() / top:.2e} x lambda_max"
    # top half, relative; eigenvalues that are 0 in exact arithmetic (a rank-deficient merged
    # weight) are rounding noise in any float64 method, so the relative test skips values below
    # 1e-4 lambda_max (their absolute error is checked above)
    top_half = want[len(want) // 2:]
    keep = top_half > 1e-4 * top
    rel = np.abs(w[len(want) // 2:] - top_half)[keep] / top_half[keep]
    assert keep.sum() >= min(8, len(top_half)) or top_half.max() <= 1e-4 * top
    assert rel.max(initial=0.0) <= 1e-10, f"top half relative error {rel.max():.2e}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def base_weight(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=g) / cols ** 0.5
    if kind == "student":
        t = torch.distributions.StudentT(torch.tensor(3.0)).sample((rows, cols))
        return (t / cols ** 0.5).float()
    if kind == "lowrank":  # rank-deficient: rank 24 < min(rows, cols)
        return torch.randn(rows, 24, generator=g) @ torch.randn(24, cols, generator=g) / cols
    if kind == "orthogonal":  # exact clusters: every Gram eigenvalue equal
        q, _ = torch.linalg.qr(torch.randn(max(rows, cols), max(rows, cols), generator=g, dtype=torch.float64))
        return q[:rows, :cols].float()
    raise ValueError(kind)


def lora_factors(rows: int, cols: int, r: int, seed: int, scale: float = 1.0):
    g = gen(seed + 100)
    A = torch.randn(r, cols, generator=g) / cols ** 0.5
    B = torch.randn(rows, r, generator=g) * scale / r ** 0.5
    return A, B


# ------------------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("kind", ["gaussian", "student", "lowrank", "orthogonal"])
@pytest.mark.parametrize("r", [1, 8, 16])
@pytest.mark.parametrize("shape", [(160, 128), (96, 144)], ids=["tall", "wide"])
def test_update_path_matches_the_merged_gram(kind, r, shape):
    rows, cols = shape
    w0 = base_weight(kind, rows, cols, seed=r)
    A, B = lora_factors(rows, cols, r, seed=r)
    updates = [(A, B, 2.0, False)]
    cache = BaseSpectrumCache()
    (w, path), = lora_eigenvalues([LoRAItem("l", w0, updates)], cache)
    assert path == "update"
    assert_exact(w, merged_eigvalsh(w0, updates))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(600, 96), (80, 700)], ids=["tall", "wide"])
def test_update_path_with_more_base_rows_than_one_block(shape, dtype):
    # update_system forms M0^T B a block of M0's rows at a time (in float64 from the weight's own
    # dtype): several blocks, both Gram sides, a non-float32 base
    rows, cols = shape
    assert max(rows, cols) > 2 * lora_update._ROW_BLOCK
    w0 = base_weight("student", rows, cols, seed=5).to(dtype)
    A, B = lora_factors(rows, cols, 8, seed=5, scale=0.5)
    updates = [(A, B, 2.0, False)]
    (w, path), = lora_eigenvalues([LoRAItem("l", w0, updates)], BaseSpectrumCache())
    assert path == "update"
    assert_exact(w, merged_eigvalsh(w0, updates))


def test_rank_64_and_two_adapters_and_fan_in_fan_out():
    rows, cols = 256, 200
    w0 = base_weight("student", rows, cols, seed=5)
    A, B = lora_factors(rows, cols, 64, seed=5)
    A2, B2 = lora_factors(cols, rows, 4, seed=6)  # a fan-in-fan-out adapter: update (B2 A2)^T
    updates = [(A, B, 0.25, False), (A2, B2, 0.5, True)]
    (w, path), = lora_eigenvalues([LoRAItem("l", w0, updates)], BaseSpectrumCache())
    assert path == "update"
    assert_exact(w, merged_eigvalsh(w0, updates))


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_update_as_large_as_the_base(scale):
    rows, cols, r = 192, 192, 16
    w0 = base_weight("gaussian", rows, cols, seed=9)
    A, B = lora_factors(rows, cols, r, seed=9, scale=scale)
    updates = [(A, B, 1.0, False)]
    assert torch.linalg.matrix_norm(B @ A, ord=2) >= 0.5 * scale * torch.linalg.matrix_norm(w0, ord=2)
    (w, path), = lora_eigenvalues([LoRAItem("l", w0, updates)], BaseSpectrumCache())
    assert path == "update"
    assert_exact(w, merged_eigvalsh(w0, updates))


def test_zero_b_at_initialisation_gives_the_base_spectrum():
    w0 = base_weight("gaussian", 120, 100, seed=1)
    A, _ = lora_factors(120, 100, 8, seed=1)
    updates = [(A, torch.zeros(120, 8), 2.0, False)]
    (w, path), = lora_eigenvalues([LoRAItem("l", w0, updates)], BaseSpectrumCache())
    assert path == "update"
    assert_exact(w, merged_eigvalsh(w0, []))


def test_minilm_layers(minilm_state_dict):
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight",
             "encoder.layer.5.output.dense.weight"]
    items, wants = [], []
    for i, name in enumerate(names):
        w0 = minilm_state_dict[name]
        A, B = lora_factors(w0.shape[0], w0.shape[1], 8, seed=i, scale=0.05)
        upd = [(A, B, 2.0, False)]
        items.append(LoRAItem(name, w0, upd))
        wants.append(merged_eigvalsh(w0, upd))
    res = lora_eigenvalues(items, BaseSpectrumCache())
    for (w, path), want in zip(res, wants):
        assert path == "update"
        assert_exact(w, want)


def test_cancelling_update_takes_the_full_path(caplog):
    """B A = -W0 + a small rest: the merged weight is tiny next to W0, so the update's error
    bound (eps x ||G0||) is no longer small next to it; the layer is solved in full."""
    rows, cols = 64, 48
    U, S, Vh = torch.linalg.svd(base_weight("gaussian", rows, cols, 2).double())
    w0 = (U[:, :8] * S[:8]) @ Vh[:8]  # rank 8
    rest = torch.randn(rows, cols, generator=gen(3), dtype=torch.float64) * 1e-4
    B, A = -(U[:, :8] * S[:8]), Vh[:8]
    updates = [(A, B, 1.0, False)]
    with caplog.at_level(logging.INFO, logger="tbfast.lora"):
        (w, path), = lora_eigenvalues([LoRAItem("cancel", w0 + rest, updates)], BaseSpectrumCache())
    assert path == "full" and "cancels most of the base" in caplog.text
    want = merged_eigvalsh(w0 + rest, updates)
    assert np.abs(w.numpy() - np.clip(want, 0, None)).max() <= 1e-12 * want.max()


def test_not_converged_layer_falls_back(monkeypatch, caplog):
    w0 = base_weight("gaussian", 50, 40, 0)
    A, B = lora_factors(50, 40, 2, 0)
    real = secular.eigvalsh_update

    def failing(d, Z, C, backend="auto"):
        w, st = real(d, Z, C, backend=backend)
        return torch.full_like(w, float("nan")), torch.full_like(st, secular.NOT_CONVERGED)

    monkeypatch.setattr(lora_update.secular, "eigvalsh_update", failing)
    with caplog.at_level(logging.WARNING, logger="tbfast.lora"):
        (w, path), = lora_eigenvalues([LoRAItem("l", w0, [(A, B, 1.0, False)])], BaseSpectrumCache())
    assert path == "full" and "secular update failed" in caplog.text
    assert_exact(w, merged_eigvalsh(w0, [(A, B, 1.0, False)]))


# ------------------------------------------------------------------------------------- cache


def test_cache_builds_once_and_invalidates_on_change():
    w0 = base_weight("gaussian", 80, 64, 0)
    A, B = lora_factors(80, 64, 4, 0)
    cache = BaseSpectrumCache()
    lora_eigenvalues([LoRAItem("l", w0, [(A, B, 1.0, False)])], cache)
    lora_eigenvalues([LoRAItem("l", w0, [(A * 2, B, 1.0, False)])], cache)
    assert cache.builds == 1
    with torch.no_grad():
        w0.data[3, 5] += 0.5  # through .data: no version counter sees it; the checksum does
    (w, path), = lora_eigenvalues([LoRAItem("l", w0, [(A, B, 1.0, False)])], cache)
    assert cache.builds == 2 and path == "update"
    assert_exact(w, merged_eigvalsh(w0, [(A, B, 1.0, False)]))


def test_cache_over_budget_takes_the_full_path():
    w0 = base_weight("gaussian", 80, 64, 0)
    A, B = lora_factors(80, 64, 4, 0)
    cache = BaseSpectrumCache(memory_budget=64 * 64 * 8)  # one eigenvector matrix does not fit
    (w, path), = lora_eigenvalues([LoRAItem("l", w0, [(A, B, 1.0, False)])], cache)
    assert path == "full" and len(cache) == 0
    assert_exact(w, merged_eigvalsh(w0, [(A, B, 1.0, False)]))


def two_layer_items() -> list[LoRAItem]:
    """Two rank-4 LoRA layers on Student-t bases, one tall (80 x 64) and one wide (48 x 72)."""
    items = []
    for i, shape in enumerate([(80, 64), (48, 72)]):
        w0 = base_weight("student", *shape, seed=i)
        A, B = lora_factors(*shape, 4, seed=i)
        items.append(LoRAItem(f"layer.{i}", w0, [(A, B, 1.0, False)]))
    return items


def test_cache_save_and_load(tmp_path):
    items = two_layer_items()
    cache = BaseSpectrumCache()
    first = lora_eigenvalues(items, cache)
    f = cache.save(tmp_path / "base.spectrum.safetensors")
    loaded = BaseSpectrumCache.load(f)
    assert loaded.names == ["layer.0", "layer.1"] and loaded.dtype == torch.float64
    again = lora_eigenvalues(items, loaded)
    assert loaded.builds == 0
    for name in loaded.names:  # the file holds the cache's bits
        assert torch.equal(loaded.entry(name).evecs, cache.entry(name).evecs)
        assert torch.equal(loaded.entry(name).evals, cache.entry(name).evals)
    for item, (a, _), (b, path) in zip(items, first, again):
        assert path == "update"
        assert_exact(b, merged_eigvalsh(item.w0, item.updates))
        assert torch.allclose(a, b, rtol=0, atol=1e-13 * float(a.max()))
    # a budget that holds one entry loads one
    assert len(BaseSpectrumCache.load(f, memory_budget=(64 * 64 + 64) * 8)) == 1


def test_loading_a_foreign_file_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, str(p))
    with pytest.raises(ValueError, match="not a tbfast base-spectrum cache") as e:
        BaseSpectrumCache.load(p)
    assert "\n" not in str(e.value)
    (tmp_path / "junk").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable tbfast base-spectrum cache"):
        BaseSpectrumCache.load(tmp_path / "junk")


def _damage(path, name: str, offset_from_end: int = 8) -> None:
    """Multiply one stored float64 of tensor ``name`` in a safetensors file by 1.01 (in place)."""
    import json
    import struct
    raw = bytearray(path.read_bytes())
    hlen = struct.unpack("<Q", raw[:8])[0]
    start, end = json.loads(raw[8:8 + hlen])[name]["data_offsets"]
    pos = 8 + hlen + end - offset_from_end
    (v,) = struct.unpack("<d", raw[pos:pos + 8])
    raw[pos:pos + 8] = struct.pack("<d", v * 1.01)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("tensor", ["0.evals", "0.evecs"])
def test_damaged_cache_entry_is_dropped_and_recomputed(tmp_path, caplog, tensor):
    """A cache file whose stored spectrum changed (one float64 x 1.01, e.g. the largest eigenvalue)
    is never used: `load` checks each entry's digests, drops the damaged one with a warning naming
    the file and layer, and the layer recomputes it (oracle: float64 eigvalsh of the merged Gram).
    Without the check the eigenvalue came back 1% off, labelled "update"."""
    items = two_layer_items()
    cache = BaseSpectrumCache()
    lora_eigenvalues(items, cache)
    f = cache.save(tmp_path / "c.safetensors")
    _damage(f, tensor)
    with caplog.at_level(logging.WARNING, logger="tbfast.lora"):
        loaded = BaseSpectrumCache.load(f)
    assert loaded.names == ["layer.1"] and loaded.damaged == 1
    assert any("layer.0" in r.getMessage() and str(f) in r.getMessage() and "damaged" in r.getMessage()
               for r in caplog.records)
    out = lora_eigenvalues(items, loaded)
    assert loaded.builds == 1  # layer.0 recomputed, layer.1 from the file
    for item, (w, path) in zip(items, out):
        assert path == "update"
        assert_exact(w, merged_eigvalsh(item.w0, item.updates))


def test_cache_save_creates_its_directory_and_load_names_bad_paths(tmp_path):
    cache = BaseSpectrumCache()
    w0 = base_weight("gaussian", 40, 32, 0)
    cache.lookup("l", w0)
    f = cache.save(tmp_path / "new" / "dir" / "c.safetensors")
    assert BaseSpectrumCache.load(f).names == ["l"]
    with pytest.raises(ValueError, match="is a directory") as e:
        BaseSpectrumCache.load(tmp_path / "new")
    assert str(tmp_path / "new") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write the base-spectrum cache") as e:
        cache.save(tmp_path / "file" / "c.safetensors")  # its "directory" is a file
    assert "file/c.safetensors" in str(e.value) and not list(tmp_path.glob("file*.tmp"))


def test_cache_entry_is_shared_by_name_across_models_of_one_base(tmp_path):
    """A cache filled under a PeftModel's names (``base_model.model.``) serves the same base weights
    under other names (the adapter read from its directory): found by the weight's checksum, shared
    (no eigendecomposition, no second copy in memory or in the saved file), exact."""
    w0s = [base_weight("student", 80, 64, 0), base_weight("gaussian", 48, 72, 1)]
    cache = BaseSpectrumCache()
    for i, w0 in enumerate(w0s):
        cache.lookup(f"base_model.model.l{i}", w0)
    size = cache.nbytes
    items = []
    for i, w0 in enumerate(w0s):
        A, B = lora_factors(*w0.shape, 4, seed=i)
        items.append(LoRAItem(f"l{i}", w0, [(A, B, 1.0, False)]))
    out = lora_eigenvalues(items, cache)
    assert cache.builds == 2 and cache.nbytes == size and len(cache) == 4
    for item, (w, path) in zip(items, out):
        assert path == "update"
        assert_exact(w, merged_eigvalsh(item.w0, item.updates))
    f = cache.save(tmp_path / "c.safetensors")
    from safetensors import safe_open
    with safe_open(str(f), framework="pt") as h:
        assert sorted(h.keys()) == ["0.evals", "0.evecs", "1.evals", "1.evecs"]  # one copy each
    loaded = BaseSpectrumCache.load(f)
    assert sorted(loaded.names) == sorted(cache.names) and loaded.nbytes == size
    lora_eigenvalues(items, loaded)
    assert loaded.builds == 0
    # a changed weight under one name leaves the other name's entry as it was
    w_changed = w0s[0].clone()
    w_changed[0, 0] += 1.0
    loaded.lookup("l0", w_changed)
    assert loaded.builds == 1 and loaded.entry("base_model.model.l0") is not loaded.entry("l0")


def test_lora_esd_cache_must_be_a_cache_object():
    with pytest.raises(TypeError, match="BaseSpectrumCache.load"):
        tbfast.lora_esd(peft_model(), cache="base.spectrum.safetensors")


def test_float32_cache_is_close_but_marked_less_exact():
    w0 = base_weight("gaussian", 96, 80, 0)
    A, B = lora_factors(96, 80, 4, 0)
    cache = BaseSpectrumCache(dtype=torch.float32)
    (w, path), = lora_eigenvalues([LoRAItem("l", w0, [(A, B, 1.0, False)])], cache)
    want = merged_eigvalsh(w0, [(A, B, 1.0, False)])
    assert cache.entry("l").evecs.dtype == torch.float32
    assert np.abs(w.numpy() - want).max() <= 1e-5 * want.max()


# ------------------------------------------------------------------------- PEFT model, alphas


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(96, 128)
        self.v = nn.Linear(128, 64)
        self.o = nn.Linear(64, 64)


def peft_model(r: int = 8):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        for mod in (m.q, m.v, m.o):
            mod.weight.copy_(torch.distributions.StudentT(torch.tensor(2.5)).sample(mod.weight.shape) * 0.05)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q", "v"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return pm


def merged_matrices(pm) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and isinstance(mod.lora_A, nn.ModuleDict):
            W = mod.base_layer.weight.detach().double()
            W = W + mod.scaling["default"] * mod.lora_B["default"].weight.detach().double() @ mod.lora_A["default"].weight.detach().double()
            out[name] = W
        elif isinstance(mod, nn.Linear) and not name.endswith(("lora_A.default", "lora_B.default", "base_layer")):
            out[name] = mod.weight.detach().double()
    return out


def test_lora_esd_on_a_peft_model_and_its_alphas():
    pm = peft_model()
    res = tbfast.lora_esd(pm)
    assert res.esd_path == ["update", "update", "dense"]
    mats = merged_matrices(pm)
    assert list(mats) == res.spectra.names
    for i, W in enumerate(mats.values()):
        G = W.T @ W if W.shape[1] <= W.shape[0] else W @ W.T
        assert_exact(res.spectra.eigenvalues(i), np.clip(np.linalg.eigvalsh(G.numpy()), 0, None))
    oracle = tbfast.esd(mats, dtype=torch.float64)  # a dense float64 ESD of the merged weights
    for fit in ("median", "goodness-of-fit", "fix-finger"):
        a = tbfast.fit_power_law(res.spectra, fit=fit).alpha
        b = tbfast.fit_power_law(oracle, fit=fit).alpha
        assert torch.allclose(a, b, rtol=0, atol=1e-8, equal_nan=True), (fit, a, b)
    warm = tbfast.lora_esd(pm, cache=res.cache)
    assert warm.cache.builds == 2  # q and v, built once


def test_backend_info_names_the_update_op():
    info = tbfast.backend_info()["lora_update"]
    assert info["op"] == "tbfast::eigvalsh_update" and "cpu" in info["kernels"]


def test_lora_metrics_table_has_esd_path_and_oracle_alphas():
    from tbfast.lora.esd import lora_metrics
    pm = peft_model()
    m = lora_metrics(pm, fit="goodness-of-fit")
    assert m.extra["esd_path"] == ["update", "update", "dense"]
    want = tbfast.layer_metrics(merged_matrices(pm), dtype=torch.float64, fit="goodness-of-fit")
    assert m.names == want.names
    assert torch.allclose(m.alpha, want.alpha, rtol=0, atol=1e-8)
    assert torch.allclose(m.spectral_norm, want.spectral_norm, rtol=1e-12, atol=0)


def test_tempbalance_on_a_lora_model_reuses_the_cache():
    from tbfast.lora.esd import LoRAMetrics
    pm = peft_model()
    fn = LoRAMetrics()
    oracle = lambda net: tbfast.layer_metrics(merged_matrices(net), dtype=torch.float64)  # noqa: E731
    lrs = []
    for metrics_fn in (fn, oracle):
        tb = tbfast.TempBalance(net=pm, metrics_fn=metrics_fn, remove_first_layer=False, remove_last_layer=False)
        groups, _ = tb.build_optimizer_param_group(untuned_lr=0.1, initialize=True)
        opt = torch.optim.SGD(groups, lr=0.1)
        tb.step(opt, untuned_lr=0.1)
        tb.step(opt, untuned_lr=0.1)
        lrs.append([g["lr"] for g in opt.param_groups])
    assert fn.cache.builds == 2  # q and v: the base spectra are computed once over two refreshes
    assert np.allclose(lrs[0], lrs[1], rtol=1e-9, atol=0)


def test_lora_bench_workload_runs_and_reports_errors():
    """`tbfast bench --lora` on a tiny block: the paths agree with the oracle (no timing asserted)."""
    pytest.importorskip("peft")
    from tbfast.bench.lora import format_lora, run_lora_benchmark
    res = run_lora_benchmark(scale=1 / 64, rank=2, sweep=(32,))
    assert res["shapes"][0] == [64, 64] and res["shapes"][4] == [172, 64]
    assert res["esd_path"] == ["update"] * 7
    assert res["errors"]["update"]["max_err_over_lambda_max"] <= 1e-12
    assert res["errors"]["default_fp32"]["max_err_over_lambda_max"] > 1e-9  # float32 is not exact
    assert "projected_full_block" in res and "| update (warm cache) |" in format_lora(res)


def test_nonfinite_lora_factor_is_reported_by_layer_name():
    from tbfast.errors import NonFiniteWeightsError
    pm = peft_model()
    with torch.no_grad():
        pm.base_model.model.v.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="base_model.model.v"):
        tbfast.lora_esd(pm)


def test_nonfinite_lora_factor_with_a_cache_logs_no_secular_failure(caplog):
    """NaN in an adapter is the weights' fault, reported by layer name, not a failed update."""
    from tbfast.errors import NonFiniteWeightsError
    pm = peft_model()
    cache = BaseSpectrumCache()
    tbfast.lora_esd(pm, cache=cache)
    with torch.no_grad():
        pm.base_model.model.v.lora_B["default"].weight[0, 0] = float("nan")
    with caplog.at_level(logging.INFO, logger="tbfast.lora"):
        with pytest.raises(NonFiniteWeightsError, match="base_model.model.v"):
            tbfast.lora_esd(pm, cache=cache)
    assert not any("secular update failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("threads", [1, 2])
def test_weight_checksum_is_the_digest_and_sees_every_change(threads):
    """`weight_checksum`: dtype, shape and the 128-bit digest of the bytes (oracle: the definition
    in plain Python, tests/oracle.py), the same on one thread and two; a change of any byte, of
    the dtype or of the shape changes it."""
    from oracle import oracle_digest_hex

    from tbfast.lora import cache as cache_mod

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = torch.randn(30, 70, generator=torch.Generator().manual_seed(0))
        raw = w.numpy().tobytes()
        assert cache_mod.weight_checksum(w) == f"torch.float32|30x70|d128:{oracle_digest_hex(raw)}"
        seen = {cache_mod.weight_checksum(w)}
        for flat_index in (0, 700, 2099):  # the first, a middle and the last word
            v = w.clone()
            v.view(-1)[flat_index] += 1e-3
            seen.add(cache_mod.weight_checksum(v))
        seen.add(cache_mod.weight_checksum(w.double()))
        seen.add(cache_mod.weight_checksum(w.reshape(70, 30)))
        seen.add(cache_mod.weight_checksum(w.T))  # the transpose's bytes in row-major order
        assert len(seen) == 7
        assert cache_mod.weight_checksum(w[:0]) == f"torch.float32|0x70|d128:{oracle_digest_hex(b'')}"
        assert not cache_mod.is_sha256_checksum(cache_mod.weight_checksum(w))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
def test_legacy_sha256_checksum_is_sha256_of_the_pieces(monkeypatch, threads):
    """`sha256_checksum` (the form of cache files written before the digest, kept to verify them):
    dtype, shape and SHA-256 of the SHA-256 digests of the bytes' pieces (oracle: hashlib on the
    bytes, written here), the same on one thread and two; no thread is left behind."""
    import hashlib
    import threading

    from tbfast.lora import cache as cache_mod

    monkeypatch.setattr(cache_mod, "CHECKSUM_PIECE", 1000)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        before = threading.active_count()
        w = torch.randn(30, 70, generator=torch.Generator().manual_seed(0))  # 8400 bytes: 9 pieces
        raw = w.numpy().tobytes()
        digests = b"".join(hashlib.sha256(raw[i:i + 1000]).digest() for i in range(0, len(raw), 1000))
        want = f"torch.float32|30x70|{hashlib.sha256(digests).hexdigest()}"
        assert cache_mod.sha256_checksum(w) == want and cache_mod.is_sha256_checksum(want)
        v = w.clone()
        v.view(-1)[2099] += 1e-3
        assert cache_mod.sha256_checksum(v) != want
        empty = hashlib.sha256(hashlib.sha256(b"").digest()).hexdigest()
        assert cache_mod.sha256_checksum(w[:0]) == f"torch.float32|0x70|{empty}"
        assert threading.active_count() == before
    finally:
        torch.set_num_threads(old)


def _legacy_cache_file(path, items) -> None:
    """A cache file as tbfast wrote it before the digest: format tbfast-base-spectrum-1, each
    entry's checksum "{dtype}|{rows}x{cols}|" + SHA-256 of the SHA-256 of the weight's bytes (one
    piece: under 16 MiB), written here from the old definition; eigenpairs of the float64 Gram."""
    import hashlib
    import json

    from safetensors.torch import save_file
    tensors, index = {}, {}
    for i, (name, w0) in enumerate(items):
        m = w0.double() if w0.shape[1] <= w0.shape[0] else w0.double().T
        evals, evecs = torch.linalg.eigh(m.T @ m)
        tensors[f"{i}.evals"], tensors[f"{i}.evecs"] = evals.contiguous(), evecs.contiguous()
        sha = hashlib.sha256(hashlib.sha256(w0.numpy().tobytes()).digest()).hexdigest()
        index[str(i)] = {"name": name, "checksum": f"{w0.dtype}|{w0.shape[0]}x{w0.shape[1]}|{sha}",
                         "shape": list(w0.shape)}
    save_file(tensors, str(path), metadata={"format": "tbfast-base-spectrum-1", "entries": json.dumps(index)})


def test_cache_file_with_legacy_checksums_is_used_and_rekeyed(tmp_path, caplog):
    """Entries of an old file are verified once with SHA-256 and re-keyed to the digest: no
    eigendecomposition is recomputed; a saved copy carries the new form; a base weight that
    changed since the file was written is recomputed."""
    from tbfast.lora.cache import weight_checksum
    w_same = base_weight("student", 80, 64, seed=0)
    w_changed = base_weight("gaussian", 48, 72, seed=1)
    _legacy_cache_file(tmp_path / "old.safetensors", [("same", w_same), ("changed", w_changed)])
    cache = BaseSpectrumCache.load(tmp_path / "old.safetensors")
    stored = cache.entry("same").evecs
    w_changed = w_changed.clone()
    w_changed[0, 0] += 1.0
    items = [LoRAItem(n, w, [lora_factors(*w.shape, 4, seed=2) + (1.0, False)])
             for n, w in (("same", w_same), ("changed", w_changed))]
    with caplog.at_level(logging.INFO, logger="tbfast.lora"):
        out = lora_eigenvalues(items, cache)
    assert cache.builds == 1  # only the changed weight
    assert cache.entry("same").evecs is stored  # the file's eigenvectors, not recomputed
    assert any("legacy SHA-256 checksum verified" in r.getMessage() for r in caplog.records)
    for item, (w, path) in zip(items, out):
        assert path == "update"
        assert cache.entry(item.name).checksum == weight_checksum(item.w0)
        assert_exact(w, merged_eigvalsh(item.w0, item.updates))
    lora_eigenvalues(items, cache)  # re-keyed: the next refresh matches at once
    assert cache.builds == 1
    again = BaseSpectrumCache.load(cache.save(tmp_path / "new.safetensors"))
    assert [again.entry(n).checksum for n in ("same", "changed")] == [weight_checksum(w_same), weight_checksum(w_changed)]
