"""The public face of the native engine: batched normalisation, fused autoencoder assignment and prototype
assignment over numpy arrays and memmaps of any size.

Inputs are float32 or float16 arrays of shape [n, k*k] or [n, k, k], C-contiguous: a strided or transposed
view is rejected with the fix rather than copied, since a silent copy of a billion-kernel memmap would
exhaust memory.  Every call releases the GIL and runs on ``threads`` OpenMP threads (default: all).
Outputs can be preallocated (``out=`` arguments), e.g. as writable memmaps, so results stream to disk.

``device``: 'cpu' (this engine), 'cuda' (the GPU: cupy arrays / torch CUDA tensors in place, numpy arrays and
memmaps streamed; :mod:`kernelatlas.gpu`) or 'auto' (the GPU for GPU arrays and for host arrays of at least
``kernelatlas.gpu.AUTO_MIN_ROWS`` rows when a GPU passed its self-check, else the CPU).  On the GPU ``threads``
does not apply.

Semantics shared by every call (and every backend):

* a kernel is centred (its mean subtracted) and divided by the L2 norm of the centred kernel;
* a kernel holding NaN or Inf is *non-finite* (norm NaN); one whose entries are all ``<= min_abs`` in
  magnitude is *dead* (default ``min_abs=0``: exact zeros only); one whose centred norm is at most
  1e-5 x max|w| is *flat* (a constant kernel).  All three become zero rows, norm 0 (NaN if non-finite),
  label -1, score 0 and code NaN -- never an error, never a division by zero.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from kernelatlas import _core, gpu

if TYPE_CHECKING:
    from kernelatlas.autoencoder import Autoencoder

__all__ = ["assign", "assign_prototypes", "build_info", "check_device", "normalize", "set_isa", "thread_count"]


def thread_count(threads: int | None) -> int:
    """The engine's thread argument: None (all cores) is 0; anything below 1 is refused."""
    if threads is None:
        return 0
    if threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for all cores), got {threads}")
    return int(threads)


def check_device(device: str) -> None:
    """Refuse an unknown device name; device='cuda' without a usable GPU is refused with the reason (the
    self-check runs here when a GPU is found)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        ok, why = gpu._probe()
        error = gpu.self_check() if ok else f"device='cuda' needs a usable GPU: {why}"
        if error is not None:
            raise gpu.GpuUnavailable(error)


def _on_host(dev_in: gpu.DeviceInput | None, x: Any) -> Any:
    """x for the CPU engine: a GPU array (the 'auto' fallback) copied to the host."""
    return dev_in.to_host() if dev_in is not None else x


def _back(dev_in: gpu.DeviceInput | None, results: tuple[Any, ...]) -> tuple[Any, ...]:
    """The CPU engine's results, moved to the input's GPU when the input was there (the 'auto' fallback)."""
    return tuple(dev_in.from_host(r) for r in results) if dev_in is not None else results


def normalize(
    x: np.ndarray,
    *,
    out: np.ndarray | None = None,
    norms: np.ndarray | None = None,
    min_abs: float = 0.0,
    threads: int | None = None,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Centre every kernel and divide it by its L2 norm.

    Returns ``(normalized, norms)``: float32 of x's shape, and float32 [n] with the centred norms (0 for dead
    or flat kernels, NaN for non-finite ones, whose rows are zero).
    """
    where, dev_in = gpu.resolve(device, x)
    if where == "cuda":
        return gpu.normalize(x, dev_in, out, norms, float(min_abs))
    res = _core.normalize(_on_host(dev_in, x), out=out, norms=norms, min_abs=float(min_abs),
                          threads=thread_count(threads))
    return _back(dev_in, res)


