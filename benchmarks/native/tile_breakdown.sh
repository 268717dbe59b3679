#!/usr/bin/env bash
# Builds benchmarks/native/tile_breakdown.cpp once per ISA variant (the flags of CMakeLists.txt's
# ka_isa_variant) and prints the per-stage time of an assign tile on one core, for k = 3, 5, 7, with the input
# in cache (20,160 rows reused) and streamed from memory (2,000,160 rows).  Needs g++ (or CXX).  Compare the
# GFLOP/s columns with the single-core FMA peak: `kernelatlas bench` prints the measured peak on all cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${TMPDIR:-/tmp}/kernelatlas-tile-breakdown
mkdir -p "$out"
cxx=${CXX:-g++}
common=(-O3 -std=c++17 -fno-math-errno -fno-trapping-math -I"$root/cpp/include" -I"$root/cpp/src")
"$cxx" "${common[@]}" -DKA_ISA=2 -DKA_NS=isa_avx512 -mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma -mf16c -mavx2 \
  -mprefer-vector-width=512 "$root/benchmarks/native/tile_breakdown.cpp" "$root/cpp/src/model.cpp" -o "$out/avx512"
"$cxx" "${common[@]}" -DKA_ISA=1 -DKA_NS=isa_avx2 -mavx2 -mfma -mf16c "$root/benchmarks/native/tile_breakdown.cpp" \
  "$root/cpp/src/model.cpp" -o "$out/avx2"
avx512=0
grep -q avx512bw /proc/cpuinfo && avx512=1
for rows in ${ROWS:-20160 2000160}; do
  for d in ${DIMS:-9 25 49}; do
    [ $avx512 = 1 ] && "$out/avx512" "$d" "$rows"
    "$out/avx2" "$d" "$rows"
  done
done
