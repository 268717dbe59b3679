"""`kernelatlas shift`: distribution shift of kernels between groups of models or layers (Gavrikov & Keuper,
CVPR 2022; reference/README.md section B).

Every kernel (scaled by its own max|w| when the quality run's PCA was, as in the paper) is projected onto the
global PCA basis of its kernel size from the quality run, c = basis @ (w - mean).  Per group and per
component, its coefficients are counted into ``bins`` (70) bins over one range shared by all groups (the
coefficients' min and max over every kernel compared); empty bins get float32 eps and each histogram is
renormalised.  The shift between groups P and Q is

    D(P, Q) = sum_k EVR_k * [KL(P_k || Q_k) + KL(Q_k || P_k)]     (natural log, EVR of the global PCA)

Groups: a models.parquet column (family, task, category -- CNN Filter DB's "Visual Category" --, dataset, or
any column given at extract time with --meta KEY=VAL), ``model`` (each model its own group), or ``depth``
(deciles of the layer's depth_norm: [0, 0.1], (0.1, 0.2], ..., (0.9, 1.0]).  Models without a value for the
column are left out (and counted).  Both passes (range, then histograms) are native and streamed over whole
layers (``_core.coef_range``, ``_core.coef_histograms``).

Outputs go into the quality run's folder, CORPUS/runs/QRUN/shift-kK-BY/: shift.csv (the matrix), pairs.csv,
groups.csv, coefficients.csv and histograms.npz (the counts and edges), shift.png (heatmap) and
coefficients.png (distributions per group), shift.json written last; and beside them shift-kK-box.png / .csv,
the pairwise shifts of every grouping computed so far as a box plot.  :func:`quality_section` renders all of
it for the report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas._files import atomic_write, atomic_write_bytes
from kernelatlas.corpus import Corpus, CorpusError
from kernelatlas.corpus.store import map_shard
from kernelatlas.document import Document
from kernelatlas.figures import new_figure, save_figure, short_text
from kernelatlas.jobs.quality import (
    CHUNK_ROWS,
    PCA,
    LayerSpan,
    QualityRun,
    latest_quality_run,
    layer_batches,
    load_quality_run,
    quality_run,
)

__all__ = [
    "BINS",
    "DEPTH_EDGES",
    "EPS",
    "GROUPINGS",
    "ShiftResult",
    "coefficient_histograms",
    "depth_deciles",
    "histogram_probabilities",
    "layer_groups",
    "load_shift",
    "quality_section",
    "shift",
    "shift_matrix",
]

SHIFT_FORMAT = "kernelatlas-shift"
GROUPINGS = ("family", "task", "category", "depth", "model")
BINS = 70
EPS = float(np.finfo(np.float32).eps)  # the floor of empty bins (the paper's float32 eps)
DEPTH_EDGES = np.linspace(0.0, 1.0, 11)
# global PCA explained-variance ratios of the full CNN Filter DB (3x3, third-party recomputation; reference B)
PAPER_EVR_3X3 = (0.3982, 0.1833, 0.1170, 0.0985, 0.0658, 0.0552, 0.0301, 0.0282, 0.0237)


# ---------------------------------------------------------------------------------------------- maths


def histogram_probabilities(counts: Any, eps: float = EPS) -> np.ndarray:
    """[..., bins] counts -> probabilities: normalised, empty bins set to ``eps``, renormalised (an all-empty
    histogram becomes uniform)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    p = counts / np.where(total > 0, total, 1.0)
    p = np.where(p > 0, p, eps)
    return p / p.sum(axis=-1, keepdims=True)


def shift_matrix(probs: Any, evr: Any) -> np.ndarray:
    """D[a, b] = sum_k evr_k [KL(P_a,k || P_b,k) + KL(P_b,k || P_a,k)] for probabilities [G, C, bins] (no
    zeros) and weights evr [C]: the symmetric KL is sum (p - q)(log p - log q)."""
    p = np.asarray(probs, dtype=np.float64)
    w = np.asarray(evr, dtype=np.float64)
    logp = np.log(p)
    g = len(p)
    out = np.zeros((g, g))
    for a in range(g):
        sym = ((p[a][None] - p) * (logp[a][None] - logp)).sum(axis=-1)  # [G, C]
        out[a] = sym @ w
    out = 0.5 * (out + out.T)
    np.fill_diagonal(out, 0.0)
    return out


