"""The one layer entry point (`tbfast.sources.build_layers`) on every source kind, and the error
types of the layer and checkpoint stages.

Oracles: each layer's matrix built by hand in the test (the saved tensors, the conv kernel
positions indexed plainly, the LoRA merge ``W + alpha / r * B @ A`` written out), its fp64 SVD
eigenvalues (tests/oracle.py) and the median-Hill alpha computed from them by the formula
(tests/oracle.py); the exception types are those documented in tbfast/errors.py.
"""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import tbfast
from tbfast import cli, errors
from tbfast.options import LayerOptions
from tbfast.sources import build_layers

from oracle import conv_matrices, median_fit, svd_eigs

safetensors_torch = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 40)
        self.conv = nn.Conv2d(6, 10, 3)


@pytest.fixture()
def net():
    torch.manual_seed(0)
    return Net()


def _oracle_alpha(mats: torch.Tensor, scale: float = 1.0) -> float:
    return median_fit(svd_eigs(mats, scale))[0]


def _alphas(source, **options) -> dict[str, float]:
    df = tbfast.analyze(source, fit="median", dtype=torch.float64, min_evals=0, max_evals=None, **options)
    return dict(zip(df["name"], df["alpha"]))


def _check_eigs(layers, expected: dict[str, tuple[torch.Tensor, float]]) -> None:
    """Every layer's ESD (tbfast.esd on the layer list, float64) equals the fp64 SVD of the
    matrices built by hand, scaled as the rule says."""
    assert sorted(l.name for l in layers) == sorted(expected)
    spectra = tbfast.esd(layers, dtype=torch.float64)
    for i, l in enumerate(spectra.layers):
        mats, scale = expected[l.name]
        np.testing.assert_allclose(spectra.eigenvalues(i).numpy(), svd_eigs(mats, scale), rtol=1e-9, atol=1e-12)


def test_module_source_linear_and_conv(net):
    w_fc, w_conv = net.fc.weight.detach(), net.conv.weight.detach()
    layers = build_layers(net, LayerOptions())
    _check_eigs(layers, {"fc": (w_fc, 1.0), "conv": (conv_matrices(w_conv), math.sqrt(0.5))})
    alphas = _alphas(net)
    assert alphas["fc"] == pytest.approx(_oracle_alpha(w_fc), rel=1e-6)
    assert alphas["conv"] == pytest.approx(_oracle_alpha(conv_matrices(w_conv), math.sqrt(0.5)), rel=1e-6)


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "torch", "torch_legacy"])
def test_file_and_state_dict_sources(net, tmp_path, fmt):
    sd = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    if fmt == "state_dict":
        source = sd
    elif fmt == "safetensors":
        source = tmp_path / "m.safetensors"
        safetensors_torch.save_file(sd, str(source))
    else:
        source = tmp_path / "m.pt"
        torch.save(sd, source, _use_new_zipfile_serialization=fmt == "torch")
    layers = build_layers(source, LayerOptions(conv_norm=0.3), mapping="state_dict")
    _check_eigs(layers, {"fc": (sd["fc.weight"], 1.0), "conv": (conv_matrices(sd["conv.weight"]), math.sqrt(0.3))})


def test_a_mapping_is_a_state_dict_or_raw_matrices(net):
    sd = {k: v.detach().clone() for k, v in net.state_dict().items() if k.endswith("weight")}
    as_sd = build_layers(sd, mapping="state_dict")
    as_matrices = build_layers(sd, mapping="matrices")
    assert [(l.name, l.kind) for l in as_sd] == [("fc", "Linear"), ("conv", "Conv2d")]
    assert [(l.name, l.kind) for l in as_matrices] == [("fc.weight", "matrix"), ("conv.weight", "Conv2d")]
    _check_eigs(as_matrices, {"fc.weight": (sd["fc.weight"], 1.0),
                              "conv.weight": (conv_matrices(sd["conv.weight"]), math.sqrt(0.5))})
    # the two public front doors keep their meaning
    assert [l.name for l in tbfast.esd(sd).layers] == ["fc.weight", "conv.weight"]
    assert list(tbfast.analyze(sd, min_evals=0)["name"]) == ["fc", "conv"]
    with pytest.raises(TypeError, match="only apply to nn.Module"):
        build_layers(sd, LayerOptions(include="fc"), mapping="matrices")