def assign(
    x: np.ndarray,
    model: Autoencoder,
    *,
    threshold: float = 0.85,
    min_abs: float = 0.0,
    threads: int | None = None,
    device: str = "auto",
    decoder: str = "auto",
    out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paper-mode assignment in one fused pass: normalise, encode to the 1-D code, decode, take the cosine of
    kernel and reconstruction; label = index of the model's cluster interval holding the code when the cosine
    is >= ``threshold``, else -1.  A model without clusters labels every kernel that passes the threshold 0.

    Returns ``(labels int16, scores float32, codes float32)``, each [n].  ``out`` may give the three output
    arrays (e.g. writable memmaps).  ``decoder``: 'auto' uses the exact piecewise-linear table of a ReLU
    decoder (see DESIGN.md), 'mlp' forces the decoder network, 'segments' requires the table.

    ``precision``: 'fp32' (default: every result within the reference tests' tolerances) or 'bf16' (opt-in, on
    CPUs with AVX512_BF16: the encoder's hidden layers take bfloat16 inputs and weights, summed in fp32; rows
    near a decision -- code within :meth:`Autoencoder.bf16_margins` of an interval edge, score within it of
    the threshold -- are recomputed in fp32, so labels agree with fp32 on >= 99.9% of kernels (measured
    speed-up and agreement: BENCHMARKS.md "Reduced precision"); other rows' codes and scores differ by up to
    ~1e-2).  'bf16' raises ValueError, naming the reason, where it cannot run (``build_info()['bf16']``).
    'tf32' (opt-in, on the GPU: the first encoder layer by TF32 tensor-core mma, the rest exact fp32; labels
    agree with fp32 on >= 99.9% of kernels, BENCHMARKS.md "GPU") is refused on the CPU.
    """
    where, dev_in = gpu.resolve(device, x)
    gpu.check_precision(where, precision)
    if where == "cuda":
        return gpu.assign(model, x, dev_in, float(threshold), float(min_abs), decoder, out, precision)
    labels, scores, codes = out if out is not None else (None, None, None)
    margins = model.bf16_margins(decoder) if precision == "bf16" else (0.0, 0.0)
    res = model._engine.assign(
        _on_host(dev_in, x),
        threshold=float(threshold),
        labels=labels,
        scores=scores,
        codes=codes,
        min_abs=float(min_abs),
        threads=thread_count(threads),
        decoder=decoder,
        precision=precision,
        recheck_code=margins[0],
        recheck_score=margins[1],
    )
    return _back(dev_in, res)


def assign_prototypes(
    x: np.ndarray,
    prototypes: np.ndarray | Any,
    *,
    threshold: float,
    min_abs: float = 0.0,
    threads: int | None = None,
    device: str = "auto",
    out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Label each kernel with the prototype of highest cosine (kernels and prototypes both centred and
    L2-normalised), or -1 when that cosine is below ``threshold``.

    ``prototypes``: an array [P, k*k] or [P, k, k] (1 <= P <= 256), or a ``_core.PrototypeEngine`` built once
    and reused.  Returns ``(labels int16, scores float32)``.
    """
    where, dev_in = gpu.resolve(device, x)
    if where == "cuda":
        raw = prototypes.normalized if isinstance(prototypes, _core.PrototypeEngine) else _prototype_rows(prototypes)
        return gpu.assign_prototypes(raw, x, dev_in, float(threshold), float(min_abs), out)
    engine = prototypes if isinstance(prototypes, _core.PrototypeEngine) else prototype_engine(prototypes)
    labels, scores = out if out is not None else (None, None)
    res = engine.assign(_on_host(dev_in, x), threshold=float(threshold), labels=labels, scores=scores,
                        min_abs=float(min_abs), threads=thread_count(threads))
    return _back(dev_in, res)


def _prototype_rows(prototypes: np.ndarray) -> np.ndarray:
    p = np.asarray(prototypes, dtype=np.float32)
    return np.ascontiguousarray(p.reshape(len(p), -1) if p.ndim == 3 else p)


def prototype_engine(prototypes: np.ndarray) -> _core.PrototypeEngine:
    """Normalise and pack a prototype set once, for repeated :func:`assign_prototypes` calls."""
    return _core.PrototypeEngine(_prototype_rows(prototypes))


def set_isa(name: str | None) -> str | None:
    """Force the engine's instruction-set path ('scalar', 'avx2', 'avx512'), or None for the best the CPU
    supports.  Returns the previous setting.  The environment variable ``KERNELATLAS_ISA`` sets the initial
    value.  Meant for tests and benchmarks: every path gives the same results to fp32 rounding."""
    previous = _core.set_isa(name or "")
    return previous or None


def build_info() -> dict[str, Any]:
    """Version, compiler, the ISA chosen at run time (and those supported / compiled), OpenMP and thread
    count, and whether the CUDA module was built (and which devices it sees)."""
    info = dict(_core.build_info())
    info["omp_num_threads_env"] = os.environ.get("OMP_NUM_THREADS")
    info["cuda_available"] = False
    info["cuda_devices"] = []
    info["cuda_verified"] = gpu.VERIFIED_ON_HARDWARE
    if info["cuda_built"] and not gpu.VERIFIED_ON_HARDWARE:
        info["cuda_backend"] = gpu.NOT_VERIFIED
    if info["cuda_built"]:
        try:
            from kernelatlas import _cuda
        except ImportError as exc:  # built, but the CUDA runtime cannot load here
            info["cuda_error"] = str(exc)
        else:
            dev = _cuda.device_info()
            info["cuda_available"] = dev["device_count"] > 0
            info["cuda_devices"] = list(dev.get("devices", []))
            if "error" in dev:
                info["cuda_error"] = dev["error"]
    return info
