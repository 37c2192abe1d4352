"""tbfast's op layer: every compiled/accelerated op is a ``torch.ops`` operator, one module each.

Conventions (shared by every op module here):

- Public ops live in the namespace ``tbfast`` (``torch.ops.tbfast.<name>``); test-only ops (an
  unpruned oracle, ...) in ``tbfast_testing``.
- Each op has one schema, kernels registered per device through ``torch.library`` (C++ on CPU,
  Triton / cuSOLVER on CUDA, the plain-torch reference of `tbfast.kernels.ref` where no compiled
  path exists) and a fake kernel, so it is torch.compile-safe.
- Each module offers plain Python entry functions with an explicit ``backend=`` choice
  (``"auto"`` = the dispatcher's pick) for tests and ``tbfast bench``; the library's stages
  (`tbfast.powerlaw`, ...) call those.

Modules: `tbfast.ops.eig` (``eigvalsh_batched``: batched symmetric eigenvalues; ``cusolver_eigvalsh``),
`tbfast.ops.cusolver` (finding libcusolver, size policy), `tbfast.ops.fit` (``hill_fit``,
``ks_scan``: the power-law fits), `tbfast.ops.secular` (``eigvalsh_update``: eigenvalues of a
low-rank update of a diagonal matrix, the exact LoRA ESD refresh), `tbfast.ops.digest`
(``weight_digest``: a 128-bit digest of a tensor's bytes, the LoRA base-weight check).
Importing this package registers every op.
"""

from __future__ import annotations

from . import eig  # noqa: F401  (registers torch.ops.tbfast.eigvalsh_batched / cusolver_eigvalsh)
from . import fit  # noqa: F401  (registers torch.ops.tbfast.hill_fit / ks_scan)
from . import digest  # noqa: F401  (registers torch.ops.tbfast.weight_digest)
from . import secular  # noqa: F401  (registers torch.ops.tbfast.eigvalsh_update)
