#!/usr/bin/env bash
# One wheel for many torch versions: build tbfast's wheel ONCE under torch $BUILD_TORCH (default
# 2.13.0; the stable-ABI build, TBFAST_STABLE_ABI=1), install that same wheel into a fresh venv
# with torch $RUN_TORCH (default 2.14.1) and the [test] extras, and run the suite there with
# TBFAST_REQUIRE_EXTENSION=1 (from a test root without tbfast/, so the installed wheel is tested).
# Also lists the C++ symbols of libtorch/c10 that the compiled _C imports (the stable build must
# import none: only the C shim's aoti_torch_* / torch_* functions).
#
#   scripts/check_stable_abi.sh [RESULTS_FILE]
# Environment: PYTHON, BUILD_TORCH, RUN_TORCH, WORK; VENV_BUILD / VENV_RUN reuse existing venvs
# (with that torch already installed) instead of creating fresh ones.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/_install_lib.sh"
PY=${PYTHON:-python3}
BUILD_TORCH=${BUILD_TORCH:-2.13.0}
RUN_TORCH=${RUN_TORCH:-2.14.1}
WORK=${WORK:-$(mktemp -d /tmp/tbfast-stable-abi-XXXXXX)}
RESULTS=${1:-$WORK/check_stable_abi.txt}
mkdir -p "$WORK"
t0=$(date +%s)

VB=${VENV_BUILD:-$WORK/venv-build}
if [ -z "${VENV_BUILD:-}" ]; then
  tb_log "build venv with torch==$BUILD_TORCH"
  "$PY" -m venv "$VB"
  "$VB/bin/pip" install -q "torch==$BUILD_TORCH" "setuptools>=69" wheel ninja build
fi
rm -rf "$WORK/dist" "$WORK/wheels"
"$VB/bin/python" -m build --sdist --no-isolation --outdir "$WORK/dist" "$SRC" >"$WORK/sdist.log" 2>&1 \
  || { tail -n 30 "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/tbfast-*.tar.gz)
tb_log "wheel from the sdist under torch $("$VB/bin/python" -c 'import torch; print(torch.__version__)')"
TBFAST_STABLE_ABI=1 TBFAST_REQUIRE_EXTENSION=1 "$VB/bin/pip" wheel -q --no-build-isolation --no-deps \
  -w "$WORK/wheels" "$SDIST" >"$WORK/wheel.log" 2>&1 || { tail -n 60 "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/wheels/tbfast-*.whl)
tb_log "wheel: $(basename "$WHEEL")"
mkdir -p "$WORK/unpacked"
(cd "$WORK/unpacked" && "$VB/bin/python" -m zipfile -e "$WHEEL" .)
SO=$(ls "$WORK"/unpacked/tbfast/_C*.so)
cxx_syms=$(nm -D --undefined-only "$SO" | awk '{print $NF}' | c++filt | grep -cE '^(c10|at|torch|caffe2)::' || true)
shim_syms=$(nm -D --undefined-only "$SO" | awk '{print $NF}' | grep -cE '^(aoti_torch_|torch_)' || true)

VR=${VENV_RUN:-$WORK/venv-run}
echo "torch==$RUN_TORCH" >"$WORK/constraints.txt"
if [ -z "${VENV_RUN:-}" ]; then
  tb_log "run venv with torch==$RUN_TORCH and the [test] extras"
  "$PY" -m venv "$VR"
  "$VR/bin/pip" install -q "torch==$RUN_TORCH"
fi
"$VR/bin/pip" install -q --force-reinstall --no-deps "$WHEEL"
"$VR/bin/pip" install -q -c "$WORK/constraints.txt" "$WHEEL[test]" >"$WORK/pip-extras.log" 2>&1 \
  || tb_log "some [test] extras did not install (see $WORK/pip-extras.log)"
tb_testroot "$SRC" "$WORK/testroot"
tb_check_installed "$VR" "$WORK/testroot"
ext=$(cd "$WORK/testroot" && "$VR/bin/python" -c '
import json, torch, tbfast
e = tbfast.backend_info()["extension"]
print(json.dumps({"torch_running": torch.__version__, "loaded": e["loaded"], "path": e["path"], "build": e["build"]}))')
tb_log "suite under torch $RUN_TORCH with TBFAST_REQUIRE_EXTENSION=1"
set +e
(cd "$WORK/testroot" && TBFAST_REQUIRE_EXTENSION=1 timeout 3600 "$VR/bin/python" -m pytest -q -p no:cacheprovider -rs \
   tests --ignore=tests/test_structure.py) >"$WORK/pytest.log" 2>&1
rc=$?
set -e
tail -n 5 "$WORK/pytest.log"

tb_header "$RESULTS"
{
  echo "script: scripts/check_stable_abi.sh (one stable-ABI wheel built under torch $BUILD_TORCH, tested under torch $RUN_TORCH)"
  echo "build venv: $("$VB/bin/python" -V 2>&1), torch $("$VB/bin/python" -c 'import torch; print(torch.__version__)')$([ -n "${VENV_BUILD:-}" ] && echo ' (reused venv)')"
  echo "wheel: $(basename "$WHEEL")"
  echo "libtorch/c10 C++ symbols imported by $(basename "$SO"): $cxx_syms; C shim functions (aoti_torch_*, torch_*): $shim_syms"
  echo "run venv: $("$VR/bin/python" -V 2>&1), torch $("$VR/bin/python" -c 'import torch; print(torch.__version__)')$([ -n "${VENV_RUN:-}" ] && echo ' (reused venv)')"
  echo "extension as loaded there: $ext"
  echo "suite (tests/ minus test_structure.py, TBFAST_REQUIRE_EXTENSION=1): $(tb_pytest_summary "$WORK/pytest.log") (exit $rc)"
  echo "total wall time: $(( $(date +%s) - t0 )) s"
} >>"$RESULTS"
cat "$RESULTS"
exit $rc
