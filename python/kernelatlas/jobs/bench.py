"""``kernelatlas bench``: the native engine against the PyTorch peer (reference/README.md, section C),
measured in the same process, alternately, over one synthetic corpus memmap per kernel size.

What is measured, per kernel size k and per stage (normalise only; normalise + encode; the whole assignment;
prototype assignment): kernels/s of the engine (one call over the whole memmap, writing into preallocated
outputs) and of the peer (:class:`kernelatlas.bench.peer.TorchPeer`, chunk by chunk, writing into preallocated
outputs), the ratio engine/peer per round (the median over rounds is the figure to quote), the FLOP rates
against this CPU's measured FP32 FMA peak, the input bandwidth against the measured read bandwidth, and the
label agreement of the two.

Fairness rules (section C): the same thread count for both (``torch.set_num_threads``); the chunk size that is
fastest for torch, picked on a prefix of the corpus; rounds alternate engine/peer (and flip the order every
other round) so that drift and noise hit both; both run under ``GLIBC_TUNABLES=``
``glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184`` -- without it glibc hands
torch's large per-chunk buffers back to the OS after every op and the peer's speed varies several fold from
process to process.  glibc reads the variable only at process start, so :func:`run_bench` re-runs
itself in a child process with it set (and the CLI re-executes itself with ``os.execv``) when this process was
not started with it.  Other processes using the CPUs during a timed run are measured from /proc/stat and
reported: the figures of a busy machine are not worth quoting.

The corpus is synthetic: kernels that look like trained kernels (a random mixture of a few smooth patterns --
blob, difference of Gaussians, first and second derivatives, ring -- with one dominant, plus an offset and
noise, at a log-normal scale) with about 1% all-zero rows.  The model is a random-init
(``torch.manual_seed``) autoencoder d -> 64 -> 32 -> 1 -> 32 -> 64 -> d (ReLU, sigmoid code); its code
intervals and the thresholds are placed at quantiles of a sample so that every label occurs and about half of
the kernels pass the threshold (random-init codes crowd into a narrow band, so evenly spaced intervals would
give one label).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

import kernelatlas
from kernelatlas import _core
from kernelatlas.autoencoder import Autoencoder
from kernelatlas.engine import prototype_engine

__all__ = [
    "ALLOCATOR_TUNABLES",
    "STAGES",
    "allocator_status",
    "check_params",
    "exec_with_tunables",
    "format_report",
    "make_autoencoder",
    "make_corpus",
    "run_bench",
]

STAGES = ("normalize", "encode", "assign", "prototypes")
STAGE_TITLES = {
    "normalize": "normalise",
    "encode": "normalise+encode",
    "assign": "assign (end to end)",
    "prototypes": "prototypes (8)",
}
DEFAULT_CHUNK_SIZES = (16384, 32768, 65536)
# The project's targets for the end-to-end ratio engine/peer (2 threads); printed beside the measured ratios.
TARGET_RATIOS = {3: 6.0, 7: 4.0}
NOMINAL_MEMORY_GBPS = 40.0  # a typical 2-channel DDR5 server share; the measured figure is printed beside it
HIDDEN = (64, 32)  # encoder widths d -> 64 -> 32 -> 1; the decoder mirrors them
N_INTERVALS = 5
AGREEMENT_TOL = 1e-5  # a disagreement within this of the threshold (or an interval edge) is fp rounding
BUSY_SHARE = 0.10  # other processes using more of the CPUs than this make a timed run worthless
MAX_RETRIES = 2  # times a contended engine/peer pair is measured again

ALLOCATOR_TUNABLES = {
    "glibc.malloc.mmap_threshold": "4294967296",
    "glibc.malloc.trim_threshold": "17179869184",
}
ALLOCATOR_SETTING = ":".join(f"{k}={v}" for k, v in ALLOCATOR_TUNABLES.items())
# Set in the environment of a process that kernelatlas started to get the tunables; its value says how.
CHILD_ENV = "KERNELATLAS_BENCH_CHILD"


def _log(msg: str, verbose: bool = True) -> None:
    if verbose:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- allocator


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


def _run_in_child(params: dict[str, Any], json_path: str | os.PathLike[str] | None,
                  verbose: bool) -> dict[str, Any]:
    """Run the bench in ``python -m kernelatlas.cli bench`` with the tunables set; its output goes to ours
    (or nowhere when not ``verbose``)."""
    with tempfile.TemporaryDirectory(prefix="kernelatlas-bench-") as tmp:
        out = Path(json_path) if json_path is not None else Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "kernelatlas.cli", "bench", *bench_cli_args(**params, json_path=out)]
        _log("glibc reads GLIBC_TUNABLES only at start: measuring in a child process with it set", verbose)
        sys.stdout.flush()
        sys.stderr.flush()
        quiet = {} if verbose else {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        proc = subprocess.run(cmd, env=_tunables_environ("subprocess"), check=False, **quiet)
        if proc.returncode != 0:
            raise RuntimeError(f"the bench child process failed (exit {proc.returncode}): {' '.join(cmd)}")
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------- corpus


def synthetic_patterns(k: int) -> np.ndarray:
    """Eight smooth k x k patterns, float32 [8, k*k]: blob, DoG, d/dx, d/dy, d2/dx2, d2/dy2, d2/dxdy, ring."""
    c = np.linspace(-1.0, 1.0, k)
    u, v = np.meshgrid(c, c, indexing="xy")  # u varies along a row (x), v down the rows (y)
    r2 = u * u + v * v

    def gauss(sigma: float) -> np.ndarray:
        return np.exp(-r2 / (2 * sigma * sigma))

    s = 0.6
    g = gauss(s)
    patterns = [
        g,
        gauss(0.45) - 0.6 * gauss(1.0),
        -u * g,
        -v * g,
        (u * u / (s * s) - 1) * g,
        (v * v / (s * s) - 1) * g,
        u * v * g,
        np.exp(-((np.sqrt(r2) - 0.75) ** 2) / 0.08),
    ]
    return np.stack([p.ravel() for p in patterns]).astype(np.float32)


def synth_kernels(rng: np.random.Generator, rows: int, k: int, patterns: np.ndarray) -> np.ndarray:
    """``rows`` synthetic kernels float32 [rows, k*k]; about 1% are all-zero (dead) rows."""
    n_pat, d = patterns.shape
    coeffs = rng.standard_normal((rows, n_pat), dtype=np.float32) * np.float32(0.3)
    dominant = rng.integers(0, n_pat, rows)
    coeffs[np.arange(rows), dominant] += rng.choice(np.float32([-1.0, 1.0]), rows) * (
        np.float32(1.0) + np.abs(rng.standard_normal(rows, dtype=np.float32))
    )
    kernels = coeffs @ patterns
    kernels += rng.standard_normal((rows, d), dtype=np.float32) * np.float32(0.15)
    kernels += rng.standard_normal((rows, 1), dtype=np.float32) * np.float32(0.3)
    kernels *= np.exp(rng.normal(-2.5, 0.6, (rows, 1))).astype(np.float32)
    kernels[rng.random(rows) < 0.01] = 0.0
    return kernels


def corpus_path(workdir: str | os.PathLike[str], n: int, k: int, dtype: str, seed: int) -> Path:
    return Path(workdir) / f"corpus-k{k}-n{n}-{dtype}-seed{seed}.npy"


def make_corpus(
    workdir: str | os.PathLike[str],
    n: int,
    k: int,
    *,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    chunk_rows: int = 1 << 20,
) -> np.memmap:
    """The synthetic corpus [n, k*k] as a read-only memmap of a .npy file in ``workdir``; reused when a file
    of that shape and dtype is there.  Written chunk by chunk to a temporary name, then renamed, so a crash
    never leaves a half-written file that a later run would take for a complete one."""
    from tqdm import tqdm

    path = corpus_path(workdir, n, k, dtype, seed)
    d = k * k
    if path.is_file():
        try:
            corpus = np.load(path, mmap_mode="r")
            if corpus.shape == (n, d) and corpus.dtype == np.dtype(dtype):
                _log(f"k={k}: reusing {path}", progress)
                return corpus
        except (ValueError, OSError):
            pass
        _log(f"k={k}: {path} has the wrong shape or is damaged: writing it again", progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    rng = np.random.default_rng([seed, k])
    patterns = synthetic_patterns(k)
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
    with tqdm(total=n, desc=f"corpus k={k}", unit="kernel", unit_scale=True, file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            out[start:stop] = synth_kernels(rng, stop - start, k, patterns)
            bar.update(stop - start)
    out.flush()
    del out
    os.replace(partial, path)
    _log(f"k={k}: wrote {path} ({path.stat().st_size / 1e9:.2f} GB)", progress)
    return np.load(path, mmap_mode="r")


def _page_cache(corpus: np.ndarray, k: int, progress: bool, chunk_rows: int = 1 << 20) -> None:
    """Read the corpus once, so that both contenders read it from memory, never from disk."""
    from tqdm import tqdm

    n = len(corpus)
    with tqdm(total=n, desc=f"page-cache k={k}", unit="kernel", unit_scale=True, file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            np.max(corpus[start:stop])
            bar.update(stop - start)


# ---------------------------------------------------------------------------------------------- model


def make_autoencoder(k: int, seed: int = 0) -> tuple[Any, Any]:
    """The benchmark's default autoencoder, random-init: encoder d -> 64 -> 32 -> 1 (ReLU, ReLU, sigmoid code)
    and decoder 1 -> 32 -> 64 -> d (ReLU, ReLU, linear), as two ``nn.Sequential``."""
    import torch
    from torch import nn

    d = k * k
    torch.manual_seed(seed)
    h1, h2 = HIDDEN
    encoder = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1),
                            nn.Sigmoid())
    decoder = nn.Sequential(nn.Linear(1, h2), nn.ReLU(), nn.Linear(h2, h1), nn.ReLU(), nn.Linear(h1, d))
    return encoder.eval(), decoder.eval()


def calibrate(
    encoder: Any, decoder: Any, prototypes: np.ndarray, sample: np.ndarray, threads: int | None
) -> tuple[Autoencoder, float, float]:
    """Code intervals at quantiles of the sample's codes, and the thresholds (autoencoder, prototypes) at the
    median score, so that every label occurs and about half of the kernels pass."""
    plain = Autoencoder.from_torch(encoder, decoder)
    codes = plain.encode(sample, threads=threads)
    edges = np.nanquantile(codes, np.linspace(0, 1, N_INTERVALS + 1)[1:-1]).astype(np.float64)
    bounds = [0.0, *edges.tolist(), 1.0]
    clusters = [(bounds[i], bounds[i + 1]) for i in range(N_INTERVALS)]
    model = Autoencoder.from_torch(encoder, decoder, clusters=clusters)
    _, scores, _ = kernelatlas.assign(sample, model, threshold=0.0, threads=threads)
    live = np.isfinite(codes)
    tau = round(float(np.median(scores[live])), 4)
    _, pscores = kernelatlas.assign_prototypes(sample, prototypes, threshold=0.0, threads=threads)
    ptau = round(float(np.median(pscores[live])), 4)
    return model, tau, ptau


def flops_per_kernel(model: Autoencoder, stage: str, n_proto: int) -> tuple[int, int]:
    """(engine, peer) floating-point operations per kernel, an FMA counted as 2, activations and biases not
    counted, padding not counted.

    * normalise: 5d (sum, subtract, square-accumulate, scale) for both;
    * encode: + 2 x encoder MACs for both;
    * assign, engine with the segment table: + 6d (reconstruction r = c + u b, x.r and r.r, one FMA each);
      engine with the decoder MLP: + 2 x decoder MACs + 4d (x.r, r.r); the peer: + 2 x decoder MACs + 6d
      (``F.cosine_similarity`` takes x.r, x.x and r.r);
    * prototypes: + 2 P d for both.
    """
    d = model.d
    enc = sum(int(layer.weight.size) for layer in model.encoder)
    dec = sum(int(layer.weight.size) for layer in model.decoder)
    norm = 5 * d
    if stage == "normalize":
        return norm, norm
    if stage == "encode":
        return norm + 2 * enc, norm + 2 * enc
    if stage == "assign":
        engine_cos = 6 * d if model.piecewise_linear else 2 * dec + 4 * d
        return norm + 2 * enc + engine_cos, norm + 2 * enc + 2 * dec + 6 * d
    if stage == "prototypes":
        return norm + 2 * n_proto * d, norm + 2 * n_proto * d
    raise ValueError(f"unknown stage {stage!r}")


# ---------------------------------------------------------------------------------------------- measuring


class _CpuMeter:
    """CPU time used by OTHER processes during a timed run, as a share of all CPUs, from /proc/stat."""

    MIN_TICKS = 50  # CPU-ticks (all CPUs together) a run must span for its share to mean anything

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _stat() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as fh:
                fields = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        busy = user + nice + system + irq + softirq + steal
        return busy, busy + idle + iowait

    def start(self) -> tuple[Any, float]:
        return self._stat(), time.process_time()

    def others_share(self, token: tuple[Any, float]) -> float | None:
        stat0, cpu0 = token
        stat1, cpu1 = self._stat(), time.process_time()
        if stat0 is None or stat1 is None or stat1[1] - stat0[1] < self.MIN_TICKS:
            return None  # too short to tell at the clock-tick resolution
        busy = (stat1[0] - stat0[0]) / self.hz
        total = (stat1[1] - stat0[1]) / self.hz
        return max(0.0, min(1.0, (busy - (cpu1 - cpu0)) / total))


def _wait_for_idle(meter: _CpuMeter, max_wait: float, busy: float = BUSY_SHARE) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use less than ``busy`` of the CPUs over a
    0.3 s window; returns the seconds waited.  A shared machine is common and torch's OpenMP collapses when a
    core is taken (every op ends in a barrier), so a timed run is worth starting only on idle CPUs."""
    if max_wait <= 0:
        return 0.0
    t0 = time.perf_counter()
    while True:
        token = meter.start()
        time.sleep(0.3)
        share = meter.others_share(token)
        waited = time.perf_counter() - t0
        if share is None or share < busy or waited >= max_wait:
            return waited


