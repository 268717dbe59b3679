#!/usr/bin/env bash
# The project's static checks, as CI runs them (and .pre-commit-config.yaml before each commit):
#   ruff (lint + import order; rules in pyproject.toml), mypy (the package; strict modules listed in
#   pyproject.toml), the stub check of the compiled module kernelatlas._core against _core.pyi, and
#   clang-format over cpp/ and cuda/.
# Usage: scripts/lint.sh   (uses ./.venv, or $PYTHON; `pip install -e .[test,lint]` provides the tools)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
cd "$root"
status=0
step() { echo "lint: $*" >&2; "$@" || status=1; }
step "$py" -m ruff check python tests benchmarks scripts
step "$py" -m mypy
step env PYTHON="$py" bash scripts/check-stubs.sh
step env PYTHON="$py" bash scripts/check-format.sh
[ "$status" = 0 ] && echo "lint: all checks passed" >&2
exit "$status"
