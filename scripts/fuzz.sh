#!/usr/bin/env bash
# The long fuzzing run over every checkpoint loader (docs/security-fuzz.md): random recipes -- real checkpoints
# from ../shared/weights and generated files, mutated (bit flips, truncation, size lies, structure-aware
# rewrites) -- run in worker processes with an address-space limit and a time limit, through load_file +
# kernels(), extract and the CNN Filter DB readers.  Every input that ends in a signal, a hang, a
# MemoryError / resident-memory blow-up or an uncaught exception is saved (all its files, its recipe and the
# traceback) in a folder named below; `python tests/fuzzing.py replay FOLDER` reruns one.
# Usage: scripts/fuzz.sh [SECONDS] [extra args of `tests/fuzzing.py run`, e.g. --families onnx,tflite --seed 7]
#   SECONDS: how long to fuzz (default 600).  Findings go to $KERNELATLAS_FUZZ_OUT or
#   ${TMPDIR:-/tmp}/kernelatlas-fuzz-<date>-<time>.  Exit status 1 when an input matched no known finding
#   (tests/fuzzing.py KNOWN lists the ones already reported).
#   With atheris installed (pip install atheris; Python 3.11 wheels exist), KERNELATLAS_FUZZ_ENGINE=atheris
#   runs its coverage-guided engine on each single-file format instead, SECONDS split between them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
seconds=${1:-600}
shift || true
out=${KERNELATLAS_FUZZ_OUT:-${TMPDIR:-/tmp}/kernelatlas-fuzz-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
echo "fuzz: ${seconds} s; failing inputs are saved under $out"
cd "$root"
if [ "${KERNELATLAS_FUZZ_ENGINE:-}" = atheris ]; then
  exec "$py" tests/fuzzing.py atheris --seconds "$seconds" --out "$out" "$@"
fi
exec "$py" tests/fuzzing.py run --seconds "$seconds" --out "$out" "$@"
