"""Checkpoint readers: which tensors become layers, lazy loading, shards, deltas, LoRA, errors.

Oracles: the tensors that were saved (indexed by hand for conv kernel positions), and PEFT's own
``merge_and_unload()`` for LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from tbfast.checkpoint import (CheckpointNotFoundError, CorruptCheckpointError, EmptyCheckpointError,
                               MappingStore, UnsupportedDtypeError, checkpoint_layers, kind_from_name,
                               lora_layers, open_checkpoint)

safetensors_torch = pytest.importorskip("safetensors.torch")


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "embed_tokens.weight": r(50, 12),
        "blocks.0.attn.q.weight": r(12, 12),
        "blocks.0.attn.q.bias": r(12),
        "blocks.0.norm.weight": r(12),
        "blocks.0.mlp.fc.weight": r(20, 12),
        "blocks.1.attn.q.weight": r(12, 12),
        "blocks.10.mlp.fc.weight": r(20, 12),
        "conv.weight": r(6, 3, 2, 3),
        "conv1d.weight": r(5, 4, 3),
        "position_ids": torch.arange(12).unsqueeze(0),
        "h.0.attn.bias": torch.ones(1, 1, 4, 4),  # a GPT-2 style mask buffer: a bias, skipped
        "lm_head.weight": r(30, 12),
        "transformer.wte.weight": r(40, 12),
    }


EXPECTED = {  # layer name -> kind, under the documented file rule
    "embed_tokens": "Embedding",
    "blocks.0.attn.q": "Linear",
    "blocks.0.mlp.fc": "Linear",
    "blocks.1.attn.q": "Linear",
    "blocks.10.mlp.fc": "Linear",
    "conv": "Conv2d",
    "conv1d": "Conv1d",
    "lm_head": "Linear",
    "transformer.wte": "Embedding",
}


def _expected_matrices(w: torch.Tensor) -> torch.Tensor:
    """(k, out, in) by explicit indexing: kernel positions in row-major order."""
    if w.dim() == 2:
        return w.unsqueeze(0)
    out, inp = w.shape[:2]
    positions = [idx for idx in torch.cartesian_prod(*[torch.arange(s) for s in w.shape[2:]]).reshape(-1, w.dim() - 2)]
    return torch.stack([w[(slice(None), slice(None), *[int(i) for i in p])] for p in positions])


def _check_layers(layers, sd):
    by_name = {l.name: l for l in layers}
    assert set(by_name) == set(EXPECTED)
    for name, kind in EXPECTED.items():
        l = by_name[name]
        w = sd[name + ".weight"]
        assert l.kind == kind
        assert l.shape == tuple(w.shape)
        assert (l.rows, l.cols) == tuple(w.shape[:2])
        assert l.k == math.prod(w.shape[2:])
        assert l.scale == (math.sqrt(0.5) if kind.startswith("Conv") else 1.0)
        torch.testing.assert_close(l.matrices().to(w.dtype), _expected_matrices(w), rtol=0, atol=0)
    assert by_name["blocks.10.mlp.fc"].block == 10
    assert by_name["conv"].block is None


def test_kind_rule():
    assert kind_from_name("model.embed_tokens", 2) == "Embedding"
    assert kind_from_name("bert.embeddings.word_embeddings", 2) == "Embedding"
    assert kind_from_name("transformer.wpe", 2) == "Embedding"
    assert kind_from_name("tok_emb", 2) == "Embedding"
    assert kind_from_name("encoder.member_proj", 2) == "Linear"
    assert kind_from_name("model.layers.0.mlp.up_proj", 2) == "Linear"
    assert kind_from_name("patch_embed.proj", 4) == "Conv2d"
    assert kind_from_name("x", 3) == "Conv1d"
    assert kind_from_name("x", 5) is None


def test_safetensors_file(tmp_path):
    sd = _state_dict()
    f = tmp_path / "model.safetensors"
    safetensors_torch.save_file(sd, str(f))
    layers = checkpoint_layers(f)
    _check_layers(layers, sd)
    # natural order: blocks.1 before blocks.10
    names = [l.name for l in layers]
    assert names.index("blocks.1.attn.q") < names.index("blocks.10.mlp.fc")


@pytest.mark.parametrize("nested", [False, True])
def test_torch_file(tmp_path, nested):
    sd = _state_dict()
    f = tmp_path / "model.pt"
    torch.save({"state_dict": sd, "epoch": 3} if nested else sd, str(f))
    _check_layers(checkpoint_layers(f), sd)


def test_in_memory_state_dict_and_selection():
    sd = _state_dict()
    _check_layers(checkpoint_layers(sd), sd)
    no_emb = checkpoint_layers(sd, include_embedding=False)
    assert {l.name for l in no_emb} == {n for n, k in EXPECTED.items() if k != "Embedding"}
    only = checkpoint_layers(sd, include=r"^blocks\.", exclude=r"mlp")
    assert {l.name for l in only} == {"blocks.0.attn.q", "blocks.1.attn.q"}
    # num_evals = k * min(rows, cols): conv 6*min(6,3)=18, conv1d 3*4=12, Linear 12
    with pytest.raises(EmptyCheckpointError, match="no analysable"):
        checkpoint_layers(sd, max_evals=11)
    assert {l.name for l in checkpoint_layers(sd, min_evals=13)} == {"conv"}


def test_sharded_safetensors_with_index(tmp_path):
    sd = _state_dict()
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:6], "model-00002-of-00002.safetensors": keys[6:]}
    weight_map = {}
    for fname, ks in shards.items():
        safetensors_torch.save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
        weight_map.update({k: fname for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text("{}")
    _check_layers(checkpoint_layers(tmp_path), sd)


def test_sharded_safetensors_without_index(tmp_path):
    sd = _state_dict()
    keys = list(sd)
    safetensors_torch.save_file({k: sd[k] for k in keys[:5]}, str(tmp_path / "a.safetensors"))
    safetensors_torch.save_file({k: sd[k] for k in keys[5:]}, str(tmp_path / "b.safetensors"))
    _check_layers(checkpoint_layers(tmp_path), sd)


def test_sharded_bin_with_index(tmp_path):
    sd = _state_dict()
    keys = list(sd)
    weight_map = {}
    for i, ks in enumerate((keys[:7], keys[7:])):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in ks}, str(tmp_path / fname))
        weight_map.update({k: fname for k in ks})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save({"not": "weights"}, str(tmp_path / "training_args.bin"))
    _check_layers(checkpoint_layers(tmp_path), sd)


def test_bf16_weights_keep_dtype_until_loaded(tmp_path):
    sd = {"fc.weight": torch.randn(16, 8).to(torch.bfloat16)}
    f = tmp_path / "m.safetensors"
    safetensors_torch.save_file(sd, str(f))
    (layer,) = checkpoint_layers(f)
    m = layer.matrices()
    assert m.dtype == torch.bfloat16
    torch.testing.assert_close(m[0], sd["fc.weight"], rtol=0, atol=0)


class CountingStore(MappingStore):
    def __init__(self, sd):
        super().__init__(sd)
        self.loaded: list[str] = []

    def load(self, name):
        self.loaded.append(name)
        return super().load(name)


def test_layers_are_lazy():
    store = CountingStore(_state_dict())
    layers = checkpoint_layers(store)
    assert store.loaded == []  # discovery reads only names, shapes and dtypes
    conv = next(l for l in layers if l.name == "conv")
    conv.matrices()
    assert store.loaded == ["conv.weight"]


def test_delta_against_base(tmp_path):
    sd, base = _state_dict(1), _state_dict(2)
    del base["lm_head.weight"]  # a new head: not in the base, skipped
    f = tmp_path / "ft.safetensors"
    fb = tmp_path / "base.pt"
    safetensors_torch.save_file(sd, str(f))
    torch.save(base, str(fb))
    layers = checkpoint_layers(f, base=fb)
    assert {l.name for l in layers} == set(EXPECTED) - {"lm_head"}
    for l in layers:
        d = sd[l.name + ".weight"] - base[l.name + ".weight"]
        torch.testing.assert_close(l.matrices().float(), _expected_matrices(d), rtol=0, atol=1e-6)


def test_delta_shape_mismatch_names_the_layer():
    sd = _state_dict()
    base = dict(sd, **{"blocks.0.attn.q.weight": torch.zeros(12, 13)})
    with pytest.raises(ValueError, match="blocks.0.attn.q"):
        checkpoint_layers(sd, base=base)


# ---------------------------------------------------------------------------------------------
# PEFT LoRA


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 24)
        self.out = nn.Linear(24, 8)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_merged_like_peft(tmp_path, rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = Tiny()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(base_sd, str(tmp_path / "base.safetensors"))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False,
                          use_rslora=rslora, alpha_pattern={"v": 12})
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(tmp_path / "adapter"))
    merged = pm.merge_and_unload().state_dict()

    layers = lora_layers(tmp_path / "adapter", tmp_path / "base.safetensors")
    assert {l.name: l.kind for l in layers} == {"q": "LoRA", "v": "LoRA"}
    for l in layers:
        torch.testing.assert_close(l.matrices()[0], merged[l.name + ".weight"], rtol=1e-5, atol=1e-6)
    # the adapter directory is also accepted by checkpoint_layers (with base=)
    assert [l.name for l in checkpoint_layers(tmp_path / "adapter", base=base_sd)] == ["q", "v"]


def test_lora_scaling_quirk(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = Tiny()
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=16, target_modules=["q"],
                                                     init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "adapter"))
    mod = pm.base_model.model.q
    A, B = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach()
    (layer,) = lora_layers(tmp_path / "adapter", base_sd, lora_scaling=False)
    torch.testing.assert_close(layer.matrices()[0], base_sd["q.weight"] + B @ A, rtol=1e-5, atol=1e-6)


def test_lora_without_base_is_a_clear_error(tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, target_modules=["q"]))
    pm.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="base"):
        checkpoint_layers(tmp_path / "adapter")


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope.safetensors"):
        checkpoint_layers(tmp_path / "nope.safetensors")


def test_corrupt_safetensors(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CorruptCheckpointError, match="bad.safetensors"):
        checkpoint_layers(f)


def test_truncated_safetensors(tmp_path):
    f = tmp_path / "cut.safetensors"
    safetensors_torch.save_file({"fc.weight": torch.randn(64, 64)}, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="cut.safetensors"):
        checkpoint_layers(f)[0].matrices()


def test_corrupt_torch_file(tmp_path):
    f = tmp_path / "bad.bin"
    f.write_bytes(b"this is not a zip file")
    with pytest.raises(CorruptCheckpointError, match="bad.bin"):
        checkpoint_layers(f)


def test_pickled_module_is_rejected(tmp_path):
    f = tmp_path / "model.pt"
    torch.save(nn.Linear(3, 3), str(f))
    with pytest.raises(CorruptCheckpointError, match="state dict"):
        checkpoint_layers(f)


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "gone.safetensors"}}))
    with pytest.raises(CheckpointNotFoundError, match="gone.safetensors"):
        checkpoint_layers(tmp_path)


def test_quantized_only_checkpoint(tmp_path):
    f = tmp_path / "q.safetensors"
    safetensors_torch.save_file({"fc.weight": torch.zeros(8, 8, dtype=torch.int8), "fc.bias": torch.zeros(8)},
                                str(f))
    with pytest.raises(UnsupportedDtypeError, match="quantized"):
        checkpoint_layers(f)


def test_complex_weight_is_unsupported():
    with pytest.raises(UnsupportedDtypeError, match="fc.weight"):
        checkpoint_layers({"fc.weight": torch.zeros(4, 4, dtype=torch.complex64)})


def test_empty_checkpoints(tmp_path):
    f = tmp_path / "empty.safetensors"
    safetensors_torch.save_file({}, str(f))
    with pytest.raises(EmptyCheckpointError, match="no tensors"):
        checkpoint_layers(f)
    f2 = tmp_path / "norms.safetensors"
    safetensors_torch.save_file({"ln.weight": torch.ones(8), "ln.bias": torch.zeros(8)}, str(f2))
    with pytest.raises(EmptyCheckpointError, match="no analysable"):
        checkpoint_layers(f2)
    (tmp_path / "d").mkdir()
    with pytest.raises(EmptyCheckpointError, match="no checkpoint files"):
        checkpoint_layers(tmp_path / "d")


def test_open_checkpoint_rejects_other_objects():
    with pytest.raises(TypeError):
        open_checkpoint(42)
