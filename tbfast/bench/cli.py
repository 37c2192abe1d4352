"""``tbfast bench``: run the benchmarks and print a table with ratios against the reference.

    tbfast bench [--quick] [--device cpu|cuda|auto] [--workloads a,b] [--repeats N]
                 [--json FILE] [--markdown] [--overhead [--steps N]]
    python -m tbfast.bench ...   (same)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

import torch

from .table import format_table
from .esd_bench import METHOD_HELP, METHODS, QUICK_METHODS, run_esd_benchmark
from .workloads import QUICK_WORKLOADS, WORKLOADS

__all__ = ["main", "build_parser", "environment"]

QUICK_KS_REFERENCE_LAYERS = 8
QUICK_ORACLE_LAYERS = 12


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tbfast bench", description=(
        "Race tbfast against the reference ESD estimator (per-layer svdvals, .item() syncs, "
        "Python KS loop) and measure TempBalance's share of training time."))
    p.add_argument("--quick", action="store_true",
                   help=f"small run (< 2 min on a 2-core CPU): workloads {','.join(QUICK_WORKLOADS)}, "
                        f"methods {','.join(QUICK_METHODS)}, 1 repeat, reference KS loop timed on "
                        f"{QUICK_KS_REFERENCE_LAYERS} layers per workload and extrapolated, fp64 oracle on "
                        f"{QUICK_ORACLE_LAYERS} evenly spaced layers (both labelled)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the weights live and the work runs (auto: cuda if available)")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated subset of: {','.join(WORKLOADS)}")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of: {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (median reported)")
    p.add_argument("--no-oracle", action="store_true", help="skip the fp64 SVD accuracy oracle")
    p.add_argument("--oracle-layers", type=int, default=None,
                   help="check accuracy on this many evenly spaced layers per workload (default: all)")
    p.add_argument("--no-ks", action="store_true", help="skip the KS-scan benchmark")
    p.add_argument("--ks-reference-layers", type=int, default=None,
                   help="time the reference KS loop on this many layers and extrapolate (labelled)")
    p.add_argument("--overhead", action="store_true",
                   help="also run the training-overhead benchmark (no TB / reference TB / tbfast TB)")
    p.add_argument("--overhead-only", action="store_true", help="run only the training-overhead benchmark")
    p.add_argument("--paper", action="store_true",
                   help="run only the overhead benchmark in the paper's setting (13 examples, 10 epochs, "
                        "ESD every step, calibrated to the paper's time split)")
    p.add_argument("--overhead-model", default=None, choices=["roberta-base", "roberta-small", "bert-small", "bert-tiny"],
                   help="model of the overhead benchmark (default: roberta-base on CUDA, bert-small on CPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps of the overhead benchmark")
    p.add_argument("--scale", action="store_true",
                   help="run only the distributed scale benchmark: the ESD of --scale-workload on each of "
                        "--scale-ranks ranks (per-rank time, critical path), measured LLaMA-7B per-matrix "
                        "costs, and the planned LLaMA-7B time on --project-ranks ranks")
    p.add_argument("--scale-workload", default="roberta-base-shaped",
                   help="workload of --scale (any of the workloads, or llama7b: all 32 blocks, 224 "
                        "matrices generated lazily, hours on a CPU)")
    p.add_argument("--scale-ranks", default="1,2", help="rank counts measured by --scale (default 1,2)")
    p.add_argument("--project-ranks", default="1,4,8", help="rank counts projected by --scale (default 1,4,8)")
    p.add_argument("--shape-costs", default=None, metavar="RxC=SEC,...",
                   help="--scale: seconds per matrix of the LLaMA-7B shapes (4096x4096, 11008x4096, "
                        "4096x11008) from an earlier run, instead of measuring them now")
    p.add_argument("--lora", action="store_true",
                   help="run only the exact-LoRA-ESD benchmark: a LLaMA-7B-shaped block with LoRA on all seven "
                        "Linears, refresh with a warm base-spectrum cache vs the fp32 and fp64 eigensolves")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="--lora: multiply every dimension of the block by this (0.5 on a 2-core CPU)")
    p.add_argument("--lora-rank", type=int, default=8, help="--lora: the LoRA rank (default 8)")
    p.add_argument("--farms", action="store_true",
                   help="run only the FARMS benchmark: batched FARMS alpha vs a per-window eigvalsh loop on "
                        "--workloads (default minilm,roberta-base-shaped)")
    p.add_argument("--moe", action="store_true",
                   help="run only the MoE benchmark: 32 blocks x 8 experts x 3 matrices (Mixtral's count, sides "
                        "divided by --moe-scale), fused / file / ModuleList vs the reference")
    p.add_argument("--moe-scale", type=int, default=16, help="--moe: divide Mixtral's sides by this (default 16)")
    p.add_argument("--json", metavar="FILE", default=None, help="write all results as JSON")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    return p


def _backend_info() -> tuple[dict[str, Any], str | None]:
    """tbfast.backend_info() from a child process, so a broken extension cannot kill the run."""
    code = "import json, tbfast; print(json.dumps([tbfast.backend_info(), tbfast.__version__], default=str))"
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if p.returncode == 0:
            info, version = json.loads(p.stdout.strip().splitlines()[-1])
            return info, version
        return {"error": f"backend_info exited with {p.returncode}: {p.stderr.strip()[-500:]}"}, None
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": f"backend_info failed: {e}"}, None


def environment(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """Device name, versions, date and command of this run."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - optional dependency
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
                        break
        except OSError:
            pass
    backend, tb_version = _backend_info()
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "tbfast bench " + " ".join(shlex.quote(a) for a in argv),
        "device": str(device), "device_name": name,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "tbfast": tb_version, "python": platform.python_version(), "backend": backend,
    }


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def esd_tables(results: list[dict], markdown: bool) -> str:
    """The ESD table (one row per workload x method) and the KS table."""
    rows, ks_rows = [], []
    for r in results:
        for m in r["methods"].values():
            ks_agree = "-" if m["ks_index_agreement"] is None else \
                f"{m['ks_index_agreement'] * 100:.0f}% of {m['ks_index_layers']}"
            err = _fmt(m["max_alpha_rel_err"], ".1e")
            if m["oracle_layers"] is not None and m["oracle_layers"] < r["layers"]:
                err += f" ({m['oracle_layers']} layers)"
            rows.append([r["workload"], str(r["layers"]), m["method"], _fmt_s(m["seconds"]),
                         _fmt(m["layers_per_s"], ".1f"), _fmt(m["ratio_vs_reference"], ".2f") + "x",
                         err, ks_agree])
        if r["ks"]:
            k = r["ks"]
            ref = _fmt_s(k["reference_seconds"])
            if k["reference_extrapolated"]:
                ref += f" (extrapolated from {k['reference_measured_layers']} layers)"
            ks_rows.append([r["workload"], str(k["layers"]), ref, _fmt_s(k["tbfast_seconds"]),
                            f"{k['ratio_vs_reference']:.0f}x"])
    out = ["ESD + median fit + metrics, weights -> host-side table (median of repeats)",
           format_table(["workload", "layers", "method", "time", "layers/s", "vs reference",
                   "max alpha rel err (fp64 SVD)", "KS xmin index = oracle"], rows, markdown)]
    if ks_rows:
        out += ["", "KS scan (SPEC sec. 4) on the same eigenvalues",
                format_table(["workload", "layers", "reference (Python loop)", "tbfast", "speedup"],
                       ks_rows, markdown)]
    return "\n".join(out)


