"""The streamed pass over one run's score and code shards: per layer, counts at every threshold of the curve
grid, in O(chunk + layers) memory (:func:`scan_run` -> :class:`RunStats`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kernelatlas.corpus import Corpus
from kernelatlas.corpus.rundir import RunError
from kernelatlas.jobs.report.runs import Cluster, RunInfo

CHUNK_ROWS = 1 << 20

# coverage curves: share classified at every threshold of this grid (exact counts, see scan_run)
CURVE_GRID = np.round(np.linspace(0.5, 1.0, 201), 6)

@dataclass
class RunStats:
    """What one pass over a run's outputs gives.  ``layers``: one row per layer with rows of the run's kind,
    the layer columns plus counts: assigned (rows not -2), dead, live, inside (live with a code in some
    interval; = live in prototypes mode), cls_<t> (classified at each report threshold), n_<i> (stored label
    = cluster i), and with a held-out split live_ho / cls_ho_<t> (the same counts over held-out kernels: never
    in the model's training pool).  ``curve``: for each (model_id, layer kind), counts of live in-interval
    kernels with score >= each CURVE_GRID value.  ``label_mismatch``: rows whose stored label disagrees with the
    recomputation at the run's threshold (borderline float32 scores; anything else points at a bug)."""

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


def scan_run(corpus: Corpus, run: RunInfo, thresholds: Sequence[float], *, chunk_rows: int = CHUNK_ROWS,
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
    keys_all = split.keys(corpus, lay) if split is not None and split.by_layer else np.zeros(n_layers, np.uint64)
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
                        rows_here = np.arange(a, b, dtype=np.int64) if valid is None \
                            else np.arange(a, b, dtype=np.int64)[valid]
                        owner = base + local
                        held = split.row_mask(keys_all[owner], rows_here - starts_all[owner], shard, rows_here)
                        held |= unpooled[owner]
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
