#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build the package with the CUDA module required, run the
# device tests (tests/gpu/, plus the CPU-harness and nvcc build tests), run the GPU benchmark (the engine
# against a torch-CUDA peer of the same pipeline, same run), and print a short summary.  Meant to finish well
# under 8 minutes on an H100/H200 (the build is most of it).
# Usage: scripts/gpu-check.sh [OUT_DIR]      (default OUT_DIR: gpu-check-out; JSON and logs go there)
# Environment: PYTHON (default .venv/bin/python; made by scripts/setup.sh when missing -- set KERNELATLAS_TORCH
# to a CUDA build of torch for the peer and the torch-tensor tests), GPU_CHECK_N (kernels on the device for the
# benchmark, default 2^25), GPU_CHECK_STREAM_N (kernels streamed from a memmap, default 2^24).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/gpu-check-out}
mkdir -p "$out"
cd "$root"
start=$(date +%s)
py=${PYTHON:-$root/.venv/bin/python}
say() { echo "gpu-check: $*" >&2; }
elapsed() { echo $(( $(date +%s) - start )); }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" >&2
if [ ! -x "$py" ]; then
  say "no venv at $py: running scripts/setup.sh"
  KERNELATLAS_CUDA=ON bash scripts/setup.sh > "$out/setup.log" 2>&1 || { say "setup failed: $out/setup.log"; exit 1; }
fi

say "building (KERNELATLAS_CUDA=ON) ..."
build_flags=()
"$py" -c "import scikit_build_core, pybind11" 2>/dev/null && build_flags=(--no-build-isolation)
if ! KERNELATLAS_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-8} \
    "$py" -m pip install -q "${build_flags[@]}" -e . > "$out/build.log" 2>&1; then
  say "build failed after $(elapsed) s: see $out/build.log"; tail -20 "$out/build.log" >&2; exit 1
fi
say "built in $(elapsed) s"
"$py" -c "import json, kernelatlas; print(json.dumps(kernelatlas.build_info(), indent=1))" > "$out/build-info.json"

say "device tests ..."
timeout 300 "$py" -m pytest tests/gpu tests/test_cuda_harness.py tests/test_cuda_tf32.py tests/test_cuda_build.py \
  tests/test_gpu_dispatch.py \
  -q -p no:cacheprovider -rs --junitxml="$out/tests.xml" > "$out/tests.log" 2>&1
tests_rc=$?
say "tests exit $tests_rc after $(elapsed) s"

say "benchmark ..."
timeout 240 "$py" benchmarks/gpu_bench.py --n "${GPU_CHECK_N:-33554432}" --stream-n "${GPU_CHECK_STREAM_N:-16777216}" \
  --json "$out/gpu-bench.json" > "$out/bench.log" 2>&1
bench_rc=$?

echo "==== kernelatlas gpu-check summary ($(elapsed) s) ===="
[ -f "$out/gpu.txt" ] && echo "GPU: $(head -1 "$out/gpu.txt")"
echo "tests: $(tail -1 "$out/tests.log")"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -10
if [ "$bench_rc" = 0 ]; then cat "$out/bench.log"; else echo "benchmark failed (exit $bench_rc):"; tail -5 "$out/bench.log"; fi
echo "logs and JSON: $out"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
