"""Shared setup of the pytest-benchmark files: the allocator fairness rule, one synthetic corpus and model per
kernel size, and the engine/peer ratios printed at the end of the run.

These files are not part of the default test run (pyproject's testpaths is tests/).  Run them with

    python -m pytest benchmarks/ -p no:cacheprovider

Environment: KERNELATLAS_BENCH_N (kernels per size, default 2,000,000), KERNELATLAS_BENCH_DIR (where corpus
files are kept and reused, default kernelatlas-bench in the temp dir), KERNELATLAS_BENCH_THREADS (default: all
cores), KERNELATLAS_BENCH_CHUNK (torch chunk rows; default: the fastest of 16384, 32768 and 65536 on a prefix,
per kernel size), KERNELATLAS_BENCH_NO_REEXEC=1 (measure with the allocator as it is).

`kernelatlas bench` is the fuller comparison (alternating rounds, FLOP and bandwidth shares, label agreement);
see BENCHMARKS.md.  Here each group runs the engine's rounds, then the peer's.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from kernelatlas.bench import allocator, synthetic
from kernelatlas.jobs import bench  # numpy and the engine only: torch is imported by the fixtures

N = int(os.environ.get("KERNELATLAS_BENCH_N", "2000000"))
WORKDIR = os.environ.get("KERNELATLAS_BENCH_DIR", os.path.join(tempfile.gettempdir(), "kernelatlas-bench"))
THREADS = int(os.environ.get("KERNELATLAS_BENCH_THREADS", "0")) or len(os.sched_getaffinity(0))
CHUNK_ROWS = int(os.environ.get("KERNELATLAS_BENCH_CHUNK", "0"))  # 0: torch's fastest, per kernel size

# median seconds per (stage, k) and contender, filled by the tests, printed by pytest_terminal_summary
MEDIANS: dict[tuple[str, int], dict[str, float]] = {}
CHUNKS: dict[int, dict[int, float]] = {}  # d -> torch chunk size -> seconds on the prefix


def pytest_configure(config: pytest.Config) -> None:
    """glibc reads GLIBC_TUNABLES only at start: re-execute pytest with the benchmark's allocator settings
    (reference/README.md section C) unless the process already runs with them."""
    if os.environ.get("KERNELATLAS_BENCH_NO_REEXEC") or not allocator.needs_reexec():
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # the new process gets the real stdout/stderr, not capture files
    print(f"benchmarks: re-executing pytest with GLIBC_TUNABLES={allocator.ALLOCATOR_SETTING}", file=sys.stderr)
    allocator.exec_with_tunables(sys.orig_argv)


@dataclass
class Setup:
    """One kernel size: the corpus memmap, the engine model and the peer around the same weights, the
    thresholds and preallocated outputs for each contender."""

    k: int
    corpus: np.ndarray
    model: Any
    peer: Any
    prototypes: Any
    tau: float
    prototype_tau: float
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def runner(self, stage: str, who: str) -> Any:
        """A no-argument callable running ``stage`` for ``who`` ('engine' or 'peer') over the whole corpus."""
        import kernelatlas

        x, out, threads = self.corpus, self.outputs[stage][who], THREADS
        if stage == "normalize":
            if who == "engine":
                return lambda: kernelatlas.normalize(x, out=out[0], norms=out[1], threads=threads)
            return lambda: self.peer.normalize(x, out=out[0], norms=out[1])
        if stage == "encode":
            if who == "engine":
                return lambda: self.model.encode(x, threads=threads, out=out)
            return lambda: self.peer.encode(x, out=out)
        if stage == "assign":
            if who == "engine":
                return lambda: kernelatlas.assign(x, self.model, threshold=self.tau, threads=threads, out=out)
            return lambda: self.peer.assign(x, threshold=self.tau, out=out)
        if who == "engine":
            return lambda: kernelatlas.assign_prototypes(x, self.prototypes, threshold=self.prototype_tau,
                                                         threads=threads, out=out)
        return lambda: self.peer.assign_prototypes(x, threshold=self.prototype_tau, out=out)


def _fastest_chunk(peer: Any, corpus: np.ndarray, tau: float) -> int:
    """Section C: the chunk size that is fastest for torch (assignment of a 1M-row prefix, best of 2)."""
    prefix = corpus[: min(len(corpus), 1_000_000)]
    seconds = {}
    for chunk in bench.DEFAULT_CHUNK_SIZES:
        peer.chunk_rows = chunk
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            peer.assign(prefix, threshold=tau)
            runs.append(time.perf_counter() - t0)
        seconds[chunk] = min(runs)
    CHUNKS[len(corpus[0])] = seconds
    return min(seconds, key=seconds.__getitem__)


def _filled(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    arr = np.empty(shape, dtype=dtype)
    arr.fill(0)
    return arr


@pytest.fixture(scope="session")
def medians() -> dict[tuple[str, int], dict[str, float]]:
    """Where each test leaves its median time, for the ratios printed at the end."""
    return MEDIANS


@pytest.fixture(scope="session")
def setups() -> Any:
    """Setup per kernel size, built on first use and kept for the session."""
    from kernelatlas.bench.peer import TorchPeer
    from kernelatlas.engine import prototype_engine

    cache: dict[int, Setup] = {}

    def get(k: int) -> Setup:
        if k not in cache:
            corpus = synthetic.make_corpus(WORKDIR, N, k, progress=False)
            np.max(corpus)  # page-cache it
            encoder, decoder = synthetic.make_autoencoder(k)
            patterns = synthetic.synthetic_patterns(k)
            sample = np.ascontiguousarray(corpus[:200_000])
            model, tau, ptau = synthetic.calibrate(encoder, decoder, patterns, sample, THREADS)
            peer = TorchPeer(encoder, decoder, clusters=model.clusters, prototypes=patterns, threads=THREADS)
            peer.chunk_rows = CHUNK_ROWS or _fastest_chunk(peer, corpus, tau)
            n, d = corpus.shape
            s = Setup(k, corpus, model, peer, prototype_engine(patterns), tau, ptau)
            s.outputs["normalize"] = dict.fromkeys(("engine", "peer"),
                                                   (_filled((n, d), np.float32), _filled((n,), np.float32)))
            s.outputs["encode"] = {who: _filled((n,), np.float32) for who in ("engine", "peer")}
            s.outputs["assign"] = {who: (_filled((n,), np.int16), _filled((n,), np.float32),
                                         _filled((n,), np.float32)) for who in ("engine", "peer")}
            s.outputs["prototypes"] = {who: (_filled((n,), np.int16), _filled((n,), np.float32))
                                       for who in ("engine", "peer")}
            cache[k] = s
        return cache[k]

    return get


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not MEDIANS:
        return
    tr = terminalreporter
    tr.section("engine / PyTorch peer (median time of the peer / median time of the engine)")
    alloc = allocator.allocator_status()
    chunks = f"{CHUNK_ROWS} rows" if CHUNK_ROWS else "the fastest per size, see below"
    tr.write_line(f"n = {N:,} kernels per size, {THREADS} threads, torch chunk: {chunks}; allocator "
                  f"GLIBC_TUNABLES={alloc['setting']}: {alloc['how']}")
    order = sorted(MEDIANS.items(), key=lambda item: (item[0][1], bench.STAGES.index(item[0][0])))
    for (stage, k), times in order:
        if {"engine", "peer"} <= times.keys():
            e, p = times["engine"], times["peer"]
            tr.write_line(f"  {f'{stage}-k{k}':<14} engine {N / e / 1e6:8.2f} M/s   "
                          f"peer {N / p / 1e6:8.2f} M/s   engine/peer {p / e:6.2f}x")
    for d, seconds in sorted(CHUNKS.items()):
        best = min(seconds, key=seconds.__getitem__)
        tr.write_line(f"  torch chunk for {math.isqrt(d)}x{math.isqrt(d)}: {best} rows (assign on 1M rows: "
                      + ", ".join(f"{c}: {t:.2f} s" for c, t in seconds.items()) + ")")