def test_delta_against_base(net):
    torch.manual_seed(1)
    base = Net()
    expected = {"fc": (net.fc.weight.detach() - base.fc.weight.detach(), 1.0),
                "conv": (conv_matrices(net.conv.weight.detach() - base.conv.weight.detach()), math.sqrt(0.5))}
    _check_eigs(build_layers(net, LayerOptions(base=base)), expected)
    sd, bsd = net.state_dict(), {k: v.double() for k, v in base.state_dict().items()}
    _check_eigs(build_layers(sd, LayerOptions(base=bsd)), {  # a float64 base: the delta in float64
        "fc": (sd["fc.weight"].double() - bsd["fc.weight"], 1.0),
        "conv": (conv_matrices(sd["conv.weight"].double() - bsd["conv.weight"]), math.sqrt(0.5))})


def _write_adapter(d, cfg: dict, factors: dict) -> None:
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    safetensors_torch.save_file({f"base_model.model.{k}": v.contiguous() for k, v in factors.items()},
                                str(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_directory(net, tmp_path, rslora):
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(3, 24, generator=g), torch.randn(40, 3, generator=g)
    _write_adapter(tmp_path / "ad", {"peft_type": "LORA", "r": 3, "lora_alpha": 7, "use_rslora": rslora},
                   {"fc.lora_A.weight": A, "fc.lora_B.weight": B})
    s = 7 / math.sqrt(3) if rslora else 7 / 3
    merged = net.fc.weight.detach() + s * (B @ A)
    (layer,) = build_layers(tmp_path / "ad", LayerOptions(base=net.state_dict()))
    assert layer.kind == "LoRA"
    _check_eigs([layer], {"fc": (merged, 1.0)})
    assert _alphas(tmp_path / "ad", base=net)["fc"] == pytest.approx(_oracle_alpha(merged), rel=1e-6)
    (quirk,) = build_layers(tmp_path / "ad", LayerOptions(base=net.state_dict(), lora_scaling=False))
    _check_eigs([quirk], {"fc": (net.fc.weight.detach() + B @ A, 1.0)})


def test_peft_module_merged(net):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["fc"], init_lora_weights=False))
    mod = pm.base_model.model.fc
    A, B = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
    merged = mod.base_layer.weight.detach() + 5 / 2 * (B @ A)
    layers = build_layers(pm, LayerOptions(types=("Linear",)))
    _check_eigs(layers, {"base_model.model.fc": (merged, 1.0)})


def test_eigenvalue_filters_apply_to_every_source(net):
    # fc: 24 eigenvalues (40 x 24); conv: 9 * 6 = 54 eigenvalues (10 x 6 per kernel position)
    sd = net.state_dict()
    for source, mapping in ((net, "state_dict"), (sd, "state_dict"), (build_layers(net), "matrices")):
        assert [l.name for l in build_layers(source, LayerOptions(min_evals=25), mapping=mapping)] == ["conv"]
        assert [l.name for l in build_layers(source, LayerOptions(max_evals=24), mapping=mapping)] == ["fc"]
        assert [l.name for l in build_layers(source, LayerOptions(max_n=10), mapping=mapping)] == ["conv"]


def test_weight_layer_constructor():
    lin = tbfast.layers.weight_layer("model.layers.3.mlp", "Linear", (11, 7), index=5)
    assert (lin.rows, lin.cols, lin.k, lin.scale, lin.block, lin.index) == (11, 7, 1, 1.0, 3, 5)
    conv = tbfast.layers.weight_layer("conv", "Conv2d", (8, 4, 3, 2), conv_norm=0.2,
                                      loader=lambda: torch.zeros(6, 8, 4))
    assert (conv.rows, conv.cols, conv.k, conv.block) == (8, 4, 6, None)
    assert conv.scale == pytest.approx(math.sqrt(0.2))
    assert conv.num_evals == 24 and tuple(conv.matrices().shape) == (6, 8, 4)


# ---------------------------------------------------------------------------------------------
# error types


def test_no_matching_layer_is_no_layers_error(net):
    with pytest.raises(errors.NoLayersError, match="no layer with 1000 to None eigenvalues"):
        tbfast.analyze(net, min_evals=1000, max_evals=None)
    with pytest.raises(errors.NoLayersError, match="no analysable layer"):
        tbfast.esd(net, include="nothing-matches")
    with pytest.raises(ValueError):  # still a ValueError for callers that caught that
        tbfast.analyze(net, include="nothing-matches")


