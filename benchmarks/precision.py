"""precision='bf16' against fp32 (issue 16): speed-up and label agreement of the opt-in reduced-precision
encoder, in one process, alternating rounds, on

* the synthetic corpus and random-init model of ``kernelatlas bench`` (k = 3 and 7), and
* real kernels with a trained model: ``--run DIR`` takes the corpus and models of a ``kernelatlas run`` output
  folder (DIR/corpus, DIR/models/kK), with random normal kernels through the same model as a control.

Reports per case: kernels/s of each precision (median of rounds), the speed-up, the share of labels that agree,
the share of rows the bf16 path recomputed in fp32 (rows whose bf16 and fp32 codes are equal), and the
machine (CPU model, ISA in use, measured FMA peak).

    python benchmarks/precision.py --n 5000000 --run kernelatlas-run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5_000_000, help="synthetic kernels per size (default 5,000,000)")
    ap.add_argument("--k", default="3,7", help="synthetic kernel sizes (default 3,7)")
    ap.add_argument("--run", type=Path, help="a `kernelatlas run` folder: its corpus and trained models")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="engine threads (default: all cores)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
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

    for k in (int(v) for v in args.k.split(",")):
        rng = np.random.default_rng(0)
        patterns = synthetic.synthetic_patterns(k)
        x = synthetic.synth_kernels(rng, args.n, k, patterns)
        enc, dec = synthetic.make_autoencoder(k)
        model, tau, _ = synthetic.calibrate(enc, dec, patterns, x[:100_000], threads)
        report(f"synthetic k={k} (bench model)", compare(x, model, tau, threads, args.rounds))
    if args.run is not None:
        from kernelatlas.corpus.store import Corpus

        corpus = Corpus.open(args.run / "corpus")
        for model_dir in sorted((args.run / "models").glob("k*")):
            model = Autoencoder.load(model_dir)
            k = model.kernel_size
            x = np.concatenate([np.asarray(ch.kernels) for ch in corpus.iter_chunks(k)])
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
