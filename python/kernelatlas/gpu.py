"""The CUDA backend's Python face: which device a call runs on, GPU inputs taken zero-copy, the runtime
self-check, and the calls into the private module ``kernelatlas._cuda``.

Where a call runs (``device=`` of :func:`kernelatlas.normalize`, :func:`kernelatlas.assign`,
:func:`kernelatlas.assign_prototypes` and :meth:`kernelatlas.Autoencoder.encode`):

* ``'cpu'``: the CPU engine.  GPU arrays are refused (copy them to the host first).
* ``'cuda'``: the GPU.  A cupy array, a torch CUDA tensor or any object with ``__cuda_array_interface__`` /
  a CUDA ``__dlpack__`` is read in place and the outputs are allocated on the same device by the same
  library; a numpy array or memmap is streamed through pinned, double-buffered host memory on two CUDA
  streams (copy and compute overlap) into numpy outputs.  Refused, with the reason, when no usable GPU is
  found or the self-check failed.
* ``'auto'`` (the default): the GPU for GPU arrays, and for host arrays of at least :data:`AUTO_MIN_ROWS`
  rows when a GPU is usable; the CPU engine otherwise.  When the GPU is there but failed its self-check,
  ``'auto'`` warns and runs on the CPU (GPU arrays are copied to the host and the results back).

The self-check: the first GPU call of a process runs a few thousand fixed rows (random kernels and decoded
patterns, fp32 and fp16, dead / flat / non-finite rows) through every GPU op and the CPU engine and compares
them; any disagreement beyond fp32 rounding disables the GPU for the process, with the differences in the
error.  The kernels compute the CPU engine's own expressions in the same order (cuda/ops/*.cuh), so on a
correct device they agree to the bit with the AVX2 / AVX-512 engine.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AUTO_MIN_ROWS",
    "SELF_CHECK_ROWS",
    "DeviceInput",
    "available",
    "device_input",
    "resolve",
    "self_check",
    "status",
]

AUTO_MIN_ROWS = 1 << 20  # host arrays smaller than this stay on the CPU under device='auto'
SELF_CHECK_ROWS = 4096
VERIFIED_ON_HARDWARE = False  # set True once tests/gpu/ has passed on a real device (scripts/gpu-check.sh)
NOT_VERIFIED = "CUDA backend: not yet verified on hardware"

_TYPESTRS = {"<f4": "float32", "<f2": "float16", "=f4": "float32", "=f2": "float16"}
_DLPACK_CUDA = (2, 13)  # kDLCUDA, kDLCUDAManaged


class GpuUnavailable(RuntimeError):
    """device='cuda' was asked for and no usable GPU is there (the message says why)."""


def _module() -> Any:
    """kernelatlas._cuda, or None when it was not built or cannot load (tests replace this function)."""
    try:
        from kernelatlas import _cuda
    except ImportError:
        return None
    return _cuda


@functools.cache
def _probe() -> tuple[bool, str]:
    mod = _module()
    if mod is None:
        return False, "the CUDA module is not built (no nvcc at build time, or KERNELATLAS_CUDA=OFF)"
    info = mod.device_info()
    if info.get("device_count", 0) <= 0:
        return False, f"no CUDA device is visible ({info.get('error', 'device count 0')})"
    return True, ""


def available() -> bool:
    """Whether the CUDA module is built and sees a device (says nothing of the self-check)."""
    return _probe()[0]


def status() -> dict[str, Any]:
    """For build_info: availability, the self-check's outcome so far, and whether the backend is verified."""
    ok, why = _probe()
    return {
        "cuda_usable": ok and _SELF_CHECK.get("fp32") is None,
        "cuda_reason": why,
        "cuda_self_check": _check_state("fp32"),
        "cuda_tf32_check": _check_state("tf32"),
        "cuda_verified": VERIFIED_ON_HARDWARE,
        "cuda_backend": "" if VERIFIED_ON_HARDWARE else NOT_VERIFIED,
    }


# ---------------------------------------------------------------------------------------------- GPU arrays


