"""Shard indexes and adapter configs are untrusted input: names that leave the checkpoint
directory are refused, malformed maps are clear errors, the index is checked against the shards,
and symlinked Hugging Face cache snapshots keep working.

Oracles: the tensors that were saved, and the LoRA merge ``W + (lora_alpha / r) B @ A`` written
out by hand."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from tbfast import cli
from tbfast.analyze import analyze
from tbfast.checkpoint import (CheckpointNotFoundError, CorruptCheckpointError, checkpoint_layers,
                               lora_layers, open_checkpoint)

safetensors_torch = pytest.importorskip("safetensors.torch")


def _rand(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def layout(tmp_path):
    """``ckpt/`` with one shard and an index, and ``secret/s.safetensors`` beside it."""
    ckpt, secret = tmp_path / "ckpt", tmp_path / "secret"
    ckpt.mkdir()
    secret.mkdir()
    inside = {"fc.weight": _rand(0, 16, 12)}
    safetensors_torch.save_file(inside, str(ckpt / "a.safetensors"))
    safetensors_torch.save_file({"secret.weight": _rand(1, 16, 12)}, str(secret / "s.safetensors"))
    return ckpt, secret, inside


def _write_index(d, weight_map, name="model.safetensors.index.json"):
    (d / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d / name


def _cli(path, capsys):
    code = cli.main(["analyze", str(path), "--min-evals", "0"])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("shard", [
    "../secret/s.safetensors",
    "sub/../../secret/s.safetensors",
    "..\\secret\\s.safetensors",
    "ABSOLUTE",
    "../../../../../../../../etc/passwd",
])
def test_index_names_outside_the_directory_are_refused(layout, shard, capsys):
    ckpt, secret, _ = layout
    if shard == "ABSOLUTE":
        shard = str(secret / "s.safetensors")
    idx = _write_index(ckpt, {"fc.weight": "a.safetensors", "secret.weight": shard})
    for source in (ckpt, idx):
        with pytest.raises(CorruptCheckpointError, match="outside the checkpoint directory") as e:
            open_checkpoint(source)
        assert str(idx) in str(e.value) and repr(shard) in str(e.value)
    code, err = _cli(ckpt, capsys)
    assert code == cli.EXIT_CORRUPT
    assert len(err.splitlines()) == 1 and "outside the checkpoint directory" in err


def test_bin_index_names_outside_the_directory_are_refused(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"fc.weight": _rand(0, 8, 8)}, str(ckpt / "pytorch_model-00001-of-00001.bin"))
    torch.save({"secret.weight": _rand(1, 8, 8)}, str(tmp_path / "s.bin"))
    _write_index(ckpt, {"fc.weight": "pytorch_model-00001-of-00001.bin", "secret.weight": "../s.bin"},
                 "pytorch_model.bin.index.json")
    with pytest.raises(CorruptCheckpointError, match="outside the checkpoint directory"):
        checkpoint_layers(ckpt)
    assert _cli(ckpt, capsys)[0] == cli.EXIT_CORRUPT


def test_hf_cache_snapshot_symlinks_into_blobs(tmp_path):
    """``snapshots/<rev>/*`` are symlinks to ``../../blobs/<hash>``: inside by name, followed."""
    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    shards = {"model-00001-of-00002.safetensors": {"layers.0.fc.weight": _rand(2, 20, 12)},
              "model-00002-of-00002.safetensors": {"layers.1.fc.weight": _rand(3, 12, 20),
                                                   "layers.1.fc.bias": _rand(4, 12)}}
    weight_map = {}
    for i, (fname, sd) in enumerate(shards.items()):
        safetensors_torch.save_file(sd, str(blobs / f"blob{i}"))
        os.symlink(f"../../blobs/blob{i}", snap / fname)
        weight_map.update({k: fname for k in sd})
    (blobs / "blobidx").write_text(json.dumps({"weight_map": weight_map}))
    os.symlink("../../blobs/blobidx", snap / "model.safetensors.index.json")
    assert (snap / "model-00001-of-00002.safetensors").resolve().parent == blobs.resolve()

    layers = {l.name: l for l in checkpoint_layers(snap)}
    saved = {k: v for sd in shards.values() for k, v in sd.items()}
    assert set(layers) == {"layers.0.fc", "layers.1.fc"}
    for name, layer in layers.items():
        torch.testing.assert_close(layer.matrices()[0], saved[name + ".weight"], rtol=0, atol=0)


@pytest.mark.parametrize("weight_map", [
    ["a.safetensors"],                      # a list
    {"fc.weight": 3},                       # a non-string value
    {"fc.weight": {"file": "a.safetensors"}},
    {"fc.weight": ""},
    {},                                     # names nothing
    None,
])
def test_malformed_weight_map(layout, weight_map, capsys):
    ckpt, _, _ = layout
    idx = _write_index(ckpt, weight_map)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.index.json"):
        open_checkpoint(ckpt)
    with pytest.raises(CorruptCheckpointError):
        open_checkpoint(idx)
    code, err = _cli(ckpt, capsys)
    assert code == cli.EXIT_CORRUPT and len(err.splitlines()) == 1


def test_index_that_is_not_an_object(layout, capsys):
    ckpt, _, _ = layout
    (ckpt / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="weight_map"):
        open_checkpoint(ckpt)
    assert _cli(ckpt, capsys)[0] == cli.EXIT_CORRUPT


def test_index_naming_a_tensor_its_shard_does_not_hold(layout, capsys):
    ckpt, _, _ = layout
    _write_index(ckpt, {"fc.weight": "a.safetensors", "ghost.weight": "a.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="'ghost.weight'.*a.safetensors"):
        checkpoint_layers(ckpt)
    code, err = _cli(ckpt, capsys)
    assert code == cli.EXIT_CORRUPT and "ghost.weight" in err


def test_index_placing_a_tensor_in_the_wrong_shard(layout):
    ckpt, _, inside = layout
    safetensors_torch.save_file({"other.weight": _rand(5, 8, 8)}, str(ckpt / "b.safetensors"))
    _write_index(ckpt, {"fc.weight": "b.safetensors", "other.weight": "a.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="it is in a.safetensors"):
        checkpoint_layers(ckpt)


def test_unlisted_shard_and_tensor_are_warned_about(layout, caplog):
    ckpt, _, inside = layout
    safetensors_torch.save_file({"stray.weight": _rand(6, 8, 8)}, str(ckpt / "zz-stray.safetensors"))
    safetensors_torch.save_file({"unlisted.weight": _rand(7, 8, 8), "listed.weight": _rand(8, 8, 8)},
                                str(ckpt / "b.safetensors"))
    _write_index(ckpt, {"fc.weight": "a.safetensors", "listed.weight": "b.safetensors"})
    with caplog.at_level(logging.WARNING, logger="tbfast.checkpoint"):
        layers = checkpoint_layers(ckpt)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("zz-stray.safetensors" in m and "not listed" in m for m in msgs)
    assert any("unlisted.weight" in m and "not listed" in m for m in msgs)
    # the unlisted shard is not read; tensors of listed shards are
    assert {l.name for l in layers} == {"fc", "listed", "unlisted"}
    torch.testing.assert_close(next(l for l in layers if l.name == "fc").matrices()[0], inside["fc.weight"],
                               rtol=0, atol=0)


def test_index_naming_a_missing_shard_is_not_found(layout):
    ckpt, _, _ = layout
    _write_index(ckpt, {"fc.weight": "a.safetensors", "x.weight": "gone.safetensors"})
    with pytest.raises(CheckpointNotFoundError, match="gone.safetensors"):
        checkpoint_layers(ckpt)


class _Payload:
    """Unpickling this would create ``path`` (stands in for arbitrary code)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("sharded", [False, True])
def test_pickle_payload_in_torch_file_never_runs(tmp_path, sharded):
    marker = tmp_path / "pwned"
    d = tmp_path / "ckpt"
    d.mkdir()
    f = d / ("pytorch_model-00001-of-00001.bin" if sharded else "model.bin")
    torch.save({"fc.weight": _rand(0, 8, 8), "x": _Payload(str(marker))}, str(f))
    if sharded:
        _write_index(d, {"fc.weight": f.name}, "pytorch_model.bin.index.json")
    with pytest.raises(CorruptCheckpointError, match="weights_only"):
        checkpoint_layers(d if sharded else f)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# PEFT adapters: base_model_name_or_path is never opened; lora_scaling is honoured or refused


def _adapter(tmp_path, base_path: str | None, r: int = 2, alpha: float = 16.0):
    """A hand-written PEFT LoRA adapter on module ``q`` (16 x 12); returns (dir, A, B)."""
    d = tmp_path / "adapter"
    d.mkdir()
    A, B = _rand(10, r, 12), _rand(11, 16, r)
    safetensors_torch.save_file({"base_model.model.q.lora_A.weight": A, "base_model.model.q.lora_B.weight": B},
                                str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q"],
        "base_model_name_or_path": base_path}))
    return d, A, B


@pytest.fixture()
def base_file(tmp_path):
    W = _rand(12, 16, 12)
    f = tmp_path / "base.safetensors"
    safetensors_torch.save_file({"q.weight": W}, str(f))
    return f, W


def test_adapter_config_base_path_is_not_opened(tmp_path, base_file, capsys):
    f, _ = base_file
    d, _, _ = _adapter(tmp_path, str(f))  # a real, loadable local checkpoint
    for call in (lambda: checkpoint_layers(d), lambda: analyze(d), lambda: lora_layers(d, None)):
        with pytest.raises(ValueError, match="base=") as e:
            call()
        assert str(f) in str(e.value)  # quoted, so the user can pass it
    code, err = _cli(d, capsys)
    assert code == cli.EXIT_ERROR and "--base" in err and len(err.splitlines()) == 1


def test_lora_scaling_without_base_is_an_error(tmp_path, base_file):
    f, _ = base_file
    d, _, _ = _adapter(tmp_path, str(f))
    with pytest.raises(ValueError, match="base="):
        analyze(d, lora_scaling=False, min_evals=0)


@pytest.mark.parametrize("lora_scaling", [True, False])
def test_lora_scaling_is_honoured_on_every_entry_point(tmp_path, base_file, lora_scaling):
    f, W = base_file
    d, A, B = _adapter(tmp_path, None, r=2, alpha=16.0)
    s = 16.0 / 2 if lora_scaling else 1.0
    expected = W.double() + s * (B.double() @ A.double())
    for layers in (checkpoint_layers(d, base=f, lora_scaling=lora_scaling),
                   lora_layers(d, f, lora_scaling=lora_scaling)):
        (layer,) = layers
        torch.testing.assert_close(layer.matrices()[0].double(), expected, rtol=1e-5, atol=1e-5)
    (row,) = analyze(d, base=f, lora_scaling=lora_scaling, min_evals=0, dtype=torch.float64).itertuples()
    top = torch.linalg.svdvals(expected)[0].item() ** 2
    assert row.spectral_norm == pytest.approx(top, rel=1e-6)


@pytest.mark.parametrize("cfg", ["[1]", '{"lora_alpha": "lots", "r": 2}', '{"alpha_pattern": ["q"]}'])
def test_malformed_adapter_config(tmp_path, base_file, cfg):
    f, _ = base_file
    d, _, _ = _adapter(tmp_path, None)
    (d / "adapter_config.json").write_text(cfg)
    with pytest.raises(CorruptCheckpointError, match="adapter_config.json"):
        lora_layers(d, f)
