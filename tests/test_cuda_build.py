"""The CUDA kernels as nvcc builds them, on any machine with nvcc (CI has nvcc and no GPU): cuda/ops/all_kernels.cu
(every kernel, instantiated without Python around it) is compiled for sm_80 and sm_90 with the module's flags
(cuda/CMakeLists.txt: -fmad=false, warnings as errors, ptxas spill and local-memory warnings as errors), and
ptxas's resource report is read: no kernel may use a stack frame, spill or local memory, and each stays within
the registers it was designed for.

The design (cuda/ops/*.cuh): one thread per kernel row, the row and the layer activations in shared memory, a
layer computed 8 units at a time with the 8 accumulators in registers; about 32 registers for normalize and
prototypes, 40-48 for encode and assign (sm_80 / sm_90, CUDA 13).  The budgets below leave room for compiler
versions but fail long before 64, beyond which a 128-thread block's registers would start to limit how many
blocks share an SM.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import kernelatlas as ka

ROOT = Path(__file__).resolve().parents[1]
NVCC = os.environ.get("CUDACXX") or shutil.which("nvcc")
ARCHS = (80, 90)
REGISTER_BUDGET = {"NormalizeOp": 40, "PrototypesOp": 40, "EncodeOp": 56, "AssignOp": 56, "EncodeOpTF32": 56,
                   "AssignOpTF32": 64}

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (set CUDACXX or put nvcc on PATH)")


def _ptxas_report() -> str:
    cmd = [NVCC, "-c", "-o", os.devnull, "-std=c++17", "-O3", "-fmad=false", "-Werror=all-warnings",
           "-Xptxas=-v,-warn-spills,-warn-lmem-usage", f"-I{ROOT / 'cpp' / 'include'}", f"-I{ROOT / 'cuda' / 'ops'}"]
    for arch in ARCHS:
        cmd.append(f"--generate-code=arch=compute_{arch},code=sm_{arch}")
    cmd.append(str(ROOT / "cuda" / "ops" / "all_kernels.cu"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    return proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def ptxas_usage() -> dict[tuple[str, int], dict[str, int]]:
    """(op, arch) -> registers, stack, spill_stores, spill_loads, as ptxas reports them."""
    usage: dict[tuple[str, int], dict[str, int]] = {}
    current: tuple[str, int] | None = None
    for line in _ptxas_report().splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            # EncodeOp / AssignOp are EncodeOpT<false> / AssignOpT<false>; the <true> forms are the TF32 path
            op = re.search(r"_\d+([A-Za-z]+Op)(?:TILb([01])EE|E)", m.group(1))
            assert op, f"unexpected kernel {m.group(1)}"
            current = (op.group(1) + ("TF32" if op.group(2) == "1" else ""), int(m.group(2)))
            usage[current] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            usage[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            usage[current]["registers"] = int(m.group(1))
    return usage


@needs_nvcc
def test_every_kernel_is_built_for_every_arch(ptxas_usage):
    assert set(ptxas_usage) == {(op, arch) for op in REGISTER_BUDGET for arch in ARCHS}


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", list(REGISTER_BUDGET))
def test_no_spills_no_local_memory_and_register_budget(ptxas_usage, op, arch):
    u = ptxas_usage[(op, arch)]
    assert u["stack"] == 0 and u["spill_stores"] == 0 and u["spill_loads"] == 0, f"{op} sm_{arch}: {u}"
    assert 0 < u["registers"] <= REGISTER_BUDGET[op], f"{op} sm_{arch} uses {u['registers']} registers: {u}"


@needs_nvcc
def test_the_module_was_built_with_the_kernels():
    """With nvcc present the default build (KERNELATLAS_CUDA=AUTO) builds _cuda with its entry points; it imports
    without a GPU or driver and says why nothing can run."""
    info = ka.build_info()
    if not info["cuda_built"]:
        pytest.skip("this build was made with KERNELATLAS_CUDA=OFF")
    from kernelatlas import _cuda

    for name in ("normalize_ptr", "normalize_host", "DeviceAutoencoder", "DevicePrototypes", "synchronize"):
        assert hasattr(_cuda, name), name
    dev = _cuda.device_info()
    assert dev["device_count"] >= 0
    if dev["device_count"] == 0:
        assert info["cuda_available"] is False


def test_gpu_check_script_exists_and_is_documented():
    script = ROOT / "scripts" / "gpu-check.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    for doc in ("README.md", "BENCHMARKS.md"):
        assert "scripts/gpu-check.sh" in (ROOT / doc).read_text(), doc
    assert "CUDA backend: not yet verified on hardware" in (ROOT / "README.md").read_text()
