"""Measuring for ``kernelatlas bench``: CPU time taken by other processes (/proc/stat), waiting for an idle
machine, timing one call, the machine's read bandwidth, and the label agreement of engine and peer.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas.autoencoder import Autoencoder


def log(msg: str, verbose: bool = True) -> None:
    if verbose:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)


AGREEMENT_TOL = 1e-5
BUSY_SHARE = 0.10


class CpuMeter:
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


def wait_for_idle(meter: CpuMeter, max_wait: float, busy: float = BUSY_SHARE) -> float:
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


def timed(fn: Callable[[], Any], meter: CpuMeter) -> tuple[float, float | None]:
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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def filled(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A preallocated output whose pages are already touched (first-touch faults are not part of a run)."""
    arr = np.empty(shape, dtype=dtype)
    arr.fill(0)
    return arr


def agreement_assign(model: Autoencoder, tau: float, engine: tuple[np.ndarray, ...],
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
        "kernels": len(e_labels),
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


def agreement_prototypes(corpus: np.ndarray, prototypes: np.ndarray, tau: float,
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
        "kernels": len(e_labels),
        "equal": int(len(e_labels) - differ.sum()),
        "differ_near_threshold": int((differ & near_tau).sum()),
        "differ_near_tie": int(tie.sum()),
        "differ_other": int((rest & ~tie).sum()),
        "max_abs_score_diff": float(np.max(np.abs(e_scores[live] - p_scores[live]), initial=0.0)),
    }
