"""``tbfast analyze``'s analysis keywords and its series mode (``tbfast analyze A B ...``).

The series mode writes its long table (``--csv``, ``-`` for standard output) and
``alpha_over_steps.png`` (``--plot``) by `tbfast.io`'s rules: never over a file of any
checkpoint of the series (or ``--base``), atomically, files before standard output; its
errors are one line with the exit codes of `tbfast.errors.EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, analyze_exit_codes
from ..options import FarmsOptions
from .series import PLOT_NAME, alpha_pivot, analyze_series, expand_checkpoints

__all__ = ["analyze_options", "expand_checkpoints", "run_series"]


def analyze_options(args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    """The `tbfast.analyze` keywords of the command-line options (a bad ``--farms-*`` value is a
    ValueError naming the field)."""
    import torch

    given = {k: v for k, v in (("window_rows", args.farms_window), ("aspect_ratio", args.farms_aspect_ratio),
                               ("windows_per_dim", args.farms_windows_per_dim)) if v is not None}
    farms = FarmsOptions(**given) if given else (True if args.farms else None)
    return dict(base=args.base, fit=args.fit, xmin_pos=args.xmin_pos, filter_zeros=args.filter_zeros,
                min_evals=args.min_evals, max_evals=args.max_evals or None, include_embedding=not args.no_embedding,
                include=args.include, exclude=args.exclude,
                dtype=torch.float64 if args.dtype == "float64" else torch.float32, device=args.device,
                memory_budget=args.memory_budget, progress=progress, farms=farms)


def _error(msg: str, code: int) -> int:
    print(f"tbfast analyze: error: {msg}", file=sys.stderr)
    return code


def run_series(args: argparse.Namespace, paths: list[Path], progress: bool, group: object = None) -> int:
    """A series of checkpoints: the alpha table (layers x steps) on standard output, the long
    table with ``--csv``, alpha against the step with ``--plot``; returns the exit code."""
    from .._interrupt import interruptible
    from ..checkpoint import checkpoint_files
    from ..checkpoint.files import shown
    from ..io import STDOUT, OutputRefusedError, check_output, file_ids, output_dir, write_output

    codes = analyze_exit_codes()
    inputs = file_ids([f for p in [*paths, args.base] for f in checkpoint_files(p)])  # never written over
    plot = Path(args.plot) / PLOT_NAME if args.plot else None
    try:  # refused before the analysis, not after it
        if args.csv:
            check_output(args.csv, inputs, what="--csv")
        if args.plot and os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise OutputRefusedError(f"--plot {args.plot}: exists and is not a directory")
        if plot is not None:
            check_output(plot, inputs, what="plot")
            if args.csv and args.csv != STDOUT and (os.path.abspath(plot) == os.path.abspath(args.csv)
                                                   or file_ids([plot]) & file_ids([args.csv])):
                raise OutputRefusedError(f"--csv {args.csv} and the plot {plot} are the same file")
    except OutputRefusedError as e:
        return _error(str(e), EXIT_USAGE)
    t0 = time.perf_counter()
    try:  # on a worker thread, so Ctrl-C ends the command at once
        table = interruptible(analyze_series)(paths, process_group=group, **analyze_options(args, progress))
    except tuple(cls for cls, _ in codes) as e:
        return _error(str(e), next(code for cls, code in codes if isinstance(e, cls)))
    elapsed = time.perf_counter() - t0
    written: list[str] = []  # the files first, then standard output (a reader that goes away loses no file)
    try:
        if args.csv and args.csv != STDOUT:
            try:
                write_output(args.csv, table.to_csv(index=False).encode(), inputs, what="--csv")
            except OutputRefusedError:
                raise
            except OSError as e:
                return _error(f"cannot write --csv {args.csv}: {e}", EXIT_ERROR)
            written.append(f"wrote {shown(args.csv)}")
        if plot is not None:
            try:
                from .series_plot import plot_alpha_series

                output_dir(args.plot, what="plot directory")
                plot_alpha_series(table, plot, inputs=inputs)
            except ImportError as e:
                return _error(str(e), EXIT_ERROR)
            except OutputRefusedError:
                raise
            except OSError as e:
                return _error(f"cannot write plots to {args.plot}: {e}", EXIT_ERROR)
            written.append(f"wrote {shown(plot)}")
    except OutputRefusedError as e:
        return _error(str(e), EXIT_USAGE)
    if args.csv == STDOUT:
        write_output(STDOUT, table.to_csv(index=False).encode())
        for line in written:
            print(line, file=sys.stderr)
    else:
        import pandas as pd

        steps = sorted(set(table["step"]))
        print(f"tbfast analyze: {table['checkpoint'].nunique()} checkpoints, steps {steps[0]}..{steps[-1]}  "
              f"({len(table)} rows, fit={args.fit}, {args.dtype}, {elapsed:.2f} s)")
        with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
            print("alpha per layer (rows) and step (columns):")
            print(alpha_pivot(table).to_string(float_format=lambda v: f"{v:.4g}"))
        for line in written:
            print(line)
    sys.stdout.flush()  # a closed pipe shows here, inside main's BrokenPipeError handler
    return EXIT_OK
