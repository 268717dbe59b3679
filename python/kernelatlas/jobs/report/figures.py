"""The report's figures: per-layer cluster shares, depth profile, prototype grid, decoded spectrum, coverage
curves and the depthwise-vs-regular comparison (one PNG each, drawn with :mod:`kernelatlas.figures`).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas.figures import new_figure, percent_formatter, save_figure, short_text
from kernelatlas.jobs.report.runs import FALLBACK_COLOURS, UNCLASSIFIED_COLOUR, Cluster, RunInfo
from kernelatlas.jobs.report.scan import CURVE_GRID, RunStats
from kernelatlas.jobs.report.tables import fmt_pct, share_of

KIND_COLOURS = {"depthwise": "#1f77b4", "regular": "#d62728", "grouped": "#2ca02c"}


MAX_CURVES = 10

MAX_LAYER_FIGURES = 25

MODELS_PER_FIGURE = 12







def _wrap(text: str, width: int, lines: int = 2) -> str:
    """A cluster name on at most ``lines`` lines of ``width`` characters (the last shortened with …)."""
    import textwrap

    parts = textwrap.wrap(text, width) or [""]
    if len(parts) > lines:
        parts = parts[: lines - 1] + [short_text(" ".join(parts[lines - 1:]), width)]
    return "\n".join(parts)


def _legend_handles(clusters: Sequence[Cluster]) -> list[Any]:
    from matplotlib.patches import Patch

    return [Patch(facecolor=c.colour, edgecolor="none", label=c.name) for c in clusters] + \
        [Patch(facecolor=UNCLASSIFIED_COLOUR, edgecolor="none", label="unclassified")]


def layer_figures(stats: RunStats, table: Any, out: Path) -> tuple[list[str], int]:
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
        fig = new_figure(4.6 * ncols + 1.8, max(2.6 * nrows + 0.9, 0.24 * (len(run.clusters) + 3)), constrained=True)
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
            ax.set_title(f"{short_text(str(sub['model'].iloc[0]))}\n{len(sub)} layers, "
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
        save_figure(fig, out / name)
        files.append(name)
    return files, len(pages) - len(shown)


def interval_text(run: RunInfo, i: int, digits: int = 3) -> str:
    """[lo, hi) of cluster i; the interval reaching highest is closed: [lo, hi]."""
    c = run.clusters[i]
    if c.lo is None or c.hi is None:
        return "–"
    top = max(cl.hi for cl in run.clusters if cl.hi is not None)
    return f"[{c.lo:.{digits}f}, {c.hi:.{digits}f}" + ("]" if c.hi == top else ")")


def _depth_bins(depth_norm: Any) -> np.ndarray:
    return np.clip(np.floor(np.asarray(depth_norm, dtype=np.float64) * 10), 0, 9).astype(np.int64)


def depth_figure(stats: RunStats, out: Path) -> str:
    """All models together: cluster shares by normalised depth (deciles), weighted by kernels."""
    run, lay = stats.run, stats.layers
    bins = _depth_bins(lay["depth_norm"])
    live = np.bincount(bins, weights=lay["live"], minlength=10)
    fig = new_figure(8.5, 4.2, constrained=True)
    ax = fig.subplots()
    x = np.arange(10)
    bottom = np.zeros(10)
    labelled = np.zeros(10)
    for i, c in enumerate(run.clusters):
        v = np.nan_to_num(share_of(np.bincount(bins, weights=lay[f"n_{i}"], minlength=10), live))
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
    save_figure(fig, out / name)
    return name


def prototype_figure(stats: RunStats, clusters_table: Any, out: Path) -> str:
    """Fig. 5 of the paper: each cluster's prototype, its name and its share of the run's live kernels."""
    run = stats.run
    n = len(run.clusters)
    ncols = min(n, 6)
    nrows = math.ceil(n / ncols)
    fig = new_figure(max(1.9 * ncols + 1.2, 6.5), 2.3 * nrows + 0.8, constrained=True)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    share = dict(zip(clusters_table["cluster"], clusters_table["share"], strict=True))
    image = None
    for ax, c in zip(axes.flat, run.clusters, strict=False):
        image = _draw_prototype(ax, c, 4) or image
        ax.set_title(f"{_wrap(c.name, 20)}\n{fmt_pct(share.get(c.name, np.nan))}", fontsize=9)
    unc = share.get("unclassified", np.nan)
    fig.suptitle(f"Cluster prototypes — {run.kernel_size}×{run.kernel_size} {run.kind}, run {run.run_id}: share "
                 f"of {int(stats.layers['live'].sum()):,} live kernels (unclassified {fmt_pct(unc)})", fontsize=10)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, ticks=[-1, 0, 1])
        bar.ax.set_yticklabels(["−max", "0", "+max"], fontsize=8)
        bar.set_label("weight / max |weight|", fontsize=8)
    name = f"prototypes-{run.tag}.png"
    save_figure(fig, out / name)
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


def spectrum_figure(stats: RunStats, out: Path) -> tuple[str | None, str]:
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
    fig = new_figure(max(1.5 * n, 6.5), 3.8, constrained=True)
    grid = fig.add_gridspec(2, n, height_ratios=[1, 2.2])
    axis = fig.add_subplot(grid[0, :])
    lo_all = min(0.0, min(c.lo for c in run.clusters))  # type: ignore[type-var]
    hi_all = max(1.0, max(c.hi for c in run.clusters))  # type: ignore[type-var]
    for i in order:
        c = run.clusters[i]
        axis.axvspan(c.lo, c.hi, color=c.colour, alpha=0.85)
        narrow = (c.hi - c.lo) < 0.08 * (hi_all - lo_all)  # type: ignore[operator]
        middle = (c.lo + c.hi) / 2  # type: ignore[operator]  # autoencoder runs: lo and hi are set
        axis.text(middle, 0.5, short_text(c.name, 14) if narrow else _wrap(c.name, 14), ha="center",
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
        ax.set_title(f"{_wrap(c.name, 18)}\n{interval_text(run, i, 2)}", fontsize=7)
    fig.suptitle(f"Decoded spectrum — {run.kernel_size}×{run.kernel_size}, run {run.run_id} (drawn from the "
                 "cluster prototypes; red +, blue −)", fontsize=10)
    save_figure(fig, out / name)
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
    ax.yaxis.set_major_formatter(percent_formatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of live kernels classified")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def coverage_figure(stats: RunStats, models: Any, out: Path) -> str:
    """Share of live kernels classified vs threshold: one line per model, the corpus total in black."""
    run, lay = stats.run, stats.layers
    names = models.set_index("model_id")["name"]
    live = lay.groupby("model_id")["live"].sum()
    per_model: dict[int, np.ndarray] = {}
    for (m, _kind), c in stats.curve.items():
        per_model[m] = per_model.get(m, 0) + c
    fig = new_figure(8.5, 4.6, constrained=True)
    ax = fig.subplots()
    many = len(live) > MAX_CURVES
    for i, m in enumerate(live.index):
        y = share_of(per_model.get(int(m), np.zeros(len(CURVE_GRID))), int(live[m]))
        if many:
            ax.plot(CURVE_GRID, y, color="#999999", linewidth=0.7, alpha=0.7,
                    label=f"each model ({len(live)})" if i == 0 else None)
        else:
            ax.plot(CURVE_GRID, y, color=FALLBACK_COLOURS[i % len(FALLBACK_COLOURS)], linewidth=1.4,
                    label=short_text(str(names.get(m, "?")), 30))
    total = sum(per_model.values(), np.zeros(len(CURVE_GRID), np.int64))
    ax.plot(CURVE_GRID, share_of(total, int(live.sum())), color="black", linewidth=2.6, label="all models")
    _coverage_axes(ax, stats.thresholds,
                   f"Coverage vs threshold — {run.kernel_size}×{run.kernel_size} {run.kind}, run {run.run_id}",
                   "cosine-similarity threshold t (dotted: the report's thresholds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    name = f"coverage-{run.tag}.png"
    save_figure(fig, out / name)
    return name




def _kind_curve(stats: RunStats, kind: str) -> tuple[np.ndarray, int]:
    """Summed curve and live count of the layers of one kind of a run."""
    curve = sum((c for (_m, k), c in stats.curve.items() if k == kind), np.zeros(len(CURVE_GRID), np.int64))
    live = int(stats.layers.loc[stats.layers["kind"] == kind, "live"].sum())
    return curve, live


def runs_coverage_figure(all_stats: Sequence[RunStats], out: Path) -> str:
    """Every reported run's total coverage curve on one plot (per kernel size and kind)."""
    fig = new_figure(8.5, 4.6, constrained=True)
    ax = fig.subplots()
    styles = {"depthwise": "-", "regular": "--", "grouped": "-.", "all": ":"}
    sizes = sorted({st.run.kernel_size for st in all_stats})
    for st in all_stats:
        curve = sum(st.curve.values(), np.zeros(len(CURVE_GRID), np.int64))
        colour = FALLBACK_COLOURS[sizes.index(st.run.kernel_size) % len(FALLBACK_COLOURS)]
        ax.plot(CURVE_GRID, share_of(curve, int(st.layers["live"].sum())), color=colour,
                linestyle=styles.get(st.run.kind, "-"), linewidth=2,
                label=f"{st.run.kernel_size}×{st.run.kernel_size} {st.run.kind} ({st.run.run_id}, {st.run.mode})")
    _coverage_axes(ax, all_stats[0].thresholds, "Coverage vs threshold, all models, per kernel size and kind",
                   "cosine-similarity threshold t (dotted: the report's thresholds)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    name = "coverage-runs.png"
    save_figure(fig, out / name)
    return name


@dataclass
class _KindSource:
    kind: str
    stats: RunStats

    @property
    def label(self) -> str:
        how = "" if self.stats.run.kind == self.kind else " layers of 'all' run"
        return f"{self.kind}{how} ({self.stats.run.run_id})"


def comparison_sources(all_stats: Sequence[RunStats], k: int) -> dict[str, _KindSource]:
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


def comparison_figure(k: int, sources: dict[str, _KindSource], thresholds: Sequence[float], out: Path) -> str:
    """Depthwise vs regular k x k kernels: coverage curves together (left) and the share classified at the
    middle report threshold by depth decile (right): the paper's claim is that regular kernels lose the
    clustered structure after the first layers while depthwise ones keep it at every depth."""
    t_ref = sorted(thresholds)[len(thresholds) // 2]
    fig = new_figure(11.5, 4.4, constrained=True)
    left, right = fig.subplots(1, 2)
    width = 0.8 / max(len(sources), 1)
    for j, (kind, src) in enumerate(sorted(sources.items())):
        curve, live = _kind_curve(src.stats, kind)
        colour = KIND_COLOURS.get(kind, "black")
        left.plot(CURVE_GRID, share_of(curve, live), color=colour, linewidth=2.2,
                  label=f"{src.label}: {live:,} live")
        lay = src.stats.layers[src.stats.layers["kind"] == kind]
        bins = _depth_bins(lay["depth_norm"])
        col = src.stats.cls_col(t_ref)
        live_by_depth = np.bincount(bins, weights=lay["live"], minlength=10)
        share = share_of(np.bincount(bins, weights=lay[col], minlength=10), live_by_depth)
        has = live_by_depth > 0  # no bar where the kind has no layer at that depth
        x = np.arange(10) + (j - (len(sources) - 1) / 2) * width
        right.bar(x[has], share[has], width=width, color=colour, label=kind)
    _coverage_axes(left, thresholds, "coverage vs threshold", "cosine-similarity threshold t")
    left.legend(fontsize=8, loc="best")
    right.set_xticks(np.arange(10), [f"{i / 10:.1f}" for i in range(10)], fontsize=8)
    right.set_ylim(0, 1.02)
    right.yaxis.set_major_formatter(percent_formatter())
    right.set_xlabel("normalised layer depth (decile start); no bar: no layer of that kind there")
    right.set_ylabel(f"share classified at t = {t_ref:g}")
    right.set_title(f"classified at t = {t_ref:g} by depth", fontsize=10)
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    fig.suptitle(f"Depthwise vs regular {k}×{k} kernels", fontsize=11)
    name = f"compare-k{k}.png"
    save_figure(fig, out / name)
    return name
