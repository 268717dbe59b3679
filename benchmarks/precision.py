"""precision='bf16' against fp32 (issue 16): speed-up and label agreement of the opt-in reduced-precision
encoder, in one process, alternating rounds, on

* the synthetic corpus and random-init model of ``kernelatlas bench`` (k = 3 and 7), and
* real kernels with a trained model: ``--run DIR`` takes the corpus and models of a ``kernelatlas run`` output
  folder (DIR/corpus, DIR/models/kK), with random normal kernels through the same model as a control.

Reports per case: kernels/s of each precision (median of rounds), the speed-up, the share of labels that agree,
the share of rows the bf16 path recomputed in fp32 (rows whose bf16 and fp32 codes are equal), and the
machine (CPU model, ISA in use, measured FMA peak).

    python benchmarks/precision.py --n 5000000 --run kernelatlas-run

``--tf32``: the label agreement of the GPU's precision='tf32' instead, on any machine: the CUDA kernels' own
bodies run by the CPU harness (kernelatlas._cuda_harness), the tensor-core mma emulated on TF32-rounded
operands, with the recheck margins derived as Autoencoder.tf32_margins derives them.  No speed (the harness is
not a GPU: benchmarks/gpu_bench.py measures that on a device).

    python benchmarks/precision.py --tf32 --n 1000000 --run kernelatlas-run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import kernelatlas
from kernelatlas import Autoencoder
from kernelatlas.bench import synthetic
from kernelatlas.bench.harness import cpu_model
from kernelatlas.cli import _default_threads


def compare(x: np.ndarray, model: Autoencoder, threshold: float, threads: int, rounds: int) -> dict[str, Any]:
    """fp32 and bf16 assign of x, alternating, ``rounds`` each; agreement from the last round."""
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    out: dict[str, tuple[np.ndarray, ...]] = {}
    model.bf16_margins()  # calibrated once per model, outside the timing
    for _ in range(rounds):
        for prec in ("fp32", "bf16"):
            t = time.perf_counter()
            out[prec] = kernelatlas.assign(x, model, threshold=threshold, threads=threads, precision=prec)
            times[prec].append(time.perf_counter() - t)
    (l32, _, c32), (l16, _, c16) = out["fp32"], out["bf16"]
    live = ~np.isnan(c32)
    rate = {p: len(x) / statistics.median(t) / 1e6 for p, t in times.items()}
    return {
        "rows": len(x),
        "fp32_M_per_s": round(rate["fp32"], 2),
        "bf16_M_per_s": round(rate["bf16"], 2),
        "speedup": round(rate["bf16"] / rate["fp32"], 3),
        "labels_agree": float(np.mean(l16 == l32)),
        "labels_differ": int(np.sum(l16 != l32)),
        "rechecked_share": float(np.mean(c16[live] == c32[live])) if live.any() else 0.0,
        "margins": model.bf16_margins(),
    }


def synthetic_cases(args: argparse.Namespace, threads: int) -> Iterator[tuple[int, np.ndarray, Autoencoder, float]]:
    """(k, kernels, calibrated bench model, threshold) for each --k: the corpus and model of `kernelatlas bench`."""
    for k in (int(v) for v in args.k.split(",")):
        rng = np.random.default_rng(0)
        patterns = synthetic.synthetic_patterns(k)
        x = synthetic.synth_kernels(rng, args.n, k, patterns)
        enc, dec = synthetic.make_autoencoder(k)
        model, tau, _ = synthetic.calibrate(enc, dec, patterns, x[:100_000], threads)
        yield k, x, model, tau


def trained_cases(args: argparse.Namespace) -> Iterator[tuple[int, np.ndarray, Autoencoder]]:
    """(k, the corpus's kernels of size k, the trained model) for each model of the --run folder."""
    if args.run is None:
        return
    from kernelatlas.corpus.store import Corpus

    corpus = Corpus.open(args.run / "corpus")
    for model_dir in sorted((args.run / "models").glob("k*")):
        model = Autoencoder.load(model_dir)
        k = model.kernel_size
        yield k, np.concatenate([np.asarray(ch.kernels) for ch in corpus.iter_chunks(k)]), model


def compare_tf32(x: np.ndarray, model: Autoencoder, threshold: float) -> dict[str, Any]:
    """precision='tf32' against fp32 through the CUDA harness, recheck margins from the model's calibration set."""
    from kernelatlas import _cuda_harness

    hm = _cuda_harness.Autoencoder(*model._engine_args())
    calib = model._calibration_set()
    ref = hm.assign(calib, threshold=-1.0)
    low = hm.assign(calib, threshold=-1.0, precision="tf32")
    live = ~np.isnan(ref[2])
    dz = 2 * float(np.quantile(np.abs(low[2][live] - ref[2][live]), 0.9))
    ds = 2 * float(np.quantile(np.abs(low[1][live] - ref[1][live]), 0.9))
    l32, _, c32, _ = hm.assign(x, threshold=threshold)
    raw = hm.assign(x, threshold=threshold, precision="tf32")
    lt, _, ct, _ = hm.assign(x, threshold=threshold, precision="tf32", recheck_code=dz, recheck_score=ds)
    live = ~np.isnan(c32)
    return {
        "rows": len(x),
        "labels_agree": float(np.mean(lt == l32)),
        "labels_differ": int(np.sum(lt != l32)),
        "labels_agree_without_recheck": float(np.mean(raw[0] == l32)),
        "rechecked_share": float(np.mean(ct[live] == c32[live])) if live.any() else 0.0,
        "code_error_max": float(np.abs(raw[2][live] - c32[live]).max()) if live.any() else 0.0,
        "margins": (dz, ds),
    }


def main_tf32(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {"machine": "CPU harness (kernelatlas._cuda_harness), TF32 mma emulated", "cases": {}}

    def report(name: str, r: dict[str, Any]) -> None:
        results["cases"][name] = r
        print(f"{name:34s} labels agree {r['labels_agree']:.4%} ({r['labels_differ']} differ; "
              f"{r['labels_agree_without_recheck']:.4%} without recheck)  rechecked {r['rechecked_share']:.1%}  "
              f"max |code - fp32| {r['code_error_max']:.1e}", flush=True)

    for k, x, model, tau in synthetic_cases(args, _default_threads()):
        report(f"synthetic k={k} (bench model)", compare_tf32(x, model, tau))
    for k, x, model in trained_cases(args):
        report(f"trained k={k}, {len(x):,} real kernels", compare_tf32(x, model, 0.85))
        noise = np.random.default_rng(1).standard_normal((max(len(x), 100_000), k * k)).astype(np.float32)
        report(f"trained k={k}, random control", compare_tf32(noise, model, 0.85))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5_000_000, help="synthetic kernels per size (default 5,000,000)")
    ap.add_argument("--k", default="3,7", help="synthetic kernel sizes (default 3,7)")
    ap.add_argument("--run", type=Path, help="a `kernelatlas run` folder: its corpus and trained models")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="engine threads (default: all cores)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--tf32", action="store_true", help="the GPU's precision='tf32' through the CPU harness instead")
    args = ap.parse_args()
    if args.tf32:
        return main_tf32(args)
    info = kernelatlas.build_info()
    if not info.get("bf16"):
        print(f"precision='bf16' cannot run here: {info.get('bf16_note')}", file=sys.stderr)
        return 2
    threads = args.threads or _default_threads()
    peak = kernelatlas._core.fma_peak_gflops(1.0, threads)
    machine = f"{cpu_model()}, ISA {info['isa']}, {threads} threads, FP32 FMA peak {peak:.0f} GFLOP/s (measured)"
    print(f"machine: {machine}")
    results: dict[str, Any] = {"machine": machine, "cases": {}}

    def report(name: str, r: dict[str, Any]) -> None:
        results["cases"][name] = r
        print(f"{name:34s} fp32 {r['fp32_M_per_s']:7.2f} M/s  bf16 {r['bf16_M_per_s']:7.2f} M/s  x{r['speedup']:.2f}  "
              f"labels agree {r['labels_agree']:.4%} ({r['labels_differ']} differ)  rechecked "
              f"{r['rechecked_share']:.1%}", flush=True)

    for k, x, model, tau in synthetic_cases(args, threads):
        report(f"synthetic k={k} (bench model)", compare(x, model, tau, threads, args.rounds))
    for k, x, model in trained_cases(args):
        reps = max(1, args.n // max(1, len(x)))  # repeated to a timeable size; agreement counts each copy
        report(f"trained k={k}, {len(x):,} real kernels", compare(np.tile(x, (reps, 1)), model, 0.85, threads,
                                                                   args.rounds))
        noise = np.random.default_rng(1).standard_normal((len(x) * reps, k * k)).astype(np.float32)
        report(f"trained k={k}, random control", compare(noise, model, 0.85, threads, args.rounds))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
