#!/usr/bin/env bash
# Build and test tbfast on several torch versions, each in a fresh venv (NOT run in CI: every
# torch is a download of up to several GB, and each build compiles the extension).
#
#   scripts/torch_matrix.sh [TORCH_VERSION ...]        (default: 2.4.1 2.14.1, the floor and the newest)
#
# Per version: a fresh venv with torch==V (pinned by a constraint file so no extra can move it),
# the sdist of this checkout built into a wheel there (--no-build-isolation), installed with the
# [test] extras, then the whole suite (minus tests/test_structure.py, a lint of the source tree)
# from a test root without tbfast/, so the INSTALLED package is tested; TBFAST_REQUIRE_EXTENSION=1
# when the extension built. Appends one Markdown table row per version to $RESULTS
# (default $MATRIX_DIR/torch_matrix.md) and keeps every log under $MATRIX_DIR/torch-V/.
# Environment: PYTHON (default python3), MATRIX_DIR (default /tmp/tbfast-torch-matrix);
# for a quicker run: MATRIX_TESTS (pytest arguments instead of the whole suite), MATRIX_EXTRAS=""
# (install pytest + hypothesis instead of the [test] extras), VENV_REUSE (reuse a venv that already
# holds torch==V, one version only; the row then says so). Below torch 2.6 the constraints also
# pin transformers<5 (transformers 5 needs torch >= 2.6); the row says so.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/scripts/_install_lib.sh"
PY=${PYTHON:-python3}
MATRIX_DIR=${MATRIX_DIR:-/tmp/tbfast-torch-matrix}
RESULTS=${RESULTS:-$MATRIX_DIR/torch_matrix.md}
[ $# -gt 0 ] || set -- 2.4.1 2.14.1
mkdir -p "$MATRIX_DIR"

if [ ! -f "$RESULTS" ]; then
  tb_header "$RESULTS"
  {
    echo
    echo "| torch | python | extension built | extension loaded | passed | failed | skipped | errors | suite time | notes |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  } >>"$RESULTS"
fi

tb_log "sdist of $SRC"
rm -rf "$MATRIX_DIR/dist"
[ -x "$MATRIX_DIR/tools/bin/python" ] || { "$PY" -m venv "$MATRIX_DIR/tools" &&
  "$MATRIX_DIR/tools/bin/pip" install -q build "setuptools>=69" wheel; }
# (torch is not needed for an sdist: setup.py then only warns that it would skip the extension)
"$MATRIX_DIR/tools/bin/python" -m build --sdist --no-isolation --skip-dependency-check --outdir "$MATRIX_DIR/dist" "$SRC" >"$MATRIX_DIR/sdist.log" 2>&1 \
  || { tail -n 30 "$MATRIX_DIR/sdist.log"; exit 1; }
SDIST=$(ls "$MATRIX_DIR"/dist/tbfast-*.tar.gz)

for V in "$@"; do
  D=$MATRIX_DIR/torch-$V
  rm -rf "$D"
  mkdir -p "$D"
  notes=""
  if [ -n "${VENV_REUSE:-}" ]; then
    VENV=$VENV_REUSE
    notes="reused venv;"
  else
    VENV=$D/venv
    tb_log "torch $V: venv"
    "$PY" -m venv "$VENV"
  fi
  echo "torch==$V" >"$D/constraints.txt"
  if ! "$VENV/bin/pip" install --progress-bar off "torch==$V" "setuptools>=69" wheel ninja >"$D/pip-torch.log" 2>&1; then
    echo "| $V | $("$VENV/bin/python" -V | cut -d' ' -f2) | - | - | - | - | - | - | - | torch==$V could not be installed (see pip-torch.log) |" >>"$RESULTS"
    continue
  fi
  # transformers 5 turns its torch support off below torch 2.6 ("PyTorch >= 2.6 is required"), and
  # pip would pick it for the [test] extras: constrain it to 4.x there (INSTALL.md says the same)
  if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6))'; then
    echo "transformers<5" >>"$D/constraints.txt"
    notes="$notes transformers<5 (torch < 2.6);"
  fi
  tb_log "torch $V: build the sdist into a wheel and install it with [test] (constraints: $(tr '\n' ' ' <"$D/constraints.txt"))"
  tw=$(date +%s)
  EXTRAS=${MATRIX_EXTRAS-test}
  if [ -z "$EXTRAS" ]; then
    notes="$notes tests: ${MATRIX_TESTS:-all};"
    "$VENV/bin/pip" install --progress-bar off -c "$D/constraints.txt" pytest hypothesis >"$D/pip-install.log" 2>&1
    EXTRAS_SPEC=""
  else
    EXTRAS_SPEC="[$EXTRAS]"
  fi
  if ! "$VENV/bin/pip" install --progress-bar off --no-build-isolation -c "$D/constraints.txt" "$SDIST$EXTRAS_SPEC" \
       >>"$D/pip-install.log" 2>&1; then
    # an extra that cannot resolve with this torch: install tbfast alone, then the test extras one by one
    notes="[test] did not resolve as a whole;"
    "$VENV/bin/pip" install --progress-bar off --no-build-isolation -c "$D/constraints.txt" "$SDIST" \
      >>"$D/pip-install.log" 2>&1
    for dep in $("$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for r in md.requires("tbfast") or []:
    if "extra ==" in r and "test" in r.split("extra ==")[1]:
        print(r.split(";")[0].strip().replace(" ", ""))
PY
    ); do
      "$VENV/bin/pip" install --progress-bar off -c "$D/constraints.txt" "$dep" >>"$D/pip-install.log" 2>&1 \
        || notes="$notes not installed: $dep;"
    done
  fi
  install_s=$(( $(date +%s) - tw ))
  tb_testroot "$SRC" "$D/testroot"
  tb_check_installed "$VENV" "$D/testroot"
  status=$(cd "$D/testroot" && "$VENV/bin/python" -c '
import json, tbfast
e = tbfast.backend_info()["extension"]
s = e.get("build_status") or {}
print(s.get("extension", "?"), "yes" if e["loaded"] else "no")')
  built=${status% *}
  loaded=${status#* }
  req=""
  [ "$built" = built ] && req=1
  tb_log "torch $V: extension $built, loaded $loaded; running the suite"
  ts=$(date +%s)
  set +e
  (cd "$D/testroot" && TBFAST_REQUIRE_EXTENSION=$req timeout 3600 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
     -rs ${MATRIX_TESTS:-tests --ignore=tests/test_structure.py}) >"$D/pytest.log" 2>&1
  rc=$?
  set -e
  suite_s=$(( $(date +%s) - ts ))
  summary=$(tb_pytest_summary "$D/pytest.log")
  count() { echo "$summary" | grep -oE "[0-9]+ $1" | cut -d' ' -f1 || true; }
  p=$(count passed); f=$(count failed); s=$(count skipped); e=$(count error)
  tv=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
  echo "| $tv | $("$VENV/bin/python" -V | cut -d' ' -f2) | $built (install ${install_s} s) | $loaded | ${p:-0} | ${f:-0} | ${s:-0} | ${e:-0} | ${suite_s} s | pytest exit $rc; ${notes} |" >>"$RESULTS"
  tb_log "torch $V: $summary (exit $rc)"
done
cat "$RESULTS"
