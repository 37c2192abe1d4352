"""Which matrices make a layer's ESD (SPEC section 1).

- `tbfast.layers.core`: the `Layer` record (a small record whose matrices are produced on demand
  by `Layer.matrices()`, so nothing is copied until the spectra stage needs it), its public
  constructor `weight_layer`, and every matrix rule (kinds, conv reshape and scale, deltas,
  LoRA merge and scaling, block index, selection);
- `tbfast.layers.modules`: `find_layers`, the walk over an ``nn.Module``;
- `tbfast.layers.matrices`: `layers_from_matrices`, raw tensors.

Checkpoint files and PEFT adapter directories are read by `tbfast.checkpoint`; `tbfast.sources`
turns any source into layers.
"""

from .core import BLOCK_PATTERN, LAYER_KINDS, Layer, block_index, weight_layer
from .matrices import layers_from_matrices
from .modules import find_layers

__all__ = ["Layer", "find_layers", "block_index", "layers_from_matrices", "weight_layer", "LAYER_KINDS",
           "BLOCK_PATTERN"]