def depth_deciles(depth_norm: Any) -> np.ndarray:
    """Decile index 0..9 of depth_norm with edges 0, 0.1, ..., 1.0, right-closed and the first bin closed
    ([0, 0.1], (0.1, 0.2], ... as pandas.cut(include_lowest=True)); -1 for NaN or outside [0, 1]."""
    x = np.asarray(depth_norm, dtype=np.float64)
    idx = np.digitize(x, DEPTH_EDGES, right=True) - 1
    idx = np.where(x == 0.0, 0, idx)
    return np.where(np.isfinite(x) & (x >= 0.0) & (x <= 1.0), idx, -1).astype(np.int32)


def _depth_label(i: int) -> str:
    lo, hi = DEPTH_EDGES[i], DEPTH_EDGES[i + 1]
    return f"{'[' if i == 0 else '('}{lo:.1f}, {hi:.1f}]"


def layer_groups(corpus: Corpus, layer_ids: Any, by: str) -> tuple[np.ndarray, list[str], int]:
    """Group index per layer (int32, -1 = no group) for a grouping, the group names, and how many of the
    layers have no group (model without a value for the column, or no depth)."""
    layer_ids = np.asarray(layer_ids, dtype=np.int64)
    lay = corpus.layers.set_index("layer_id").loc[layer_ids]
    if by == "depth":
        codes = depth_deciles(lay["depth_norm"].to_numpy(np.float64))
        present = sorted(set(codes[codes >= 0].tolist()))
        remap = {c: i for i, c in enumerate(present)}
        out = np.array([remap.get(int(c), -1) for c in codes], dtype=np.int32)
        return out, [_depth_label(c) for c in present], int((out < 0).sum())
    models = corpus.models.set_index("model_id")
    if by == "model":
        names = models["name"].astype(str)
        dup = names.duplicated(keep=False) | (names == "")
        labels = names.where(~dup, names + " #" + models.index.astype(str))
    elif by in models.columns:
        labels = models[by].fillna("").astype(str).str.strip()
    else:
        known = sorted(set(GROUPINGS) | {c for c in models.columns if models[c].dtype == object})
        raise ValueError(f"cannot group by {by!r}: models.parquet of {corpus.root} has no such column; "
                         f"choose one of {', '.join(known)} (metadata comes from --meta KEY=VAL at extract "
                         "time or from a CNN Filter DB import)")
    per_layer = labels.reindex(lay["model_id"].to_numpy()).fillna("").to_numpy(dtype=object)
    names_sorted = sorted({str(v) for v in per_layer if v != ""})
    index = {name: i for i, name in enumerate(names_sorted)}
    out = np.array([index.get(str(v), -1) for v in per_layer], dtype=np.int32)
    return out, names_sorted, int((out < 0).sum())


# ---------------------------------------------------------------------------------------------- histograms


