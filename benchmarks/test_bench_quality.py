"""Per-layer statistics (_core.layer_stats, issue 5) over a page-cached synthetic corpus of float16 3x3 kernels
in layers of ~100k rows, against the numpy code a user would write (per layer: cast to float32, finite mask,
max|w|, sparse count, sums and Gram matrices by BLAS, the same for the max-abs-scaled rows), and against the
machine's two bounds measured in the same run: the read rate of the same page-cached corpus (numpy on all
threads) and the FP32 FMA peak (_core.fma_peak_gflops).

    python -m pytest benchmarks/test_bench_quality.py -p no:cacheprovider -s

KERNELATLAS_BENCH_QUALITY_N (default 100,000,000 kernels: 1.8 GB of float16, written once to
KERNELATLAS_BENCH_DIR and reused); KERNELATLAS_BENCH_QUALITY_PEER_N (rows the numpy peer runs on, a prefix of
whole layers, default 20,000,000: the peer is ~20x slower); KERNELATLAS_BENCH_THREADS (default: all cores).
The CNN Filter DB scale, 10^9 kernels, needs 18 GB of disk for the corpus and as much free memory to keep it
page-cached (KERNELATLAS_BENCH_QUALITY_N=1000000000); with less memory the pass reads from disk and measures
the disk instead.

Work per kernel (d = 9): the upper triangles of two Gram matrices plus two row sums, 2 * (45 + 9) FMAs =
216 useful FLOPs, and 18 bytes read.  The lower of the two bounds (bytes / bandwidth, FLOPs / peak) is the
speed of light the engine is measured against.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from kernelatlas import _core
from kernelatlas.bench import synthetic

N = int(os.environ.get("KERNELATLAS_BENCH_QUALITY_N", str(100_000_000)))
PEER_N = int(os.environ.get("KERNELATLAS_BENCH_QUALITY_PEER_N", str(20_000_000)))
WORKDIR = os.environ.get("KERNELATLAS_BENCH_DIR", os.path.join(tempfile.gettempdir(), "kernelatlas-bench"))
THREADS = int(os.environ.get("KERNELATLAS_BENCH_THREADS", "0")) or len(os.sched_getaffinity(0))
D = 9
FLOPS_PER_ROW = 2 * 2 * (D * (D + 1) // 2 + D)  # two matrices: triangle FMAs + sum FMAs, 2 FLOPs each
NOMINAL_GBS, NOMINAL_GFLOPS = 40.0, 426.0  # the figures for this machine (2 cores)
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float16 corpus memmap [N, 9] (page-cached) and layers of 50k..150k rows (mean ~100k)."""
    x = synthetic.make_corpus(WORKDIR, N, 3, dtype="float16", progress=False)
    for a in range(0, N, 1 << 22):
        np.max(x[a:a + (1 << 22)])  # page-cache it
    sizes = np.random.default_rng(0).integers(50_000, 150_001, N // 50_000 + 1)
    stops = np.minimum(np.cumsum(sizes), N)
    stops = np.unique(stops[stops > 0])
    starts = np.concatenate([[0], stops[:-1]])
    return x, starts.astype(np.int64), stops.astype(np.int64)


def numpy_layer_stats(x: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> dict[str, np.ndarray]:
    """The peer: what a user writes with numpy, float32 BLAS for the Gram matrices (float64 for the sparse
    kernels' moments, as the engine returns them)."""
    out: dict[str, list] = {k: [] for k in ("n", "sparse", "max_abs", "sum", "gram", "sum_scaled", "gram_scaled",
                                            "sum_sparse", "gram_sparse")}
    for a, b in zip(starts, stops, strict=True):
        w = x[a:b].astype(np.float32)
        w = w[np.isfinite(w).all(axis=1)]
        m = np.abs(w).max(axis=1)
        big = float(m.max()) if len(w) else 0.0
        s = w / np.where(m > 0, m, np.float32(1))[:, None]
        out["n"].append(len(w))
        out["sparse"].append(int((m < 0.01 * big).sum()) if big > 0 else len(w))
        out["max_abs"].append(big)
        out["sum"].append(w.sum(axis=0, dtype=np.float64))
        out["gram"].append(w.T @ w)
        out["sum_scaled"].append(s.sum(axis=0, dtype=np.float64))
        out["gram_scaled"].append(s.T @ s)
        sp = w[m < 0.01 * big] if big > 0 else w[:0]  # the sparse kernels' moments, for entropy_clean
        out["sum_sparse"].append(sp.sum(axis=0, dtype=np.float64))
        out["gram_sparse"].append(sp.T.astype(np.float64) @ sp)
    return {k: np.array(v) for k, v in out.items()}


def read_pass(x: np.ndarray, threads: int) -> float:
    """Seconds to read every byte of the page-cached corpus once: numpy OR-reductions of uint64 views on
    ``threads`` Python threads (numpy releases the GIL), the cheapest pass over the same pages."""
    flat = x.reshape(-1)
    words = flat[: len(flat) // 4 * 4].view(np.uint64)
    parts = np.array_split(words, threads * 8)
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(np.bitwise_or.reduce, parts))
        return time.perf_counter() - t0


@pytest.fixture(scope="module")
def bounds(corpus) -> dict[str, float]:
    """Measured in this run, on all threads: the read rate of the page-cached corpus (best of 3) and the FP32
    FMA peak."""
    x = corpus[0]
    seconds = min(read_pass(x, THREADS) for _ in range(3))
    return {"gbs": x.nbytes / seconds / 1e9, "gflops": _core.fma_peak_gflops(0.5, THREADS)}


@pytest.mark.benchmark(group="layer-stats")
def test_layer_stats_engine(benchmark, corpus, bounds):
    x, starts, stops = corpus
    _core.layer_stats(x, starts, stops, threads=THREADS)  # warm-up
    got = benchmark.pedantic(_core.layer_stats, args=(x, starts, stops), kwargs={"threads": THREADS},
                             rounds=3, iterations=1)
    assert got["n"].sum() + got["nonfinite"].sum() == N
    t = benchmark.stats.stats.median
    RESULTS["engine"] = t
    gb = x.nbytes / 1e9
    rate = N / t
    t_mem, t_flop = x.nbytes / (bounds["gbs"] * 1e9), N * FLOPS_PER_ROW / (bounds["gflops"] * 1e9)
    lower = "memory" if t_mem > t_flop else "compute"
    print(f"\nlayer_stats, {N:,} float16 3x3 kernels ({gb:.1f} GB), {len(starts):,} layers, {THREADS} threads: "
          f"{t:.3f} s = {rate / 1e6:.0f} M kernels/s, {gb / t:.1f} GB/s, {N * FLOPS_PER_ROW / t / 1e9:.0f} GFLOP/s\n"
          f"  bounds measured now: read {bounds['gbs']:.1f} GB/s -> {x.nbytes / bounds['gbs'] / 1e9:.3f} s "
          f"({t_mem / t:.0%} reached), FMA peak {bounds['gflops']:.0f} GFLOP/s -> {t_flop:.3f} s "
          f"({t_flop / t:.0%} reached); the tighter bound is {lower} ({max(t_mem, t_flop) / t:.0%} of it)\n"
          f"  against the issue's nominal figures: {gb / t / NOMINAL_GBS:.0%} of {NOMINAL_GBS:.0f} GB/s, "
          f"{N * FLOPS_PER_ROW / t / 1e9 / NOMINAL_GFLOPS:.0%} of {NOMINAL_GFLOPS:.0f} GFLOP/s")


@pytest.mark.benchmark(group="layer-stats")
def test_layer_stats_numpy_peer(benchmark, corpus):
    x, starts, stops = corpus
    keep = stops <= min(PEER_N, N)
    starts, stops = starts[keep], stops[keep]
    rows = int(stops[-1]) if len(stops) else 0
    if rows == 0:
        pytest.skip("KERNELATLAS_BENCH_QUALITY_PEER_N is below one layer")
    ref = numpy_layer_stats(x, starts[:3], stops[:3])
    got = _core.layer_stats(x, starts[:3], stops[:3])
    for k in ("n", "sparse", "max_abs"):  # the same statistics, not just the same speed
        np.testing.assert_array_equal(got[k], ref[k])
    np.testing.assert_allclose(got["gram"], ref["gram"], rtol=1e-4)
    np.testing.assert_allclose(got["gram_sparse"], ref["gram_sparse"], rtol=1e-9, atol=1e-12)
    benchmark.pedantic(numpy_layer_stats, args=(x, starts, stops), rounds=1, iterations=1)
    t = benchmark.stats.stats.median
    print(f"\nnumpy peer (float32 BLAS per layer), {rows:,} kernels: {t:.2f} s = {rows / t / 1e6:.1f} M kernels/s")
    if "engine" in RESULTS:
        print(f"  engine / numpy: {(N / RESULTS['engine']) / (rows / t):.1f}x (kernels/s, same run)")


@pytest.mark.benchmark(group="coef-histograms")
def test_coef_histograms_engine(benchmark, corpus):
    """The distribution-shift pass: coefficients on a 9-component basis, 70-bin histograms per group."""
    x, starts, stops = corpus
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((D, D)))
    mean = np.full(D, -0.04)
    groups = (np.arange(len(starts)) % 10).astype(np.int32)
    t0 = time.perf_counter()
    lo, hi = _core.coef_range(x, starts, stops, mean, q, threads=THREADS)
    t_range = time.perf_counter() - t0
    hist = benchmark.pedantic(_core.coef_histograms, args=(x, starts, stops, groups, 10, mean, q, lo, hi),
                              kwargs={"threads": THREADS}, rounds=3, iterations=1)
    assert hist.sum() == D * N  # the synthetic corpus has no non-finite rows
    t = benchmark.stats.stats.median
    print(f"\ncoef_range {N / t_range / 1e6:.0f} M kernels/s, coef_histograms {N / t / 1e6:.0f} M kernels/s "
          f"({N:,} kernels, 9 components x 70 bins, 10 groups, {THREADS} threads)")


@pytest.mark.benchmark(group="orthogonality")
def test_orthogonality_native_against_float64_numpy(benchmark):
    """Orthogonality of regular 3x3 float16 layers of the CNN Filter DB's widths (c_in = c_out from 64 to 512):
    the native fp32 kernel (_core.orthogonality, all threads) against the float64 numpy blocks it replaced for
    corpus dtypes (the same function given float64 filters), same layers, same run; values within
    ORTHOGONALITY_TOL."""
    from kernelatlas.jobs import quality as lq

    rng = np.random.default_rng(2)
    layers = [(rng.standard_normal((c, c * 9)) * 0.05).astype(np.float16) for c in (64, 128, 256, 512)]
    fma = sum(c * c * c * 9 / 2 for c in (64, 128, 256, 512))  # upper-triangle multiply-adds
    wide = [f.astype(np.float64) for f in layers]

    def native() -> list[float]:
        return [lq.orthogonality(f, threads=THREADS) for f in layers]

    got = benchmark.pedantic(native, rounds=3, iterations=1)
    t = benchmark.stats.stats.median
    t0 = time.perf_counter()
    want = [lq.orthogonality(f) for f in wide]
    t_ref = time.perf_counter() - t0
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= lq.ORTHOGONALITY_TOL
    print(f"\northogonality of 4 layers (c = 64..512, 3x3, float16): native {t * 1e3:.1f} ms "
          f"({2 * fma / t / 1e9:.0f} GFLOP/s), float64 numpy {t_ref * 1e3:.1f} ms: {t_ref / t:.1f}x (same run)")
