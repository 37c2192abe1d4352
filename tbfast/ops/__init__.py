"""tbfast's op layer: every compiled kernel registered once through ``torch.library``.

Ops live in the ``tbfast`` namespace (``torch.ops.tbfast.<name>``), test-only ops in
``tbfast_testing``. Each op module offers a plain Python entry function with an explicit
``backend=`` choice.
"""

from . import eig  # noqa: F401  (registers torch.ops.tbfast.eigvalsh_batched / cusolver_eigvalsh)
