"""`kernelatlas run`: the paper's pipeline end to end on public checkpoints, with the defaults of each step.

    zoo pull -> extract -> train (one autoencoder per depthwise kernel size present) -> clusters -> assign ->
    quality + shift (CNN Filter DB analyses) -> report

Every step is resumable, so rerunning the command after an interruption (or with more sources) only does
what is missing: extract skips files already in the corpus, a model directory whose model.json matches the
request is reused, assign resumes its run, and the report is redrawn from the latest runs.  Output layout:

    OUT/corpus/        the corpus (kernelatlas info OUT/corpus)
    OUT/models/kK/     one model directory per kernel size (autoencoder, clusters.json, spectrum.png)
    OUT/models/per-model/ID-NAME/kK/   with --per-model: one autoencoder per model and kernel size
    OUT/report/        report.html, report.md, figures (PNG) and tables (CSV)
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_pipeline"]

MIN_KERNELS = 1000  # a kernel size (or, per model, a model) with fewer depthwise kernels is too thin to train on


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[run] {msg}", file=sys.stderr, flush=True)


def _quality(corpus: Any, *, threads: int | None, progress: bool, command: str, cluster: Any = None) -> None:
    """The CNN Filter DB analyses of every stored layer (seconds at zoo scale): per-layer quality, the global
    PCA, and the distribution shift between models and between depth deciles (the groupings every corpus has;
    `kernelatlas shift --by task|category|family` adds those given with extract --meta)."""
    from kernelatlas.corpus import CorpusError
    from kernelatlas.jobs.quality import quality_run
    from kernelatlas.jobs.shift import shift_result

    _say("measuring kernel quality per layer (sparsity, variance entropy, degenerate layers) and the PCA basis",
         progress)
    qrun = quality_run(corpus, threads=threads, progress=progress, command=command, cluster=cluster)
    for k in sorted({int(k) for k in corpus.kernel_sizes}):
        for by in ("model", "depth"):
            try:
                shift_result(corpus, by, kernel_size=k, quality_run_id=qrun.run_id, threads=threads,
                             progress=progress, command=command, cluster=cluster)
            except (ValueError, CorpusError) as exc:  # e.g. one model only: nothing to compare
                _say(f"k={k}: no shift by {by}: {exc}", progress)


def run_pipeline(
    out: str | os.PathLike[str] = "kernelatlas-run",
    *,
    zoo: Sequence[str] = ("default",),
    sources: Sequence[str] = (),
    threshold: float = 0.85,
    seed: int = 0,
    epochs: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    retrain: bool = False,
    per_model: bool = False,
    holdout: float | None = None,
    cluster: Any = None,
    client: Any = None,
) -> dict[str, Any]:
    """Run the whole job into ``out``; returns a summary (paths, models, runs).  ``per_model``: also one
    autoencoder per model (each model with at least MIN_KERNELS depthwise kernels of a size), assigned over its
    own model's kernels, for a per-model Table 1 beside the pooled one.  ``epochs`` caps training (default: to
    convergence); ``holdout``: the share of kernels kept out of training (default: train's, 0.2).

    ``cluster`` / ``client`` (kernelatlas.cluster): extract, assign, quality and shift run as tasks on a Dask
    cluster whose workers share ``out``; training (a sample of ~2M kernels) and the report stay in this process.
    The outputs are those of an in-process run."""
    from kernelatlas.cluster import session

    with session(cluster, client) as cl:
        return _run_pipeline(out, zoo=zoo, sources=sources, threshold=threshold, seed=seed, epochs=epochs,
                             threads=threads, progress=progress, retrain=retrain, per_model=per_model,
                             holdout=holdout, cluster=cl)


def _run_pipeline(out: str | os.PathLike[str], *, zoo: Sequence[str], sources: Sequence[str], threshold: float,
                  seed: int, epochs: int | None, threads: int | None, progress: bool, retrain: bool, per_model: bool,
                  holdout: float | None, cluster: Any) -> dict[str, Any]:
    from kernelatlas.corpus import Corpus
    from kernelatlas.jobs.extract import extract
    from kernelatlas.jobs.report import report

    root = Path(out)
    corpus_dir, models_dir, report_dir = root / "corpus", root / "models", root / "report"
    inputs = [f"zoo:{name}" for name in zoo] + list(sources)
    if not inputs:
        raise ValueError("nothing to study: give --zoo NAME (see `kernelatlas zoo list`) or --src PATH")
    _say(f"extracting {', '.join(inputs)} into {corpus_dir}", progress)
    ex = extract(inputs, corpus_dir, progress=progress, cluster=cluster)
    for path, reason in ex.failed:
        print(f"[run] warning: could not read {path}: {reason}", file=sys.stderr)
    corpus = Corpus.open(corpus_dir)
    layers = corpus.layers
    dw = layers[(layers["kind"] == "depthwise") & (layers["rows"] > 0)]
    sizes = [int(k) for k, n in dw.groupby("kh")["rows"].sum().items() if n >= MIN_KERNELS]
    if not sizes:
        raise ValueError(f"{corpus_dir} holds fewer than {MIN_KERNELS} depthwise kernels of any stored size: "
                         "add sources with depthwise convs")
    command = f"kernelatlas run --out {root}"
    options: dict[str, Any] = {"seed": seed, "progress": progress}
    if epochs is not None:
        options["epochs"] = epochs
    if holdout is not None:
        options["holdout"] = holdout
    run_ids: dict[int, str] = {}
    for k in sorted(sizes):
        n = int(dw[dw.kh == k]["rows"].sum())
        run_ids[k] = _model_and_run(corpus, k, models_dir / f"k{k}", options, retrain=retrain, threshold=threshold,
                                    threads=threads, progress=progress, command=command, cluster=cluster,
                                    what=f"k={k}: the autoencoder of all {n:,} depthwise kernels")
    per_model_runs: dict[str, dict[int, str]] = {}
    if per_model:
        names = corpus.models.set_index("model_id")["name"]
        counts = dw.groupby(["model_id", "kh"])["rows"].sum()
        for (model_id, k), n in counts.items():
            if int(k) not in sizes:
                continue
            name = str(names[model_id])
            if n < MIN_KERNELS:
                _say(f"k={k}: {name}: {int(n):,} depthwise kernels, fewer than {MIN_KERNELS}: no per-model "
                     "autoencoder", progress)
                continue
            mdir = models_dir / "per-model" / f"{int(model_id)}-{_safe(name)}" / f"k{k}"
            per_model_runs.setdefault(name, {})[int(k)] = _model_and_run(
                corpus, int(k), mdir, {**options, "models": [int(model_id)]}, retrain=retrain,
                threshold=threshold, threads=threads, progress=progress, command=command + " --per-model",
                cluster=cluster,
                what=f"k={k}: the autoencoder of {name} alone ({int(n):,} depthwise kernels)")
    _quality(corpus, threads=threads, progress=progress, command=f"kernelatlas run --out {root}", cluster=cluster)
    _say(f"writing the report into {report_dir}", progress)
    page = report(corpus, report_dir, runs=list(run_ids.values())
                  + [r for runs in per_model_runs.values() for r in runs.values()])
    summary = {"out": str(root), "corpus": str(corpus_dir), "models": {k: str(models_dir / f"k{k}") for k in sizes},
               "runs": run_ids, "per_model_runs": per_model_runs, "report": str(page), "failed": ex.failed}
    _say(f"done: open {page}", progress)
    return summary


def _safe(name: str) -> str:
    """A model name as a folder name."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"


def _model_and_run(corpus: Any, k: int, mdir: Path, options: dict[str, Any], *, retrain: bool, threshold: float,
                   threads: int | None, progress: bool, command: str, what: str, cluster: Any = None) -> str:
    """Train (or reuse) the autoencoder in ``mdir``, read its clusters, assign; returns the run id.  A model
    directory is reused when its model.json records the same seed, corpus generation, epoch cap, held-out share
    and models as asked."""
    from kernelatlas.holdout import DEFAULT_SHARE
    from kernelatlas.jobs.assign import assign_corpus
    from kernelatlas.jobs.clusters import clusters as find_clusters
    from kernelatlas.jobs.train import train

    meta = mdir / "model.json"
    models = options.get("models")
    reuse = False
    if meta.is_file() and not retrain:
        info = json.loads(meta.read_text())
        training, split = info.get("training", {}), info.get("holdout") or {}
        reuse = (training.get("seed") == options["seed"]
                 and info.get("corpus", {}).get("generation") == corpus.manifest["generation"]
                 and training.get("epochs_max") == options.get("epochs")
                 and split.get("share") == options.get("holdout", DEFAULT_SHARE)
                 and split.get("models") == models)
    if reuse:
        _say(f"{what}: reusing {mdir} (--retrain to train again)", progress)
    else:
        _say(f"{what}: training", progress)
        train(corpus, k, mdir, **options)
    if reuse and (mdir / "clusters.json").is_file():
        _say(f"k={k}: keeping {mdir / 'clusters.json'}", progress)
    else:
        _say(f"k={k}: reading clusters off the code axis", progress)
        find_clusters(mdir)
    _say(f"k={k}: assigning {'the depthwise kernels of that model' if models else 'every depthwise kernel'} "
         f"(threshold {threshold})", progress)
    return assign_corpus(corpus, model=mdir, threshold=threshold, threads=threads, progress=progress,
                         command=command, models=models, cluster=cluster)
