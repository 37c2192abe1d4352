"""Layers from checkpoint files, without the model class.

Readers (all lazy: a tensor is read only when its layer's ``matrices()`` is called):

- a ``.safetensors`` file, or a directory of safetensors shards (with or without a
  ``*.safetensors.index.json``), read through ``safetensors.safe_open`` (memory-mapped);
  an index's shard names must stay inside its directory (no ``..``, not absolute; symlinks
  inside the directory are followed) and it is checked against the shards' contents;
- a ``.pt`` / ``.bin`` / ``.pth`` file or a directory of ``.bin`` shards, read with
  ``torch.load(weights_only=True)`` (memory-mapped for zip-format files);
- an in-memory state dict;
- a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors`` /
  ``adapter_model.bin``) merged onto a base checkpoint: ``W + s * B @ A``.

Modules, one job each: `stores` (tensor stores, `open_checkpoint`, dtype rules), `index` (shard
indexes and their path safety), `peft` (adapter config and tensor names), `layers` (the front
ends `checkpoint_layers` / `lora_layers`; the matrix rules are `tbfast.layers.core`'s).
"""

from ..errors import (CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, EmptyCheckpointError,
                      UnsupportedDtypeError)
from ..layers.core import kind_from_name
from .layers import checkpoint_layers, lora_layers
from .peft import is_peft_adapter
from .stores import (MappingStore, SafetensorsStore, TensorInfo, TensorStore, TorchFileStore, checkpoint_files,
                     open_checkpoint)

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "UnsupportedDtypeError",
    "EmptyCheckpointError",
    "TensorInfo",
    "TensorStore",
    "MappingStore",
    "SafetensorsStore",
    "TorchFileStore",
    "open_checkpoint",
    "checkpoint_files",
    "checkpoint_layers",
    "lora_layers",
    "is_peft_adapter",
    "kind_from_name",
]