def target_checks(results: list[dict], device_type: str) -> list[dict[str, Any]]:
    """The project's speed targets for RoBERTa-base-shaped, each with its target and verdict.

    CPU: ESD + median fit >= 3x faster than the reference; KS scan >= 100x faster than
    the per-candidate loop. CUDA: ESD + median fit + all metrics to a host table
    <= 80 ms; KS scan <= 5 ms; alpha within 1e-3 of fp64 SVD; KS xmin index = oracle on >= 95%.
    """
    out = []
    for r in results:
        if r["workload"] != "roberta-base-shaped" or "tbfast" not in r["methods"]:
            continue
        m, ks = r["methods"]["tbfast"], r["ks"]
        checks = []
        if device_type == "cpu":
            checks.append(("ESD + median fit, x faster than reference", m["ratio_vs_reference"], ">=", 3.0))
            if ks:
                checks.append(("KS scan, x faster than per-candidate loop"
                               + (" (reference extrapolated)" if ks["reference_extrapolated"] else ""),
                               ks["ratio_vs_reference"], ">=", 100.0))
        else:
            checks.append(("ESD + median fit + metrics to host table, seconds", m["seconds"], "<=", 0.080))
            if ks:
                checks.append(("KS scan, seconds", ks["tbfast_seconds"], "<=", 0.005))
        if m["max_alpha_rel_err"] is not None:
            checks.append(("max alpha rel err vs fp64 SVD", m["max_alpha_rel_err"], "<=", 1e-3))
        if m["ks_index_agreement"] is not None:
            checks.append(("KS xmin index = oracle, fraction of layers", m["ks_index_agreement"], ">=", 0.95))
        for what, value, op, target in checks:
            if value is None:
                continue
            ok = value >= target if op == ">=" else value <= target
            out.append({"workload": r["workload"], "what": what, "value": value, "op": op,
                        "target": target, "met": bool(ok)})
    return out


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tbfast bench: --device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def _split(arg: str | None, known, what: str) -> list[str] | None:
    if arg is None:
        return None
    items = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad:
        raise SystemExit(f"tbfast bench: unknown {what} {bad}; known: {', '.join(known)}")
    return items


