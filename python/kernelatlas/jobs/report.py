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
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas.corpus import Corpus, rundir
from kernelatlas.corpus.rundir import RunError
from kernelatlas.holdout import Holdout, control_at

__all__ = ["RunError", "RunInfo", "find_runs", "load_run", "report"]

DEFAULT_THRESHOLDS = (0.80, 0.85, 0.90)
# coverage curves: share classified at every threshold of this grid (exact counts, see _scan)
CURVE_GRID = np.round(np.linspace(0.5, 1.0, 201), 6)
CHUNK_ROWS = 1 << 20
MODELS_PER_FIGURE = 12      # small multiples per per-layer figure
MAX_LAYER_FIGURES = 25      # per run; the per-layer CSV holds every model beyond them
MAX_CURVES = 10             # per-model coverage curves drawn in colour with a legend; beyond: thin grey lines
UNCLASSIFIED_COLOUR = "#c9c9c9"
# tab10 without its grey (grey means unclassified / no cluster here), then darker tab20b/c shades
FALLBACK_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                    "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")
KIND_COLOURS = {"depthwise": "#1f77b4", "regular": "#d62728", "grouped": "#2ca02c"}
RUN_KINDS = ("depthwise", "regular", "grouped", "all")
RUN_MODES = ("autoencoder", "prototypes")


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Cluster:
    name: str
    lo: float | None
    hi: float | None
    colour: str
    prototype: np.ndarray  # [k, k] float64


@dataclass
class RunInfo:
    """One completed run, validated: its run.json and where its output shards are."""

    run_id: str
    path: Path
    spec: dict[str, Any]
    kernel_size: int
    kind: str
    mode: str
    threshold: float
    clusters: list[Cluster]
    shards: list[str]
    created: str
    model_dir: Path | None = None
    holdout: Holdout | None = None     # the model's held-out split (autoencoder runs made since it existed)
    models: tuple[int, ...] | None = None  # the models the run was restricted to (a per-model autoencoder)

    @property
    def per_model(self) -> bool:
        """A run of a per-model autoencoder over its own model's kernels (reported in its own table)."""
        return self.models is not None

    def control(self, threshold: float) -> float | None:
        """The random-kernel control at ``threshold`` (None: not recorded)."""
        return control_at(self.spec.get("control"), threshold)

    @property
    def tag(self) -> str:
        """A file-name-safe name for this run's figures and tables."""
        return f"k{self.kernel_size}-{self.kind}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", self.run_id)

    def output(self, shard: str, what: str) -> Path:
        """runs/RUN_ID/kK/{labels,scores,codes}-NNNNNN.npy of a corpus shard kK/shard-NNNNNN.npy."""
        return rundir.output_path(self.path, self.kernel_size, shard, what)


def _colour(value: Any, index: int) -> str:
    from matplotlib.colors import is_color_like, to_hex

    if isinstance(value, str) and is_color_like(value):
        return to_hex(value)
    return FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)]


def load_run(corpus_root: str | os.PathLike[str], run_id: str) -> RunInfo:
    """Read and check CORPUS/runs/RUN_ID/run.json; :class:`RunError` names the file when it is missing,
    unreadable, incomplete (``completed`` not true), of another verb, or inconsistent."""
    root = Path(corpus_root)
    run = rundir.require(root, run_id, rundir.ASSIGN_FORMAT)
    spec, spec_path, path = run.info or {}, run.spec_path, run.path
    missing = [k for k in ("kernel_size", "mode", "threshold", "clusters", "shards") if k not in spec]
    if missing:
        raise RunError(f"{spec_path} lacks {', '.join(missing)}: it was not written by `kernelatlas assign`")
    try:
        k = int(spec["kernel_size"])
        threshold = float(spec["threshold"])
    except (TypeError, ValueError):
        raise RunError(f"{spec_path}: kernel_size and threshold must be numbers") from None
    mode = spec["mode"]
    if mode not in RUN_MODES:
        raise RunError(f"{spec_path}: mode {mode!r} is not one of {', '.join(RUN_MODES)}")
    kind = spec.get("kind", "depthwise")
    if kind not in RUN_KINDS:
        raise RunError(f"{spec_path}: kind {kind!r} is not one of {', '.join(RUN_KINDS)}")
    clusters = []
    for i, c in enumerate(spec["clusters"]):
        try:
            # a cluster spec without a prototype (clusters.json edited by hand) gets one decoded below
            proto = (np.full((k, k), np.nan) if c.get("prototype") is None
                     else np.asarray(c["prototype"], dtype=np.float64).reshape(k, k))
            lo = None if c.get("lo") is None else float(c["lo"])
            hi = None if c.get("hi") is None else float(c["hi"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"{spec_path}: cluster {i} is malformed ({exc}); each needs name, lo, hi, colour and a "
                           f"{k}x{k} prototype") from None
        if mode == "autoencoder" and (lo is None or hi is None or not lo <= hi):
            raise RunError(f"{spec_path}: cluster {i} needs a code interval lo <= hi in autoencoder mode")
        clusters.append(Cluster(str(c.get("name", f"cluster_{i}")), lo, hi, _colour(c.get("colour"), i), proto))
    if not clusters:
        raise RunError(f"{spec_path}: the run has no clusters")
    model_dir = None
    if spec.get("model_dir"):
        md = Path(spec["model_dir"])
        model_dir = md if md.is_absolute() or md.exists() else root / md
    if mode == "autoencoder" and model_dir is not None and any(np.isnan(c.prototype).all() for c in clusters):
        clusters = _decoded_prototypes(clusters, model_dir, k)
    models = spec.get("models")
    return RunInfo(run_id=run_id, path=path, spec=spec, kernel_size=k, kind=kind, mode=mode, threshold=threshold,
                   clusters=clusters, shards=[str(s) for s in spec["shards"]], created=str(spec.get("created", "")),
                   model_dir=model_dir, holdout=Holdout.from_json(spec.get("holdout")),
                   models=None if not models else tuple(int(m) for m in models))


def _decoded_prototypes(clusters: list[Cluster], model_dir: Path, k: int) -> list[Cluster]:
    """Prototypes the run did not record: the decoded centre of each interval, when the model directory is
    still there (else they stay NaN and are drawn as blank panels)."""
    from dataclasses import replace

    try:
        from kernelatlas.autoencoder import Autoencoder

        model = Autoencoder.load(model_dir)
        centres = np.array([(c.lo + c.hi) / 2 for c in clusters], dtype=np.float32)  # type: ignore[operator]
        decoded = np.asarray(model.decode(centres), dtype=np.float64).reshape(len(clusters), k, k)
    except (OSError, ValueError, RuntimeError, ImportError):
        return clusters
    return [replace(c, prototype=decoded[i]) if np.isnan(c.prototype).all() else c for i, c in enumerate(clusters)]


def find_runs(corpus_root: str | os.PathLike[str], *, allow_none: bool = False) -> tuple[list[RunInfo], list[str]]:
    """The default selection: the latest completed run (by run.json "created") per (kernel size, kind, models
    it was restricted to), so that a depthwise and a regular run of one size are both reported and compared, and
    the runs of per-model autoencoders beside the pooled one.  Returns the runs and one note per run directory
    left out (not completed, unreadable, or superseded by a later run)."""
    root = Path(corpus_root)
    notes: list[str] = []
    valid: dict[str, RunInfo] = {}
    for found in rundir.scan(root):
        if found.info is not None and found.format != rundir.ASSIGN_FORMAT:
            continue  # a quality run: its own report section
        try:
            valid[found.run_id] = load_run(root, found.run_id)
        except RunError as exc:
            notes.append(f"skipped: {exc}")
    dirs = [rundir.read(root, rid) for rid in valid]
    chosen = rundir.latest(dirs, key=lambda d: (d.kernel_size, d.kind, d.models))
    latest = {key: valid[d.run_id] for key, d in chosen.items()}
    for d in dirs:
        newer = chosen[(d.kernel_size, d.kind, d.models)]
        if newer.run_id != d.run_id:
            notes.append(f"not shown: run {d.run_id} ({d.kernel_size}x{d.kernel_size} {d.kind}, created "
                         f"{d.created}) is older than run {newer.run_id}; name it with --run to report on it")
    if not latest and not allow_none:
        where = root / "runs"
        raise RunError(f"no completed run in {where}: run `kernelatlas assign {root} --model MODEL` first"
                       + (" (" + "; ".join(notes) + ")" if notes else ""))
    return sorted(latest.values(), key=lambda r: (r.kernel_size, r.kind, r.models or (), r.run_id)), notes


# ---------------------------------------------------------------------------------------------- streaming


@dataclass
class RunStats:
    """What one pass over a run's outputs gives.  ``layers``: one row per layer with rows of the run's kind,
    the layer columns plus counts: assigned (rows not -2), dead, live, inside (live with a code in some
    interval; = live in prototypes mode), cls_<t> (classified at each report threshold), n_<i> (stored label
    = cluster i), and with a held-out split live_ho / cls_ho_<t> (the same counts over held-out kernels: never
    in the model's training pool).  ``curve``: for each (model_id, layer kind), counts of live in-interval kernels with score
    >= each CURVE_GRID value.  ``label_mismatch``: rows whose stored label disagrees with the recomputation at
    the run's threshold (borderline float32 scores; anything else points at a bug)."""

    run: RunInfo
    layers: Any
    curve: dict[tuple[int, str], np.ndarray]
    thresholds: tuple[float, ...]
    label_mismatch: int = 0
    rows: int = 0
    notes: list[str] = field(default_factory=list)

    def cls_col(self, t: float) -> str:
        return f"cls_{t!r}"


def _open_output(run: RunInfo, shard: str, what: str, rows: int, dtype: Any) -> np.ndarray:
    path = run.output(shard, what)
    if not path.is_file():
        raise RunError(f"{path} not found: run {run.run_id} lists {shard} in {run.path / 'run.json'} but its "
                       f"{what} are missing; rerun the same `kernelatlas assign` command")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} is not a readable .npy file ({exc}); rerun `kernelatlas assign`") from None
    if arr.shape != (rows,):
        raise RunError(f"{path} has shape {arr.shape}, but {shard} holds {rows} rows: the run does not belong to "
                       "this corpus or was damaged; rerun `kernelatlas assign`")
    if arr.dtype.kind != np.dtype(dtype).kind:
        raise RunError(f"{path} holds {arr.dtype}, expected {np.dtype(dtype)}")
    return arr


