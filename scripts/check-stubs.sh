#!/usr/bin/env bash
# Checks the shipped stub of the native module (python/kernelatlas/_core.pyi) against the module itself with
# mypy's stubtest: every function, class, argument name, default and keyword-only marker the binding exports
# must be in the stub and vice versa.  Usage: scripts/check-stubs.sh [stubtest args]
# Needs: a venv with kernelatlas installed (editable or not) and mypy (the `lint` extra); $PYTHON picks the
# interpreter (default .venv/bin/python, as made by scripts/setup.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || { echo "check-stubs: no Python at $py: run scripts/setup.sh or set PYTHON" >&2; exit 2; }
"$py" -c "import mypy" 2>/dev/null || { echo "check-stubs: mypy is missing: pip install -e '.[lint]'" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Only the stub is under test: errors in modules mypy follows from it (the package's own typing) are silenced.
printf '[mypy]\nfollow_imports = silent\n' >"$tmp/mypy.ini"
# pybind11 classes have the metaclass pybind11_builtins.pybind11_type, which has no importable name a stub
# could spell; their methods and properties are still checked one by one.
printf '%s\n' 'kernelatlas._core.AutoencoderEngine' 'kernelatlas._core.PrototypeEngine' >"$tmp/allowlist"
# the stub is read from the source tree (MYPYPATH), the module imported from wherever it is installed
cd "$root"
MYPYPATH="$root/python" "$py" -m mypy.stubtest kernelatlas._core --mypy-config-file "$tmp/mypy.ini" \
  --allowlist "$tmp/allowlist" "$@"
echo "check-stubs: python/kernelatlas/_core.pyi matches kernelatlas._core"