def _scale(args: argparse.Namespace, device: torch.device, env: dict[str, Any]) -> int:
    from .scale import format_scale, run_scale

    if args.scale_workload != "llama7b" and args.scale_workload not in WORKLOADS:
        raise SystemExit(f"tbfast bench: unknown --scale-workload {args.scale_workload!r}")
    try:
        ranks = [int(x) for x in args.scale_ranks.split(",")]
        project_ranks = [int(x) for x in args.project_ranks.split(",")]
    except ValueError:
        raise SystemExit("tbfast bench: --scale-ranks / --project-ranks take comma-separated integers") from None
    print(f"# tbfast bench --scale on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}")
    print(f"# command: {env['command']}")
    from .scale import parse_shape_costs

    try:
        given = parse_shape_costs(args.shape_costs) if args.shape_costs else None
    except ValueError as e:
        raise SystemExit(f"tbfast bench: --shape-costs: {e}") from None
    res = run_scale(args.scale_workload, ranks, project_ranks, device, repeats=args.repeats or 1,
                    shape_costs=given)
    print(format_scale(res["measured"], res.pop("_costs"), res["llama7b_projection"], args.scale_workload,
                       args.markdown))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "scale": res}, f, indent=2, default=str)
        print(f"# wrote {args.json}")
    return 0


def _lora(args: argparse.Namespace, env: dict[str, Any]) -> int:
    from .lora import format_lora, run_lora_benchmark
    print(f"# tbfast bench --lora on {env['device_name']}, torch {env['torch']}, {env['date']}")
    print(f"# command: {env['command']}", flush=True)
    res = run_lora_benchmark(scale=args.lora_scale, rank=args.lora_rank, repeats=args.repeats or 1)
    print(format_lora(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "lora": res}, f, indent=2, default=str)
        print(f"# wrote {args.json}")
    return 0


