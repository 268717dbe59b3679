#!/usr/bin/env bash
# Sets up kernelatlas from a clean checkout into a virtual environment (default ./.venv):
#   1. torch first, pinned to the CPU build (an unpinned `torch` pulls several GB of CUDA wheels);
#   2. the package itself with its test, lint and distributed (Dask, for --cluster) extras -- this compiles the
#      native engine (every ISA variant, and kernelatlas._cuda when nvcc is found; KERNELATLAS_CUDA=OFF skips it).
# Environment: KERNELATLAS_VENV (where), KERNELATLAS_TORCH (the torch requirement), KERNELATLAS_EDITABLE=1.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${KERNELATLAS_VENV:-$root/.venv}
torch_req=${KERNELATLAS_TORCH:-torch==2.13.0}

python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
echo "setup: installing $torch_req" >&2
"$py" -m pip install -q "$torch_req"
echo "setup: building and installing kernelatlas (native engine) from $root" >&2
if [ "${KERNELATLAS_EDITABLE:-0}" = 1 ]; then
  "$py" -m pip install -q -e "$root[test,lint,distributed]"
else
  "$py" -m pip install -q "$root[test,lint,distributed]"
fi
"$py" -c "import json, kernelatlas; print(json.dumps(kernelatlas.build_info(), indent=1))"
echo "setup: done; activate with: source $venv/bin/activate" >&2