@dataclass
class DeviceInput:
    """A C-contiguous float32 / float16 kernel batch in GPU memory: [rows, d] or [rows, k, k]."""

    obj: Any  # the caller's array (kept alive for the duration of the call)
    ptr: int
    dtype: str  # 'float32' | 'float16'
    shape: tuple[int, ...]
    rows: int
    d: int
    library: str  # 'torch' | 'cupy'
    stream: int  # the CUDA stream to launch on (the library's current one)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An output array on the input's device, from the input's library."""
        if self.library == "torch":
            import torch

            tdtype = {np.dtype(np.float32): torch.float32, np.dtype(np.int16): torch.int16}[np.dtype(dtype)]
            return torch.empty(shape, dtype=tdtype, device=self.obj.device)
        import cupy

        with cupy.cuda.Device(self.obj.device.id):
            return cupy.empty(shape, dtype=dtype)

    def to_host(self) -> np.ndarray:
        if self.library == "torch":
            return self.obj.detach().cpu().numpy()
        import cupy

        return cupy.asnumpy(self.obj)

    def from_host(self, a: np.ndarray) -> Any:
        if self.library == "torch":
            import torch

            return torch.from_numpy(np.ascontiguousarray(a)).to(self.obj.device)
        import cupy

        with cupy.cuda.Device(self.obj.device.id):
            return cupy.asarray(a)


def pointer(a: Any) -> int:
    """The device address of an output array made by :meth:`DeviceInput.empty`."""
    return int(a.__cuda_array_interface__["data"][0])


def _is_torch_cuda(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and getattr(getattr(x, "device", None), "type", None) == "cuda"


def device_input(x: Any) -> DeviceInput | None:
    """x as a GPU kernel batch, or None for a host array.  Raises TypeError / ValueError (naming the fix) for a
    GPU array of the wrong dtype, shape or layout."""
    if isinstance(x, np.ndarray):
        return None
    if _is_torch_cuda(x):
        library = "torch"
    elif hasattr(x, "__cuda_array_interface__"):
        library = "cupy"
        if type(x).__module__.split(".")[0] != "cupy":
            import cupy  # numba and others: a zero-copy cupy view of the same memory

            x = cupy.asarray(x)
    elif hasattr(x, "__dlpack_device__") and next(iter(x.__dlpack_device__())) in _DLPACK_CUDA:
        try:
            import cupy
        except ImportError as exc:
            raise TypeError("a CUDA DLPack array needs cupy to be read in place: pip install 'kernelatlas[cuda]'") \
                from exc
        library, x = "cupy", cupy.from_dlpack(x)
    else:
        return None
    cai = x.__cuda_array_interface__
    shape = tuple(int(s) for s in cai["shape"])
    dtype = _TYPESTRS.get(cai["typestr"])
    if dtype is None:
        raise TypeError(f"x must be float32 or float16, got {cai['typestr']} on the GPU: convert it with "
                        "x.astype(float32) / x.float()")
    if len(shape) == 2:
        rows, d = shape
    elif len(shape) == 3 and shape[1] == shape[2]:
        rows, d = shape[0], shape[1] * shape[2]
    else:
        raise ValueError(f"x must have shape [n, k*k] or [n, k, k], got {shape}")
    itemsize = 4 if dtype == "float32" else 2
    strides = cai.get("strides")
    if strides is not None and rows > 1:  # None: C-contiguous by the interface's definition
        want = [itemsize]
        for s in reversed(shape[1:]):
            want.insert(0, want[0] * s)
        if tuple(strides) != tuple(want):
            raise ValueError("x is not C-contiguous on the GPU (a transposed view or a strided slice?): pass "
                             "x.contiguous() (torch) or cupy.ascontiguousarray(x); kernelatlas never copies silently")
    if library == "torch":
        import torch

        device_id = int(x.device.index or 0)
        stream = int(torch.cuda.current_stream(x.device).cuda_stream)
    else:
        import cupy

        device_id = int(x.device.id)
        stream = int(cupy.cuda.get_current_stream().ptr)
    if device_id != 0:
        raise ValueError(f"x is on CUDA device {device_id}: the CUDA backend runs on device 0 so far (set "
                         "CUDA_VISIBLE_DEVICES to choose the GPU)")
    return DeviceInput(x, int(cai["data"][0]), dtype, shape, rows, d, library, stream)


# ---------------------------------------------------------------------------------------------- self-check

_SELF_CHECK: dict[str, str | None] = {}  # check name -> None (passed) or its error; absent: not run yet


def _check_state(name: str) -> str:
    return "not run" if name not in _SELF_CHECK else "failed" if _SELF_CHECK[name] else "passed"


def _run_check(name: str, body: Callable[[Any, list[str]], None], failed: str, fix: str) -> str | None:
    """Runs ``body(module, problems)`` once per process under ``name``: None when it found no problem, else the
    error (``failed``, the first problems, ``fix``), remembered for the process.  An exception -- a CUDA error
    from the driver, a launch or memory -- is a failed check too."""
    if name not in _SELF_CHECK:
        problems: list[str] = []
        try:
            body(_module(), problems)
        except Exception as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        _SELF_CHECK[name] = (f"{failed}: " + "; ".join(problems[:5]) + f" -- {fix}, and please report this with "
                             "`kernelatlas build-info`") if problems else None
    return _SELF_CHECK[name]


def _check_batch(d: int, dtype: Any, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, d])
    n = SELF_CHECK_ROWS // 2
    x = rng.standard_normal((n, d)) * rng.uniform(0.05, 2.0, (n, 1)) + rng.normal(0.0, 0.5, (n, 1))
    x[1] = 0.0  # dead
    x[3] = 0.37  # flat
    x[5, d // 2] = np.nan
    x[6, 0] = np.inf
    big = 1e30 if np.dtype(dtype) == np.float32 else 1e3  # near each dtype's overflow and underflow
    x[7] *= big
    x[8] /= big
    return x.astype(dtype)


def _check_model(d: int) -> Any:
    """A fixed random autoencoder d -> 32 -> 16 -> 1 (sigmoid) -> 16 -> 32 -> d with ReLUs, three intervals."""
    from kernelatlas.autoencoder import Autoencoder, Dense

    rng = np.random.default_rng(1234 + d)

    def dense(n_in: int, n_out: int, act: str) -> Dense:
        return Dense(rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), rng.normal(0, 0.1, n_out), act)

    enc = [dense(d, 32, "relu"), dense(32, 16, "relu"), dense(16, 1, "sigmoid")]
    dec = [dense(1, 16, "relu"), dense(16, 32, "relu"), dense(32, d, "identity")]
    return Autoencoder(enc, dec, round(float(np.sqrt(d))), [(0.0, 0.4), (0.4, 0.6), (0.6, 1.0)])


