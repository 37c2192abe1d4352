#!/usr/bin/env bash
# One-shot GPU check for tbfast, run from a fresh checkout on a CUDA machine:
#
#     bash scripts/device_check.sh [OUTDIR]        # OUTDIR defaults to $OUT, else ./out
#
# Builds the extension in place, reports the backends, runs the CUDA and Triton tests (junit
# xml), the ESD benchmark and an eigensolver timing (torch.linalg.eigvalsh vs tbfast's cuSOLVER
# batched path) and the TempBalance overhead benchmarks (paper setting, every step), all within
# about 9 minutes: every step has its own time limit and the whole
# run a deadline, and a failing step never stops the next one. Writes at most these files:
#   device_check.log  junit_gpu.xml  eig_gpu.json  bench_gpu.json  paper_gpu.json  overhead_gpu.json
#   dist_gpu.json (+ dist_rank*.json)  summary.json
# Knobs: TBFAST_CHECK_BUDGET (s), TBFAST_CHECK_BENCH_ARGS (extra `tbfast bench` flags),
# TBFAST_CHECK_BENCH_LIMIT (s), TBFAST_CHECK_EIG_SIZES ("72x768,16x1536").
# TBFAST_CHECK_SKIP_BUILD=1 reuses an extension already built in tbfast/ (a rerun on a warm machine).
set -u

START=$(date +%s)
TOTAL_BUDGET=${TBFAST_CHECK_BUDGET:-540}   # seconds for all steps together
DEADLINE=$((START + TOTAL_BUDGET))

