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

The pieces: :mod:`kernelatlas.bench.peer` (the PyTorch peer), :mod:`kernelatlas.bench.synthetic` (corpus and
model), :mod:`kernelatlas.bench.harness` (timing, CPU contention, bandwidth, label agreement) and
:mod:`kernelatlas.bench.allocator` (the glibc tunables and the re-execution); this module runs them per kernel
size and formats the report.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import kernelatlas
from kernelatlas import _core
from kernelatlas.bench.allocator import (
    CHILD_ENV,
    allocator_status,
    bench_cli_args,
    needs_reexec,
    run_in_child,
)
from kernelatlas.bench.harness import (
    AGREEMENT_TOL,
    BUSY_SHARE,
    CpuMeter,
    agreement_assign,
    agreement_prototypes,
    cpu_model,
    filled,
    log,
    measure_read_bandwidth,
    median,
    timed,
    wait_for_idle,
)
from kernelatlas.bench.synthetic import (
    HIDDEN,
    calibrate,
    corpus_path,
    flops_per_kernel,
    make_autoencoder,
    make_corpus,
    page_cache,
    synthetic_patterns,
)
from kernelatlas.engine import prototype_engine

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
NOMINAL_MEMORY_GBPS = 40.0
MAX_RETRIES = 2


class _SizeBench:
    """Everything for one kernel size: corpus, engine model, peer, thresholds and preallocated outputs
    (touched, so that first-touch page faults are no part of a timed run).  Engine and peer have outputs of
    their own where their results are compared; the [n, d] output of the normalise stage is shared."""

    def __init__(self, k: int, n: int, dtype: str, seed: int, threads: int, workdir: Path,
                 stages: Sequence[str], verbose: bool) -> None:
        from kernelatlas.bench.peer import TorchPeer

        self.k, self.d, self.n, self.threads, self.stages = k, k * k, n, threads, list(stages)
        self.corpus = make_corpus(workdir, n, k, dtype=dtype, seed=seed, progress=verbose)
        page_cache(self.corpus, k, verbose)
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
            shared = (filled((n, self.d), np.float32), filled((n,), np.float32))
            self.out["normalize"] = dict.fromkeys(both, shared)
        if "encode" in stages:
            self.out["encode"] = {who: filled((n,), np.float32) for who in both}
        if "assign" in stages:
            self.out["assign"] = {who: (filled((n,), np.int16), filled((n,), np.float32),
                                        filled((n,), np.float32)) for who in both}
        if "prototypes" in stages:
            self.out["prototypes"] = {who: (filled((n,), np.int16), filled((n,), np.float32))
                                      for who in both}

    def run(self, stage: str, who: str, rows: int | None = None) -> None:
        """One pass of ``stage`` by ``who`` over the first ``rows`` kernels (all by default)."""
        rows = self.n if rows is None else rows
        x = self.corpus[:rows]
        full = self.out[stage][who]
        out: Any = tuple(a[:rows] for a in full) if isinstance(full, tuple) else full[:rows]
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

    def pick_chunk(self, chunk_sizes: Sequence[int], meter: CpuMeter) -> tuple[int, dict[int, float], int]:
        """Torch's fastest chunk size (best of 2 on a prefix, on the assign stage if measured)."""
        prefix = min(self.n, max(4 * max(chunk_sizes), 1_000_000))
        stage = "assign" if "assign" in self.stages else self.stages[0]
        trials = {}
        for chunk in chunk_sizes:
            self.peer.chunk_rows = chunk
            best = min(timed(partial(self.run, stage, "peer", prefix), meter)[0] for _ in range(2))
            trials[chunk] = prefix / best
        self.peer.chunk_rows = max(trials, key=trials.__getitem__)
        return self.peer.chunk_rows, trials, prefix

    def agreement(self) -> dict[str, Any]:
        result = {}
        if "assign" in self.out:
            result["assign"] = agreement_assign(self.model, self.tau, self.out["assign"]["engine"],
                                                 self.out["assign"]["peer"])
        if "prototypes" in self.out:
            result["prototypes"] = agreement_prototypes(self.corpus, self.patterns, self.ptau,
                                                         self.out["prototypes"]["engine"],
                                                         self.out["prototypes"]["peer"])
        return result