def _interval_index(codes: np.ndarray, clusters: Sequence[Cluster]) -> np.ndarray:
    """Cluster index of each code (float64), -1 outside every interval (and for NaN).  Intervals are [lo, hi);
    the one reaching highest is closed at hi (a code of exactly 1.0 belongs to it)."""
    index = np.full(len(codes), -1, dtype=np.int64)
    top = max(range(len(clusters)), key=lambda i: clusters[i].hi)  # type: ignore[arg-type,return-value]
    for i, c in enumerate(clusters):
        lo, hi = np.float64(c.lo), np.float64(c.hi)
        inside = (codes >= lo) & ((codes <= hi) if i == top else (codes < hi))
        index[inside & (index < 0)] = i
    return index


def _row_layers(starts: np.ndarray, stops: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
    """For rows [a, b) of a shard and the layers overlapping them (sorted, disjoint row ranges): each row's
    layer position (0 .. len(starts)-1) and a mask of the rows inside some layer (None: all are).  Layers
    tile a shard in a corpus, so the fast path is one np.repeat; gaps fall back to a search."""
    lengths = np.minimum(stops, b) - np.maximum(starts, a)
    if starts[0] <= a and int(lengths.sum()) == b - a:
        return np.repeat(np.arange(len(starts), dtype=np.int64), lengths), None
    row = np.arange(a, b, dtype=np.int64)
    local = np.searchsorted(starts, row, "right") - 1
    valid = (local >= 0) & (row < stops[np.maximum(local, 0)])
    return local[valid], valid


def _grid_bin(scores: np.ndarray) -> np.ndarray:
    """Index of the largest CURVE_GRID value <= each score (float64), -1 below the grid or for NaN; exact:
    the arithmetic guess is corrected by comparing with the grid values themselves."""
    n = len(CURVE_GRID)
    step = (CURVE_GRID[-1] - CURVE_GRID[0]) / (n - 1)
    with np.errstate(invalid="ignore"):
        guess = np.floor((scores - CURVE_GRID[0]) / step)
    finite = np.isfinite(guess)
    idx = np.clip(np.where(finite, guess, -1), -1, n - 1).astype(np.int64)
    idx -= (idx >= 0) & (scores < CURVE_GRID[np.maximum(idx, 0)])   # rounding put it one too high
    up = np.minimum(idx + 1, n - 1)
    idx += (idx + 1 < n) & (scores >= CURVE_GRID[up])              # or one too low
    idx[~finite] = -1
    return idx


def _scan(corpus: Corpus, run: RunInfo, thresholds: Sequence[float], *, chunk_rows: int = CHUNK_ROWS,
          progress: bool = False) -> RunStats:
    shard_rows = {s["path"]: int(s["rows"]) for s in corpus.manifest["shards"]}
    for shard in run.shards:
        if shard not in shard_rows:
            raise RunError(f"{run.path / 'run.json'} lists {shard}, which {corpus.root} does not hold: the run "
                           "belongs to another corpus")
    lay = corpus.layers
    lay = lay[lay["shard"].isin(run.shards) & (lay["rows"] > 0)]
    lay = lay.sort_values(["shard", "row_start"], kind="stable").reset_index(drop=True)
    n_layers, n_clusters, n_t, n_grid = len(lay), len(run.clusters), len(thresholds), len(CURVE_GRID)
    kinds = sorted(lay["kind"].unique())
    model_ids = sorted(lay["model_id"].unique())
    model_pos = {m: i for i, m in enumerate(model_ids)}
    kind_pos = {k: i for i, k in enumerate(kinds)}
    layer_group = (lay["model_id"].map(model_pos).to_numpy(np.int64) * max(len(kinds), 1)
                   + lay["kind"].map(kind_pos).to_numpy(np.int64)) if n_layers else np.zeros(0, np.int64)
    n_groups = len(model_ids) * max(len(kinds), 1)
    counts = {name: np.zeros(n_layers, np.int64) for name in ("assigned", "dead", "live", "inside", "live_ho")}
    classified = np.zeros((n_t, n_layers), np.int64)
    classified_ho = np.zeros((n_t, n_layers), np.int64)
    split = run.holdout
    shard_sha = {str(s["path"]): s.get("sha256") for s in corpus.manifest["shards"]}
    # layers whose model was never in the training pool: every kernel of theirs is held out
    unpooled = (~lay["model_id"].map(split.model_in_pool).to_numpy(bool) if split is not None and n_layers
                else np.zeros(n_layers, bool))
    by_cluster = np.zeros((n_layers, n_clusters), np.int64)
    curve_hist = np.zeros(n_groups * n_grid, np.int64)
    mismatch = 0
    total_rows = sum(shard_rows[s] for s in run.shards)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_rows, unit="kernel", unit_scale=True, desc=f"report {run.run_id}", leave=False,
                   file=sys.stderr)
    shard_of = lay["shard"].to_numpy()
    starts_all = lay["row_start"].to_numpy(np.int64)
    stops_all = starts_all + lay["rows"].to_numpy(np.int64)
    autoencoder = run.mode == "autoencoder"
    try:
        for shard in run.shards:
            rows = shard_rows[shard]
            labels = _open_output(run, shard, "labels", rows, np.int16)
            scores = _open_output(run, shard, "scores", rows, np.float32)
            codes = _open_output(run, shard, "codes", rows, np.float32) if autoencoder else None
            first, last = np.searchsorted(shard_of, shard, "left"), np.searchsorted(shard_of, shard, "right")
            starts, stops = starts_all[first:last], stops_all[first:last]
            for a in range(0, rows, chunk_rows):
                b = min(a + chunk_rows, rows)
                if bar is not None:
                    bar.update(b - a)
                # the layers overlapping rows [a, b): positions i0 .. i1-1 of this shard's layers
                i0 = int(np.searchsorted(stops, a, "right"))
                i1 = int(np.searchsorted(starts, b, "left"))
                if i0 >= i1:
                    continue
                span, base = i1 - i0, first + i0
                local, valid = _row_layers(starts[i0:i1], stops[i0:i1], a, b)
                if valid is None:
                    lab = np.asarray(labels[a:b])
                    score = np.asarray(scores[a:b])
                    code = np.asarray(codes[a:b]) if codes is not None else None
                else:
                    lab = np.asarray(labels[a:b])[valid]
                    score = np.asarray(scores[a:b])[valid]
                    code = np.asarray(codes[a:b])[valid] if codes is not None else None
                lab = lab.astype(np.int64)
                if len(lab) and (lab.min() < -2 or lab.max() >= n_clusters):
                    bad = int(lab[(lab < -2) | (lab >= n_clusters)][0])
                    raise RunError(f"{run.output(shard, 'labels')} holds label {bad}, but the run has "
                                   f"{n_clusters} clusters (labels -2 .. {n_clusters - 1}): the run is damaged")
                assigned = lab != -2
                if code is not None:
                    code64 = code.astype(np.float64)
                    dead = assigned & (lab == -1) & ~np.isfinite(code64)
                else:
                    dead = assigned & (lab == -1) & ((score == 0) | ~np.isfinite(score))
                live = assigned & ~dead
                if code is not None:
                    cidx = _interval_index(code64, run.clusters)
                    inside = live & (cidx >= 0)
                else:
                    cidx = None
                    inside = live

                def add(target: np.ndarray, mask: np.ndarray) -> None:
                    target[base:base + span] += np.bincount(local[mask], minlength=span)  # noqa: B023

                add(counts["assigned"], assigned)
                add(counts["dead"], dead)
                add(counts["live"], live)
                add(counts["inside"], inside)
                labelled = lab >= 0
                by_cluster[base:base + span] += np.bincount(
                    local[labelled] * n_clusters + lab[labelled], minlength=span * n_clusters
                ).reshape(span, n_clusters)
                local_in = local[inside]
                score_in = score[inside].astype(np.float64)
                for j, t in enumerate(thresholds):
                    classified[j, base:base + span] += np.bincount(local_in[score_in >= t], minlength=span)
                if split is not None:
                    if split.shard_in_pool(shard, shard_sha.get(shard)):
                        held = split.mask(shard, a, b)
                        held = held if valid is None else held[valid]
                        held |= unpooled[base + local]
                    else:  # a shard added after training (or changed): none of it was seen
                        held = np.ones(len(lab), bool)
                    add(counts["live_ho"], live & held)
                    held_in = held[inside]
                    for j, t in enumerate(thresholds):
                        classified_ho[j, base:base + span] += np.bincount(local_in[held_in & (score_in >= t)],
                                                                          minlength=span)
                # curve: the grid point at or below each score, per (model, kind)
                grid_bin = _grid_bin(score_in)
                keep = grid_bin >= 0
                group = layer_group[base + local_in[keep]]
                curve_hist += np.bincount(group * n_grid + grid_bin[keep], minlength=n_groups * n_grid)
                # the stored labels against the recomputation at the run's threshold
                expect = inside & (score.astype(np.float64) >= run.threshold)
                mismatch += int(np.count_nonzero(expect != labelled))
                if cidx is not None:
                    both = expect & labelled
                    mismatch += int(np.count_nonzero(cidx[both] != lab[both]))
    finally:
        if bar is not None:
            bar.close()
    frame = lay.copy()
    for name, values in counts.items():
        frame[name] = values
    for j, t in enumerate(thresholds):
        frame[f"cls_{t!r}"] = classified[j]
        frame[f"cls_ho_{t!r}"] = classified_ho[j]
    for i in range(n_clusters):
        frame[f"n_{i}"] = by_cluster[:, i]
    frame = frame[frame["assigned"] > 0].reset_index(drop=True)
    hist = curve_hist.reshape(n_groups, n_grid) if n_groups else np.zeros((0, n_grid), np.int64)
    curve: dict[tuple[int, str], np.ndarray] = {}
    for m, mi in model_pos.items():
        for k, ki in kind_pos.items():
            h = hist[mi * len(kinds) + ki]
            if h.any():
                curve[(int(m), str(k))] = np.cumsum(h[::-1])[::-1]
    stats = RunStats(run, frame, curve, tuple(thresholds), mismatch, total_rows)
    if frame.empty:
        stats.notes.append(f"run {run.run_id} assigned no kernel: its shards hold no {run.kind} "
                           f"{run.kernel_size}x{run.kernel_size} layer (every label is -2)")
    corpus_shards = corpus.shards(run.kernel_size)
    missing = [] if run.per_model else [s for s in corpus_shards if s not in run.shards]
    if missing:
        stats.notes.append(f"run {run.run_id} covers {len(run.shards)} of the corpus's {len(corpus_shards)} "
                           f"{run.kernel_size}x{run.kernel_size} shards (the corpus grew after it: "
                           f"{len(missing)} newer shard(s) are not in it); rerun `kernelatlas assign` to cover them")
    gen = run.spec.get("corpus_generation")
    if gen is not None and int(gen) != int(corpus.manifest.get("generation", 0)) and not missing:
        stats.notes.append(f"run {run.run_id} was made on corpus generation {gen}; the corpus is now at "
                           f"generation {corpus.manifest.get('generation')}")
    if mismatch:
        stats.notes.append(f"run {run.run_id}: {mismatch:,} stored labels differ from the labels recomputed from "
                           f"its scores and codes at its threshold {run.threshold:g} (scores on the threshold "
                           "in float32 can do that; many point at a damaged run)")
    return stats


