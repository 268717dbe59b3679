"""``kernelatlas report``: the Markdown + HTML report of the paper pipeline (Babaiee et al., ICLR 2024) over the
assign runs of a corpus -- coverage tables like the paper's Table 1, per-layer cluster shares like its Fig. 7,
the prototype grid like its Fig. 5, the decoded spectrum, coverage-vs-threshold curves and the depthwise vs
regular comparison -- with every table also written as CSV and every figure as a PNG next to the pages.

It reads only what a run wrote (``runs/RUN_ID/run.json``, the label/score/code shards, the model directory's
``spectrum.png``) plus the corpus tables; kernels themselves are never read.  The score and code shards are
streamed with ``np.load(mmap_mode="r")`` one chunk of rows at a time, and every count is aggregated per layer
with ``np.bincount`` over layer positions found from the row ranges of ``layers.parquet``, so memory stays
O(chunk + layers) whatever the corpus holds (billions of rows).

Coverage is recomputed from the stored scores and codes, not taken from the labels, so that one run gives the
shares at every threshold: a live kernel is *classified at t* when its score is >= t and (autoencoder mode) its
code lies in some cluster interval ([lo, hi), the interval reaching highest closed at hi).  Comparisons are
exact real-number comparisons (float32 values widened to float64).  Dead, flat and non-finite kernels (label -1
with a NaN code; in prototypes mode label -1 with a score of 0) are left out of every share; rows labelled -2
are not of the run's kind and are not counted at all.  Figures are drawn with matplotlib's object API on the Agg
canvas (no pyplot, no global backend switch), so a library caller's matplotlib state is left alone.

The package: ``runs`` (which runs, validated), ``scan`` (the streamed pass over a run's outputs), ``tables``
(pandas tables and cell formatting), ``figures`` (the report's PNGs); this module assembles the document
(:class:`kernelatlas.document.Document`) section by section.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kernelatlas.corpus import Corpus
from kernelatlas.corpus.rundir import RunError
from kernelatlas.document import Document
from kernelatlas.figures import short_text
from kernelatlas.jobs.report.figures import (
    MAX_CURVES,
    MAX_LAYER_FIGURES,
    comparison_figure,
    comparison_sources,
    coverage_figure,
    depth_figure,
    interval_text,
    layer_figures,
    prototype_figure,
    runs_coverage_figure,
    spectrum_figure,
)
from kernelatlas.jobs.report.runs import RunInfo, find_runs, load_run
from kernelatlas.jobs.report.scan import CHUNK_ROWS, RunStats, scan_run
from kernelatlas.jobs.report.tables import (
    cluster_table,
    curve_table,
    fmt_count,
    fmt_pct,
    fmt_threshold,
    layer_table,
    model_table,
    share_of,
    total_row,
)

__all__ = ["RunError", "RunInfo", "find_runs", "load_run", "report"]

DEFAULT_THRESHOLDS = (0.80, 0.85, 0.90)


def _write_csv(frame: Any, path: Path) -> str:
    frame.to_csv(path, index=False)
    return path.name


# files this module writes into a report folder; older ones are removed first so that a rerun with fewer runs
# or models leaves no stale figure behind (nothing else in the folder is touched)
_OWN_FILES = ("report.md", "report.html", "corpus.csv", "runs.csv", "coverage.csv", "coverage-totals.csv",
              "coverage-per-model.csv",
              "coverage-curves.csv", "compare.csv", "coverage-runs.png", "compare-k*.png", "layers-*.png",
              "layers-*.csv", "depth-*.png", "prototypes-*.png", "spectrum-*.png", "coverage-k*.png", "clusters-*.csv",
              "quality-*")


def _clear_previous(out: Path) -> None:
    for pattern in _OWN_FILES:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


def report(corpus: Corpus | str | os.PathLike[str], out: str | os.PathLike[str], *,
           runs: Sequence[str] | None = None, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
           chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> Path:
    """Write report.md, report.html, their PNG figures and CSV tables into ``out`` (created); returns the path
    of report.html.

    ``runs``: RUN_IDs to report on (each must be completed); default: the latest completed run per (kernel
    size, kind) by run.json "created" -- one per size, and a depthwise and a regular run of a size side by side
    for the comparison.  ``thresholds``: the coverage table's thresholds (the paper's threshold is not public,
    so 0.80/0.85/0.90).  ``chunk_rows``: rows read per step of the streamed pass.  :class:`RunError` names the
    run file when a requested run is missing, incomplete or damaged; nothing is written then."""
    try:
        import matplotlib  # noqa: F401 - fail before the long pass, not after it
    except ImportError:
        raise ImportError("kernelatlas report draws its figures with matplotlib: pip install 'matplotlib>=3.7'") \
            from None
    corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    thresholds = tuple(sorted({float(t) for t in thresholds}))
    if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must be in (0, 1], got {list(thresholds)}")
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    if runs:
        selected = [load_run(corpus.root, r) for r in dict.fromkeys(runs)]
        notes: list[str] = []
        selection = "the runs named on the command line"
    else:
        from kernelatlas.jobs.quality import latest_quality_run

        # a corpus with only a quality run still gets a report (its quality section)
        selected, notes = find_runs(corpus.root, allow_none=latest_quality_run(corpus) is not None)
        selection = "the latest completed run per kernel size and kind (by its `created` time)"
    all_stats = [scan_run(corpus, run, thresholds, chunk_rows=chunk_rows, progress=progress) for run in selected]
    for st in all_stats:
        notes.extend(st.notes)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)

    doc = Document()
    doc.h(1, "kernelatlas report")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc.p(f"Corpus `{corpus.root}` — written {now} from {len(selected)} run(s): {selection}.")
    _method_section(doc, thresholds)
    _corpus_section(doc, corpus, out_dir)
    _runs_section(doc, corpus, all_stats, notes, out_dir)
    pooled = [st for st in all_stats if not st.run.per_model]
    _coverage_section(doc, corpus, pooled, thresholds, out_dir)
    per_model = _per_model_section(doc, corpus, [st for st in all_stats if st.run.per_model], pooled, thresholds,
                                   out_dir)
    for st in pooled:
        _run_section(doc, corpus, st, out_dir)
    if pooled:
        _curves_section(doc, corpus, pooled, out_dir)
    compared = _comparison_section(doc, corpus, pooled, thresholds, out_dir)
    from kernelatlas.jobs.shift import quality_section

    doc.raw(*quality_section(corpus, out_dir))
    doc.h(2, "Files")
    doc.p("Every table above is also a CSV file in this folder (shares as fractions, counts as kernels): "
          "`corpus.csv`, `runs.csv`, `coverage.csv` (per model and run), `coverage-totals.csv`, "
          "`coverage-curves.csv`, `clusters-*.csv`, `layers-*.csv`" + (", `compare.csv`" if compared else "")
          + (", `coverage-per-model.csv`" if per_model else "")
          + ".  Regenerate with `kernelatlas report CORPUS --out DIR`.")
    (out_dir / "report.md").write_text(doc.markdown(), encoding="utf-8")
    (out_dir / "report.html").write_text(doc.html(f"kernelatlas report — {corpus.root.name}"), encoding="utf-8")
    return out_dir / "report.html"


def _method_section(doc: Document, thresholds: Sequence[float]) -> None:
    doc.h(2, "Method")
    doc.p("This report follows Babaiee et al., \"Unveiling the Unseen: Identifiable Clusters in Trained Depthwise "
          "Convolutional Kernels\" (ICLR 2024).  Every kernel is centred (its mean subtracted) and divided by its "
          "L2 norm; an autoencoder per kernel size with a one-dimensional code reconstructs it.  Decoding evenly "
          "spaced codes gives a spectrum of patterns; intervals of the code axis with one pattern are the "
          "clusters (named by `kernelatlas clusters`, editable in clusters.json).  A kernel is classified at "
          "threshold t when the cosine similarity between it and its reconstruction (its score) is at least t "
          "and its code lies in a cluster's interval; it then belongs to that cluster.  In prototypes mode the "
          "score is the best cosine similarity to a fixed set of prototypes and the kernel takes that "
          "prototype's cluster.")
    doc.p("Shares are of live kernels: all-zero, flat (constant) and non-finite kernels have no direction, get "
          "no code (label -1, NaN code, score 0) and are counted apart as dead.  The shares at each threshold are "
          "recomputed from the stored scores and codes, so one run gives every threshold; the cluster shares "
          "(tables of clusters, prototype and per-layer figures) are those of the stored labels, i.e. at the "
          "run's own threshold.  The threshold of the paper is not public: coverage is reported at "
          + ", ".join(f"{t:g}" for t in thresholds) + " (the paper reports over 90% of ConvNeXt and over 95% of "
          "ConvNeXtV2 depthwise kernels classified).")


def _corpus_section(doc: Document, corpus: Corpus, out_dir: Path) -> None:
    import pandas as pd

    summary = corpus.summary()
    doc.h(2, "Corpus")
    doc.p(f"{summary['models']:,} model(s), {summary['layers']:,} conv layers, {summary['kernels_stored']:,} "
          f"kernels stored in {summary['shards']} shard(s) ({summary['dtype']}); all-zero kernels: "
          f"{summary['zero_kernels']:,}, non-finite: {summary['nonfinite_kernels']:,}; corpus generation "
          f"{corpus.manifest.get('generation', '?')}.")
    rows, records = [], []
    for size, kinds in sorted(summary["kernels_by_size"].items(),
                              key=lambda kv: [int(x) for x in kv[0].split("x")]):
        for kind in sorted(k for k in kinds if not k.endswith("_stored")):
            stored = kinds.get(kind + "_stored", 0)
            rows.append([size, kind, fmt_count(kinds[kind]), fmt_count(stored)])
            records.append({"size": size, "kind": kind, "kernels": kinds[kind], "stored": stored})
    doc.table(["size", "kind", "kernels", "stored"], rows,
              _write_csv(pd.DataFrame(records, columns=["size", "kind", "kernels", "stored"]), out_dir / "corpus.csv"),
              "Kernels by size and layer kind (stored: kept in the shards; the others are only counted)")


def _runs_section(doc: Document, corpus: Corpus, all_stats: Sequence[RunStats], notes: Sequence[str],
                  out_dir: Path) -> None:
    import pandas as pd

    doc.h(2, "Runs")
    rows, records = [], []
    for st in all_stats:
        r = st.run
        n_shards = len(corpus.shards(r.kernel_size))
        kernels = int(st.layers["assigned"].sum())
        rows.append([r.run_id, f"{r.kernel_size}×{r.kernel_size}", r.kind, r.mode, f"{r.threshold:g}",
                     str(len(r.clusters)), f"{len(r.shards)}/{n_shards}", fmt_count(kernels), r.created,
                     "yes" if st.label_mismatch == 0 else f"{st.label_mismatch:,} differ"])
        records.append({"run_id": r.run_id, "kernel_size": r.kernel_size, "kind": r.kind, "mode": r.mode,
                        "threshold": r.threshold, "clusters": len(r.clusters), "shards": len(r.shards),
                        "corpus_shards": n_shards, "kernels": kernels, "created": r.created,
                        "model_dir": r.spec.get("model_dir"), "prototypes": r.spec.get("prototypes"),
                        "command": r.spec.get("command"), "label_mismatch": st.label_mismatch})
    doc.table(["run", "size", "kind", "mode", "threshold", "clusters", "shards", "kernels", "created",
               "labels agree"], rows, _write_csv(pd.DataFrame(records), out_dir / "runs.csv"),
              "The runs reported on (shards: covered / in the corpus; labels agree: the stored labels equal those "
              "recomputed at the run's threshold)")
    doc.ul([f"`{st.run.run_id}`: `{st.run.spec['command']}`" for st in all_stats if st.run.spec.get("command")])
    if notes:
        doc.p("Notes:")
        doc.ul(notes)


def _split_cells(m: dict[str, Any], t: float) -> list[str]:
    """'in-sample / held-out' shares of a table row at t (or the overall share when the run has no split)."""
    if m.get("live_held_out", -1) < 0:
        return [fmt_pct(m[f"share_{fmt_threshold(t)}"])]
    return [f"{fmt_pct(m[f'share_in_sample_{fmt_threshold(t)}'])} / {fmt_pct(m[f'share_held_out_{fmt_threshold(t)}'])}"]


def _control_row(label: str, control: list[float | None], width: int) -> list[str]:
    return [label] + ["–"] * width + [fmt_pct(c) if c is not None else "–" for c in control]


def _coverage_section(doc: Document, corpus: Corpus, all_stats: Sequence[RunStats], thresholds: Sequence[float],
                      out_dir: Path) -> None:
    """Table 1: per run, per model, the share of live kernels classified at each threshold -- in-sample and on
    held-out kernels -- and the random-kernel control."""
    import pandas as pd

    doc.h(2, "Coverage (Table 1)")
    doc.p("Share of the live kernels of each model classified at each threshold, per run (kernel size and kind). "
          "kernels: rows of the run's kind; dead: all-zero, flat or non-finite; live = kernels − dead.  Each cell "
          "reads **in-sample / held-out**: in-sample kernels were in the autoencoder's training pool; held-out "
          "ones never were (a fixed share of every layer's kernels, set aside by a rule on their identity before "
          "training sampled anything, plus kernels of models or shards the model was not trained on).  The "
          "held-out figure is the honest one; a gap between the two would mean the model memorised its training "
          "kernels.  The last rows give all models together and the **control**: random kernels (i.i.d. "
          "Gaussian entries, centred) through the same model -- a coverage figure means something only well "
          "above it.  `coverage-totals.csv` holds the totals.")
    frames, totals = [], []
    for st in all_stats:
        table = model_table(st, corpus.models)
        total = total_row(st)
        frames.append(table)
        totals.append(total)
        rows = [[short_text(str(m["model"]), 60), fmt_count(m["kernels"]), fmt_count(m["dead"]), fmt_count(m["live"])]
                + [c for t in thresholds for c in _split_cells(m, t)] for m in table.to_dict("records")]
        rows.append([f"all {total['models']} models", fmt_count(total["kernels"]), fmt_count(total["dead"]),
                     fmt_count(total["live"])] + [c for t in thresholds for c in _split_cells(total, t)])
        split = total.get("live_held_out", -1) >= 0
        if st.run.mode == "autoencoder":
            rows.append(_control_row("random kernels (control)", [st.run.control(t) for t in thresholds], 3))
        what = "in-sample / held-out" if split else "all kernels (the model records no held-out split)"
        headers = ["model", "kernels", "dead", "live"] + [f"classified at {fmt_threshold(t)}" for t in thresholds]
        doc.table(headers, rows,
                  "coverage.csv", f"{st.run.kernel_size}×{st.run.kernel_size} {st.run.kind} kernels, run "
                  f"{st.run.run_id} ({st.run.mode}; {what})", bold_last=False)
    if frames:
        _write_csv(pd.concat(frames, ignore_index=True), out_dir / "coverage.csv")
        _write_csv(pd.DataFrame(totals), out_dir / "coverage-totals.csv")


def _per_model_section(doc: Document, corpus: Corpus, per_model: Sequence[RunStats], pooled: Sequence[RunStats],
                       thresholds: Sequence[float], out_dir: Path) -> bool:
    """Table 1 with one autoencoder per model (`kernelatlas run --per-model`), beside the pooled model's."""
    import pandas as pd

    if not per_model:
        return False
    doc.h(2, "Coverage with one autoencoder per model")
    doc.p("Each model's kernels through an autoencoder trained on that model alone (its own held-out split), "
          "next to the same model's figure under the pooled autoencoder of the table above.  Cells: in-sample / "
          "held-out; control: random kernels through the model's own autoencoder.")
    pooled_tables = {(st.run.kernel_size, st.run.kind): model_table(st, corpus.models) for st in pooled}
    frames = []
    for (k, kind) in sorted({(st.run.kernel_size, st.run.kind) for st in per_model}):
        rows = []
        ref = pooled_tables.get((k, kind))
        for st in sorted((s for s in per_model if (s.run.kernel_size, s.run.kind) == (k, kind)),
                         key=lambda s: s.run.models or ()):
            table = model_table(st, corpus.models)
            table["scope"] = "per-model"
            frames.append(table)
            for m in table.to_dict("records"):
                cells = [c for t in thresholds for c in _split_cells(m, t)]
                pooled_cells = ["–"] * len(thresholds)
                if ref is not None and (ref["model_id"] == m["model_id"]).any():
                    r = ref[ref["model_id"] == m["model_id"]].iloc[0].to_dict()
                    pooled_cells = [c for t in thresholds for c in _split_cells(r, t)]
                control = st.run.control(thresholds[len(thresholds) // 2])
                rows.append([short_text(str(m["model"]), 50), fmt_count(m["live"])] + cells + pooled_cells
                            + [fmt_pct(control) if control is not None else "–", st.run.run_id])
        mid = fmt_threshold(thresholds[len(thresholds) // 2])
        doc.table(["model", "live"] + [f"own model, {fmt_threshold(t)}" for t in thresholds]
                  + [f"pooled model, {fmt_threshold(t)}" for t in thresholds] + [f"control at {mid}", "run"], rows,
                  "coverage-per-model.csv", f"{k}×{k} {kind} kernels, one autoencoder per model")
    _write_csv(pd.concat(frames, ignore_index=True), out_dir / "coverage-per-model.csv")
    return True


def _run_section(doc: Document, corpus: Corpus, st: RunStats, out_dir: Path) -> None:
    """One run: its clusters (table, prototypes, spectrum), coverage curves, shares by depth and per layer."""
    run = st.run
    size = f"{run.kernel_size}×{run.kernel_size}"
    doc.h(2, f"{size} {run.kind} kernels — run {run.run_id} ({run.mode})")
    clusters = cluster_table(st)
    intervals = [interval_text(run, i) for i in range(len(run.clusters))] + ["–"]
    doc.table(["cluster", "code interval", "kernels", "share of live"],
              [[str(r.cluster), iv, fmt_count(r.kernels), fmt_pct(r.share)]
               for r, iv in zip(clusters.itertuples(), intervals, strict=True)],
              _write_csv(clusters, out_dir / f"clusters-{run.tag}.csv"),
              f"Clusters of run {run.run_id} (stored labels, threshold {run.threshold:g})")
    what = ("the fixed prototype the run compared kernels with" if run.mode == "prototypes" else
            "the decoded centre of its code interval")
    doc.figure(prototype_figure(st, clusters, out_dir), f"Cluster prototypes, {size} {run.kind}",
               f"Cluster prototypes (like Fig. 5 of the paper). Each panel is one cluster's prototype ({what}), red "
               "positive and blue negative, scaled to its own largest |weight|, framed in the cluster's colour; "
               "under its name, the share of the run's live kernels in that cluster.")
    spectrum, why = spectrum_figure(st, out_dir)
    if spectrum is not None:
        doc.figure(spectrum, f"Decoded spectrum, {size}",
                   f"Decoded spectrum ({why}). The autoencoder's code axis from left to right: each coloured "
                   "interval is a cluster, shown with the pattern it decodes to; codes in the grey gaps belong to "
                   "no cluster and are unclassified.")
    else:
        doc.p(f"No spectrum: {why}.")
    inside = "whose code lies in a cluster interval" if run.mode == "autoencoder" else "(prototypes mode: any)"
    doc.figure(coverage_figure(st, corpus.models, out_dir), f"Coverage vs threshold, {size} {run.kind}",
               f"Coverage vs threshold. For each threshold t on the x axis, the share of live kernels whose score "
               f"is at least t {inside}; one line per model (grey when there are more than {MAX_CURVES}), black: "
               "all models together; dotted lines: the thresholds of the coverage table. A curve that stays high "
               "towards t = 1 means kernels that the clusters describe closely.")
    doc.figure(depth_figure(st, out_dir), f"Cluster shares by depth, {size} {run.kind}",
               "Cluster shares by depth, all models together. Layers are grouped by normalised depth (0: a "
               "model's first conv layer, 1: its last) into deciles; each bar shows how the live kernels of those "
               "layers divide into the clusters (stored labels), unclassified in grey on top; the number over a "
               "bar is its count of live kernels.")
    layers = layer_table(st, corpus.models)
    layer_csv = _write_csv(layers, out_dir / f"layers-{run.tag}.csv")
    files, left_out = layer_figures(st, layers, out_dir)
    for i, f in enumerate(files):
        doc.figure(f, f"Cluster shares per layer, {size} {run.kind}" + (f", page {i + 1}" if len(files) > 1 else ""),
                   "Cluster shares per layer (like Fig. 7 of the paper). One panel per model; each bar is one "
                   "layer of the run's kind, from the input (left) to the output (right); the coloured segments "
                   "are the shares of the layer's live kernels in each cluster, grey the unclassified ones.")
    doc.p(f"Per-layer shares of every model: `{layer_csv}`."
          + (f" {left_out} more page(s) of models are not drawn (at most {MAX_LAYER_FIGURES} per run); the CSV "
             "holds them." if left_out else ""))


def _curves_section(doc: Document, corpus: Corpus, all_stats: Sequence[RunStats], out_dir: Path) -> None:
    doc.h(2, "Coverage across runs")
    curve_csv = _write_csv(curve_table(all_stats, corpus.models), out_dir / "coverage-curves.csv")
    doc.figure(runs_coverage_figure(all_stats, out_dir), "Coverage vs threshold of every run",
               "Coverage vs threshold of every reported run, all models together: colour = kernel size, line "
               "style = kind (solid depthwise, dashed regular, dotted 'all').")
    doc.p(f"The curves of every model and run, thresholds 0.50 to 1.00 in steps of 0.01: `{curve_csv}`.")


def _comparison_section(doc: Document, corpus: Corpus, all_stats: Sequence[RunStats], thresholds: Sequence[float],
                        out_dir: Path) -> bool:
    """Depthwise vs regular per kernel size, where runs cover both; otherwise says why not.  Returns whether
    any comparison was drawn."""
    import pandas as pd

    doc.h(2, "Depthwise vs regular kernels")
    rows, records, skipped = [], [], []
    stored = corpus.layers[corpus.layers["rows"] > 0]
    for k in sorted({st.run.kernel_size for st in all_stats}):
        sources = comparison_sources(all_stats, k)
        if len(sources) >= 2:
            doc.figure(comparison_figure(k, sources, thresholds, out_dir), f"Depthwise vs regular {k}×{k}",
                       f"Depthwise vs regular {k}×{k} kernels. Left: coverage vs threshold of each kind, all "
                       "models together. Right: the share classified at the middle threshold per depth decile. "
                       "The paper finds depthwise kernels clustered at every depth and regular kernels losing "
                       "that structure after the first layers. Each kind is scored by its own run's clusters, so "
                       "this compares how well each kind is described by them.")
            for kind, src in sorted(sources.items()):
                lay = src.stats.layers[src.stats.layers["kind"] == kind]
                live = int(lay["live"].sum())
                shares = {f"share_{fmt_threshold(t)}": float(share_of(lay[src.stats.cls_col(t)].sum(), live))
                          for t in thresholds}
                records.append({"kernel_size": k, "kind": kind, "run_id": src.stats.run.run_id, "live": live,
                                **shares})
                rows.append([f"{k}×{k}", kind, src.stats.run.run_id, fmt_count(live)]
                            + [fmt_pct(v) for v in shares.values()])
            continue
        if not sources:
            continue  # only grouped kernels reported at this size
        have = next(iter(sources))
        other = "regular" if have == "depthwise" else "depthwise"
        other_layers = stored[(stored["kh"] == k) & (stored["kw"] == k) & (stored["kind"] == other)]
        if len(other_layers):
            skipped.append(f"{k}×{k}: only a {have} run is reported, but the corpus stores "
                           f"{int(other_layers['rows'].sum()):,} {other} {k}×{k} kernels ({len(other_layers)} "
                           f"layers): run `kernelatlas assign {corpus.root} --model MODEL --kind {other}` to "
                           "compare them; skipped.")
        else:
            skipped.append(f"{k}×{k}: the corpus stores no {other} {k}×{k} kernels"
                           + (" (extract with `--all-convs` to store regular convs)" if other == "regular" else "")
                           + "; no comparison.")
    if records:
        doc.table(["size", "kind", "run", "live"] + [f"classified at {fmt_threshold(t)}" for t in thresholds], rows,
                  _write_csv(pd.DataFrame(records), out_dir / "compare.csv"), "Depthwise vs regular coverage")
    doc.ul(skipped)
    return bool(records)
