"""What each training choice buys, measured on a corpus (default: the one `kernelatlas run` builds):

    python benchmarks/training_choices.py kernelatlas-run/corpus [--kernel-size 3] [--choices NAME,...]

For every configuration in CHOICES it trains the autoencoder with kernelatlas.train (the library's code path,
so what is measured is what users get), then reports coverage -- the share of live kernels whose reconstruction
cosine is >= 0.80 / 0.85 / 0.90 -- in-sample (the training pool) and on the held-out kernels (never seen), per
model of interest, next to the random-kernel control (centred Gaussian kernels through the same model), plus
training time, steps and why training stopped.  Prints a Markdown table (docs/training.md holds one) and writes
a CSV beside it with --csv.  Not part of the test run: minutes per configuration on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import kernelatlas as ka
from kernelatlas.corpus import Corpus
from kernelatlas.holdout import Holdout, random_control

THRESHOLDS = (0.80, 0.85, 0.90)
# name -> train() options on top of the library defaults
CHOICES: dict[str, dict] = {
    "old default: 30 epochs of 512": dict(epochs=30, batch_size=512, schedule="constant", patience=10**9),
    "10k steps, constant lr": dict(max_steps=10_000, schedule="constant", patience=10**9),
    "20k steps, cosine lr": dict(max_steps=20_000, schedule="cosine", patience=10**9),
    "plateau, batch 256": dict(batch_size=256),
    "plateau, batch 512": dict(batch_size=512),
    "plateau, batch 64": dict(batch_size=64),
    "plateau, batch 256, lr 3e-3": dict(batch_size=256, lr=3e-3),
    "plateau, batch 512, lr 3e-3": dict(batch_size=512, lr=3e-3),
    "plateau, batch 512, widths 128-64": dict(batch_size=512, widths=(128, 64)),
    "plateau, batch 512, widths 32-16": dict(batch_size=512, widths=(32, 16)),
    "plateau, batch 512, 3 restarts": dict(batch_size=512, restarts=3),
}
# the rows above were measured before training penalised code pre-activations beyond +-4 (docs/training.md)
CHOICES = {name: {"code_penalty": 0.0, **options} for name, options in CHOICES.items()}
CHOICES["plateau, batch 256, code penalty 0.01 beyond 4 (the default)"] = {"batch_size": 256}


def coverage(corpus: Corpus, model: ka.Autoencoder, k: int, split: Holdout) -> dict:
    """Per model (and all): live kernels and classified shares in-sample / held out."""
    lay = corpus.layers
    lay = lay[(lay.kind == "depthwise") & (lay.kh == k) & (lay.rows > 0)]
    names = corpus.models.set_index("model_id")["name"]
    out: dict[str, dict] = {}
    for _, r in lay.iterrows():
        x = np.ascontiguousarray(corpus.shard_array(r.shard)[r.row_start:r.row_start + r.rows])
        _, scores, codes = ka.assign(x, model, threshold=1.0)
        live = np.isfinite(codes)
        held = split.mask(r.shard, r.row_start, r.row_start + r.rows) | (not split.model_in_pool(r.model_id))
        for key in (str(names[r.model_id]), "all"):
            acc = out.setdefault(key, {"in": np.zeros(4), "ho": np.zeros(4)})
            for part, mask in (("in", live & ~held), ("ho", live & held)):
                acc[part] += [mask.sum()] + [(mask & (scores >= t)).sum() for t in THRESHOLDS]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus")
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--choices", default=";".join(CHOICES), help="semicolon-separated names from CHOICES")
    ap.add_argument("--models", default="mobilenet_v2-b0353104,efficientnet-lite0-57934424",
                    help="models to show beside 'all'")
    ap.add_argument("--exclude", default="", help="a model to leave out of training (its coverage: never seen)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds; cells are means (default: 0)")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    corpus = Corpus.open(args.corpus)
    k = args.kernel_size
    shown = [m for m in args.models.split(",") if m] + ([args.exclude] if args.exclude else []) + ["all"]
    rows = []
    print(f"# {k}x{k} depthwise kernels of {args.corpus}; machine: {os.uname().nodename}, "
          f"{ka.build_info().get('isa')}, {len(os.sched_getaffinity(0))} cores", flush=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    print(f"# cells: coverage at 0.85, in-sample / held-out, mean over seeds {seeds}; random: the control at 0.85; "
          "steps and seconds: means", flush=True)
    print("| choice | " + " | ".join(shown) + " | random | steps | seconds |", flush=True)
    for name in args.choices.split(";"):
        opts = CHOICES[name]
        per_seed = []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                model = ka.train(corpus, k, Path(tmp) / "m", progress=False, threads=args.threads, seed=seed,
                                 exclude_models=[args.exclude] if args.exclude else (), **opts)
                seconds = time.perf_counter() - t0
            t = model.info["training"]
            cov = coverage(corpus, model, k, Holdout.from_json(model.info["holdout"]))
            control = random_control(model, THRESHOLDS)
            row = {"choice": name, "seed": seed, "seconds": round(seconds, 1), "steps": t["steps_run"],
                   "best_step": t["best_step"], "stop": t["stop_reason"].split(":")[0], "val_loss": t["val_loss"]}
            row.update({f"random:{thr:.2f}": round(control[thr], 4) for thr in THRESHOLDS})
            for m in shown:
                c = cov.get(m)
                for part in ("in", "ho"):
                    n = c[part][0] if c is not None else 0
                    for j, thr in enumerate(THRESHOLDS):
                        row[f"{m}:{part}:{thr:.2f}"] = round(c[part][j + 1] / n, 4) if n else float("nan")
            per_seed.append(row)
            rows.append(row)

        def mean(key: str, per_seed: list = per_seed) -> float:
            return float(np.mean([r[key] for r in per_seed]))

        cells = " | ".join(f"{mean(f'{m}:in:0.85'):.3f} / {mean(f'{m}:ho:0.85'):.3f}" for m in shown)
        stops = sorted({r["stop"] for r in per_seed})
        print(f"| {name} | {cells} | {mean('random:0.85'):.3f} | {mean('steps'):,.0f} ({', '.join(stops)}) | "
              f"{mean('seconds'):.0f} s |", flush=True)
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
