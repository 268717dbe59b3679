#!/usr/bin/env bash
# Checks that the C++ and CUDA sources (cpp/, cuda/) are formatted as .clang-format says; exits non-zero and
# lists the offending lines otherwise.  Usage: scripts/check-format.sh [--fix]   (--fix rewrites the files).
# clang-format is pinned to one major version, since versions differ in their output: a clang-format on PATH
# is used when it is that version, else the one in the venv (the PyPI wheel `clang-format`), installed there
# on first use.  Venv: $PYTHON's (default .venv/bin/python, as made by scripts/setup.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
major=23
pin="clang-format==23.1.5"

is_pinned() { "$1" --version 2>/dev/null | grep -q "clang-format version $major\."; }

cf=""
if command -v clang-format >/dev/null && is_pinned clang-format; then
  cf=clang-format
else
  venv_py=${PYTHON:-$root/.venv/bin/python}
  [ -x "$venv_py" ] || { echo "check-format: no clang-format $major on PATH and no venv at $venv_py: run scripts/setup.sh or set PYTHON" >&2; exit 2; }
  bin=$("$venv_py" -c "import sysconfig; print(sysconfig.get_paths()['scripts'])")
  if ! is_pinned "$bin/clang-format"; then
    echo "check-format: installing $pin into $("$venv_py" -c 'import sys; print(sys.prefix)')" >&2
    "$venv_py" -m pip install -q "$pin"
  fi
  cf=$bin/clang-format
fi

cd "$root"
mapfile -t files < <(git ls-files -- 'cpp/*.h' 'cpp/*.cpp' 'cuda/*.h' 'cuda/*.cuh' 'cuda/*.cu')
[ ${#files[@]} -gt 0 ] || { echo "check-format: no sources found under cpp/ or cuda/" >&2; exit 2; }
if [ "${1:-}" = "--fix" ]; then
  "$cf" -i "${files[@]}"
  echo "check-format: formatted ${#files[@]} files with $("$cf" --version)"
else
  "$cf" --dry-run --Werror "${files[@]}"
  echo "check-format: ${#files[@]} files formatted as .clang-format says ($("$cf" --version))"
fi
