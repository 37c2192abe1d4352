"""Alpha over training: `analyze_series` runs `tbfast.analyze` on a series of checkpoints.

Each checkpoint (a file, a directory of shards, a Hugging Face Trainer ``checkpoint-<step>``
folder, a state dict or a model) is analysed in turn, with the same options, and the tables are
stacked into one long table with two leading columns: ``checkpoint`` (its path or label) and
``step``. The step is read, in this order, from ``steps=``, from ``trainer_state.json``'s
``global_step`` (in the checkpoint directory or the file's directory), or from a trailing number
in the name (``checkpoint-500``, ``step_1000.safetensors``, ``ckpt-7``, ``iter3``; a file's
parent folder is tried after its own name). A run directory holding ``checkpoint-*`` folders
(and no weights of its own; trainer files such as ``training_args.bin`` do not count) stands for
those folders, in step order.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._progress import progress_bar
from ..analyze import COLUMNS, analyze_spectra
from ..checkpoint.index import NOT_WEIGHTS

__all__ = ["analyze_series", "checkpoint_step", "expand_checkpoints", "alpha_pivot", "SERIES_COLUMNS", "PLOT_NAME"]

logger = logging.getLogger(__name__)

#: leading columns of the long table; then every column of `tbfast.analyze`
SERIES_COLUMNS = ("checkpoint", "step") + COLUMNS
#: the file ``plot_dir=`` (and ``tbfast analyze A B ... --plot DIR``) writes
PLOT_NAME = "alpha_over_steps.png"

_STEP_RE = re.compile(r"(?:^|[-_.])(?:checkpoint|ckpt|global[-_]?step|step|steps|iter|iteration|epoch)"
                      r"[-_]?(\d+)$", re.IGNORECASE)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _trainer_step(d: Path) -> int | None:
    f = d / "trainer_state.json"
    if not f.is_file():
        return None
    try:
        step = json.loads(f.read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError) as e:
        logger.warning("%s: unreadable (%s); the step is taken from the name", f, e)
        return None
    return int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) and step >= 0 else None


def _name_step(name: str) -> int | None:
    m = _STEP_RE.search(name)
    return int(m.group(1)) if m else None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The training step of a checkpoint path (see the module doc), or None when nothing says it."""
    p = Path(path)
    if p.is_dir():
        step = _trainer_step(p)
        return step if step is not None else _name_step(p.name)
    step = _name_step(p.stem)
    if step is None:
        step = _trainer_step(p.parent)
    return step if step is not None else _name_step(p.parent.name)


def _is_run_dir(p: Path) -> bool:
    try:
        if not p.is_dir() or any(f.suffix in _WEIGHT_SUFFIXES and not NOT_WEIGHTS.match(f.name)
                                 for f in p.iterdir() if f.is_file()):
            return False
        return any(c.is_dir() and _name_step(c.name) is not None and c.name.lower().startswith("checkpoint")
                   for c in p.iterdir())
    except OSError:  # unreadable: not a run directory (reading it as a checkpoint reports why)
        return False


def expand_checkpoints(sources: Sequence[Any]) -> list[Any]:
    """``sources`` with every run directory (``checkpoint-*`` folders, no weights of its own)
    replaced by its checkpoint folders in step order."""
    out: list[Any] = []
    for s in sources:
        p = Path(s) if isinstance(s, (str, os.PathLike)) else None
        if p is not None and _is_run_dir(p):
            subs = [c for c in p.iterdir() if c.is_dir() and c.name.lower().startswith("checkpoint")
                    and _name_step(c.name) is not None]
            out += sorted(subs, key=lambda c: (checkpoint_step(c), c.name))
        else:
            out.append(s)
    return out


def _label(source: Any, i: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"checkpoint {i}"


def analyze_series(checkpoints: Sequence[Any], *, steps: Sequence[int] | None = None,
                   plot_dir: str | os.PathLike | None = None, progress: bool = False, **options: Any):
    """`tbfast.analyze` of every checkpoint in ``checkpoints``: one long pandas DataFrame with
    the columns ``checkpoint``, ``step`` and those of `tbfast.analyze`, checkpoint after
    checkpoint (one at a time, so memory is that of the largest one).

    ``checkpoints``: paths (files, shard directories, Trainer ``checkpoint-*`` folders, or a run
    directory holding them), state dicts or models. ``steps``: the step of each checkpoint;
    by default read from ``trainer_state.json`` or the name (see the module doc); when some
    checkpoint has none, every checkpoint gets its position (0, 1, ...) and a warning says so.
    ``plot_dir``: also write ``alpha_over_steps.png`` there (alpha of every layer against the
    step, `tbfast.analysis.series_plot.plot_alpha_series`), by `tbfast.io.write_output`'s rules and
    never over a file of the series (`tbfast.io.OutputRefusedError`, checked before the analysis).
    Other ``options`` as for `tbfast.analyze`.
    """
    import pandas as pd

    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    sources = expand_checkpoints(list(checkpoints))
    if not sources:
        raise ValueError("analyze_series: no checkpoint given")
    if steps is not None:
        steps = [int(s) for s in steps]
        if len(steps) != len(sources):
            raise ValueError(f"analyze_series: {len(steps)} steps for {len(sources)} checkpoints")
    else:
        found = [checkpoint_step(s) if isinstance(s, (str, os.PathLike)) else None for s in sources]
        if any(s is None for s in found):
            missing = next(_label(s, i) for i, (s, f) in enumerate(zip(sources, found)) if f is None)
            logger.warning("no training step found for %s (no trainer_state.json, no number in the name); "
                           "using each checkpoint's position 0..%d as its step", missing, len(sources) - 1)
            steps = list(range(len(sources)))
        else:
            steps = [int(s) for s in found]
    if plot_dir is not None:  # refused before the analysis, not after it
        from ..checkpoint import checkpoint_files
        from ..io import check_output, file_ids

        inputs = file_ids([f for s in [*sources, options.get("base")] for f in checkpoint_files(s)])
        check_output(Path(plot_dir) / PLOT_NAME, inputs, what="plot")
    bar = progress_bar(progress, len(sources), "checkpoints", unit="checkpoint")
    frames = []
    for i, (src, step) in enumerate(zip(sources, steps)):
        logger.info("analysing checkpoint %s (step %d)", _label(src, i), step)
        df = analyze_spectra(src, progress=False, **options).details
        df.insert(0, "step", step)
        df.insert(0, "checkpoint", _label(src, i))
        frames.append(df)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    table = pd.concat(frames, ignore_index=True)
    if plot_dir is not None:
        from ..io import output_dir
        from .series_plot import plot_alpha_series

        plot_alpha_series(table, output_dir(plot_dir, what="plot directory") / PLOT_NAME, inputs=inputs)
    return table


def alpha_pivot(table: Any, column: str = "alpha") -> Any:
    """``column`` of a series table as layers x steps (layers in model order, steps ascending)."""
    order = list(dict.fromkeys(table["name"]))
    piv = table.pivot_table(index="name", columns="step", values=column, aggfunc="first", dropna=False)
    return piv.reindex(order)