# ---------------------------------------------------------------------------------------------- tables


def _t(t: float) -> str:
    """A threshold in column names and headers: two decimals (0.80), more only when it has them (0.875)."""
    return f"{t:.2f}" if round(t, 2) == t else f"{t:g}"


def _share(num: Any, den: Any) -> Any:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.asarray(den) > 0, np.asarray(num, dtype=np.float64) / np.maximum(den, 1), np.nan)


def _pct(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return "<0.1%" if 0 < x < 0.0005 else f"{100 * x:.1f}%"


def _count(x: Any) -> str:
    return f"{int(x):,}"


def _model_table(stats: RunStats, models: Any) -> Any:
    """Table 1 of the paper for one run: per model, kernels of the run's kind, dead, live and the share of
    live kernels classified at each threshold."""
    import pandas as pd

    lay = stats.layers
    cols = (["assigned", "dead", "live", "live_ho"] + [stats.cls_col(t) for t in stats.thresholds]
            + [f"cls_ho_{t!r}" for t in stats.thresholds])
    per_model = lay.groupby("model_id", sort=True)[cols].sum().reset_index()
    names = models.set_index("model_id")["name"]
    out = pd.DataFrame({
        "kernel_size": stats.run.kernel_size, "kind": stats.run.kind, "run_id": stats.run.run_id,
        "model_id": per_model["model_id"].astype(np.int64),
        "model": per_model["model_id"].map(names).fillna("?").astype(str),
        "kernels": per_model["assigned"], "dead": per_model["dead"], "live": per_model["live"],
    })
    for t in stats.thresholds:
        out[f"classified_{_t(t)}"] = per_model[stats.cls_col(t)]
    for t in stats.thresholds:
        out[f"share_{_t(t)}"] = _share(per_model[stats.cls_col(t)], per_model["live"])
    _split_columns(out, per_model, stats)
    return out


def _split_columns(out: Any, counts: Any, stats: RunStats) -> None:
    """In-sample (the training pool) and held-out (never seen) shares beside the overall one, and the
    random-kernel control; NaN where the run records no split (prototypes, or a model from before splits)."""
    has_split = stats.run.holdout is not None
    live_ho = np.asarray(counts["live_ho"], dtype=np.int64)
    live_in = np.asarray(counts["live"], dtype=np.int64) - live_ho
    out["live_in_sample"] = live_in if has_split else -1
    out["live_held_out"] = live_ho if has_split else -1
    for t in stats.thresholds:
        cls_ho = np.asarray(counts[f"cls_ho_{t!r}"], dtype=np.int64)
        cls_in = np.asarray(counts[stats.cls_col(t)], dtype=np.int64) - cls_ho
        out[f"share_in_sample_{_t(t)}"] = _share(cls_in, live_in) if has_split else np.nan
        out[f"share_held_out_{_t(t)}"] = _share(cls_ho, live_ho) if has_split else np.nan
    for t in stats.thresholds:
        control = stats.run.control(t)
        out[f"control_{_t(t)}"] = np.nan if control is None else control


def _total_row(stats: RunStats) -> dict[str, Any]:
    lay = stats.layers
    row: dict[str, Any] = {"kernel_size": stats.run.kernel_size, "kind": stats.run.kind, "run_id": stats.run.run_id,
                           "models": int(lay["model_id"].nunique()), "layers": len(lay),
                           "kernels": int(lay["assigned"].sum()), "dead": int(lay["dead"].sum()),
                           "live": int(lay["live"].sum())}
    for t in stats.thresholds:
        row[f"classified_{_t(t)}"] = int(lay[stats.cls_col(t)].sum())
    for t in stats.thresholds:
        row[f"share_{_t(t)}"] = float(_share(row[f"classified_{_t(t)}"], row["live"]))
    import pandas as pd

    sums = {c: [int(lay[c].sum())] for c in ["live", "live_ho"] + [stats.cls_col(t) for t in stats.thresholds]
            + [f"cls_ho_{t!r}" for t in stats.thresholds]}
    frame = pd.DataFrame(index=[0])
    _split_columns(frame, sums, stats)
    row.update({k: (v.item() if hasattr(v, "item") else v) for k, v in frame.iloc[0].to_dict().items()})
    return row


def _cluster_table(stats: RunStats) -> Any:
    """Per cluster: interval, kernels with that stored label, share of the live kernels of the run."""
    import pandas as pd

    lay = stats.layers
    live = int(lay["live"].sum())
    rows = []
    for i, c in enumerate(stats.run.clusters):
        n = int(lay[f"n_{i}"].sum())
        rows.append({"cluster": c.name, "lo": c.lo, "hi": c.hi, "colour": c.colour, "kernels": n,
                     "share": float(_share(n, live))})
    labelled = sum(r["kernels"] for r in rows)
    rows.append({"cluster": "unclassified", "lo": None, "hi": None, "colour": UNCLASSIFIED_COLOUR,
                 "kernels": live - labelled, "share": float(_share(live - labelled, live))})
    return pd.DataFrame(rows)


def _layer_table(stats: RunStats, models: Any) -> Any:
    """Per layer: the cluster shares (stored labels, of the live kernels) and the coverage at each threshold."""
    import pandas as pd

    lay = stats.layers
    names = models.set_index("model_id")["name"]
    out = pd.DataFrame({
        "layer_id": lay["layer_id"], "model_id": lay["model_id"], "model": lay["model_id"].map(names).fillna("?"),
        "layer": lay["name"], "kind": lay["kind"], "depth": lay["depth"], "depth_norm": lay["depth_norm"],
        "kernels": lay["assigned"], "dead": lay["dead"], "live": lay["live"],
    })
    labelled = np.zeros(len(lay), np.int64)
    for i, c in enumerate(stats.run.clusters):
        out[f"share_{c.name}"] = _share(lay[f"n_{i}"], lay["live"])
        labelled += lay[f"n_{i}"].to_numpy()
    out["share_unclassified"] = _share(lay["live"].to_numpy() - labelled, lay["live"])
    for t in stats.thresholds:
        out[f"share_classified_{_t(t)}"] = _share(lay[stats.cls_col(t)], lay["live"])
    return out.sort_values(["model_id", "depth", "layer_id"], kind="stable").reset_index(drop=True)


def _curve_table(all_stats: Sequence[RunStats], models: Any) -> Any:
    """Long table: run, model (or ALL), threshold, share of live kernels classified."""
    import pandas as pd

    names = models.set_index("model_id")["name"]
    every = 4  # CURVE_GRID steps by 0.0025; the table by 0.01
    grid = CURVE_GRID[::every]
    frames = []
    for st in all_stats:
        live = st.layers.groupby("model_id")["live"].sum()
        per_model: dict[int, np.ndarray] = {}
        for (m, _kind), c in st.curve.items():
            per_model[m] = per_model.get(m, 0) + c
        total = sum(per_model.values(), np.zeros(len(CURVE_GRID), np.int64))
        for m in sorted(live.index):
            frames.append(pd.DataFrame({
                "kernel_size": st.run.kernel_size, "kind": st.run.kind, "run_id": st.run.run_id,
                "model_id": int(m), "model": str(names.get(m, "?")), "threshold": grid,
                "share": _share(per_model.get(int(m), np.zeros(len(CURVE_GRID))), int(live[m]))[::every]}))
        frames.append(pd.DataFrame({
            "kernel_size": st.run.kernel_size, "kind": st.run.kind, "run_id": st.run.run_id, "model_id": -1,
            "model": "ALL", "threshold": grid, "share": _share(total, int(live.sum()))[::every]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png", dpi=110, facecolor="white")


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _wrap(text: str, width: int, lines: int = 2) -> str:
    """A cluster name on at most ``lines`` lines of ``width`` characters (the last shortened with …)."""
    import textwrap

    parts = textwrap.wrap(text, width) or [""]
    if len(parts) > lines:
        parts = parts[: lines - 1] + [_short(" ".join(parts[lines - 1:]), width)]
    return "\n".join(parts)


def _legend_handles(clusters: Sequence[Cluster]) -> list[Any]:
    from matplotlib.patches import Patch

    return [Patch(facecolor=c.colour, edgecolor="none", label=c.name) for c in clusters] + \
        [Patch(facecolor=UNCLASSIFIED_COLOUR, edgecolor="none", label="unclassified")]


def _layer_figures(stats: RunStats, table: Any, out: Path) -> tuple[list[str], int]:
    """Fig. 7 of the paper: per model, one stacked bar per layer (in depth order) of the cluster shares of its
    live kernels, unclassified on top.  Small multiples, MODELS_PER_FIGURE models per file."""
    run = stats.run
    model_ids = list(dict.fromkeys(table["model_id"]))
    pages = [model_ids[i:i + MODELS_PER_FIGURE] for i in range(0, len(model_ids), MODELS_PER_FIGURE)]
    shown = pages[:MAX_LAYER_FIGURES]
    files = []
    share_cols = [f"share_{c.name}" for c in run.clusters] + ["share_unclassified"]
    colours = [c.colour for c in run.clusters] + [UNCLASSIFIED_COLOUR]
    for p, page in enumerate(shown):
        ncols = min(3, len(page))
        nrows = math.ceil(len(page) / ncols)
        # tall enough for the legend (one line per cluster) beside a single row of panels
        fig = _new_figure(4.6 * ncols + 1.8, max(2.6 * nrows + 0.9, 0.24 * (len(run.clusters) + 3)))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[len(page):]:
            ax.set_visible(False)
        for ax, m in zip(axes.flat, page, strict=False):
            sub = table[table["model_id"] == m]
            x = np.arange(len(sub))
            bottom = np.zeros(len(sub))
            for col, colour in zip(share_cols, colours, strict=True):
                values = np.nan_to_num(sub[col].to_numpy(dtype=np.float64))
                ax.bar(x, values, bottom=bottom, width=0.9 if len(sub) < 40 else 1.0, color=colour,
                       linewidth=0)
                bottom += values
            ax.set_ylim(0, 1)
            ax.set_xlim(-0.6, max(len(sub) - 0.4, 0.6))
            ax.set_yticks([0, 0.5, 1.0], ["0%", "50%", "100%"])
            ax.set_title(f"{_short(str(sub['model'].iloc[0]))}\n{len(sub)} layers, "
                         f"{int(sub['live'].sum()):,} live kernels", fontsize=9)
            ax.set_xlabel("layer, input → output (depth order)", fontsize=8)
            ax.set_ylabel("share of live kernels", fontsize=8)
            ax.tick_params(labelsize=7)
            if len(sub) <= 16:
                ax.set_xticks(x)
        title = (f"Cluster shares per layer — {run.kernel_size}×{run.kernel_size} {run.kind} kernels, run "
                 f"{run.run_id} (threshold {run.threshold:g})")
        if len(pages) > 1:
            title += f" — models {p * MODELS_PER_FIGURE + 1}–{p * MODELS_PER_FIGURE + len(page)} of {len(model_ids)}"
        fig.suptitle(title, fontsize=10)
        fig.legend(handles=_legend_handles(run.clusters), loc="outside right upper", fontsize=8, title="cluster",
                   title_fontsize=8)
        name = f"layers-{run.tag}.png" if len(pages) == 1 else f"layers-{run.tag}-{p + 1}.png"
        _save(fig, out / name)
        files.append(name)
    return files, len(pages) - len(shown)


def _interval_text(run: RunInfo, i: int, digits: int = 3) -> str:
    """[lo, hi) of cluster i; the interval reaching highest is closed: [lo, hi]."""
    c = run.clusters[i]
    if c.lo is None or c.hi is None:
        return "–"
    top = max(cl.hi for cl in run.clusters if cl.hi is not None)
    return f"[{c.lo:.{digits}f}, {c.hi:.{digits}f}" + ("]" if c.hi == top else ")")


def _depth_bins(depth_norm: Any) -> np.ndarray:
    return np.clip(np.floor(np.asarray(depth_norm, dtype=np.float64) * 10), 0, 9).astype(np.int64)


def _depth_figure(stats: RunStats, out: Path) -> str:
    """All models together: cluster shares by normalised depth (deciles), weighted by kernels."""
    run, lay = stats.run, stats.layers
    bins = _depth_bins(lay["depth_norm"])
    live = np.bincount(bins, weights=lay["live"], minlength=10)
    fig = _new_figure(8.5, 4.2)
    ax = fig.subplots()
    x = np.arange(10)
    bottom = np.zeros(10)
    labelled = np.zeros(10)
    for i, c in enumerate(run.clusters):
        v = np.nan_to_num(_share(np.bincount(bins, weights=lay[f"n_{i}"], minlength=10), live))
        ax.bar(x, v, bottom=bottom, color=c.colour, width=0.85, label=c.name)
        bottom += v
        labelled += v
    rest = np.where(live > 0, 1 - labelled, 0)
    ax.bar(x, rest, bottom=bottom, color=UNCLASSIFIED_COLOUR, width=0.85, label="unclassified")
    for xi, n in zip(x, live, strict=True):
        ax.text(xi, 1.01, f"{int(n):,}" if n else "no layers", ha="center", va="bottom", fontsize=7, rotation=0)
    ax.set_xticks(x, [f"{i / 10:.1f}–{(i + 1) / 10:.1f}" for i in x], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
    ax.set_xlabel("normalised layer depth (depth_norm), deciles; numbers on top: live kernels")
    ax.set_ylabel("share of live kernels")
    ax.set_title(f"Cluster shares by depth, all {lay['model_id'].nunique()} model(s) — {run.kernel_size}×"
                 f"{run.kernel_size} {run.kind}, run {run.run_id}", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="cluster", title_fontsize=8)
    name = f"depth-{run.tag}.png"
    _save(fig, out / name)
    return name


def _prototype_figure(stats: RunStats, clusters_table: Any, out: Path) -> str:
    """Fig. 5 of the paper: each cluster's prototype, its name and its share of the run's live kernels."""
    run = stats.run
    n = len(run.clusters)
    ncols = min(n, 6)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(max(1.9 * ncols + 1.2, 6.5), 2.3 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    share = dict(zip(clusters_table["cluster"], clusters_table["share"], strict=True))
    image = None
    for ax, c in zip(axes.flat, run.clusters, strict=False):
        image = _draw_prototype(ax, c, 4) or image
        ax.set_title(f"{_wrap(c.name, 20)}\n{_pct(share.get(c.name, np.nan))}", fontsize=9)
    unc = share.get("unclassified", np.nan)
    fig.suptitle(f"Cluster prototypes — {run.kernel_size}×{run.kernel_size} {run.kind}, run {run.run_id}: share "
                 f"of {int(stats.layers['live'].sum()):,} live kernels (unclassified {_pct(unc)})", fontsize=10)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, ticks=[-1, 0, 1])
        bar.ax.set_yticklabels(["−max", "0", "+max"], fontsize=8)
        bar.set_label("weight / max |weight|", fontsize=8)
    name = f"prototypes-{run.tag}.png"
    _save(fig, out / name)
    return name


def _draw_prototype(ax: Any, c: Cluster, frame: float) -> Any:
    """One prototype, scaled to its own largest |weight| (red +, blue -), framed in the cluster's colour;
    a blank panel saying so when the run has no prototype for it.  Returns the image (for a colour bar)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(c.colour)
        spine.set_linewidth(frame)
    finite = np.isfinite(c.prototype)
    if not finite.any():
        ax.text(0.5, 0.5, "no\nprototype", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        return None
    scale = float(np.abs(c.prototype[finite]).max()) or 1.0
    return ax.imshow(np.where(finite, c.prototype, 0.0) / scale, cmap="RdBu_r", vmin=-1, vmax=1,
                     interpolation="nearest")


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _spectrum_figure(stats: RunStats, out: Path) -> tuple[str | None, str]:
    """The decoded spectrum: the model directory's spectrum.png when the clusters step drew one, else the
    code axis [0, 1] with the cluster intervals and each cluster's prototype drawn beneath its interval."""
    run = stats.run
    name = f"spectrum-{run.tag}.png"
    if run.mode != "autoencoder":
        return None, "prototypes mode has no code axis, so there is no spectrum"
    if run.model_dir is not None and _is_png(run.model_dir / "spectrum.png"):
        shutil.copyfile(run.model_dir / "spectrum.png", out / name)
        return name, f"copied from {run.model_dir / 'spectrum.png'} (drawn by `kernelatlas clusters`)"
    order = sorted(range(len(run.clusters)), key=lambda i: (run.clusters[i].lo, run.clusters[i].hi))
    n = len(order)
    fig = _new_figure(max(1.5 * n, 6.5), 3.8)
    grid = fig.add_gridspec(2, n, height_ratios=[1, 2.2])
    axis = fig.add_subplot(grid[0, :])
    lo_all = min(0.0, min(c.lo for c in run.clusters))  # type: ignore[type-var]
    hi_all = max(1.0, max(c.hi for c in run.clusters))  # type: ignore[type-var]
    for i in order:
        c = run.clusters[i]
        axis.axvspan(c.lo, c.hi, color=c.colour, alpha=0.85)
        narrow = (c.hi - c.lo) < 0.08 * (hi_all - lo_all)  # type: ignore[operator]
        axis.text((c.lo + c.hi) / 2, 0.5, _short(c.name, 14) if narrow else _wrap(c.name, 14), ha="center",
                  va="center", fontsize=7, rotation=90 if narrow else 0)
    axis.set_xlim(lo_all, hi_all)
    axis.set_yticks([])
    axis.set_xlabel("code (1-D autoencoder code axis); grey: no cluster", fontsize=8)
    axis.set_facecolor("#eeeeee")
    axis.tick_params(labelsize=8)
    for col, i in enumerate(order):
        c = run.clusters[i]
        ax = fig.add_subplot(grid[1, col])
        _draw_prototype(ax, c, 3)
        ax.set_title(f"{_wrap(c.name, 18)}\n{_interval_text(run, i, 2)}", fontsize=7)
    fig.suptitle(f"Decoded spectrum — {run.kernel_size}×{run.kernel_size}, run {run.run_id} (drawn from the "
                 "cluster prototypes; red +, blue −)", fontsize=10)
    _save(fig, out / name)
    why = ("no spectrum.png in the model directory" if run.model_dir is not None else "the run names no model "
           "directory") + ": drawn from the clusters' intervals and prototypes"
    return name, why


def _threshold_lines(ax: Any, thresholds: Sequence[float]) -> None:
    for t in thresholds:
        ax.axvline(t, color="#555555", linestyle=":", linewidth=0.9)


def _coverage_axes(ax: Any, thresholds: Sequence[float], title: str, xlabel: str) -> None:
    """The frame every coverage-vs-threshold plot shares: threshold lines, 0.5..1 x 0..100%, labels, grid."""
    _threshold_lines(ax, thresholds)
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of live kernels classified")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def _coverage_figure(stats: RunStats, models: Any, out: Path) -> str:
    """Share of live kernels classified vs threshold: one line per model, the corpus total in black."""
    run, lay = stats.run, stats.layers
    names = models.set_index("model_id")["name"]
    live = lay.groupby("model_id")["live"].sum()
    per_model: dict[int, np.ndarray] = {}
    for (m, _kind), c in stats.curve.items():
        per_model[m] = per_model.get(m, 0) + c
    fig = _new_figure(8.5, 4.6)
    ax = fig.subplots()
    many = len(live) > MAX_CURVES
    for i, m in enumerate(live.index):
        y = _share(per_model.get(int(m), np.zeros(len(CURVE_GRID))), int(live[m]))
        if many:
            ax.plot(CURVE_GRID, y, color="#999999", linewidth=0.7, alpha=0.7,
                    label=f"each model ({len(live)})" if i == 0 else None)
        else:
            ax.plot(CURVE_GRID, y, color=FALLBACK_COLOURS[i % len(FALLBACK_COLOURS)], linewidth=1.4,
                    label=_short(str(names.get(m, "?")), 30))
    total = sum(per_model.values(), np.zeros(len(CURVE_GRID), np.int64))
    ax.plot(CURVE_GRID, _share(total, int(live.sum())), color="black", linewidth=2.6, label="all models")
    _coverage_axes(ax, stats.thresholds,
                   f"Coverage vs threshold — {run.kernel_size}×{run.kernel_size} {run.kind}, run {run.run_id}",
                   "cosine-similarity threshold t (dotted: the report's thresholds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    name = f"coverage-{run.tag}.png"
    _save(fig, out / name)
    return name


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


def _kind_curve(stats: RunStats, kind: str) -> tuple[np.ndarray, int]:
    """Summed curve and live count of the layers of one kind of a run."""
    curve = sum((c for (_m, k), c in stats.curve.items() if k == kind), np.zeros(len(CURVE_GRID), np.int64))
    live = int(stats.layers.loc[stats.layers["kind"] == kind, "live"].sum())
    return curve, live


def _runs_coverage_figure(all_stats: Sequence[RunStats], out: Path) -> str:
    """Every reported run's total coverage curve on one plot (per kernel size and kind)."""
    fig = _new_figure(8.5, 4.6)
    ax = fig.subplots()
    styles = {"depthwise": "-", "regular": "--", "grouped": "-.", "all": ":"}
    sizes = sorted({st.run.kernel_size for st in all_stats})
    for st in all_stats:
        curve = sum(st.curve.values(), np.zeros(len(CURVE_GRID), np.int64))
        colour = FALLBACK_COLOURS[sizes.index(st.run.kernel_size) % len(FALLBACK_COLOURS)]
        ax.plot(CURVE_GRID, _share(curve, int(st.layers["live"].sum())), color=colour,
                linestyle=styles.get(st.run.kind, "-"), linewidth=2,
                label=f"{st.run.kernel_size}×{st.run.kernel_size} {st.run.kind} ({st.run.run_id}, {st.run.mode})")
    _coverage_axes(ax, all_stats[0].thresholds, "Coverage vs threshold, all models, per kernel size and kind",
                   "cosine-similarity threshold t (dotted: the report's thresholds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    name = "coverage-runs.png"
    _save(fig, out / name)
    return name


@dataclass
class _KindSource:
    kind: str
    stats: RunStats

    @property
    def label(self) -> str:
        how = "" if self.stats.run.kind == self.kind else " layers of 'all' run"
        return f"{self.kind}{how} ({self.stats.run.run_id})"


def _comparison_sources(all_stats: Sequence[RunStats], k: int) -> dict[str, _KindSource]:
    """For kernel size k: per layer kind, the run that covers it (a run of that kind first, else an 'all' run
    split by the layers' kinds)."""
    sources: dict[str, _KindSource] = {}
    for st in all_stats:
        if st.run.kernel_size == k and st.run.kind in ("depthwise", "regular"):
            sources[st.run.kind] = _KindSource(st.run.kind, st)
    for st in all_stats:
        if st.run.kernel_size == k and st.run.kind == "all":
            for kind in ("depthwise", "regular"):
                if kind not in sources and (st.layers["kind"] == kind).any():
                    sources[kind] = _KindSource(kind, st)
    return sources


def _comparison_figure(k: int, sources: dict[str, _KindSource], thresholds: Sequence[float], out: Path) -> str:
    """Depthwise vs regular k x k kernels: coverage curves together (left) and the share classified at the
    middle report threshold by depth decile (right): the paper's claim is that regular kernels lose the
    clustered structure after the first layers while depthwise ones keep it at every depth."""
    t_ref = sorted(thresholds)[len(thresholds) // 2]
    fig = _new_figure(11.5, 4.4)
    left, right = fig.subplots(1, 2)
    width = 0.8 / max(len(sources), 1)
    for j, (kind, src) in enumerate(sorted(sources.items())):
        curve, live = _kind_curve(src.stats, kind)
        colour = KIND_COLOURS.get(kind, "black")
        left.plot(CURVE_GRID, _share(curve, live), color=colour, linewidth=2.2,
                  label=f"{src.label}: {live:,} live")
        lay = src.stats.layers[src.stats.layers["kind"] == kind]
        bins = _depth_bins(lay["depth_norm"])
        col = src.stats.cls_col(t_ref)
        live_by_depth = np.bincount(bins, weights=lay["live"], minlength=10)
        share = _share(np.bincount(bins, weights=lay[col], minlength=10), live_by_depth)
        has = live_by_depth > 0  # no bar where the kind has no layer at that depth
        x = np.arange(10) + (j - (len(sources) - 1) / 2) * width
        right.bar(x[has], share[has], width=width, color=colour, label=kind)
    _coverage_axes(left, thresholds, "coverage vs threshold", "cosine-similarity threshold t")
    left.legend(fontsize=8, loc="best")
    right.set_xticks(np.arange(10), [f"{i / 10:.1f}" for i in range(10)], fontsize=8)
    right.set_ylim(0, 1.02)
    right.yaxis.set_major_formatter(_percent_formatter())
    right.set_xlabel("normalised layer depth (decile start); no bar: no layer of that kind there")
    right.set_ylabel(f"share classified at t = {t_ref:g}")
    right.set_title(f"classified at t = {t_ref:g} by depth", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    fig.suptitle(f"Depthwise vs regular {k}×{k} kernels", fontsize=11)
    name = f"compare-k{k}.png"
    _save(fig, out / name)
    return name


# ---------------------------------------------------------------------------------------------- document


class _Doc:
    """The report as blocks, rendered to Markdown and to one self-contained HTML page (figures as PNG files
    next to it, tables inline).  Inline `code` spans are the only markup in text."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", " ".join(text.split())))

    def ul(self, items: Iterable[str]) -> None:
        items = [" ".join(i.split()) for i in items]
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], csv: str | None = None,
              caption: str | None = None, bold_last: bool = False) -> None:
        self.blocks.append(("table", (list(headers), [list(r) for r in rows], csv, caption, bold_last)))

    def raw(self, markdown: str, html_fragment: str) -> None:
        """A section rendered elsewhere (the kernel-quality section), as Markdown and as an HTML fragment."""
        self.blocks.append(("raw", (markdown.strip(), html_fragment)))

    def figure(self, file: str, title: str, caption: str) -> None:
        """A PNG next to the pages: ``title`` is its alt text, ``caption`` how to read it."""
        self.blocks.append(("fig", (file, title, " ".join(caption.split()))))

    @staticmethod
    def _inline_html(text: str) -> str:
        parts = text.split("`")
        return "".join(html.escape(p) if i % 2 == 0 else f"<code>{html.escape(p)}</code>"
                       for i, p in enumerate(parts))

    @staticmethod
    def _numeric_columns(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[bool]:
        """Columns whose every cell is a number, a percentage or a dash: right-aligned."""
        number = re.compile(r"^(–|-?[\d,]+(\.\d+)?%?)$")
        return [bool(rows) and all(number.match(r[i].replace("**", "")) for r in rows) for i in range(len(headers))]

    @staticmethod
    def _md_cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def markdown(self) -> str:
        out: list[str] = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "p":
                out.append(value)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in value))
            elif kind == "table":
                headers, rows, csv, caption, bold_last = value
                lines = []
                if caption:
                    lines.append(f"*{caption}*" + (f" ([CSV]({csv}))" if csv else "") + "\n")
                elif csv:
                    lines.append(f"[CSV]({csv})\n")
                lines.append("| " + " | ".join(self._md_cell(h) for h in headers) + " |")
                numeric = self._numeric_columns(headers, rows)
                lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
                for r, row in enumerate(rows):
                    cells = [self._md_cell(c) for c in row]
                    if bold_last and r == len(rows) - 1:
                        cells = [f"**{c}**" if c else c for c in cells]
                    lines.append("| " + " | ".join(cells) + " |")
                out.append("\n".join(lines))
            elif kind == "fig":
                file, title, caption = value
                out.append(f"![{self._md_cell(title)}]({file})\n\n*{caption}*")
            elif kind == "raw":
                out.append(value[0])
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body: list[str] = []
        contents: list[str] = []
        for kind, value in self.blocks:
            if kind == "h":
                level, text = value
                anchor = f"s{len(body)}-" + re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
                body.append(f'<h{level} id="{anchor}">{html.escape(text)}</h{level}>')
                if level == 2:
                    contents.append(f'<li><a href="#{anchor}">{html.escape(text)}</a></li>')
            elif kind == "p":
                body.append(f"<p>{self._inline_html(value)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{self._inline_html(i)}</li>" for i in value) + "</ul>")
            elif kind == "table":
                headers, rows, csv, caption, bold_last = value
                cap = ""
                if caption or csv:
                    cap = "<caption>" + (self._inline_html(caption) if caption else "") + \
                        (f' (<a href="{html.escape(csv)}">CSV</a>)' if csv else "") + "</caption>"
                head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
                numeric = self._numeric_columns(headers, rows)
                trs = []
                for r, row in enumerate(rows):
                    cls = ' class="total"' if bold_last and r == len(rows) - 1 else ""
                    tds = "".join(f'<td{" class=num" if numeric[i] else ""}>{html.escape(c)}</td>'
                                  for i, c in enumerate(row))
                    trs.append(f"<tr{cls}>{tds}</tr>")
                body.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>")
            elif kind == "raw":
                fragment = value[1]
                for m in list(re.finditer(r"<h2>(.*?)</h2>", fragment)):  # give its sections anchors too
                    anchor = f"s{len(body)}-" + re.sub(r"[^a-z0-9]+", "-", html.unescape(m.group(1)).lower()).strip("-")
                    fragment = fragment.replace(m.group(0), f'<h2 id="{anchor}">{m.group(1)}</h2>', 1)
                    contents.append(f'<li><a href="#{anchor}">{m.group(1)}</a></li>')
                body.append(fragment)
            elif kind == "fig":
                file, title, caption = value
                body.append(f'<figure><a href="{html.escape(file)}"><img src="{html.escape(file)}" '
                            f'alt="{html.escape(title)}"></a>'
                            f"<figcaption>{self._inline_html(caption)}</figcaption></figure>")
        style = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
caption { caption-side: top; text-align: left; font-style: italic; padding-bottom: .3em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; background: #fafafa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
code { background: #f3f3f3; padding: 0 .2em; }
ul.contents { columns: 2; font-size: 0.9em; }
"""
        if contents and body:  # after the title and its first paragraph
            body.insert(min(2, len(body)), '<nav><ul class="contents">' + "".join(contents) + "</ul></nav>")
        return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
                f"</title>\n<style>{style}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _write_csv(frame: Any, path: Path) -> str:
    frame.to_csv(path, index=False)
    return path.name


# files this module writes into a report folder; older ones are removed first so that a rerun with fewer runs
# or models leaves no stale figure behind (nothing else in the folder is touched)
_OWN_FILES = ("report.md", "report.html", "corpus.csv", "runs.csv", "coverage.csv", "coverage-totals.csv",
              "coverage-per-model.csv",
              "coverage-curves.csv", "compare.csv", "coverage-runs.png", "compare-k*.png", "layers-*.png",
              "layers-*.csv", "depth-*.png", "prototypes-*.png", "spectrum-*.png", "coverage-k*.png", "clusters-*.csv", "quality-*")


def _clear_previous(out: Path) -> None:
    for pattern in _OWN_FILES:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


# ---------------------------------------------------------------------------------------------- report


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
    all_stats = [_scan(corpus, run, thresholds, chunk_rows=chunk_rows, progress=progress) for run in selected]
    for st in all_stats:
        notes.extend(st.notes)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)

    doc = _Doc()
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


def _method_section(doc: _Doc, thresholds: Sequence[float]) -> None:
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


def _corpus_section(doc: _Doc, corpus: Corpus, out_dir: Path) -> None:
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
            rows.append([size, kind, _count(kinds[kind]), _count(stored)])
            records.append({"size": size, "kind": kind, "kernels": kinds[kind], "stored": stored})
    doc.table(["size", "kind", "kernels", "stored"], rows,
              _write_csv(pd.DataFrame(records, columns=["size", "kind", "kernels", "stored"]), out_dir / "corpus.csv"),
              "Kernels by size and layer kind (stored: kept in the shards; the others are only counted)")


def _runs_section(doc: _Doc, corpus: Corpus, all_stats: Sequence[RunStats], notes: Sequence[str],
                  out_dir: Path) -> None:
    import pandas as pd

    doc.h(2, "Runs")
    rows, records = [], []
    for st in all_stats:
        r = st.run
        n_shards = len(corpus.shards(r.kernel_size))
        kernels = int(st.layers["assigned"].sum())
        rows.append([r.run_id, f"{r.kernel_size}×{r.kernel_size}", r.kind, r.mode, f"{r.threshold:g}",
                     str(len(r.clusters)), f"{len(r.shards)}/{n_shards}", _count(kernels), r.created,
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
        return [_pct(m[f"share_{_t(t)}"])]
    return [f"{_pct(m[f'share_in_sample_{_t(t)}'])} / {_pct(m[f'share_held_out_{_t(t)}'])}"]


def _control_row(label: str, control: list[float | None], width: int) -> list[str]:
    return [label] + ["–"] * width + [_pct(c) if c is not None else "–" for c in control]


def _coverage_section(doc: _Doc, corpus: Corpus, all_stats: Sequence[RunStats], thresholds: Sequence[float],
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
        table = _model_table(st, corpus.models)
        total = _total_row(st)
        frames.append(table)
        totals.append(total)
        rows = [[_short(str(m["model"]), 60), _count(m["kernels"]), _count(m["dead"]), _count(m["live"])]
                + [c for t in thresholds for c in _split_cells(m, t)] for m in table.to_dict("records")]
        rows.append([f"all {total['models']} models", _count(total["kernels"]), _count(total["dead"]),
                     _count(total["live"])] + [c for t in thresholds for c in _split_cells(total, t)])
        split = total.get("live_held_out", -1) >= 0
        if st.run.mode == "autoencoder":
            rows.append(_control_row("random kernels (control)", [st.run.control(t) for t in thresholds], 3))
        what = "in-sample / held-out" if split else "all kernels (the model records no held-out split)"
        doc.table(["model", "kernels", "dead", "live"] + [f"classified at {_t(t)}" for t in thresholds], rows,
                  "coverage.csv", f"{st.run.kernel_size}×{st.run.kernel_size} {st.run.kind} kernels, run "
                  f"{st.run.run_id} ({st.run.mode}; {what})", bold_last=False)
    if frames:
        _write_csv(pd.concat(frames, ignore_index=True), out_dir / "coverage.csv")
        _write_csv(pd.DataFrame(totals), out_dir / "coverage-totals.csv")


def _per_model_section(doc: _Doc, corpus: Corpus, per_model: Sequence[RunStats], pooled: Sequence[RunStats],
                       thresholds: Sequence[float], out_dir: Path) -> bool:
    """Table 1 with one autoencoder per model (`kernelatlas run --per-model`), beside the pooled model's."""
    import pandas as pd

    if not per_model:
        return False
    doc.h(2, "Coverage with one autoencoder per model")
    doc.p("Each model's kernels through an autoencoder trained on that model alone (its own held-out split), "
          "next to the same model's figure under the pooled autoencoder of the table above.  Cells: in-sample / "
          "held-out; control: random kernels through the model's own autoencoder.")
    pooled_tables = {(st.run.kernel_size, st.run.kind): _model_table(st, corpus.models) for st in pooled}
    frames = []
    for (k, kind) in sorted({(st.run.kernel_size, st.run.kind) for st in per_model}):
        rows = []
        ref = pooled_tables.get((k, kind))
        for st in sorted((s for s in per_model if (s.run.kernel_size, s.run.kind) == (k, kind)),
                         key=lambda s: s.run.models or ()):
            table = _model_table(st, corpus.models)
            table["scope"] = "per-model"
            frames.append(table)
            for m in table.to_dict("records"):
                cells = [c for t in thresholds for c in _split_cells(m, t)]
                pooled_cells = ["–"] * len(thresholds)
                if ref is not None and (ref["model_id"] == m["model_id"]).any():
                    r = ref[ref["model_id"] == m["model_id"]].iloc[0].to_dict()
                    pooled_cells = [c for t in thresholds for c in _split_cells(r, t)]
                control = st.run.control(thresholds[len(thresholds) // 2])
                rows.append([_short(str(m["model"]), 50), _count(m["live"])] + cells + pooled_cells
                            + [_pct(control) if control is not None else "–", st.run.run_id])
        mid = _t(thresholds[len(thresholds) // 2])
        doc.table(["model", "live"] + [f"own model, {_t(t)}" for t in thresholds]
                  + [f"pooled model, {_t(t)}" for t in thresholds] + [f"control at {mid}", "run"], rows,
                  "coverage-per-model.csv", f"{k}×{k} {kind} kernels, one autoencoder per model")
    _write_csv(pd.concat(frames, ignore_index=True), out_dir / "coverage-per-model.csv")
    return True


def _run_section(doc: _Doc, corpus: Corpus, st: RunStats, out_dir: Path) -> None:
    """One run: its clusters (table, prototypes, spectrum), coverage curves, shares by depth and per layer."""
    run = st.run
    size = f"{run.kernel_size}×{run.kernel_size}"
    doc.h(2, f"{size} {run.kind} kernels — run {run.run_id} ({run.mode})")
    clusters = _cluster_table(st)
    intervals = [_interval_text(run, i) for i in range(len(run.clusters))] + ["–"]
    doc.table(["cluster", "code interval", "kernels", "share of live"],
              [[str(r.cluster), iv, _count(r.kernels), _pct(r.share)]
               for r, iv in zip(clusters.itertuples(), intervals, strict=True)],
              _write_csv(clusters, out_dir / f"clusters-{run.tag}.csv"),
              f"Clusters of run {run.run_id} (stored labels, threshold {run.threshold:g})")
    what = ("the fixed prototype the run compared kernels with" if run.mode == "prototypes" else
            "the decoded centre of its code interval")
    doc.figure(_prototype_figure(st, clusters, out_dir), f"Cluster prototypes, {size} {run.kind}",
               f"Cluster prototypes (like Fig. 5 of the paper). Each panel is one cluster's prototype ({what}), red "
               "positive and blue negative, scaled to its own largest |weight|, framed in the cluster's colour; "
               "under its name, the share of the run's live kernels in that cluster.")
    spectrum, why = _spectrum_figure(st, out_dir)
    if spectrum is not None:
        doc.figure(spectrum, f"Decoded spectrum, {size}",
                   f"Decoded spectrum ({why}). The autoencoder's code axis from left to right: each coloured "
                   "interval is a cluster, shown with the pattern it decodes to; codes in the grey gaps belong to "
                   "no cluster and are unclassified.")
    else:
        doc.p(f"No spectrum: {why}.")
    inside = "whose code lies in a cluster interval" if run.mode == "autoencoder" else "(prototypes mode: any)"
    doc.figure(_coverage_figure(st, corpus.models, out_dir), f"Coverage vs threshold, {size} {run.kind}",
               f"Coverage vs threshold. For each threshold t on the x axis, the share of live kernels whose score "
               f"is at least t {inside}; one line per model (grey when there are more than {MAX_CURVES}), black: "
               "all models together; dotted lines: the thresholds of the coverage table. A curve that stays high "
               "towards t = 1 means kernels that the clusters describe closely.")
    doc.figure(_depth_figure(st, out_dir), f"Cluster shares by depth, {size} {run.kind}",
               "Cluster shares by depth, all models together. Layers are grouped by normalised depth (0: a "
               "model's first conv layer, 1: its last) into deciles; each bar shows how the live kernels of those "
               "layers divide into the clusters (stored labels), unclassified in grey on top; the number over a "
               "bar is its count of live kernels.")
    layers = _layer_table(st, corpus.models)
    layer_csv = _write_csv(layers, out_dir / f"layers-{run.tag}.csv")
    files, left_out = _layer_figures(st, layers, out_dir)
    for i, f in enumerate(files):
        doc.figure(f, f"Cluster shares per layer, {size} {run.kind}" + (f", page {i + 1}" if len(files) > 1 else ""),
                   "Cluster shares per layer (like Fig. 7 of the paper). One panel per model; each bar is one "
                   "layer of the run's kind, from the input (left) to the output (right); the coloured segments "
                   "are the shares of the layer's live kernels in each cluster, grey the unclassified ones.")
    doc.p(f"Per-layer shares of every model: `{layer_csv}`."
          + (f" {left_out} more page(s) of models are not drawn (at most {MAX_LAYER_FIGURES} per run); the CSV "
             "holds them." if left_out else ""))


def _curves_section(doc: _Doc, corpus: Corpus, all_stats: Sequence[RunStats], out_dir: Path) -> None:
    doc.h(2, "Coverage across runs")
    curve_csv = _write_csv(_curve_table(all_stats, corpus.models), out_dir / "coverage-curves.csv")
    doc.figure(_runs_coverage_figure(all_stats, out_dir), "Coverage vs threshold of every run",
               "Coverage vs threshold of every reported run, all models together: colour = kernel size, line "
               "style = kind (solid depthwise, dashed regular, dotted 'all').")
    doc.p(f"The curves of every model and run, thresholds 0.50 to 1.00 in steps of 0.01: `{curve_csv}`.")


def _comparison_section(doc: _Doc, corpus: Corpus, all_stats: Sequence[RunStats], thresholds: Sequence[float],
                        out_dir: Path) -> bool:
    """Depthwise vs regular per kernel size, where runs cover both; otherwise says why not.  Returns whether
    any comparison was drawn."""
    import pandas as pd

    doc.h(2, "Depthwise vs regular kernels")
    rows, records, skipped = [], [], []
    stored = corpus.layers[corpus.layers["rows"] > 0]
    for k in sorted({st.run.kernel_size for st in all_stats}):
        sources = _comparison_sources(all_stats, k)
        if len(sources) >= 2:
            doc.figure(_comparison_figure(k, sources, thresholds, out_dir), f"Depthwise vs regular {k}×{k}",
                       f"Depthwise vs regular {k}×{k} kernels. Left: coverage vs threshold of each kind, all "
                       "models together. Right: the share classified at the middle threshold per depth decile. "
                       "The paper finds depthwise kernels clustered at every depth and regular kernels losing "
                       "that structure after the first layers. Each kind is scored by its own run's clusters, so "
                       "this compares how well each kind is described by them.")
            for kind, src in sorted(sources.items()):
                lay = src.stats.layers[src.stats.layers["kind"] == kind]
                live = int(lay["live"].sum())
                shares = {f"share_{_t(t)}": float(_share(lay[src.stats.cls_col(t)].sum(), live)) for t in thresholds}
                records.append({"kernel_size": k, "kind": kind, "run_id": src.stats.run.run_id, "live": live,
                                **shares})
                rows.append([f"{k}×{k}", kind, src.stats.run.run_id, _count(live)] + [_pct(v) for v in shares.values()])
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
        doc.table(["size", "kind", "run", "live"] + [f"classified at {_t(t)}" for t in thresholds], rows,
                  _write_csv(pd.DataFrame(records), out_dir / "compare.csv"), "Depthwise vs regular coverage")
    doc.ul(skipped)
    return bool(records)