def coefficient_histograms(corpus: Corpus, k: int, layer_ids: Any, groups: Any, n_groups: int, pca: PCA, *,
                           bins: int = BINS, components: int | None = None, threads: int | None = None,
                           chunk_rows: int = CHUNK_ROWS, progress: bool = False,
                           cluster: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts [n_groups, C, bins] of the PCA coefficients of every finite kernel of the given layers (k x k,
    stored), with the shared range (lo [C], hi [C]) found in a first pass; ``groups`` [L] int, -1 skips a
    layer. Both passes are native (``_core.coef_range``, ``_core.coef_histograms``) over whole layers;
    coefficients are computed in float64."""
    from tqdm import tqdm

    comps = pca.d if components is None else int(components)
    layer_ids = np.asarray(layer_ids, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int32)
    keep = groups >= 0
    lay = corpus.layers.set_index("layer_id").loc[layer_ids[keep]]
    group_of = dict(zip(layer_ids[keep].tolist(), groups[keep].tolist(), strict=True))
    mean = np.ascontiguousarray(pca.mean, dtype=np.float64)
    basis = np.ascontiguousarray(pca.basis[:comps], dtype=np.float64)
    plan: list[tuple[str, list[LayerSpan]]] = []
    for shard in corpus.shards(k):
        sl = lay[lay["shard"] == shard].sort_values("row_start", kind="stable")
        layers = [LayerSpan(int(lid), int(r.row_start), int(r.rows), int(r.c_out), int(r.c_in_per_group))
                  for lid, r in zip(sl.index, sl.itertuples(index=False), strict=True)]
        plan.extend((shard, g) for g in layer_batches(layers, chunk_rows))
    total = sum(lyr.rows for _, g in plan for lyr in g)

    def spans(group: list[LayerSpan]) -> tuple[int, int, np.ndarray, np.ndarray]:
        a = group[0].start
        b = group[-1].start + group[-1].rows
        starts = np.array([lyr.start - a for lyr in group], np.int64)
        return a, b, starts, starts + np.array([lyr.rows for lyr in group], np.int64)

    lo = np.full(comps, np.inf)
    hi = np.full(comps, -np.inf)
    bar = tqdm(total=2 * total, desc=f"shift k={k}", unit="kernel", unit_scale=True, disable=not progress,
               file=sys.stderr)
    weights = [sum(lyr.rows for lyr in group) for _, group in plan]
    arrays: dict[str, np.ndarray] = {}
    for shard, _ in plan:  # also checks each shard's shape and dtype against the manifest before any task
        arrays.setdefault(shard, corpus.shard_array(shard))
    # the first pass's minima / maxima and the second's integer counts do not depend on the order the groups
    # are combined in, so a cluster gives exactly the in-process result
    if cluster is None:
        for (shard, group), w in zip(plan, weights, strict=True):
            glo, ghi = _coef_range_task(arrays[shard], None, spans(group), mean, basis, pca.scaled, threads or 0)
            lo, hi = np.minimum(lo, glo), np.maximum(hi, ghi)
            bar.update(w)
    else:
        cluster.check_shared(corpus.root)
        cluster.announce(f"shift k={k}")
        tasks = [(str(corpus.root / shard), arrays[shard].shape, spans(group), mean, basis, pca.scaled, None)
                 for shard, group in plan]
        for _, (glo, ghi) in cluster.map(_coef_range_task, tasks, weights=weights, bar=bar, key=f"shift-range-k{k}"):
            lo, hi = np.minimum(lo, glo), np.maximum(hi, ghi)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    hi = np.where(np.isfinite(hi), hi, 0.0)
    # every coefficient equal (or none): a narrow range around the value puts all counts in the middle bin
    flat = hi <= lo
    pad = 1e-9 * np.maximum(np.abs(lo), 1.0)
    lo, hi = np.where(flat, lo - pad, lo), np.where(flat, hi + pad, hi)
    counts = np.zeros((n_groups, comps, bins), np.int64)
    gcodes = [np.array([group_of[lyr.layer_id] for lyr in group], np.int32) for _, group in plan]
    hist_args = (n_groups, mean, basis, lo, hi, bins, pca.scaled)
    if cluster is None:
        for (shard, group), codes, w in zip(plan, gcodes, weights, strict=True):
            counts += _coef_hist_task(arrays[shard], None, spans(group), codes, *hist_args, threads or 0)
            bar.update(w)
    else:
        hist_tasks = [(str(corpus.root / shard), arrays[shard].shape, spans(group), codes, *hist_args, None)
                      for (shard, group), codes in zip(plan, gcodes, strict=True)]
        for _, part in cluster.map(_coef_hist_task, hist_tasks, weights=weights, bar=bar, key=f"shift-hist-k{k}"):
            counts += part
    bar.close()
    return counts, lo, hi


def _shard_rows(arr_or_file: Any, shape: Any, span: tuple[int, int, np.ndarray, np.ndarray]) -> np.ndarray:
    if shape is None:  # in-process: the memmap itself
        return arr_or_file[span[0]:span[1]]
    return map_shard(arr_or_file, shape)[span[0]:span[1]]  # a cluster task: the shard file's path


def _coef_range_task(arr_or_file: Any, shape: Any, span: tuple[int, int, np.ndarray, np.ndarray], mean: np.ndarray,
                     basis: np.ndarray, scaled: bool, threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The coefficient range of one group of layers (native); on a worker when ``shape`` is given."""
    from kernelatlas import _core
    from kernelatlas.cluster import engine_threads

    if threads is None:
        threads = engine_threads()
    return _core.coef_range(_shard_rows(arr_or_file, shape, span), span[2], span[3], mean, basis,
                            scale_maxabs=scaled, threads=threads)


def _coef_hist_task(arr_or_file: Any, shape: Any, span: tuple[int, int, np.ndarray, np.ndarray], codes: np.ndarray,
                    n_groups: int, mean: np.ndarray, basis: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int,
                    scaled: bool, threads: int | None) -> np.ndarray:
    """The coefficient histograms [n_groups, C, bins] of one group of layers (native); on a worker when
    ``shape`` is given."""
    from kernelatlas import _core
    from kernelatlas.cluster import engine_threads

    if threads is None:
        threads = engine_threads()
    return _core.coef_histograms(_shard_rows(arr_or_file, shape, span), span[2], span[3], codes, n_groups, mean,
                                 basis, lo, hi, bins=bins, scale_maxabs=scaled, threads=threads)


# ---------------------------------------------------------------------------------------------- the verb


@dataclass
class ShiftResult:
    """One computed grouping: ``matrix`` (DataFrame, groups x groups), ``pairs`` (group_a, group_b, shift and
    the per-component symmetric KL), ``groups`` (group, layers, kernels), ``counts`` [G, C, bins],
    ``lo``/``hi`` [C] the shared range, ``evr`` [C], and where it is stored."""

    by: str
    k: int
    matrix: Any
    pairs: Any
    groups: Any
    counts: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    evr: np.ndarray
    root: Path
    info: dict[str, Any]

    @property
    def probabilities(self) -> np.ndarray:
        return histogram_probabilities(self.counts)


def _shift_dir(qrun: QualityRun, k: int, by: str, bins: int, drop_degenerate: bool) -> Path:
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", by)
    return qrun.root / (f"shift-k{k}-{tag}" + ("-nodegenerate" if drop_degenerate else "")
                        + ("" if bins == BINS else f"-b{bins}"))


def load_shift(root: Path) -> ShiftResult:
    import pandas as pd

    info = json.loads((root / "shift.json").read_text())
    with np.load(root / "histograms.npz", allow_pickle=False) as z:
        counts, lo, hi, evr = z["counts"], z["lo"], z["hi"], z["evr"]
    matrix = pd.read_csv(root / "shift.csv", index_col=0, keep_default_na=False)
    matrix.index = matrix.index.astype(str)
    pairs = pd.read_csv(root / "pairs.csv", keep_default_na=False)
    groups = pd.read_csv(root / "groups.csv", keep_default_na=False)
    return ShiftResult(info["by"], int(info["kernel_size"]), matrix, pairs, groups, counts, lo, hi, evr, root,
                       info)


def _pick_size(qrun: QualityRun, kernel_size: int | None) -> int:
    sizes = qrun.kernel_sizes
    if not sizes:
        raise CorpusError(f"quality run {qrun.run_id} holds no kernels")
    if kernel_size is None:
        return 3 if 3 in sizes else sizes[0]
    if kernel_size not in sizes:
        raise CorpusError(f"{qrun.corpus.root} holds no stored {kernel_size}x{kernel_size} kernels of the "
                          f"measured kind (sizes: {', '.join(map(str, sizes))}): choose --kernel-size among "
                          "them")
    return kernel_size


def shift_result(corpus: Corpus | str | os.PathLike[str], by: str, *, kernel_size: int | None = None,
                 kind: str = "all", scale: str = "maxabs", bins: int = BINS, drop_degenerate: bool = False,
                 quality_run_id: str | None = None, threads: int | None = None, chunk_rows: int = CHUNK_ROWS,
                 progress: bool = False, figures: bool = True, recompute: bool = False,
                 command: str = "", cluster: Any = None, client: Any = None) -> ShiftResult:
    """Compute (or load, when done with the same options) the shift between the groups of one grouping
    (``cluster`` / ``client``: the quality run and the coefficient histograms as tasks on a Dask cluster, see
    kernelatlas.cluster; the same result)."""
    from kernelatlas.cluster import session

    with session(cluster, client) as cl:
        return _shift_result(corpus, by, kernel_size=kernel_size, kind=kind, scale=scale, bins=bins,
                             drop_degenerate=drop_degenerate, quality_run_id=quality_run_id, threads=threads,
                             chunk_rows=chunk_rows, progress=progress, figures=figures, recompute=recompute,
                             command=command, cluster=cl)


def _shift_result(corpus: Corpus | str | os.PathLike[str], by: str, *, kernel_size: int | None, kind: str, scale: str,
                  bins: int, drop_degenerate: bool, quality_run_id: str | None, threads: int | None, chunk_rows: int,
                  progress: bool, figures: bool, recompute: bool, command: str, cluster: Any) -> ShiftResult:
    import pandas as pd

    c = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    if bins < 2:
        raise ValueError("bins must be >= 2")
    if quality_run_id is not None:
        qrun = load_quality_run(c, quality_run_id)
    else:
        qrun = quality_run(c, kind=kind, scale=scale, threads=threads, chunk_rows=chunk_rows,
                           progress=progress, figures=figures, cluster=cluster)
    k = _pick_size(qrun, kernel_size)
    root = _shift_dir(qrun, k, by, bins, drop_degenerate)
    options = {"by": by, "kernel_size": k, "bins": bins, "drop_degenerate": drop_degenerate, "eps": EPS,
               "quality_run": qrun.run_id}
    info_path = root / "shift.json"
    if info_path.is_file() and not recompute:
        try:
            done = json.loads(info_path.read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("completed") is True and done.get("options") == options:
            return load_shift(root)
    pca = qrun.pca(k)
    table = qrun.table
    table = table[(table["k"] == k) & (table["n"] > 0)]
    if drop_degenerate:
        table = table[~table["degenerate"].astype(bool)]
    layer_ids = table["layer_id"].to_numpy(np.int64)
    codes, names, ungrouped = layer_groups(c, layer_ids, by)
    if len(names) < 2:
        hint = ("give metadata at extract time (`kernelatlas extract ... --meta " + by + "=VALUE`, one "
                "extract per group) or import a CNN Filter DB file" if by not in ("depth", "model") else
                "the corpus needs layers at two depths or two models")
        raise ValueError(f"grouping by {by!r} gives {len(names)} group(s) among the {k}x{k} layers of "
                         f"{c.root} ({ungrouped} layer(s) without a value): a shift needs at least two; "
                         f"{hint}")
    counts, lo, hi = coefficient_histograms(c, k, layer_ids, codes, len(names), pca, bins=bins,
                                            threads=threads, chunk_rows=chunk_rows, progress=progress,
                                            cluster=cluster)
    n_kernels = counts[:, 0, :].sum(axis=1)
    present = n_kernels > 0
    if present.sum() < 2:
        raise ValueError(f"grouping by {by!r}: fewer than two groups hold finite {k}x{k} kernels")
    counts, names = counts[present], [n for n, p in zip(names, present, strict=True) if p]
    layers_per = np.bincount(codes[codes >= 0], minlength=len(present))[present]
    probs = histogram_probabilities(counts)
    matrix_arr = shift_matrix(probs, pca.evr[:counts.shape[1]])
    matrix = pd.DataFrame(matrix_arr, index=pd.Index(names, name="group"), columns=names)
    logp = np.log(probs)
    pair_rows = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            sym = ((probs[a] - probs[b]) * (logp[a] - logp[b])).sum(axis=-1)
            pair_rows.append({"group_a": names[a], "group_b": names[b], "shift": matrix_arr[a, b],
                              **{f"kl_v{j}": sym[j] for j in range(len(sym))}})
    pairs = pd.DataFrame(pair_rows)
    groups = pd.DataFrame({"group": names, "layers": layers_per, "kernels": n_kernels[present]})
    root.mkdir(parents=True, exist_ok=True)
    info_path.unlink(missing_ok=True)
    _write_csv(matrix.reset_index(), root / "shift.csv")
    _write_csv(pairs, root / "pairs.csv")
    _write_csv(groups, root / "groups.csv")
    _write_csv(_coefficient_table(counts, probs, names, lo, hi), root / "coefficients.csv")

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, counts=counts, lo=lo, hi=hi, evr=pca.evr[:counts.shape[1]],
                     groups=np.array(names, dtype=str))

    atomic_write(root / "histograms.npz", write_npz)
    files = ["shift.csv", "pairs.csv", "groups.csv", "coefficients.csv", "histograms.npz"]
    if figures:
        files.append(heatmap_figure(matrix, by, k, root / "shift.png"))
        files.append(coefficient_figure(probs, names, n_kernels[present], lo, hi, pca, by, k,
                                        root / "coefficients.png"))
    info = {"format": SHIFT_FORMAT, "completed": True, "by": by, "kernel_size": k, "options": options,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command or f"shift --by {by}",
            "groups": len(names), "layers_without_group": ungrouped, "layers": len(layer_ids),
            "kernels": int(n_kernels.sum()), "files": files}
    atomic_write_bytes(info_path, json.dumps(info, indent=1).encode())
    result = ShiftResult(by, k, matrix, pairs, groups, counts, lo, hi, pca.evr[:counts.shape[1]], root, info)
    if figures:
        box_figure(qrun, k)
    return result


def shift(corpus: Corpus | str | os.PathLike[str], by: str, **options: Any) -> Any:
    """Distribution shift between the groups of ``by`` (family | task | category | depth | model, or any
    models.parquet column) as a pandas DataFrame: the symmetric, explained-variance-weighted KL matrix
    (groups x groups).  ``frame.attrs`` holds the grouping, kernel size, quality run and output folder; the
    pairs, group sizes and histograms are in that folder and in :func:`shift_result`'s ShiftResult.

    Options: ``kernel_size`` (default 3 when stored, else the smallest), ``bins`` (70), ``drop_degenerate``
    (leave degenerate layers out, as the paper does for its task/category/depth comparisons), ``kind`` /
    ``scale`` (of the quality run whose PCA is used; or ``quality_run_id``), ``threads``, ``chunk_rows``,
    ``progress``, ``figures``, ``recompute``."""
    res = shift_result(corpus, by, **options)
    frame = res.matrix.copy()
    frame.attrs.update({"by": res.by, "kernel_size": res.k, "quality_run": res.info["options"]["quality_run"],
                        "dir": str(res.root)})
    return frame


def _write_csv(frame: Any, path: Path) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


def _coefficient_table(counts: np.ndarray, probs: np.ndarray, names: Sequence[str], lo: np.ndarray,
                       hi: np.ndarray) -> Any:
    import pandas as pd

    g, comps, bins = counts.shape
    frac = np.arange(bins + 1) / bins
    edges = lo[:, None] + (hi - lo)[:, None] * frac[None, :]  # [C, bins + 1]
    return pd.DataFrame({
        "group": np.repeat(np.asarray(names, dtype=object), comps * bins),
        "component": np.tile(np.repeat(np.arange(comps), bins), g),
        "bin": np.tile(np.arange(bins), g * comps),
        "lo": np.tile(edges[:, :-1].ravel(), g),
        "hi": np.tile(edges[:, 1:].ravel(), g),
        "count": counts.ravel(),
        "probability": probs.ravel(),
    })


# ---------------------------------------------------------------------------------------------- figures


def heatmap_figure(matrix: Any, by: str, k: int, path: Path) -> str:
    g = len(matrix)
    size = min(14.0, 2.5 + 0.42 * g)
    fig = new_figure(size + 1.2, size)
    ax = fig.add_subplot(1, 1, 1)
    values = matrix.to_numpy(np.float64)
    im = ax.imshow(values, cmap="viridis")
    labels = [short_text(str(n), 28) for n in matrix.index]
    ax.set_xticks(range(g))
    ax.set_yticks(range(g))
    fs = 8 if g <= 20 else max(3, int(160 / g))
    ax.set_xticklabels(labels, rotation=90, fontsize=fs)
    ax.set_yticklabels(labels, fontsize=fs)
    if g <= 16:
        top = float(values.max()) if values.size else 0.0
        for i in range(g):
            for j in range(g):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] < 0.6 * top else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="shift (EVR-weighted symmetric KL)")
    ax.set_title(f"{k}x{k} kernel distribution shift by {by}", fontsize=10)
    return save_figure(fig, path, tight=True)




