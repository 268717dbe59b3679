"""``kernelatlas build-info``: what this build of the engine runs on, as text (the dict is
:func:`kernelatlas.build_info`)."""

from __future__ import annotations

from typing import Any

__all__ = ["build_info_text"]


def build_info_text(info: dict[str, Any]) -> str:
    """One "name  value" line per fact of :func:`kernelatlas.build_info`."""
    forced = f" (forced: {info['isa_forced']})" if info.get("isa_forced") else ""
    omp_env = f" (OMP_NUM_THREADS={info['omp_num_threads_env']})" if info.get("omp_num_threads_env") else ""
    rows = [
        ("kernelatlas", info.get("version")),
        ("compiler", info.get("compiler")),
        ("ISA in use", f"{info.get('isa')}{forced}"),
        ("ISAs this CPU runs", ", ".join(info.get("isa_supported", []))),
        ("ISAs compiled", ", ".join(info.get("isa_compiled", []))),
        ("OpenMP", "yes" if info.get("openmp") else "no (single thread)"),
        ("threads (default)", f"{info.get('threads')}{omp_env}"),
        ("CUDA module built", "yes" if info.get("cuda_built") else "no"),
    ]
    if info.get("cuda_built"):
        devices = info.get("cuda_devices") or []
        rows.append(("CUDA available", "yes" if info.get("cuda_available") else "no"))
        if info.get("cuda_backend"):
            rows.append(("CUDA kernels", info["cuda_backend"]))
        if devices:
            rows.append(("CUDA devices", "; ".join(str(d) for d in devices)))
        if info.get("cuda_error"):
            rows.append(("CUDA note", info["cuda_error"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