def _measure_size(k: int, *, n: int, dtype: str, seed: int, threads: int, workdir: Path,
                  stages: Sequence[str], rounds: int, chunk_sizes: Sequence[int], wait_idle: float,
                  meter: CpuMeter, verbose: bool) -> dict[str, Any]:
    """Warm-up, torch's chunk size, then the alternating rounds for kernel size k; the per-size result."""
    sb = _SizeBench(k, n, dtype, seed, threads, workdir, stages, verbose)
    d = sb.d
    log(f"k={k}: model d={d} -> {HIDDEN[0]} -> {HIDDEN[1]} -> 1 -> {HIDDEN[1]} -> {HIDDEN[0]} -> {d}, "
         f"{sb.model.n_segments} decoder segments, {len(sb.model.clusters or [])} intervals, tau={sb.tau}, "
         f"prototype tau={sb.ptau}", verbose)

    # warm-up (first-call costs: thread pools, oneDNN primitives), then torch's best chunk size
    for stage in stages:
        for who in ("engine", "peer"):
            sb.run(stage, who, min(n, 100_000))
    wait_for_idle(meter, wait_idle)
    best_chunk, trials, prefix = sb.pick_chunk(chunk_sizes, meter)
    log(f"k={k}: torch chunk size on {prefix:,} rows: "
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
                waited += wait_for_idle(meter, wait_idle)
                pair: dict[str, float] = {}
                shares = []
                for who in order:
                    pair[who], share = timed(partial(sb.run, stage, who), meter)
                    if share is not None:
                        shares.append(share)
                busiest = max(shares) if shares else None  # None: runs too short to tell
                contended = busiest is not None and busiest > BUSY_SHARE
                line = " | ".join(f"{who} {pair[who]:6.2f} s ({n / pair[who] / 1e6:6.2f} M/s)"
                                  for who in order)
                busy = f" | others took {100 * busiest:.0f}% of the CPUs" if busiest is not None and contended else ""
                log(f"k={k} round {r + 1}/{rounds} {STAGE_TITLES[stage]:<20} {line} | "
                    f"x{pair['peer'] / pair['engine']:.2f}{busy}", verbose)
                if not contended or attempt == MAX_RETRIES:
                    break
                discarded += 1
                log("  (measuring this pair again)", verbose)
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
            "engine_kps": median([n / t for t in e_times]),
            "peer_kps": median([n / t for t in p_times]),
            "ratios": [p / e for e, p in zip(e_times, p_times, strict=True)],
            "ratio": median([p / e for e, p in zip(e_times, p_times, strict=True)]),
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
        return run_in_child(params, json_path, verbose)

    from kernelatlas.bench.peer import require_torch

    torch = require_torch()
    threads = threads or int(_core.build_info()["threads"])
    workdir = Path(workdir) if workdir is not None else Path(tempfile.gettempdir()) / "kernelatlas-bench"
    alloc = allocator_status()
    if alloc["applicable"] and not alloc["applied"]:
        log(f"WARNING: allocator tunables {alloc['how']}", verbose)
    meter = CpuMeter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    log(f"measuring the FP32 FMA peak and the read bandwidth on {threads} threads", verbose)
    wait_for_idle(meter, wait_idle)
    peak = [_core.fma_peak_gflops(0.5, threads)]
    bandwidth = measure_read_bandwidth(threads)

    build = kernelatlas.build_info()
    config: dict[str, Any] = dict(n=n, ks=ks, threads=threads, rounds=rounds, dtype=dtype, workdir=None,
                  chunk_sizes=chunk_sizes, stages=stages, seed=seed, wait_idle=wait_idle)
    result: dict[str, Any] = {
        "schema": "kernelatlas-bench/1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "kernelatlas bench " + " ".join(bench_cli_args(**config, json_path=None)),
        "config": {**config, "workdir": str(workdir)},
        "machine": {
            "cpu": cpu_model(),
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
    wait_for_idle(meter, wait_idle)
    peak.append(_core.fma_peak_gflops(0.5, threads))
    result["machine"]["fma_peak_gflops"] = max(peak)  # the larger of two: contention only ever lowers it
    result["machine"]["fma_peak_gflops_runs"] = peak
    result["machine"]["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    _fill_derived(result)
    if verbose:
        print(format_report(result), flush=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2))
        log(f"results written to {json_path}", verbose and os.environ.get(CHILD_ENV) != "subprocess")
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
