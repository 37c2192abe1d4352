#!/usr/bin/env bash
# sdist -> wheel -> install -> tests, the way a user installs tbfast from a source release.
#
#   scripts/check_sdist.sh [RESULTS_FILE]
#
# 1. builds the sdist from this checkout (python -m build --sdist --no-isolation);
# 2. checks that it carries every tracked csrc/ file (headers included);
# 3. in a fresh venv with torch ($TORCH_SPEC, default torch==2.13.0) builds a wheel FROM THE SDIST
#    (pip wheel --no-build-isolation, TBFAST_REQUIRE_EXTENSION=1: the C++ build must succeed),
#    installs it and runs a subset of the tests against the installed package (from a test root
#    without tbfast/, so tbfast resolves to site-packages) with TBFAST_REQUIRE_EXTENSION=1.
# Environment: PYTHON (default python3), TORCH_SPEC, WORK (scratch dir, default a new /tmp dir).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/_install_lib.sh"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=${WORK:-$(mktemp -d /tmp/tbfast-check-sdist-XXXXXX)}
RESULTS=${1:-$WORK/check_sdist.txt}
mkdir -p "$WORK"
TESTS=(tests/test_backend.py tests/test_ops.py tests/test_ops_eig.py tests/test_cpu_kernels.py
       tests/test_metrics.py tests/test_packaging.py)
VENV=$WORK/venv
t0=$(date +%s)

if [ -x "$VENV/bin/python" ]; then
  tb_log "reusing venv $VENV (WORK already holds one)"
else
  tb_log "venv $VENV with $TORCH_SPEC"
  "$PY" -m venv "$VENV"
fi
# test dependencies of the subset: pandas (metrics tables), triton (CPU interpreter of the Triton kernels)
"$VENV/bin/pip" install -q "$TORCH_SPEC" "setuptools>=69" wheel ninja build pytest numpy scipy hypothesis pandas triton

tb_log "sdist"
rm -rf "$WORK/dist" "$WORK/wheels"
"$VENV/bin/python" -m build --sdist --no-isolation --outdir "$WORK/dist" "$SRC" >"$WORK/sdist.log" 2>&1 \
  || { tail -n 40 "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/tbfast-*.tar.gz)
tar tzf "$SDIST" >"$WORK/sdist-files.txt"
missing=0
for f in $(git -C "$SRC" ls-files csrc); do
  grep -q "/$f\$" "$WORK/sdist-files.txt" || { tb_log "sdist lacks $f"; missing=1; }
done
[ "$missing" = 0 ] || exit 1
tb_log "sdist $(basename "$SDIST") carries all $(git -C "$SRC" ls-files csrc | wc -l) csrc files"

tb_log "wheel from the sdist (fresh unpack, no build isolation, extension required)"
tw=$(date +%s)
TBFAST_REQUIRE_EXTENSION=1 "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps -w "$WORK/wheels" "$SDIST" \
  >"$WORK/wheel.log" 2>&1 || { tail -n 60 "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/wheels/tbfast-*.whl)
build_s=$(( $(date +%s) - tw ))
"$VENV/bin/pip" install -q --force-reinstall --no-deps "$WHEEL"

tb_testroot "$SRC" "$WORK/testroot"
tb_check_installed "$VENV" "$WORK/testroot"
tb_log "tests: ${TESTS[*]}"
set +e
(cd "$WORK/testroot" && TBFAST_REQUIRE_EXTENSION=1 timeout 1800 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
   "${TESTS[@]}") >"$WORK/pytest.log" 2>&1
rc=$?
set -e
tail -n 15 "$WORK/pytest.log"

tb_header "$RESULTS"
{
  echo "script: scripts/check_sdist.sh (sdist -> wheel -> install -> tests against site-packages)"
  echo "python: $("$VENV/bin/python" -V 2>&1)"
  echo "torch: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  echo "sdist: $(basename "$SDIST") ($(grep -c '/csrc/.' "$WORK/sdist-files.txt") csrc files, headers included)"
  echo "wheel: $(basename "$WHEEL"), built from the sdist in ${build_s} s"
  echo "installed at: $(cd "$WORK/testroot" && "$VENV/bin/python" -c 'import tbfast; print(tbfast.__file__)')"
  echo "extension: $(cd "$WORK/testroot" && "$VENV/bin/python" -c 'import json, tbfast; e = tbfast.backend_info()["extension"]; print(json.dumps({"loaded": e["loaded"], "build": e["build"]}))')"
  echo "tests (TBFAST_REQUIRE_EXTENSION=1): ${TESTS[*]}"
  echo "pytest: $(tb_pytest_summary "$WORK/pytest.log") (exit $rc)"
  echo "total wall time: $(( $(date +%s) - t0 )) s"
} >>"$RESULTS"
cat "$RESULTS"
exit $rc
