"""glibc's malloc tunables for ``kernelatlas bench``: what this process's allocator does (a probe, not the
environment), and running the bench again in a child (or re-executing the CLI) with GLIBC_TUNABLES set, since
glibc reads it only at process start.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from kernelatlas.bench.harness import log

ALLOCATOR_TUNABLES = {
    "glibc.malloc.mmap_threshold": "4294967296",
    "glibc.malloc.trim_threshold": "17179869184",
}
ALLOCATOR_SETTING = ":".join(f"{k}={v}" for k, v in ALLOCATOR_TUNABLES.items())
# Set in the environment of a process that kernelatlas started to get the tunables; its value says how.
CHILD_ENV = "KERNELATLAS_BENCH_CHILD"


def _parse_tunables(value: str | None) -> dict[str, str]:
    pairs = {}
    for item in (value or "").split(":"):
        if "=" in item:
            key, val = item.split("=", 1)
            pairs[key.strip()] = val.strip()
    return pairs


def _malloc_probe() -> dict[str, bool | None] | None:
    """What glibc's malloc actually does here, or None where it cannot be asked: ``mmap_threshold`` is True
    when a 64 MiB block comes from the heap (not its own mmap), ``trim_threshold`` when freeing it leaves the
    heap at its size (None when the block did not come from the heap).  The environment cannot tell: glibc
    reads GLIBC_TUNABLES only at start (a value set later shows in os.environ but does nothing), and it
    rewrites the variable's original copy (/proc/self/environ) as it parses it."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    try:
        libc = ctypes.CDLL(None)
        mallinfo2 = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    before = mallinfo2()
    block = libc.malloc(size)
    if not block:
        return None
    during = mallinfo2()
    libc.free(block)
    after = mallinfo2()
    from_heap = during.hblkhd - before.hblkhd < size
    kept = (after.arena >= during.arena) if from_heap else None
    return {"mmap_threshold": from_heap, "trim_threshold": kept}


def allocator_status() -> dict[str, Any]:
    """Whether glibc's malloc runs with :data:`ALLOCATOR_TUNABLES` in this process.

    ``applicable``: this is Linux with glibc; ``applied``: malloc behaves as the tunables say (probed; from
    the environment where it cannot be probed); ``how``: a line for the report."""
    libc, libc_version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc":
        return {"applicable": False, "applied": False, "setting": ALLOCATOR_SETTING,
                "libc": libc or sys.platform,
                "how": f"not applicable ({libc or sys.platform}, not glibc): allocator left as it is"}
    probe = _malloc_probe()
    if probe is not None:
        applied = all(probe.values())
    else:
        have = _parse_tunables(os.environ.get("GLIBC_TUNABLES"))
        applied = all(have.get(k) == v for k, v in ALLOCATOR_TUNABLES.items())
    child = os.environ.get(CHILD_ENV, "")
    if applied:
        how = {
            "execv": "applied (the process re-executed itself with it set)",
            "subprocess": "applied (measured in a child process started with it set)",
        }.get(child, "applied (set when the process started)")
    else:
        how = "NOT applied: the peer's speed may vary several fold from process to process"
    return {"applicable": True, "applied": applied, "setting": ALLOCATOR_SETTING,
            "libc": f"glibc {libc_version}", "how": how, "probe": probe,
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES")}


def _tunables_environ(how: str) -> dict[str, str]:
    env = dict(os.environ)
    merged = _parse_tunables(env.get("GLIBC_TUNABLES"))
    merged.update(ALLOCATOR_TUNABLES)
    env["GLIBC_TUNABLES"] = ":".join(f"{k}={v}" for k, v in merged.items())
    env[CHILD_ENV] = how
    return env


def needs_reexec() -> bool:
    """True when the tunables apply here, are missing, and no earlier re-run of ours already tried."""
    status = allocator_status()
    return status["applicable"] and not status["applied"] and not os.environ.get(CHILD_ENV)


def exec_with_tunables(argv: Sequence[str]) -> NoReturn:
    """Replace this process by ``argv`` (argv[0] run as ``sys.executable``) with the tunables set."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(argv), _tunables_environ("execv"))


def bench_cli_args(
    *,
    n: int,
    ks: Sequence[int],
    threads: int | None,
    rounds: int,
    dtype: str,
    workdir: str | os.PathLike[str] | None,
    chunk_sizes: Sequence[int],
    stages: Sequence[str],
    seed: int,
    wait_idle: float,
    json_path: str | os.PathLike[str] | None,
) -> list[str]:
    """The ``kernelatlas bench`` options that reproduce these parameters."""
    args = ["--n", str(n), "--k", ",".join(map(str, ks)), "--rounds", str(rounds), "--dtype", dtype,
            "--chunk-sizes", ",".join(map(str, chunk_sizes)), "--stages", ",".join(stages),
            "--seed", str(seed), "--wait-idle", f"{wait_idle:g}"]
    if threads is not None:
        args += ["--threads", str(threads)]
    if workdir is not None:
        args += ["--workdir", str(workdir)]
    if json_path is not None:
        args += ["--json", str(json_path)]
    return args


def run_in_child(params: dict[str, Any], json_path: str | os.PathLike[str] | None,
                  verbose: bool) -> dict[str, Any]:
    """Run the bench in ``python -m kernelatlas.cli bench`` with the tunables set; its output goes to ours
    (or nowhere when not ``verbose``)."""
    with tempfile.TemporaryDirectory(prefix="kernelatlas-bench-") as tmp:
        out = Path(json_path) if json_path is not None else Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "kernelatlas.cli", "bench", *bench_cli_args(**params, json_path=out)]
        log("glibc reads GLIBC_TUNABLES only at start: measuring in a child process with it set", verbose)
        sys.stdout.flush()
        sys.stderr.flush()
        sink = None if verbose else subprocess.DEVNULL
        proc = subprocess.run(cmd, env=_tunables_environ("subprocess"), check=False, stdout=sink, stderr=sink)
        if proc.returncode != 0:
            raise RuntimeError(f"the bench child process failed (exit {proc.returncode}): {' '.join(cmd)}")
        return json.loads(out.read_text())