def _timed(fn: Callable[[], Any], meter: _CpuMeter) -> tuple[float, float | None]:
    token = meter.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, meter.others_share(token)


def measure_read_bandwidth(threads: int, nbytes: int = 1 << 30) -> dict[str, float]:
    """Streaming read bandwidth (GB/s) over a buffer larger than the caches: numpy on one thread, and torch's
    sum on ``threads`` threads; ``best`` is the larger."""
    buf = np.empty(nbytes // 4, dtype=np.float32)
    buf.fill(1.0)

    def best_of(fn: Callable[[], Any], reps: int = 3) -> float:
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return buf.nbytes / best / 1e9

    result = {"numpy_1_thread": best_of(lambda: np.add.reduce(buf))}
    try:
        import torch

        torch.set_num_threads(threads)
        view = torch.from_numpy(buf)
        result[f"torch_{threads}_threads"] = best_of(lambda: view.sum())
    except ImportError:  # pragma: no cover
        pass
    result["best"] = max(result.values())
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _filled(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A preallocated output whose pages are already touched (first-touch faults are not part of a run)."""
    arr = np.empty(shape, dtype=dtype)
    arr.fill(0)
    return arr


def _agreement_assign(model: Autoencoder, tau: float, engine: tuple[np.ndarray, ...],
                      peer: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """Labels must agree except where fp rounding can flip them: the peer's score within AGREEMENT_TOL of the
    threshold, or (counted apart) an interval edge lying between the engine's and the peer's code (both
    within AGREEMENT_TOL of it)."""
    e_labels, e_scores, e_codes = engine
    p_labels, p_scores, p_codes = peer
    differ = e_labels != p_labels
    with np.errstate(invalid="ignore"):
        near_tau = np.abs(p_scores - np.float32(tau)) <= AGREEMENT_TOL
    rest = differ & ~near_tau
    near_edge = np.zeros_like(rest)
    if rest.any() and model.clusters:
        edges = np.array(sorted({e for iv in model.clusters for e in iv}), dtype=np.float64)
        idx = np.flatnonzero(rest)
        e_side = e_codes[idx, None].astype(np.float64) - edges[None, :]
        p_side = p_codes[idx, None].astype(np.float64) - edges[None, :]
        close = (np.abs(p_side) <= AGREEMENT_TOL) & (np.abs(e_side) <= AGREEMENT_TOL)
        straddle = (e_side * p_side <= 0) & close
        near_edge[idx] = straddle.any(axis=1)
    other = rest & ~near_edge
    live = np.isfinite(p_scores)
    return {
        "kernels": int(len(e_labels)),
        "equal": int(len(e_labels) - differ.sum()),
        "differ_near_threshold": int((differ & near_tau).sum()),
        "differ_near_interval_edge": int(near_edge.sum()),
        "differ_other": int(other.sum()),
        "max_abs_score_diff": float(np.max(np.abs(e_scores[live] - p_scores[live]), initial=0.0)),
        "max_abs_code_diff": float(np.max(np.abs(e_codes[live] - p_codes[live]), initial=0.0)),
        "peer_nan_scores": int((~live).sum()),
        "engine_label_counts": {
            str(int(label)): int(count)
            for label, count in zip(*np.unique(e_labels, return_counts=True), strict=True)
        },
    }


def _agreement_prototypes(corpus: np.ndarray, prototypes: np.ndarray, tau: float,
                          engine: tuple[np.ndarray, ...], peer: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """As for assign; a disagreement between two prototypes whose cosines tie to AGREEMENT_TOL (recomputed in
    float64) is counted apart."""
    e_labels, e_scores = engine
    p_labels, p_scores = peer
    differ = e_labels != p_labels
    with np.errstate(invalid="ignore"):
        near_tau = np.abs(p_scores - np.float32(tau)) <= AGREEMENT_TOL
    rest = differ & ~near_tau
    tie = np.zeros_like(rest)
    idx = np.flatnonzero(rest & (e_labels >= 0) & (p_labels >= 0))
    if len(idx):
        p = prototypes.astype(np.float64)
        p -= p.mean(1, keepdims=True)
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        x = np.asarray(corpus[idx], dtype=np.float64).reshape(len(idx), -1)
        x -= x.mean(1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cos = x @ p.T
        rows = np.arange(len(idx))
        tie[idx] = np.abs(cos[rows, e_labels[idx]] - cos[rows, p_labels[idx]]) <= AGREEMENT_TOL
    live = np.isfinite(p_scores)
    return {
        "kernels": int(len(e_labels)),
        "equal": int(len(e_labels) - differ.sum()),
        "differ_near_threshold": int((differ & near_tau).sum()),
        "differ_near_tie": int(tie.sum()),
        "differ_other": int((rest & ~tie).sum()),
        "max_abs_score_diff": float(np.max(np.abs(e_scores[live] - p_scores[live]), initial=0.0)),
    }


# ---------------------------------------------------------------------------------------------- the bench


class _SizeBench:
    """Everything for one kernel size: corpus, engine model, peer, thresholds and preallocated outputs
    (touched, so that first-touch page faults are no part of a timed run).  Engine and peer have outputs of
    their own where their results are compared; the [n, d] output of the normalise stage is shared."""

    def __init__(self, k: int, n: int, dtype: str, seed: int, threads: int, workdir: Path,
                 stages: Sequence[str], verbose: bool) -> None:
        from kernelatlas.bench.peer import TorchPeer

        self.k, self.d, self.n, self.threads, self.stages = k, k * k, n, threads, list(stages)
        self.corpus = make_corpus(workdir, n, k, dtype=dtype, seed=seed, progress=verbose)
        _page_cache(self.corpus, k, verbose)
        encoder, decoder = make_autoencoder(k, seed)
        self.patterns = synthetic_patterns(k)
        sample = np.ascontiguousarray(self.corpus[: min(n, 200_000)])
        self.model, self.tau, self.ptau = calibrate(encoder, decoder, self.patterns, sample, threads)
        self.prototypes = prototype_engine(self.patterns)
        self.peer = TorchPeer(encoder, decoder, clusters=self.model.clusters, prototypes=self.patterns,
                              threads=threads)
        both = ("engine", "peer")
        self.out: dict[str, Any] = {}
        if "normalize" in stages:
            shared = (_filled((n, self.d), np.float32), _filled((n,), np.float32))
            self.out["normalize"] = dict.fromkeys(both, shared)
        if "encode" in stages:
            self.out["encode"] = {who: _filled((n,), np.float32) for who in both}
        if "assign" in stages:
            self.out["assign"] = {who: (_filled((n,), np.int16), _filled((n,), np.float32),
                                        _filled((n,), np.float32)) for who in both}
        if "prototypes" in stages:
            self.out["prototypes"] = {who: (_filled((n,), np.int16), _filled((n,), np.float32))
                                      for who in both}

    def run(self, stage: str, who: str, rows: int | None = None) -> None:
        """One pass of ``stage`` by ``who`` over the first ``rows`` kernels (all by default)."""
        rows = self.n if rows is None else rows
        x = self.corpus[:rows]
        out = self.out[stage][who]
        out = tuple(a[:rows] for a in out) if isinstance(out, tuple) else out[:rows]
        engine = who == "engine"
        if stage == "normalize":
            if engine:
                kernelatlas.normalize(x, out=out[0], norms=out[1], threads=self.threads)
            else:
                self.peer.normalize(x, out=out[0], norms=out[1])
        elif stage == "encode":
            if engine:
                self.model.encode(x, threads=self.threads, out=out)
            else:
                self.peer.encode(x, out=out)
        elif stage == "assign":
            if engine:
                kernelatlas.assign(x, self.model, threshold=self.tau, threads=self.threads, out=out)
            else:
                self.peer.assign(x, threshold=self.tau, out=out)
        elif engine:
            kernelatlas.assign_prototypes(x, self.prototypes, threshold=self.ptau, threads=self.threads,
                                          out=out)
        else:
            self.peer.assign_prototypes(x, threshold=self.ptau, out=out)

    def pick_chunk(self, chunk_sizes: Sequence[int], meter: _CpuMeter) -> tuple[int, dict[int, float], int]:
        """Torch's fastest chunk size (best of 2 on a prefix, on the assign stage if measured)."""
        prefix = min(self.n, max(4 * max(chunk_sizes), 1_000_000))
        stage = "assign" if "assign" in self.stages else self.stages[0]
        trials = {}
        for chunk in chunk_sizes:
            self.peer.chunk_rows = chunk
            best = min(_timed(partial(self.run, stage, "peer", prefix), meter)[0] for _ in range(2))
            trials[chunk] = prefix / best
        self.peer.chunk_rows = max(trials, key=trials.__getitem__)
        return self.peer.chunk_rows, trials, prefix

    def agreement(self) -> dict[str, Any]:
        result = {}
        if "assign" in self.out:
            result["assign"] = _agreement_assign(self.model, self.tau, self.out["assign"]["engine"],
                                                 self.out["assign"]["peer"])
        if "prototypes" in self.out:
            result["prototypes"] = _agreement_prototypes(self.corpus, self.patterns, self.ptau,
                                                         self.out["prototypes"]["engine"],
                                                         self.out["prototypes"]["peer"])
        return result


def _measure_size(k: int, *, n: int, dtype: str, seed: int, threads: int, workdir: Path,
                  stages: Sequence[str], rounds: int, chunk_sizes: Sequence[int], wait_idle: float,
                  meter: _CpuMeter, verbose: bool) -> dict[str, Any]:
    """Warm-up, torch's chunk size, then the alternating rounds for kernel size k; the per-size result."""
    sb = _SizeBench(k, n, dtype, seed, threads, workdir, stages, verbose)
    d = sb.d
    _log(f"k={k}: model d={d} -> {HIDDEN[0]} -> {HIDDEN[1]} -> 1 -> {HIDDEN[1]} -> {HIDDEN[0]} -> {d}, "
         f"{sb.model.n_segments} decoder segments, {len(sb.model.clusters or [])} intervals, tau={sb.tau}, "
         f"prototype tau={sb.ptau}", verbose)

    # warm-up (first-call costs: thread pools, oneDNN primitives), then torch's best chunk size
    for stage in stages:
        for who in ("engine", "peer"):
            sb.run(stage, who, min(n, 100_000))
    _wait_for_idle(meter, wait_idle)
    best_chunk, trials, prefix = sb.pick_chunk(chunk_sizes, meter)
    _log(f"k={k}: torch chunk size on {prefix:,} rows: "
         + ", ".join(f"{c}: {r / 1e6:.2f} M/s" for c, r in trials.items()) + f" -> {best_chunk}", verbose)

    # the rounds: engine and peer alternate, and the order flips every round
    # (a pair during which other processes took more than BUSY_SHARE of the CPUs is measured again, at most
    # MAX_RETRIES times: torch's OpenMP slows down many-fold when a core is taken, the engine far less)
    times: dict[str, dict[str, list[float]]] = {s: {"engine": [], "peer": []} for s in stages}
    others: dict[str, list[float]] = {s: [] for s in stages}
    waited, discarded = 0.0, 0
    for r in range(rounds):
        order = ("engine", "peer") if r % 2 == 0 else ("peer", "engine")
        for stage in stages:
            for attempt in range(MAX_RETRIES + 1):
                waited += _wait_for_idle(meter, wait_idle)
                pair: dict[str, float] = {}
                shares = []
                for who in order:
                    pair[who], share = _timed(partial(sb.run, stage, who), meter)
                    if share is not None:
                        shares.append(share)
                busiest = max(shares) if shares else None  # None: runs too short to tell
                contended = busiest is not None and busiest > BUSY_SHARE
                line = " | ".join(f"{who} {pair[who]:6.2f} s ({n / pair[who] / 1e6:6.2f} M/s)"
                                  for who in order)
                _log(f"k={k} round {r + 1}/{rounds} {STAGE_TITLES[stage]:<20} {line} | "
                     f"x{pair['peer'] / pair['engine']:.2f}"
                     + (f" | others took {100 * busiest:.0f}% of the CPUs" if contended else ""), verbose)
                if not contended or attempt == MAX_RETRIES:
                    break
                discarded += 1
                _log("  (measuring this pair again)", verbose)
            for who in order:
                times[stage][who].append(pair[who])
            if busiest is not None:
                others[stage].append(busiest)

    stage_results = {}
    for stage in stages:
        e_times, p_times = times[stage]["engine"], times[stage]["peer"]
        f_engine, f_peer = flops_per_kernel(sb.model, stage, len(sb.patterns))
        stage_results[stage] = {
            "engine_seconds": e_times,
            "peer_seconds": p_times,
            "engine_kps": _median([n / t for t in e_times]),
            "peer_kps": _median([n / t for t in p_times]),
            "ratios": [p / e for e, p in zip(e_times, p_times, strict=True)],
            "ratio": _median([p / e for e, p in zip(e_times, p_times, strict=True)]),
            "engine_flops_per_kernel": f_engine,
            "peer_flops_per_kernel": f_peer,
            "input_bytes_per_kernel": d * np.dtype(dtype).itemsize,
            "others_cpu_share_max": max(others[stage]) if others[stage] else None,
        }
    return {
        "k": k,
        "d": d,
        "corpus": str(corpus_path(workdir, n, k, dtype, seed)),
        "threshold": sb.tau,
        "prototype_threshold": sb.ptau,
        "intervals": [list(iv) for iv in sb.model.clusters or []],
        "decoder_segments": sb.model.n_segments,
        "engine_decoder": "segments" if sb.model.piecewise_linear else "mlp",
        "torch_chunk_rows": best_chunk,
        "torch_chunk_trials_kps": {str(c): v for c, v in trials.items()},
        "waited_for_idle_seconds": waited,
        "pairs_measured_again": discarded,
        "stages": stage_results,
        "agreement": sb.agreement(),
    }


def run_bench(
    n: int = 20_000_000,
    ks: Sequence[int] = (3, 7),
    threads: int | None = 2,
    rounds: int = 3,
    dtype: str = "float32",
    workdir: str | os.PathLike[str] | None = None,
    chunk_sizes: Sequence[int] = DEFAULT_CHUNK_SIZES,
    *,
    stages: Sequence[str] = STAGES,
    seed: int = 0,
    json_path: str | os.PathLike[str] | None = None,
    allocator: str = "auto",
    wait_idle: float = 30.0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Engine vs the PyTorch peer on ``n`` synthetic kernels per size in ``ks``; prints the table (stdout) and
    the progress (stderr) when ``verbose``; returns the results as a JSON-ready dict, also written to
    ``json_path`` when given.

    ``threads``: for both contenders (None: all cores).  ``workdir``: where the corpus files are kept and
    reused (default: ``kernelatlas-bench`` under the system temp dir).  ``chunk_sizes``: the torch chunk sizes
    tried on a prefix; the fastest is used.  ``stages``: among :data:`STAGES`.  ``allocator``: 'auto' measures
    under :data:`ALLOCATOR_TUNABLES`, in a child process when this one was not started with them; 'as-is'
    measures here whatever the allocator settings (the report says which).  ``wait_idle``: before each
    engine/peer pair, wait up to this many seconds for other processes to leave the CPUs (0: never wait).
    """
    ks = [int(k) for k in ks]
    stages = list(stages)
    chunk_sizes = [int(c) for c in chunk_sizes]
    check_params(n=n, ks=ks, threads=threads, rounds=rounds, dtype=dtype, chunk_sizes=chunk_sizes,
                 stages=stages, allocator=allocator)
    if allocator == "auto" and needs_reexec():
        params = dict(n=n, ks=ks, threads=threads, rounds=rounds, dtype=dtype, workdir=workdir,
                      chunk_sizes=chunk_sizes, stages=stages, seed=seed, wait_idle=wait_idle)
        return _run_in_child(params, json_path, verbose)

    from kernelatlas.bench.peer import require_torch

    torch = require_torch()
    threads = threads or int(_core.build_info()["threads"])
    workdir = Path(workdir) if workdir is not None else Path(tempfile.gettempdir()) / "kernelatlas-bench"
    alloc = allocator_status()
    if alloc["applicable"] and not alloc["applied"]:
        _log(f"WARNING: allocator tunables {alloc['how']}", verbose)
    meter = _CpuMeter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    _log(f"measuring the FP32 FMA peak and the read bandwidth on {threads} threads", verbose)
    _wait_for_idle(meter, wait_idle)
    peak = [_core.fma_peak_gflops(0.5, threads)]
    bandwidth = measure_read_bandwidth(threads)

    build = kernelatlas.build_info()
    config = dict(n=n, ks=ks, threads=threads, rounds=rounds, dtype=dtype, workdir=None,
                  chunk_sizes=chunk_sizes, stages=stages, seed=seed, wait_idle=wait_idle)
    result: dict[str, Any] = {
        "schema": "kernelatlas-bench/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "kernelatlas bench " + " ".join(bench_cli_args(**config, json_path=None)),
        "config": {**config, "workdir": str(workdir)},
        "machine": {
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "isa": build["isa"],
            "compiler": build["compiler"],
            "kernelatlas": kernelatlas.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "read_bandwidth_gbps": bandwidth,
            "nominal_memory_gbps": NOMINAL_MEMORY_GBPS,
            "loadavg_before": load_before,
        },
        "allocator": alloc,
        "results": {},
    }
    for k in ks:
        result["results"][f"k{k}"] = _measure_size(
            k, n=n, dtype=dtype, seed=seed, threads=threads, workdir=workdir, stages=stages, rounds=rounds,
            chunk_sizes=chunk_sizes, wait_idle=wait_idle, meter=meter, verbose=verbose)
    _wait_for_idle(meter, wait_idle)
    peak.append(_core.fma_peak_gflops(0.5, threads))
    result["machine"]["fma_peak_gflops"] = max(peak)  # the larger of two: contention only ever lowers it
    result["machine"]["fma_peak_gflops_runs"] = peak
    result["machine"]["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    _fill_derived(result)
    if verbose:
        print(format_report(result), flush=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2))
        _log(f"results written to {json_path}", verbose and os.environ.get(CHILD_ENV) != "subprocess")
    return result


def check_params(*, n: int, ks: Sequence[int], threads: int | None, rounds: int, dtype: str,
                 chunk_sizes: Sequence[int], stages: Sequence[str], allocator: str = "auto") -> None:
    """Raise ValueError naming the first bad :func:`run_bench` parameter."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not ks or any(k < 1 or k * k > 256 for k in ks):
        raise ValueError(f"kernel sizes must be in 1..16, got {list(ks)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 (or None for all cores), got {threads}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if not chunk_sizes or min(chunk_sizes) < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {list(chunk_sizes)}")
    if not stages or any(s not in STAGES for s in stages):
        raise ValueError(f"stages must be among {', '.join(STAGES)}, got {list(stages)}")
    if allocator not in ("auto", "as-is"):
        raise ValueError(f"allocator must be 'auto' or 'as-is', got {allocator!r}")


def _fill_derived(result: dict[str, Any]) -> None:
    """FLOP rates, peak and bandwidth shares, and the summary of the end-to-end ratios."""
    peak = result["machine"]["fma_peak_gflops"]
    measured_bw = result["machine"]["read_bandwidth_gbps"]["best"]
    nominal_bw = result["machine"]["nominal_memory_gbps"]
    summary = {}
    for key, res in result["results"].items():
        for s in res["stages"].values():
            s["engine_gflops"] = s["engine_kps"] * s["engine_flops_per_kernel"] / 1e9
            s["peer_gflops"] = s["peer_kps"] * s["peer_flops_per_kernel"] / 1e9
            # the engine's rate at the peer's FLOP count: what running the full decoder would have to reach
            s["engine_peer_equivalent_gflops"] = s["engine_kps"] * s["peer_flops_per_kernel"] / 1e9
            s["engine_peak_share"] = s["engine_gflops"] / peak
            s["peer_peak_share"] = s["peer_gflops"] / peak
            s["engine_input_gbps"] = s["engine_kps"] * s["input_bytes_per_kernel"] / 1e9
            s["engine_bandwidth_share"] = s["engine_input_gbps"] / measured_bw
            s["engine_nominal_bandwidth_share"] = s["engine_input_gbps"] / nominal_bw
        if "assign" in res["stages"]:
            summary[key] = {"ratio": res["stages"]["assign"]["ratio"], "target": TARGET_RATIOS.get(res["k"])}
    result["summary"] = {"assign_ratio": summary}


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table of a :func:`run_bench` result."""
    cfg, mach = result["config"], result["machine"]
    bw = mach["read_bandwidth_gbps"]
    measured = ", ".join(f"{name} {v:.1f}" for name, v in bw.items() if name != "best")
    lines = [
        "kernelatlas bench: native engine vs the PyTorch peer (reference/README.md section C), same process, "
        "alternating rounds",
        f"  machine    {mach['cpu']}, {mach['cpus']} CPUs; engine ISA {mach['isa']} ({mach['compiler']}); "
        f"torch {mach['torch']}; numpy {mach['numpy']}",
        f"  peak       FP32 FMA {mach['fma_peak_gflops']:.0f} GFLOP/s on {cfg['threads']} threads "
        f"(measured); read bandwidth {bw['best']:.1f} GB/s (measured: {measured}; nominal "
        f"{mach['nominal_memory_gbps']:.0f})",
        f"  allocator  GLIBC_TUNABLES={result['allocator']['setting']}: {result['allocator']['how']}",
        f"  run        n = {cfg['n']:,} kernels per size, {cfg['dtype']}, {cfg['threads']} threads (engine "
        f"and torch.set_num_threads), {cfg['rounds']} rounds, medians; {result['date']}",
        "",
        f"  {'k':>2}  {'stage':<20} {'engine':>10} {'peer':>10} {'engine/':>8}  {'engine':>15}  {'peer':>15}"
        f"  {'engine input':>17}  {'others':>6}",
        f"  {'':>2}  {'':<20} {'Mkernel/s':>10} {'Mkernel/s':>10} {'peer':>8}  {'GFLOP/s (%pk)':>15}"
        f"  {'GFLOP/s (%pk)':>15}  {'GB/s (%meas BW)':>17}  {'CPU':>6}",
    ]
    notes = []
    for res in result["results"].values():
        for stage, s in res["stages"].items():
            busy = s["others_cpu_share_max"]
            lines.append(
                f"  {res['k']:>2}  {STAGE_TITLES[stage]:<20} {s['engine_kps'] / 1e6:>10.2f}"
                f" {s['peer_kps'] / 1e6:>10.2f} {s['ratio']:>7.2f}x"
                f"  {s['engine_gflops']:>7.1f} ({100 * s['engine_peak_share']:>4.1f}%)"
                f"  {s['peer_gflops']:>7.1f} ({100 * s['peer_peak_share']:>4.1f}%)"
                f"  {s['engine_input_gbps']:>8.2f} ({100 * s['engine_bandwidth_share']:>4.1f}%)"
                + (f"  {100 * busy:>5.0f}%" if busy is not None else f"  {'n/a':>6}")
            )
        trials = ", ".join(f"{c}: {v / 1e6:.2f}" for c, v in res["torch_chunk_trials_kps"].items())
        notes.append(
            f"  k={res['k']}: torch chunk {res['torch_chunk_rows']} rows (M/s on a prefix: {trials}); engine "
            f"decoder: {res['engine_decoder']} ({res['decoder_segments']} segments); tau {res['threshold']}, "
            f"prototype tau {res['prototype_threshold']}; waited {res['waited_for_idle_seconds']:.0f} s for "
            f"idle CPUs, measured {res['pairs_measured_again']} contended pairs again"
        )
        if "assign" in res["stages"]:
            s = res["stages"]["assign"]
            equivalent = s["engine_peer_equivalent_gflops"]
            notes.append(
                f"     assign FLOPs per kernel: engine {s['engine_flops_per_kernel']:,}, peer "
                f"{s['peer_flops_per_kernel']:,}; the engine's rate at the peer's count: {equivalent:.0f} "
                f"GFLOP/s ({100 * equivalent / mach['fma_peak_gflops']:.0f}% of peak)"
            )
        for what, a in res["agreement"].items():
            excused = f"{a['differ_near_threshold']} with the peer's score within {AGREEMENT_TOL:g} of tau"
            if "differ_near_interval_edge" in a:
                excused += (f", {a['differ_near_interval_edge']} with an interval edge between the two "
                            "codes")
            if "differ_near_tie" in a:
                excused += f", {a['differ_near_tie']} tied prototypes"
            verdict = "OK" if a["differ_other"] == 0 else "MISMATCH"
            code_diff = f", max |code diff| {a['max_abs_code_diff']:.2g}" if "max_abs_code_diff" in a else ""
            notes.append(
                f"     {what} labels: {a['equal']:,} of {a['kernels']:,} equal; differ: {excused}; other: "
                f"{a['differ_other']} [{verdict}]; max |score diff| {a['max_abs_score_diff']:.2g}{code_diff}"
            )
    lines += ["", *notes]
    summary = result.get("summary", {}).get("assign_ratio", {})
    if summary:
        parts = []
        for key, s in summary.items():
            part = f"k={key[1:]} {s['ratio']:.2f}x"
            if s["target"] is not None:
                part += f" (target {s['target']:g}x: {'met' if s['ratio'] >= s['target'] else 'NOT met'})"
            parts.append(part)
        lines += ["", "  end to end (assign), engine/peer: " + "; ".join(parts)]
    lines += [
        "  FLOPs per kernel: engine = what it executes (normalise 5d, 2 x encoder MACs, cosine from the",
        "  decoder's segment table 6d, or 2 x decoder MACs + 4d with the MLP decoder); peer = the same",
        "  normalise and encoder, the full decoder and cosine_similarity (6d).  %pk: share of the FMA peak.",
        "  others CPU: the most CPU other processes used during a kept timed run.",
    ]
    busiest = max((s["others_cpu_share_max"] or 0.0 for res in result["results"].values()
                   for s in res["stages"].values()), default=0.0)
    if busiest > 0.05:
        lines.append(f"  WARNING: other processes used up to {100 * busiest:.0f}% of the CPUs during a timed "
                     "run: rerun on an idle machine before quoting these figures")
    return "\n".join(lines)