def _compare(name: str, got: np.ndarray, want: np.ndarray, tol: float, problems: list[str]) -> None:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        problems.append(f"{name}: shape {got.shape}, the CPU engine gives {want.shape}")
        return
    if got.dtype.kind in "iu":
        off = np.flatnonzero(got != want)
    else:
        both_nan = np.isnan(got) & np.isnan(want)
        with np.errstate(invalid="ignore"):
            off = np.flatnonzero(~both_nan & ~(np.abs(got.astype(np.float64) - want) <= tol))
    if off.size:
        problems.append(f"{name}: {off.size} of {got.size} values differ from the CPU engine's, e.g. rows "
                        f"{off[:3].tolist()}: {got.reshape(len(got), -1)[off[:3], 0].tolist()} vs "
                        f"{want.reshape(len(want), -1)[off[:3], 0].tolist()}")


def _compare_assign(name: str, d: int, got: Any, want: Any, model: Any, tol: float, problems: list[str]) -> None:
    """Codes and scores (threshold 0.5) within ``tol`` of the CPU engine's, and labels equal except where a
    difference of ``tol`` may flip one: a score at the threshold, a code at an interval edge."""
    _compare(f"{name} codes d={d}", got[2], want[2], tol, problems)
    _compare(f"{name} scores d={d}", got[1], want[1], tol, problems)
    edges = np.array([e for iv in model.clusters or [] for e in iv])
    near = (np.abs(want[1] - 0.5) <= tol) | (
        np.abs(np.nan_to_num(want[2])[:, None] - edges[None, :]) <= tol).any(axis=1)
    _compare(f"{name} labels d={d}", got[0][~near], want[0][~near], 0, problems)


def _fp32_checks(mod: Any, problems: list[str]) -> None:
    from kernelatlas import _core

    for d, dtype in ((9, np.float32), (49, np.float16)):
        x = _check_batch(d, dtype, seed=d)
        model = _check_model(d)
        cpu_norm = _core.normalize(x, threads=0)
        _compare(f"normalize d={d}", mod.normalize_host(x, chunk_rows=1000)[0], cpu_norm[0], 1e-6, problems)
        dev = mod.DeviceAutoencoder(*model._engine_args())
        for decoder in ("segments", "mlp"):
            got = dev.assign_host(x, threshold=0.5, decoder=decoder, chunk_rows=1000)
            want = model._engine.assign(x, threshold=0.5, threads=0, decoder=decoder)
            _compare_assign(f"assign ({decoder})", d, got, want, model, 1e-5, problems)
        protos = _check_batch(d, np.float32, seed=99)[10:26]
        got_p = mod.DevicePrototypes(np.ascontiguousarray(protos)).assign_host(x, threshold=0.3, chunk_rows=1000)
        want_p = _core.PrototypeEngine(np.ascontiguousarray(protos)).assign(x, threshold=0.3, threads=0)
        _compare(f"prototype scores d={d}", got_p[1], want_p[1], 1e-5, problems)
        near = np.abs(want_p[1] - 0.3) <= 1e-5
        _compare(f"prototype labels d={d}", got_p[0][~near], want_p[0][~near], 0, problems)


