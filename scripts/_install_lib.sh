# Shared helpers of scripts/check_sdist.sh, check_no_compiler.sh and torch_matrix.sh (sourced).
# They test an INSTALLED tbfast: the tests run from a scratch "test root" that holds copies of
# tests/, README.md, csrc/ (read by a test), examples/ and pyproject.toml but no tbfast/ package,
# so `import tbfast` resolves to the venv's site-packages, never to the source tree.

# the commit checked out when the script started (the code its sdist/wheel is built from)
TB_GIT_START=$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null)$(git -C "$SRC" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')

tb_log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# tb_header FILE: device, date, python of the run, written at the top of a results file.
tb_header() {
  {
    echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M')"
    echo "device: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //'), shared with other jobs (timings are wall time on a busy machine)"
    echo "os: $(uname -sr)"
    echo "git (when the script started): $TB_GIT_START"
  } >"$1"
}

# tb_testroot SRC DEST: the scratch test root (no tbfast/ inside).
tb_testroot() {
  local src=$1 dest=$2
  rm -rf "$dest"
  mkdir -p "$dest"
  cp -r "$src/tests" "$src/csrc" "$src/examples" "$src/docs" "$dest/"  # docs/: tests compare documented behaviour
  cp "$src/README.md" "$src/pyproject.toml" "$dest/"
  rm -rf "$dest/tests/__pycache__"
}

# tb_check_installed VENV DEST: fail unless tbfast, imported from DEST, lives in the venv.
tb_check_installed() {
  local venv=$1 dest=$2 where
  where=$(cd "$dest" && "$venv/bin/python" -c 'import tbfast; print(tbfast.__file__)')
  case "$where" in
    "$venv"/*site-packages/tbfast/__init__.py) tb_log "tbfast resolves to $where" ;;
    *) tb_log "tbfast resolves to $where, not to $venv's site-packages"; return 1 ;;
  esac
}

# tb_pytest_summary LOG: pytest's closing counts ("649 passed, 42 skipped in 167.2s").
tb_pytest_summary() {
  grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$1" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//'
}