def coefficient_figure(probs: np.ndarray, names: Sequence[str], kernels: np.ndarray, lo: np.ndarray,
                       hi: np.ndarray, pca: PCA, by: str, k: int, path: Path, max_groups: int = 10,
                       max_components: int = 9) -> str:
    """Coefficient distributions per component (first ``max_components``), one line per group (the largest
    ``max_groups`` in colour, the others thin grey)."""
    comps = min(max_components, probs.shape[1])
    cols = 3
    rows = -(-comps // cols)
    fig = new_figure(12, 2.6 * rows + 0.6)
    order = np.argsort(-np.asarray(kernels), kind="stable")
    coloured = set(order[:max_groups].tolist())
    colours = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
               "#17becf", "#393b79")
    bins = probs.shape[2]
    for j in range(comps):
        ax = fig.add_subplot(rows, cols, j + 1)
        centres = lo[j] + (hi[j] - lo[j]) * (np.arange(bins) + 0.5) / bins
        for gi in order[::-1]:
            if gi in coloured:
                rank = int(np.where(order == gi)[0][0])
                ax.plot(centres, probs[gi, j], lw=1.1, color=colours[rank % len(colours)],
                        label=short_text(str(names[gi]), 22) if j == 0 else None)
            else:
                ax.plot(centres, probs[gi, j], lw=0.5, color="#bbbbbb")
        ax.set_yscale("log")
        ax.set_title(f"v{j} (EVR {pca.evr[j]:.1%})", fontsize=8)
        ax.tick_params(labelsize=6)
    if comps:
        fig.legend(loc="lower center", ncol=min(5, len(coloured)), fontsize=7, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"{k}x{k} PCA coefficient distributions by {by}", fontsize=10)
    return save_figure(fig, path, tight=True)


