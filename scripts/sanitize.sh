#!/usr/bin/env bash
# Builds the native engine with AddressSanitizer + UndefinedBehaviorSanitizer (KERNELATLAS_SANITIZE=ON, -O1 -g)
# into build/asan-site and runs the engine tests against that build, every ISA path included (the tests
# parametrise over the ISAs the CPU supports).  Any ASan report or UBSan error aborts the run.
# Usage: scripts/sanitize.sh [pytest args]   (default: the engine tests)
# Needs: a venv made by scripts/setup.sh (editable or not), gcc's libasan/libubsan.
# The tests run in a bare venv (build/asan-venv) that sees the sanitized build first and the setup venv's
# packages after it, through PYTHONPATH: .pth files on PYTHONPATH are not processed, so an editable install's
# import hook (which would load the unsanitized build from the source tree) stays out of the way.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv_py=${PYTHON:-$root/.venv/bin/python}
packages=$("$venv_py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
site=$root/build/asan-site
rm -rf "$site"
"$venv_py" -m pip install -q --no-deps --target "$site" \
  -Ccmake.define.KERNELATLAS_SANITIZE=ON -Ccmake.define.KERNELATLAS_CUDA=OFF -Cbuild-dir="$root/build/asan" "$root"
so=$(ls "$site"/kernelatlas/_core*.so)
# grep without -q: -q stops at the first match, nm then dies of SIGPIPE and pipefail reads that as "not found"
nm -D "$so" | grep __asan_report >/dev/null || { echo "sanitize: $so is not instrumented" >&2; exit 1; }
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
[ -x "$root/build/asan-venv/bin/python" ] || "$venv_py" -c "import venv; venv.create('$root/build/asan-venv')"
py=$root/build/asan-venv/bin/python
cd "$root"
# leaks: CPython and torch keep allocations alive at exit by design; UBSan errors are fatal (-fno-sanitize-recover)
sanitized=(env KERNELATLAS_SANITIZED=1 PYTHONPATH="$site:$packages" LD_PRELOAD="$asan:$ubsan"
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:alloc_dealloc_mismatch=0
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 "$py")
"${sanitized[@]}" -c "import kernelatlas, sys; assert kernelatlas.__file__.startswith('$site'), kernelatlas.__file__; print('sanitized build:', kernelatlas.__file__)"
"${sanitized[@]}" -m pytest -q -p no:cacheprovider "${@:-tests}"
