#!/usr/bin/env bash
# Install without a C++ compiler: the install must succeed with a warning, `tbfast info` must say
# why the compiled paths are missing, the suite must pass without TBFAST_REQUIRE_EXTENSION, and
# TBFAST_REQUIRE_EXTENSION=1 must make it fail.
#
#   scripts/check_no_compiler.sh [RESULTS_FILE]
#
# The compiler is made unavailable with CC=/bin/false CXX=/bin/false and a PATH of links to every
# program in /usr/local/bin, /usr/bin and /bin EXCEPT the C/C++ compilers (gcc, g++, cc, c++,
# clang*, *-gcc*, *-g++*). tbfast is installed from its sdist (a fresh unpack) into a fresh venv
# with torch ($TORCH_SPEC, default torch==2.13.0) and the [test] extras; the tests run from a
# test root without tbfast/, so the installed package is what they import.
# Environment: PYTHON (default python3), TORCH_SPEC, WORK (scratch dir, default a new /tmp dir).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/_install_lib.sh"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=${WORK:-$(mktemp -d /tmp/tbfast-no-compiler-XXXXXX)}
RESULTS=${1:-$WORK/check_no_compiler.txt}
mkdir -p "$WORK"
VENV=$WORK/venv
t0=$(date +%s)

tb_log "venv $VENV with $TORCH_SPEC"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH_SPEC" "setuptools>=69" wheel ninja build
"$VENV/bin/python" -m build --sdist --no-isolation --outdir "$WORK/dist" "$SRC" >"$WORK/sdist.log" 2>&1 \
  || { tail -n 30 "$WORK/sdist.log"; exit 1; }
SDIST=$(ls -t "$WORK"/dist/tbfast-*.tar.gz | head -n 1)

# PATH without any C/C++ compiler
NOCC=$WORK/nocc-bin
rm -rf "$NOCC"
mkdir -p "$NOCC"
for d in /usr/local/bin /usr/bin /bin; do
  for f in "$d"/*; do
    n=$(basename "$f")
    case "$n" in
      gcc*|g++*|cc|c++|cpp|cpp-*|clang*|*-gcc|*-gcc-*|*-g++|*-g++-*|*-c++|*-cc|tcc|icx|icpx|nvcc) continue ;;
    esac
    [ -e "$NOCC/$n" ] || ln -s "$f" "$NOCC/$n"
  done
done
NOCC_PATH="$VENV/bin:$NOCC"
if PATH=$NOCC_PATH command -v gcc g++ c++ cc >/dev/null 2>&1; then tb_log "a compiler is still on PATH"; exit 1; fi

tb_log "pip install (no compiler) of $(basename "$SDIST")"
set +e
env PATH="$NOCC_PATH" CC=/bin/false CXX=/bin/false "$VENV/bin/pip" install --no-build-isolation -v "$SDIST[test]" \
  >"$WORK/install.log" 2>&1
install_rc=$?
set -e
[ "$install_rc" = 0 ] || { tail -n 60 "$WORK/install.log"; tb_log "install failed"; exit 1; }
warning=$(grep -m1 -A1 "tbfast WARNING" "$WORK/install.log" | tr -s ' ' | head -c 600 || true)

tb_testroot "$SRC" "$WORK/testroot"
tb_check_installed "$VENV" "$WORK/testroot"
(cd "$WORK/testroot" && "$VENV/bin/tbfast" info) >"$WORK/info.json"
ext=$("$VENV/bin/python" -c '
import json, sys
e = json.load(open(sys.argv[1]))["extension"]
print(json.dumps({"loaded": e["loaded"], "reason": e["reason"], "build_status": e["build_status"]}))' "$WORK/info.json")
loaded=$("$VENV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["extension"]["loaded"])' "$WORK/info.json")
[ "$loaded" = False ] || { tb_log "the extension loaded: the compiler was not really unavailable"; exit 1; }

tb_log "suite without TBFAST_REQUIRE_EXTENSION"
set +e
(cd "$WORK/testroot" && env -u TBFAST_REQUIRE_EXTENSION timeout 3600 "$VENV/bin/python" -m pytest -q \
   -p no:cacheprovider tests --ignore=tests/test_structure.py) >"$WORK/pytest.log" 2>&1
rc=$?
tb_log "TBFAST_REQUIRE_EXTENSION=1 must fail"
(cd "$WORK/testroot" && TBFAST_REQUIRE_EXTENSION=1 timeout 900 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
   tests/test_backend.py) >"$WORK/pytest-require.log" 2>&1
rc_req=$?
set -e
tail -n 5 "$WORK/pytest.log"

tb_header "$RESULTS"
{
  echo "script: scripts/check_no_compiler.sh (install with no C/C++ compiler, then the suite)"
  echo "python: $("$VENV/bin/python" -V 2>&1); torch: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  echo "compiler made unavailable: CC=/bin/false CXX=/bin/false, PATH without gcc/g++/cc/c++/clang"
  echo "pip install --no-build-isolation $(basename "$SDIST")[test]: exit $install_rc"
  echo "install warning (stderr): $warning"
  echo "tbfast info -> extension: $ext"
  echo "suite (tests/ minus test_structure.py, no TBFAST_REQUIRE_EXTENSION): $(tb_pytest_summary "$WORK/pytest.log") (exit $rc)"
  echo "TBFAST_REQUIRE_EXTENSION=1 pytest tests/test_backend.py: $(tb_pytest_summary "$WORK/pytest-require.log") (exit $rc_req; must be non-zero)"
  grep -E "^FAILED" "$WORK/pytest-require.log" | sed 's/^/  /' || true
  echo "total wall time: $(( $(date +%s) - t0 )) s"
} >>"$RESULTS"
cat "$RESULTS"
[ "$rc" = 0 ] && [ "$rc_req" != 0 ]