OUTDIR=${1:-${OUT:-./out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
LOG="$OUTDIR/device_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-python}

STEPS=()

# run_step NAME LIMIT_SECONDS CMD...: runs CMD under `timeout`, capped by the global deadline.
run_step() {
  local name=$1 limit=$2
  shift 2
  local now remaining t0 rc
  now=$(date +%s)
  remaining=$((DEADLINE - now - 5))
  if [ "$remaining" -lt 10 ]; then
    echo "=== [$name] SKIPPED: global time budget used up"
    STEPS+=("$name skipped 0")
    return 0
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo
  echo "=== [$name] (limit ${limit}s) $(date -u +%H:%M:%S)"
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then
    timeout -k 10 "$limit" bash -c "$1"     # a function of this script (exported below)
  else
    timeout -k 10 "$limit" "$@"
  fi
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  [ "$rc" -eq 124 ] && echo "=== [$name] TIMED OUT after ${limit}s"
  echo "=== [$name] rc=$rc in ${dt}s"
  STEPS+=("$name $rc $dt")
  return 0
}

env_info() {
  nvidia-smi || echo "nvidia-smi not available"
  echo "--- versions"
  $PY - <<'EOF'
import platform, sys
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton not importable:", exc)
EOF
  (command -v nvcc >/dev/null && nvcc --version) || (/usr/local/cuda/bin/nvcc --version 2>/dev/null) || echo "nvcc not found"
  command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja not found: the extension builds serially"
  echo "cores: $(nproc)"
}

build() {
  if [ "${TBFAST_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    echo "TBFAST_CHECK_SKIP_BUILD=1: using the extension already built in tbfast/"
    ls tbfast/_C*.so
    return
  fi
  $PY setup.py build_ext --inplace
}

report_backends() {
  # backend_info() must not create a CUDA context (no probe eigensolve, no device name query)
  $PY -X faulthandler -c "import tbfast, json, torch; print(json.dumps(tbfast.backend_info(), indent=1, default=str)); print('CUDA initialised by backend_info:', torch.cuda.is_initialized())"
  $PY - <<'EOF'
import logging
logging.basicConfig(level=logging.INFO)
from tbfast.ops import cusolver
st = cusolver.cusolver_status()
print("cusolver_status:", st)
if st["loaded"]:
    import torch
    for n in (256, 768, 2048):
        d, h = torch.ops.tbfast_testing.cusolver_syev_batched_workspace(n, 1, torch.float32, 0)
        print(f"  XsyevBatched workspace per fp32 matrix n={n}: device {d} B, host {h} B")
EOF
}

eig_timing() {
  $PY - "$OUTDIR/eig_gpu.json" <<'EOF'
"""torch.linalg.eigvalsh vs tbfast's cuSOLVER batched path on fp32 heavy-tailed Grams."""
import json, os, statistics, sys, time
import torch
from tbfast.ops import cusolver
from tbfast.ops import eig as eig_ops

out_path = sys.argv[1]
dev = torch.device("cuda")
st = cusolver.cusolver_status()
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "cuda": torch.version.cuda, "cusolver": {k: st[k] for k in ("loaded", "path", "version", "reason")},
          "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "rows": []}

def timed(fn, reps):
    fn(); torch.cuda.synchronize()                     # warm-up
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

gen = torch.Generator(device=dev).manual_seed(0)
SIZES = [(72, 768), (72, 256), (37, 384), (96, 128), (1, 768), (16, 1536), (8, 2048), (4, 4096)]
if os.environ.get("TBFAST_CHECK_EIG_SIZES"):  # e.g. "72x768,72x256"
    SIZES = [tuple(int(v) for v in s.split("x")) for s in os.environ["TBFAST_CHECK_EIG_SIZES"].split(",")]
for B, n in SIZES:
    z = torch.randn(B, n, n, device=dev, generator=gen)
    chi2 = torch.randn(B, n, n, 3, device=dev, generator=gen).square().sum(-1)
    W = z / torch.sqrt(chi2 / 3)                       # Student-t (df=3) weights
    G = (W.transpose(1, 2) @ W / n).contiguous()      # fp32 Gram
    del z, chi2, W
    reps = 3 if n < 2048 else 2
    row = {"B": B, "n": n, "dtype": "float32",
           "torch_eigvalsh_s": timed(lambda: torch.linalg.eigvalsh(G), reps)}
    if st["loaded"]:
        row["cusolver_op_s"] = timed(lambda: torch.ops.tbfast.cusolver_eigvalsh(G, 0), reps)
        # the Python entry forced onto cuSOLVER (with the retry check: one host sync)
        row["tbfast_eigvalsh_batched_cuda_s"] = timed(lambda: eig_ops.eigvalsh_batched(G, backend="cusolver"), reps)
        row["speedup_vs_torch"] = row["torch_eigvalsh_s"] / row["tbfast_eigvalsh_batched_cuda_s"]
        w_t = torch.linalg.eigvalsh(G)
        w_c, info = torch.ops.tbfast.cusolver_eigvalsh(G, 0)
        lmax = w_t.abs().amax(1, keepdim=True)
        row["nonconverged"] = int((info != 0).sum())
        row["max_diff_vs_torch_rel_lmax"] = float(((w_c - w_t).abs() / lmax).max())
        if n <= 1536:
            w64 = torch.linalg.eigvalsh(G.double())
            row["max_err_vs_fp64_rel_lmax"] = {
                "cusolver": float(((w_c.double() - w64).abs() / lmax.double()).max()),
                "torch_fp32": float(((w_t.double() - w64).abs() / lmax.double()).max())}
        d, h = torch.ops.tbfast_testing.cusolver_syev_batched_workspace(n, B, torch.float32, 0)
        row["workspace_device_bytes"], row["workspace_host_bytes"] = d, h
    print(json.dumps(row), flush=True)
    report["rows"].append(row)
    del G
    torch.cuda.empty_cache()
    with open(out_path, "w") as f:                   # rewritten after every size: a timeout keeps the rest
        json.dump(report, f, indent=1)
print("wrote", out_path)
EOF
}

bench() {
  if $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tbfast.bench.__main__') is None)" 2>/dev/null; then
    # shellcheck disable=SC2086
    $PY -m tbfast.bench --device cuda --json "$OUTDIR/bench_gpu.json" --markdown ${TBFAST_CHECK_BENCH_ARGS:-}
  else
    echo "tbfast.bench has no __main__ (python -m tbfast.bench missing); benchmark skipped"
    return 3
  fi
}

export PY OUTDIR
export -f env_info build report_backends eig_timing bench

echo "tbfast device check: repo $REPO, output $OUTDIR, budget ${TOTAL_BUDGET}s, $(date -u)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"

run_step env 30 env_info
run_step build 200 build
run_step backends 60 report_backends
# one pytest process: the CUDA-marked tests (cuSOLVER, whole GPU pipeline, TF32 / autocast independence of
# the ESD: test_global_state), the Triton kernels and the weight_digest torch reference on the GPU
run_step gpu_tests 150 $PY -m pytest tests/test_cuda.py tests/test_ops_eig.py tests/test_ops.py tests/test_gpu_pipeline.py tests/test_triton_kernels.py \
  tests/test_async.py::test_cuda_async_step_makes_no_host_sync tests/test_global_state.py \
  tests/test_ops_digest.py::test_cuda_weight_is_digested_on_the_gpu -q -rs \
  --junitxml="$OUTDIR/junit_gpu.xml" -p no:cacheprovider
run_step bench ${TBFAST_CHECK_BENCH_LIMIT:-120} bench
run_step eig_timing 60 eig_timing
# TempBalance's share of training time: the paper's setting (calibrated) and the ESD-every-step one,
# with the synchronous and asynchronous tbfast rows
run_step paper ${TBFAST_CHECK_PAPER_LIMIT:-100} $PY -m tbfast.bench --paper --device cuda --markdown \
  --json "$OUTDIR/paper_gpu.json"
run_step overhead ${TBFAST_CHECK_OVERHEAD_LIMIT:-100} $PY -m tbfast.bench --overhead-only --device cuda --markdown \
  --json "$OUTDIR/overhead_gpu.json"
# distributed path on the GPU: 2 NCCL ranks (>= 2 GPUs, with FSDP2 TempBalance) or 2 gloo ranks on cuda:0
run_step dist 60 $PY scripts/dist_check.py "$OUTDIR"

echo
echo "=================== SUMMARY ($(( $(date +%s) - START ))s) ==================="
printf '%-14s %-8s %s\n' step rc seconds
for s in "${STEPS[@]}"; do
  # shellcheck disable=SC2086
  printf '%-14s %-8s %s\n' $s
done
$PY - "$OUTDIR" "${STEPS[@]}" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
outdir, steps = sys.argv[1], [s.split() for s in sys.argv[2:]]
summary = {"steps": [{"step": s[0], "rc": s[1], "seconds": int(s[2])} for s in steps], "junit": {}}
for name in ("junit_gpu.xml",):
    path = os.path.join(outdir, name)
    if not os.path.exists(path):
        print(f"{name}: missing"); continue
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    summary["junit"][name] = counts
    print(f"{name}: {counts}")
    for s in suites:
        for case in s.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                print(f"  FAILED {case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:200]}")
eig = os.path.join(outdir, "eig_gpu.json")
if os.path.exists(eig):
    for r in json.load(open(eig))["rows"]:
        print(f"  eig B={r['B']:>3} n={r['n']:>4}: torch {r['torch_eigvalsh_s']:.4f}s"
              + (f", tbfast {r['tbfast_eigvalsh_batched_cuda_s']:.4f}s (x{r['speedup_vs_torch']:.1f})"
                 if "tbfast_eigvalsh_batched_cuda_s" in r else ""))
json.dump(summary, open(os.path.join(outdir, "summary.json"), "w"), indent=1)
EOF
echo "log: $LOG"
sleep 1  # let tee flush the log
