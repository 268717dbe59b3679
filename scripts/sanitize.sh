#!/usr/bin/env bash
# Builds the native engine with AddressSanitizer + UndefinedBehaviorSanitizer (KERNELATLAS_SANITIZE=ON, -O1 -g)
# into build/asan-site and runs the engine tests against that build, every ISA path included (the tests
# parametrise over the ISAs the CPU supports).  Any ASan report or UBSan error aborts the run.
# Usage: scripts/sanitize.sh [pytest args]   (default: the engine tests)
# Needs: a venv made by scripts/setup.sh (non-editable install), gcc's libasan/libubsan.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
site=$root/build/asan-site
rm -rf "$site"
"$py" -m pip install -q --no-deps --target "$site" \
  -Ccmake.define.KERNELATLAS_SANITIZE=ON -Ccmake.define.KERNELATLAS_CUDA=OFF -Cbuild-dir="$root/build/asan" "$root"
so=$(ls "$site"/kernelatlas/_core*.so)
# grep without -q: -q stops at the first match, nm then dies of SIGPIPE and pipefail reads that as "not found"
nm -D "$so" | grep __asan_report >/dev/null || { echo "sanitize: $so is not instrumented" >&2; exit 1; }
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
cd "$root"
# leaks: CPython and torch keep allocations alive at exit by design; UBSan errors are fatal (-fno-sanitize-recover)
PYTHONPATH="$site" LD_PRELOAD="$asan:$ubsan" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:alloc_dealloc_mismatch=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$py" -c "import kernelatlas, sys; assert kernelatlas.__file__.startswith('$site'), kernelatlas.__file__; print('sanitized build:', kernelatlas.__file__)"
PYTHONPATH="$site" LD_PRELOAD="$asan:$ubsan" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:alloc_dealloc_mismatch=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$py" -m pytest -q -p no:cacheprovider "${@:-tests}"
