"""The options of each stage as small frozen dataclasses, validated once when built.

- `LayerOptions`: which layers of a source are analysed and how their matrices are formed;
- `ESDOptions`: how the eigenvalues are computed (method, precision, device, memory);
- `FitOptions`: the power-law fit (method, xmin rule, zero filtering, fix-finger window).

The pipeline passes these objects from stage to stage instead of loose keyword lists; the
public functions (`tbfast.analyze`, `tbfast.layer_metrics`, `tbfast.TempBalance`...) keep their
keyword arguments and build the objects with `split_options`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LayerOptions", "ESDOptions", "FitOptions", "FarmsOptions", "split_options", "take_options", "renamed", "either",
           "FIT_METHODS", "canonical_fit", "ESD_METHODS", "EIG_BACKENDS", "FIT_BACKENDS", "ALIASES"]

#: Accepted fit names and their canonical form (SPEC sections 3-5).
FIT_METHODS = {
    "median": "median", "xmin_mid": "median",
    "goodness-of-fit": "ks", "ks": "ks", "KS": "ks",
    "fix-finger": "fix-finger", "xmin_peak": "fix-finger",
}
ESD_METHODS = ("auto", "gram", "svd")
EIG_BACKENDS = ("auto", "cpp", "cusolver", "torch")
FIT_BACKENDS = ("auto", "cpp", "triton", "torch")
XMIN_BOUNDS = ("reference", "corrected")


def canonical_fit(fit: str | None) -> str:
    """Canonical fit name (``median``, ``ks`` or ``fix-finger``) for any accepted alias."""
    if fit is None:
        return "ks"
    try:
        return FIT_METHODS[fit]
    except (KeyError, TypeError):
        raise ValueError(f"unknown fit {fit!r}; choose from {sorted(set(FIT_METHODS))}") from None


@dataclass(frozen=True)
class LayerOptions:
    """Layer selection and matrix rules (see `tbfast.find_layers`, `tbfast.analyze`,
    `tbfast.sources.build_layers`).

    ``types`` (kinds to keep; default Linear, Conv1d, Conv2d and LoRA, plus Embedding with
    ``include_embedding``), ``include`` / ``exclude`` (regexes searched in layer names),
    ``conv_norm`` (convolution matrices are scaled by ``sqrt(conv_norm)``), ``lora_scaling``
    (False: the reference quirk ``s = 1``). ``base``: a model, state dict or checkpoint; layers
    become ``W - W_base`` (for a LoRA adapter directory, the base it is merged onto).
    ``min_evals`` / ``max_evals`` / ``max_n`` filter by eigenvalue count and larger side after
    the layers are built (an empty result is reported then, with these bounds in the message);
    ``max_evals=0`` and ``max_n=0`` mean no limit, as None does (WeightWatcher's convention).
    """

    types: tuple[str, ...] | None = None
    include_embedding: bool = False
    include: str | None = None
    exclude: str | None = None
    conv_norm: float = 0.5
    lora_scaling: bool = True
    base: Any = None
    min_evals: int = 0
    max_evals: int | None = None
    max_n: int | None = None

    def __post_init__(self) -> None:
        if self.types is not None and not isinstance(self.types, tuple):
            object.__setattr__(self, "types", tuple(self.types))
        if not self.conv_norm > 0:
            raise ValueError(f"conv_norm must be positive, got {self.conv_norm}")
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as e:
                    raise ValueError(f"{name}={pattern!r} is not a valid regular expression ({e})") from None
        for name in ("min_evals", "max_evals", "max_n"):
            value = getattr(self, name)
            if value is None and name != "min_evals":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer{'' if name == 'min_evals' else ' or None'}, "
                                 f"got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("max_evals", "max_n"):
            if getattr(self, name) == 0:  # 0 = no limit
                object.__setattr__(self, name, None)


@dataclass(frozen=True)
class FarmsOptions:
    """FARMS (Hu et al., ICML 2025): a layer's ESD pooled over fixed-aspect-ratio submatrices.

    Each matrix (``rows x cols``) is cut into windows of ``window_rows x int(window_rows *
    aspect_ratio)`` (rows x columns of the weight as stored; shrunk by one factor to fit a smaller
    matrix) on a grid of at most ``windows_per_dim`` positions per side: step ``max(1, (size -
    w) // (windows_per_dim - 1))``, start ``min(i * step, size - w)``. Defaults are those of the
    authors' code: 100 x 200 windows, 10 x 10 positions (see docs/HTSR_TOOLS.md)."""

    window_rows: int = 100
    aspect_ratio: float = 2.0
    windows_per_dim: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.window_rows, bool) or int(self.window_rows) != self.window_rows or self.window_rows < 1:
            raise ValueError(f"farms window_rows must be a positive integer, got {self.window_rows!r}")
        if not float(self.aspect_ratio) > 0 or float(self.aspect_ratio) == float("inf"):
            raise ValueError(f"farms aspect_ratio must be positive and finite, got {self.aspect_ratio!r}")
        if (isinstance(self.windows_per_dim, bool) or int(self.windows_per_dim) != self.windows_per_dim
                or self.windows_per_dim < 1):
            raise ValueError(f"farms windows_per_dim must be a positive integer, got {self.windows_per_dim!r}")
        object.__setattr__(self, "window_rows", int(self.window_rows))
        object.__setattr__(self, "aspect_ratio", float(self.aspect_ratio))
        object.__setattr__(self, "windows_per_dim", int(self.windows_per_dim))


def as_farms(value: Any) -> FarmsOptions | None:
    """The ``farms=`` option as a `FarmsOptions` or None: None/False (off), True (defaults), a
    mapping of `FarmsOptions` fields, or a `FarmsOptions`; anything else is a ValueError."""
    if value is None or value is False:
        return None
    if value is True:
        return FarmsOptions()
    if isinstance(value, FarmsOptions):
        return value
    if isinstance(value, Mapping):
        try:
            return FarmsOptions(**value)
        except TypeError as e:
            raise ValueError(f"farms: {e}") from None
    raise ValueError(f"farms must be True, False, None, a dict or a FarmsOptions, got {type(value).__name__}")


@dataclass(frozen=True)
class ESDOptions:
    """How the ESD of every layer is computed (see `tbfast.esd`). ``eig_backend``: the
    eigensolver (``auto``, ``cpp``, ``cusolver``, ``torch``); ``memory_budget`` None means
    `tbfast.spectra.DEFAULT_MEMORY_BUDGET`; ``farms``: `FarmsOptions` (True: its defaults) to
    pool each layer's ESD over FARMS windows, None for the whole matrix."""

    method: str = "auto"
    dtype: torch.dtype = torch.float32
    device: torch.device | None = None
    memory_budget: int | None = None
    progress: bool = False
    eig_backend: str = "auto"
    allow_tf32: bool = False
    farms: Any = None  # None, or FarmsOptions: the FARMS ESD of each layer (see FarmsOptions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "farms", as_farms(self.farms))
        if self.method not in ESD_METHODS:
            raise ValueError(f"unknown ESD method {self.method!r}; choose from {ESD_METHODS}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")
        if self.eig_backend not in EIG_BACKENDS:
            raise ValueError(f"unknown eigensolver backend {self.eig_backend!r}; choose from {EIG_BACKENDS}")
        if self.memory_budget is not None:
            if not (isinstance(self.memory_budget, numbers.Real) and math.isfinite(self.memory_budget)):
                raise ValueError(f"memory_budget must be a finite number of bytes, got {self.memory_budget!r}")
            if int(self.memory_budget) <= 0:
                raise ValueError(f"memory_budget must be positive, got {self.memory_budget}")
            object.__setattr__(self, "memory_budget", int(self.memory_budget))
        if self.device is not None and not isinstance(self.device, torch.device):
            object.__setattr__(self, "device", torch.device(self.device))


@dataclass(frozen=True)
class FitOptions:
    """The power-law fit of every layer's ESD (see `tbfast.fit_power_law`); ``fit`` is stored
    in canonical form; ``fit_backend``: the fit kernels (``auto``, ``cpp``, ``triton``,
    ``torch``; the public keyword ``backend=`` is its alias). ``sr_mid_pos`` is the stable-rank
    family's start (a metric option that travels with the fit, as in the references)."""

    fit: str = "median"
    xmin_pos: float = 2.0
    filter_zeros: bool = False
    evals_thresh: float = 1e-5
    bins: int = 100
    xmin_bound: str = "reference"
    fit_backend: str = "auto"
    refine_lower_edge: bool = True
    sr_mid_pos: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fit", canonical_fit(self.fit))
        if self.fit == "median" and not self.xmin_pos > 1:
            raise ValueError(f"xmin_pos must be > 1 (xmin = eigenvalue at int(N / xmin_pos)), got {self.xmin_pos}")
        if self.bins < 1:
            raise ValueError(f"bins must be >= 1, got {self.bins}")
        if self.xmin_bound not in XMIN_BOUNDS:
            raise ValueError(f"xmin_bound must be 'reference' or 'corrected', got {self.xmin_bound!r}")
        if self.fit_backend not in FIT_BACKENDS:
            raise ValueError(f"unknown fit backend {self.fit_backend!r}; choose from {FIT_BACKENDS}")


_FIELDS = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (LayerOptions, ESDOptions, FitOptions)}