def self_check() -> str | None:
    """Runs the self-check once per process: None when the GPU agrees with the CPU engine, else the error."""
    return _run_check("fp32", _fp32_checks, "the CUDA backend disagrees with the CPU engine on its self-check, so "
                      "it is not used in this process", "use device='cpu'")


TF32_TOL = 1e-3  # |code| and |score| of precision='tf32' vs the CPU's fp32 on the check batches (measured: <= 4e-5)


def _tf32_checks(mod: Any, problems: list[str]) -> None:
    for d, dtype in ((9, np.float32), (49, np.float16)):
        x = _check_batch(d, dtype, seed=d)
        model = _check_model(d)
        dev = mod.DeviceAutoencoder(*model._engine_args())
        for decoder in ("segments", "mlp"):
            got = dev.assign_host(x, threshold=0.5, decoder=decoder, chunk_rows=1000, precision="tf32")
            want = model._engine.assign(x, threshold=0.5, threads=0, decoder=decoder)
            _compare_assign(f"tf32 assign ({decoder})", d, got, want, model, TF32_TOL, problems)
        _compare(f"tf32 encode d={d}", dev.encode_host(x, chunk_rows=1000, precision="tf32"),
                 model._engine.encode(x, threads=0), TF32_TOL, problems)


def tf32_check() -> str | None:
    """Once per process, before the first precision='tf32' call: the TF32 path (not bit-exact by design) must
    stay within :data:`TF32_TOL` of the CPU engine's fp32 codes and scores on the self-check's batches, with the
    same dead / flat / non-finite rows and the same labels wherever a code or score is not within the tolerance
    of a decision.  A wrong fragment layout or rounding gives errors of ~0.1, far outside it.  None when it
    passes, else the error (then precision='tf32' is refused for the process; 'fp32' is unaffected)."""
    return _run_check("tf32", _tf32_checks, "precision='tf32' disagrees with the CPU engine's fp32 beyond TF32 "
                      "rounding on its check, so it is not used in this process", "use precision='fp32'")


def _require_tf32(precision: str) -> None:
    if precision == "tf32":
        error = tf32_check()
        if error is not None:
            raise GpuUnavailable(error)


# ---------------------------------------------------------------------------------------------- dispatch


def resolve(device: str, x: Any) -> tuple[str, DeviceInput | None]:
    """('cpu' | 'cuda', x as a DeviceInput or None) for a call with ``device`` on ``x``; raises when the device
    cannot run it.  With 'auto', a GPU that failed its self-check gives a warning and the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    dev_in = device_input(x)
    if device == "cpu":
        if dev_in is not None:
            raise TypeError("device='cpu' was given a GPU array: copy it to the host (x.cpu().numpy(), "
                            "cupy.asnumpy(x)) or use device='cuda'")
        return "cpu", None
    if device == "auto" and dev_in is None and (len(x) < AUTO_MIN_ROWS or not available()):
        return "cpu", None
    ok, why = _probe()
    error = self_check() if ok else f"device='{device}' needs a usable GPU: {why}"
    if error is None:
        return "cuda", dev_in
    if device == "cuda":
        raise GpuUnavailable(error)
    warnings.warn(f"{error}; running on the CPU instead", RuntimeWarning, stacklevel=3)
    return "cpu", dev_in


def check_precision(where: str, precision: str) -> None:
    """Refuses a precision the chosen device does not have: 'bf16' is the CPU's AVX512_BF16 path, 'tf32' the
    GPU's tensor-core path; 'fp32' (exact) runs everywhere."""
    if where == "cuda" and precision not in ("fp32", "tf32"):
        raise ValueError(f"precision on the GPU must be 'fp32' or 'tf32', got {precision!r}"
                         + (" ('bf16' is the CPU's AVX512_BF16 path: use device='cpu')" if precision == "bf16" else ""))
    if where == "cpu" and precision == "tf32":
        raise ValueError("precision='tf32' is the GPU's tensor-core path and this call runs on the CPU: use "
                         "device='cuda' (with a usable GPU), or precision='fp32' / 'bf16' on the CPU")