def test_checkpoint_error_classes_are_the_shared_ones():
    from tbfast import checkpoint

    for name in ("CheckpointError", "CheckpointNotFoundError", "CorruptCheckpointError", "UnsupportedDtypeError",
                 "EmptyCheckpointError"):
        assert getattr(checkpoint, name) is getattr(errors, name)


def _torch_load_spy(monkeypatch, raise_exc=None):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        if raise_exc is not None:
            raise raise_exc
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.parametrize("zip_format", [True, False])
def test_mmap_is_chosen_by_file_format(tmp_path, monkeypatch, zip_format):
    w = torch.randn(6, 5)
    torch.save({"fc.weight": w}, tmp_path / "m.pt", _use_new_zipfile_serialization=zip_format)
    calls = _torch_load_spy(monkeypatch)
    (layer,) = tbfast.checkpoint.checkpoint_layers(tmp_path / "m.pt")
    assert calls == [zip_format]  # one load: memory-mapped exactly when the file is a zip
    torch.testing.assert_close(layer.matrices()[0], w, rtol=0, atol=0)


def test_weights_only_refusal_recognised_by_type(tmp_path, monkeypatch):
    f = tmp_path / "m.pt"
    torch.save({"fc.weight": torch.ones(3, 3)}, f)
    _torch_load_spy(monkeypatch, pickle.UnpicklingError("some unrelated text"))
    with pytest.raises(errors.CorruptCheckpointError, match="holds pickled Python objects") as e:
        tbfast.checkpoint.checkpoint_layers(f)
    assert isinstance(e.value.__cause__, pickle.UnpicklingError)
    # a message that merely mentions weights_only is not a refusal
    _torch_load_spy(monkeypatch, RuntimeError("weights_only Unsupported global mmap"))
    with pytest.raises(errors.CorruptCheckpointError, match="not a readable torch checkpoint"):
        tbfast.checkpoint.checkpoint_layers(f)


class Pickled:
    """Any Python object: ``torch.save`` pickles it, a weights-only load refuses it."""


def test_file_error_types(tmp_path):
    torch.save({"fc.weight": Pickled()}, tmp_path / "pickled.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    torch.save({"step": torch.tensor(3)}, tmp_path / "nomatrix.pt")
    (tmp_path / "emptydir").mkdir()
    cases = {
        "missing.safetensors": errors.CheckpointNotFoundError,
        "pickled.pt": errors.CorruptCheckpointError,
        "empty.pt": errors.CorruptCheckpointError,
        "corrupt.safetensors": errors.CorruptCheckpointError,
        "nomatrix.pt": errors.EmptyCheckpointError,
        "emptydir": errors.EmptyCheckpointError,
    }
    for name, cls in cases.items():
        with pytest.raises(cls, match=name):
            build_layers(tmp_path / name)
    torch.save({"fc.weight": torch.ones(4, 4, dtype=torch.int8)}, tmp_path / "int8.pt")
    with pytest.raises(errors.UnsupportedDtypeError, match="quantized"):
        build_layers(tmp_path / "int8.pt")


def test_cli_exit_code_follows_the_exception_type(monkeypatch, tmp_path, capsys):
    import importlib

    analyze_mod = importlib.import_module("tbfast.analyze")  # the module (tbfast.analyze is also the function)

    f = tmp_path / "x.safetensors"
    safetensors_torch.save_file({"fc.weight": torch.randn(4, 4)}, str(f))
    cases = [(errors.NoLayersError("nothing left"), cli.EXIT_EMPTY),
             (ValueError("no layer with a message that only looks like it"), cli.EXIT_ERROR),
             (errors.EmptyCheckpointError("empty"), cli.EXIT_EMPTY),
             (errors.CheckpointNotFoundError("gone"), cli.EXIT_NOT_FOUND),
             (errors.CorruptCheckpointError("bad"), cli.EXIT_CORRUPT),
             (errors.UnsupportedDtypeError("int"), cli.EXIT_DTYPE)]
    for exc, code in cases:
        def boom(*a, exc=exc, **k):
            raise exc

        monkeypatch.setattr(analyze_mod, "analyze_spectra", boom)
        assert cli.main(["analyze", str(f), "--no-progress"]) == code
        assert capsys.readouterr().err.strip() == f"tbfast analyze: error: {exc}"