#: Public keyword aliases: ``backend=`` of `tbfast.layer_metrics`, `tbfast.analyze` and
#: `tbfast.fit_power_law` is the fit backend (`FitOptions.fit_backend`).
ALIASES = {"backend": "fit_backend"}


def _both(alias: str, name: str, where: str | None = None) -> TypeError:
    return TypeError(f"{where + ': ' if where else ''}pass either {name}= or its alias {alias}=, not both")


def either(name: str, value: Any, alias: str, alias_value: Any, *, where: str | None = None) -> Any:
    """The value of keyword ``name`` or of its documented alias ``alias`` (None: not given);
    giving both is a TypeError (naming ``where``)."""
    if alias_value is None:
        return value
    if value is not None:
        raise _both(alias, name, where)
    return alias_value


def renamed(options: Mapping[str, Any], alias: str, name: str) -> dict[str, Any]:
    """``options`` with the keyword ``alias`` renamed to ``name`` (giving both is a TypeError)."""
    if alias not in options:
        return dict(options)
    if name in options:
        raise _both(alias, name)
    out = {k: v for k, v in options.items() if k != alias}
    out[name] = options[alias]
    return out


def take_options(options: Mapping[str, Any], allowed: Iterable[type] = (ESDOptions, FitOptions), *,
                 defaults: Mapping[type, Mapping[str, Any]] | None = None, where: str | None = None
                 ) -> tuple[dict[type, Any], dict[str, Any]]:
    """Build one frozen options object per class in ``allowed`` from the flat keywords
    ``options`` that a class declares (after `ALIASES`; ``defaults`` override class defaults);
    also return the other keywords. With ``where``, a keyword that no options class declares
    is a TypeError naming ``where``."""
    allowed = tuple(allowed)
    if where is not None:
        every = set().union(*_FIELDS.values())
        unknown = sorted(k for k in options if k not in every and ALIASES.get(k) not in every)
        if unknown:
            raise TypeError(f"{where}: unexpected option(s) {unknown}")
    for alias, name in ALIASES.items():
        if any(name in _FIELDS[c] for c in allowed):
            options = renamed(options, alias, name)
    out: dict[type, Any] = {}
    for cls in allowed:
        kw = dict((defaults or {}).get(cls, {}))
        kw.update({k: v for k, v in options.items() if k in _FIELDS[cls]})
        out[cls] = cls(**kw)
    known = set().union(*(_FIELDS[c] for c in allowed))
    return out, {k: v for k, v in options.items() if k not in known}


def split_options(options: Mapping[str, Any], *, allowed: Iterable[type] = (LayerOptions, ESDOptions, FitOptions),
                  defaults: Mapping[type, Mapping[str, Any]] | None = None, where: str = "tbfast"
                  ) -> dict[type, Any]:
    """Build one frozen options object per class in ``allowed`` from flat keyword ``options``
    (each keyword goes to the class that declares it; ``defaults`` override class defaults;
    ``backend`` is the alias of ``fit_backend``). An unknown keyword is a TypeError naming ``where``."""
    allowed = tuple(allowed)
    known = set().union(*(_FIELDS[c] for c in allowed))
    unknown = sorted(k for k in set(options) - known if ALIASES.get(k) not in known)
    if unknown:
        raise TypeError(f"{where}: unexpected option(s) {unknown}")
    return take_options(options, allowed, defaults=defaults)[0]