def module() -> Any:
    """kernelatlas._cuda (for the calls once :func:`resolve` said 'cuda')."""
    return _module()


def device_autoencoder(model: Any) -> Any:
    """The model uploaded to the GPU (once per Autoencoder object; cached on it)."""
    if model._gpu_cache is None:
        model._gpu_cache = module().DeviceAutoencoder(*model._engine_args())
    return model._gpu_cache


def no_out_for_gpu_arrays(out: Any) -> None:
    if out is not None and any(o is not None for o in (out if isinstance(out, tuple) else (out,))):
        raise ValueError("out= is for host (numpy) outputs; with GPU inputs the outputs are allocated on the same "
                         "device: drop out=")


def normalize(x: Any, dev_in: DeviceInput | None, out: Any, norms: Any, min_abs: float) -> tuple[Any, Any]:
    mod = module()
    if dev_in is None:
        return tuple(mod.normalize_host(x, out=out, norms=norms, min_abs=min_abs))
    no_out_for_gpu_arrays((out, norms))
    o = dev_in.empty(dev_in.shape, np.float32)
    nr = dev_in.empty((dev_in.rows,), np.float32)
    mod.normalize_ptr(dev_in.ptr, dev_in.dtype, dev_in.rows, dev_in.d, min_abs, pointer(o), pointer(nr), dev_in.stream)
    return o, nr


def encode(model: Any, x: Any, dev_in: DeviceInput | None, out: Any, min_abs: float, precision: str = "fp32") -> Any:
    _require_tf32(precision)
    dev = device_autoencoder(model)
    if dev_in is None:
        return dev.encode_host(x, out=out, min_abs=min_abs, precision=precision)
    no_out_for_gpu_arrays(out)
    _check_d(dev_in, model.d)
    codes = dev_in.empty((dev_in.rows,), np.float32)
    dev.encode_ptr(dev_in.ptr, dev_in.dtype, dev_in.rows, min_abs, pointer(codes), dev_in.stream, precision)
    return codes


def assign(model: Any, x: Any, dev_in: DeviceInput | None, threshold: float, min_abs: float, decoder: str,
           out: Any, precision: str = "fp32") -> tuple[Any, Any, Any]:
    _require_tf32(precision)
    dev = device_autoencoder(model)
    margins = model.tf32_margins(decoder) if precision == "tf32" else (0.0, 0.0)
    if dev_in is None:
        labels, scores, codes = out if out is not None else (None, None, None)
        return tuple(dev.assign_host(x, threshold=threshold, labels=labels, scores=scores, codes=codes,
                                     min_abs=min_abs, decoder=decoder, precision=precision,
                                     recheck_code=margins[0], recheck_score=margins[1]))
    no_out_for_gpu_arrays(out)
    _check_d(dev_in, model.d)
    n = (dev_in.rows,)
    labels, scores, codes = dev_in.empty(n, np.int16), dev_in.empty(n, np.float32), dev_in.empty(n, np.float32)
    dev.assign_ptr(dev_in.ptr, dev_in.dtype, dev_in.rows, threshold, min_abs, decoder, pointer(labels),
                   pointer(scores), pointer(codes), dev_in.stream, precision, *margins)
    return labels, scores, codes


def assign_prototypes(prototypes: np.ndarray, x: Any, dev_in: DeviceInput | None, threshold: float, min_abs: float,
                      out: Any) -> tuple[Any, Any]:
    dev = module().DevicePrototypes(np.ascontiguousarray(prototypes, dtype=np.float32))
    if dev_in is None:
        labels, scores = out if out is not None else (None, None)
        return tuple(dev.assign_host(x, threshold=threshold, labels=labels, scores=scores,
                                     min_abs=min_abs))
    no_out_for_gpu_arrays(out)
    _check_d(dev_in, int(dev.d))
    n = (dev_in.rows,)
    labels, scores = dev_in.empty(n, np.int16), dev_in.empty(n, np.float32)
    dev.assign_ptr(dev_in.ptr, dev_in.dtype, dev_in.rows, threshold, min_abs, pointer(labels), pointer(scores),
                   dev_in.stream)
    return labels, scores


def _check_d(dev_in: DeviceInput, d: int) -> None:
    if dev_in.d != d:
        raise ValueError(f"x holds kernels of {dev_in.d} entries but the model is for {d}: use the model trained "
                         "for this kernel size")