def _completed_shifts(qrun: QualityRun, k: int | None = None) -> list[ShiftResult]:
    out = []
    for info_path in sorted(qrun.root.glob("shift-k*/shift.json")):
        try:
            info = json.loads(info_path.read_text())
            if info.get("completed") is True and (k is None or int(info["kernel_size"]) == k):
                out.append(load_shift(info_path.parent))
        except (OSError, ValueError, KeyError):
            continue
    return out


def box_figure(qrun: QualityRun, k: int) -> str | None:
    """Box plot of the pairwise shifts of every grouping computed so far for k x k kernels (and its CSV)."""
    import pandas as pd

    results = _completed_shifts(qrun, k)
    if not results:
        return None
    rows: list[dict[str, Any]] = []
    for r in results:
        label = r.root.name.removeprefix(f"shift-k{k}-")
        rows.extend({"grouping": label, "group_a": p.group_a, "group_b": p.group_b, "shift": p.shift}
                    for p in r.pairs.itertuples(index=False))
    frame = pd.DataFrame(rows, columns=["grouping", "group_a", "group_b", "shift"])
    _write_csv(frame, qrun.root / f"shift-k{k}-box.csv")
    labels = list(dict.fromkeys(frame["grouping"]))
    fig = new_figure(max(4.0, 1.3 * len(labels) + 1.5), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot([frame.loc[frame["grouping"] == g, "shift"].to_numpy() for g in labels], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels(labels, rotation=20, fontsize=8)
    ax.set_ylabel("pairwise shift")
    ax.set_title(f"{k}x{k}: pairwise shifts per grouping", fontsize=10)
    return save_figure(fig, qrun.root / f"shift-k{k}-box.png", tight=True)


# ---------------------------------------------------------------------------------------------- report
# section


def _f(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "–"
    return "–" if not np.isfinite(v) else f"{v:.{digits}f}"


def quality_section(corpus: Corpus | str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    *, max_rows: int = 40) -> tuple[str, str]:
    """The report's kernel-quality section for the latest completed quality run of the corpus: degenerate
    layers per model, the global PCA basis and explained variance per kernel size, and the shift heatmaps and
    box plots of every grouping computed so far.  Figures and CSV tables are copied into ``out_dir`` (names
    starting with ``quality-``); returns (markdown, html fragment).  Without a quality run: a short section
    saying which command makes one."""
    c = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sec = Document()
    sec.h(2, "Kernel quality and distribution shift")
    qrun = latest_quality_run(c)
    if qrun is None:
        sec.p(f"No quality run yet: `kernelatlas quality {c.root}` measures sparsity, variance entropy, "
              "degenerate layers and orthogonality per layer, and `kernelatlas shift CORPUS --by family` the "
              "distribution shift between groups (Gavrikov & Keuper, CVPR 2022).")
        return sec.markdown(), sec.html_fragment()
    opts = qrun.info.get("options", {})
    scaled = "scaled by their max|w|" if opts.get("scale") == "maxabs" else "as stored"
    sec.p(f"Quality run `{qrun.run_id}` ({opts.get('kind', 'all')} layers; PCA on kernels {scaled}), metrics "
          "of CNN Filter DB (Gavrikov & Keuper, CVPR 2022): sparsity S (share of kernels with every |w| < 1% "
          "of the layer's max), variance entropy H (base 10, of the singular values of the centred layer), "
          "the randomness threshold TH(n), and the degenerate rule H >= TH(n) - "

          f"{opts.get('degenerate_margin', 0.02)} or (H < {opts.get('degenerate_low_entropy', 0.5)} and S >= "
          f"{opts.get('degenerate_sparsity', 0.14)}) (the entropy bound scaled by log10(d)/log10(9) beyond "
          "3x3); orthogonality as in the CVPRW 2022 companion paper.")
    joined = qrun.joined()
    joined.to_csv(out / "quality-layers.csv", index=False)
    name_col = "model_name" if "model_name" in joined.columns else "model_id"
    per_model = []
    for (model, k), grp in joined[joined["n"] > 0].groupby([name_col, "k"], sort=True):
        per_model.append({"model": model, "k": int(k), "layers": len(grp),
                          "degenerate": int(grp["degenerate"].sum()),
                          "random_like": int(grp["degenerate_random"].sum()),
                          "sparse_replicated": int(grp["degenerate_sparse"].sum()),
                          "median_entropy_ratio": float(grp["entropy_ratio"].median()),
                          "median_sparsity": float(grp["sparsity"].median()),
                          "median_orthogonality": float(grp["orthogonality"].median())})
    import pandas as pd

    models_frame = pd.DataFrame(per_model)
    models_frame.to_csv(out / "quality-models.csv", index=False)
    sec.table(["model", "k", "layers", "degenerate", "random-looking", "sparse + replicated", "median H/TH",
               "median S", "median orthogonality"],
              [[str(r["model"]), f"{r['k']}x{r['k']}", str(r["layers"]), str(r["degenerate"]),
                str(r["random_like"]), str(r["sparse_replicated"]), _f(r["median_entropy_ratio"]),
                _f(r["median_sparsity"]),
                _f(r["median_orthogonality"])] for r in per_model],
              csv="quality-models.csv", caption="Degenerate layers per model and kernel size")
    deg = joined[joined["degenerate"].astype(bool)].sort_values([name_col, "k", "depth_norm"], kind="stable")
    deg.to_csv(out / "quality-degenerate.csv", index=False)
    if len(deg):
        shown = deg.head(max_rows)
        sec.table(["model", "layer", "k", "n", "H", "TH(n)", "S", "why"],
                  [[str(r[name_col]), str(r["name"]), str(int(r["k"])), str(int(r["n"])), _f(r["entropy"]),
                    _f(r["th"]), _f(r["sparsity"]),
                    "random-looking" if r["degenerate_random"] else "sparse + replicated"]
                   for _, r in shown.iterrows()],
                  csv="quality-degenerate.csv",
                  caption=f"Degenerate layers ({len(deg)}"
                  + (f"; the first {max_rows} shown" if len(deg) > max_rows else "") + ")")
    else:
        sec.p("No layer is degenerate.")
    for k in qrun.kernel_sizes:
        sec.h(3, f"{k}x{k} kernels")
        pca = qrun.pca(k)
        shutil.copyfile(qrun.root / f"pca-k{k}.csv", out / f"quality-pca-k{k}.csv")
        for src, dst, title, caption in (
                (f"pca-k{k}.png", f"quality-pca-k{k}.png", f"global PCA basis {k}x{k}",
                 (f"The global PCA basis of {pca.n:,} {k}x{k} kernels (red positive, blue negative, one "
                  "colour scale) and its explained-variance ratios.")),
                (f"quality-k{k}.png", f"quality-layers-k{k}.png", f"layer entropy {k}x{k}",
                 ("Left: each layer's variance entropy against log2 of its kernel count with the randomness "
                  "threshold TH(n); crosses are degenerate layers.  Right: entropy against sparsity."))):
            if (qrun.root / src).is_file():
                shutil.copyfile(qrun.root / src, out / dst)
                sec.figure(dst, title, caption)
        evr_rows = []
        for i in range(min(pca.d, 9)):
            paper = _f(PAPER_EVR_3X3[i], 4) if k == 3 else "–"
            evr_rows.append([f"v{i}", _f(pca.evr[i], 4), _f(pca.evr[:i + 1].sum(), 4), paper])
        sec.table(["component", "EVR", "cumulative", "CNN Filter DB (3x3)"], evr_rows,
                  csv=f"quality-pca-k{k}.csv",
                  caption=f"Explained-variance ratios, {k}x{k} (first 9 components)")
        shifts = _completed_shifts(qrun, k)
        summary = []
        for res in shifts:
            label = res.root.name.removeprefix(f"shift-k{k}-")
            csv = f"quality-shift-k{k}-{label}.csv"
            res.matrix.reset_index().to_csv(out / csv, index=False)
            top = res.pairs.sort_values("shift", ascending=False).iloc[0]
            summary.append([label, str(len(res.matrix)), f"{int(res.groups['kernels'].sum()):,}",
                            _f(res.pairs["shift"].median()), _f(top["shift"]),
                            f"{top['group_a']} / {top['group_b']}", csv])
        if summary:
            sec.table(["grouping", "groups", "kernels", "median shift", "max shift", "most different pair",
                       "matrix (CSV)"], summary, csv=f"quality-shift-k{k}-box.csv",
                      caption=f"Distribution shift between groups, {k}x{k} kernels (every pair in the CSV)")

        for res in shifts:
            label = res.root.name.removeprefix(f"shift-k{k}-")
            dst = f"quality-shift-k{k}-{label}.png"
            if (res.root / "shift.png").is_file():
                shutil.copyfile(res.root / "shift.png", out / dst)
                sec.figure(dst, f"shift by {label}",
                           f"Distribution shift between groups by {label} ({len(res.matrix)} groups): "
                           "explained-variance-weighted symmetric KL of the "
                           f"{res.counts.shape[2]}-bin coefficient histograms in the global PCA basis.")
        if shifts and (qrun.root / f"shift-k{k}-box.png").is_file():
            shutil.copyfile(qrun.root / f"shift-k{k}-box.png", out / f"quality-shift-k{k}-box.png")
            shutil.copyfile(qrun.root / f"shift-k{k}-box.csv", out / f"quality-shift-k{k}-box.csv")
            sec.figure(f"quality-shift-k{k}-box.png", "pairwise shifts per grouping",
                       "Pairwise shifts of every grouping computed so far (a wider, higher box: the groups "
                       "differ more).")
        elif not shifts:
            sec.p(f"No shift computed for {k}x{k} kernels yet: `kernelatlas shift {c.root} --by family` (or "
                  "task, category, depth, model).")

    return sec.markdown(), sec.html_fragment()