def _htsr(args: argparse.Namespace, device: torch.device, env: dict[str, Any]) -> int:
    from .htsr_bench import FARMS_WORKLOADS, format_htsr, run_farms_benchmark, run_moe_benchmark

    print(f"# tbfast bench on {env['device_name']} ({env['device']}), torch {env['torch']}, {env['date']}")
    print(f"# command: {env['command']}")
    repeats = args.repeats or 3
    out: dict[str, Any] = {"environment": env, "farms": None, "moe": None}

    def save() -> None:  # after each part, so a long run keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2, default=str)

    if args.farms:
        out["farms"] = run_farms_benchmark(_split(args.workloads, WORKLOADS, "workload") or list(FARMS_WORKLOADS),
                                           device, repeats)
        print(format_htsr(out["farms"], None, args.markdown), flush=True)
        save()
    if args.moe:
        out["moe"] = run_moe_benchmark(device, scale=args.moe_scale, repeats=repeats)
        print(format_htsr(None, out["moe"], args.markdown), flush=True)
        save()
    if args.json:
        print(f"# wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tbfast bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = _pick_device(args.device)
    workloads = _split(args.workloads, WORKLOADS, "workload") or \
        (QUICK_WORKLOADS if args.quick else list(WORKLOADS))
    methods = _split(args.methods, METHODS, "method") or \
        list(QUICK_METHODS if args.quick else METHODS)
    repeats = args.repeats or (1 if args.quick else 3)
    ks_ref_layers = args.ks_reference_layers or (QUICK_KS_REFERENCE_LAYERS if args.quick else None)
    oracle_layers = args.oracle_layers or (QUICK_ORACLE_LAYERS if args.quick else None)
    env = environment(device, argv)
    if args.scale:
        return _scale(args, device, env)
    if args.lora:
        return _lora(args, env)
    if args.farms or args.moe:
        return _htsr(args, device, env)
    report: dict[str, Any] = {"environment": env, "methods": {m: METHOD_HELP[m] for m in methods},
                              "esd": [], "overhead": None}
    print(f"# tbfast bench on {env['device_name']} ({env['device']}), torch {env['torch']}, "
          f"triton {env['triton']}, {env['date']}")
    print(f"# command: {env['command']}")
    t_start = time.perf_counter()
    failures: list[str] = []
    if args.paper:
        args.overhead_only = True
    if not args.overhead_only:
        for w in workloads:
            t0 = time.perf_counter()
            try:
                res = run_esd_benchmark(w, device, methods=methods, repeats=repeats,
                                        oracle=not args.no_oracle, ks=not args.no_ks,
                                        ks_reference_layers=ks_ref_layers,
                                        oracle_layers=oracle_layers)
            except Exception as e:  # noqa: BLE001 - report and go on with the other workloads
                failures.append(f"{w}: {type(e).__name__}: {e}")
                print(f"# {w}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                continue
            report["esd"].append(dataclasses.asdict(res))
            print(f"# {w}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        print()
        print(esd_tables(report["esd"], args.markdown))
        for r in report["esd"]:
            for note in r["notes"]:
                print(f"note: {r['workload']}: {note}")
        report["targets"] = target_checks(report["esd"], device.type)
        if report["targets"]:
            print("\nspeed targets, tbfast on roberta-base-shaped:")
            for t in report["targets"]:
                print(f"  {t['what']}: {t['value']:.4g} (target {t['op']} {t['target']:g}): "
                      f"{'met' if t['met'] else 'NOT met'}")
    if args.overhead or args.overhead_only:
        from .overhead import format_overhead, run_overhead
        model = args.overhead_model or ("roberta-base" if device.type == "cuda" else "bert-small")
        try:
            if args.paper:
                from .overhead import run_paper_overhead
                ov = run_paper_overhead(model=args.overhead_model, device=device)
            else:
                ov = run_overhead(model=model, device=device, steps=args.steps)
        except Exception as e:  # noqa: BLE001
            failures.append(f"overhead: {type(e).__name__}: {e}")
            print(f"# overhead: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        else:
            for r in ov["runs"].values():  # per-step lrs are long; keep the last one in the JSON
                r["final_lrs"] = r.pop("lr_history")[-1]
            report["overhead"] = ov
            print()
            print(format_overhead(ov, args.markdown))
    report["failures"] = failures
    report["total_seconds"] = time.perf_counter() - t_start
    print(f"\n# total {report['total_seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"# wrote {args.json}")
    return 1 if failures else 0
