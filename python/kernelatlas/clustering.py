"""Naming the clusters of a trained autoencoder (Babaiee et al., ICLR 2024): decode a dense grid of codes along
the one-dimensional code axis (the "spectrum"), cut it into intervals over which the decoded pattern stays the
same, and name each interval by the analytic template it matches (:mod:`kernelatlas.templates`).

The rule for "stays the same" (ours; the paper cut its spectrum by eye): walking up the grid, a decoded pattern
joins the current interval while its cosine with the interval's FIRST pattern is >= ``merge_cos`` (comparing
with the previous pattern instead would let a slow drift chain any two patterns into one interval).  Interval
edges lie halfway between grid points; the first interval starts at the code range's low end and the last ends
at its high end, closed, so the intervals tile the whole range ([0, 1] for a sigmoid code).

The result is ``clusters.json`` in the model directory -- meant to be read and edited by hand: rename an
interval, or merge neighbours (:func:`merge_intervals`, or delete one and move the other's edge);
:meth:`kernelatlas.Autoencoder.load` reads the intervals' ``lo``, ``hi`` and ``name`` and nothing else.  Each
interval also records its prototype (the pattern decoded at its centre, k x k), a colour for figures, and its
best template match.  ``spectrum.png`` draws the decoded patterns along the axis with the intervals.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas._files import atomic_write
from kernelatlas.autoencoder import Autoencoder
from kernelatlas.templates import best_match, templates

__all__ = ["THRESHOLDS", "clusters", "code_range", "merge_intervals", "read_spec"]

FORMAT = "kernelatlas-clusters"
FORMAT_VERSION = 1
THRESHOLDS = (0.8, 0.85, 0.9)  # reconstruction cosines to report coverage at (the paper's value is not public)
SPEC = "clusters.json"
FIGURE = "spectrum.png"


def code_range(model: Autoencoder) -> tuple[float, float]:
    """The range of the code axis: [0, 1] for a sigmoid code, [-1, 1] for tanh; for an unbounded code, the
    range the training kernels' codes covered (model.json ``training.code_quantiles``)."""
    act = model.code_activation
    if act == "sigmoid":
        return 0.0, 1.0
    if act == "tanh":
        return -1.0, 1.0
    q = model.info.get("training", {}).get("code_quantiles", {})
    if "q0" in q and "q1" in q and q["q1"] > q["q0"]:
        return float(q["q0"]), float(q["q1"])
    raise ValueError(f"the model's code activation is {act!r}, whose range is unbounded, and its model.json records "
                     "no code range (training.code_quantiles): retrain with `kernelatlas train`, or use a "
                     "sigmoid code")


def clusters(
    model_dir: str | os.PathLike[str],
    *,
    samples: int = 200,
    merge_cos: float = 0.9,
    match_cos: float = 0.7,
    min_width: float = 0.0,
    plot: bool = True,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Cut the code axis of the model in ``model_dir`` into named intervals; write clusters.json (and, with
    ``plot``, spectrum.png) there and return the intervals (dicts as in clusters.json).

    ``samples``: grid points decoded along the axis (the edges are halfway between them).  ``merge_cos``: a
    pattern stays in the current interval while its cosine with the interval's first pattern is at least this.
    ``match_cos``: an interval takes its best template's name when their cosine (centred, signs count) is at
    least this, else a numbered name ``pattern_N``.  ``min_width``: intervals narrower than this (in code units)
    are merged into the neighbour whose prototype is closer (0: keep every interval).  Names that occur twice
    get suffixes (``dx+``, ``dx+_2``) in axis order.  Deterministic: the same model gives the same intervals.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
    if not -1.0 <= merge_cos <= 1.0 or not -1.0 <= match_cos <= 1.0:
        raise ValueError(f"merge_cos and match_cos are cosines in [-1, 1], got {merge_cos} and {match_cos}")
    if min_width < 0:
        raise ValueError(f"min_width must be >= 0, got {min_width}")
    root = Path(model_dir)
    model = Autoencoder.load(root)
    lo, hi = code_range(model)
    grid = np.linspace(lo, hi, samples)
    patterns = _decode(model, grid, threads)
    unit = _centred_unit(patterns)
    starts = _split(unit, merge_cos)
    edges = [lo] + [float((grid[s - 1] + grid[s]) / 2) for s in starts[1:]] + [hi]
    bounds = list(zip(edges[:-1], edges[1:], strict=True))
    if min_width > 0:
        bounds = _absorb_narrow(model, bounds, min_width, threads)
    intervals = _describe(model, bounds, match_cos, threads)
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kernel_size": model.kernel_size,
        "code_range": [lo, hi],
        "intervals": intervals,
        "thresholds": list(THRESHOLDS),
        "options": {"samples": samples, "merge_cos": merge_cos, "match_cos": match_cos, "min_width": min_width},
        "note": ("intervals are [lo, hi) on the code axis, the last closed at hi; the engine reads lo, hi and name "
                 "only. Rename freely; to merge neighbours, delete one and set the other's lo/hi to cover both (or "
                 "use kernelatlas.clustering.merge_intervals); a code in a gap between intervals gets label -1."),
    }
    _write_spec(root, spec)
    # check now that the engine accepts what was written, not at the first assign
    Autoencoder.load(root)
    if plot:
        draw_spectrum(root, grid=grid, patterns=patterns, intervals=intervals)
    return intervals


def read_spec(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """clusters.json of a model directory, as a dict."""
    path = Path(model_dir) / SPEC
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `kernelatlas clusters {model_dir}` first")
    return json.loads(path.read_text())


def merge_intervals(model_dir: str | os.PathLike[str], names: Sequence[str], *, name: str | None = None,
                    plot: bool = True) -> list[dict[str, Any]]:
    """Merge the intervals called ``names`` (at least two, neighbours on the code axis) in clusters.json into
    one named ``name`` (default: the first of ``names``), with a new prototype (decoded at the new centre) and
    template match.  Returns the new intervals.  Non-neighbours cannot be merged (the engine's clusters are
    single intervals): give them one name instead, or merge every interval between them too."""
    root = Path(model_dir)
    spec = read_spec(root)
    ivs = spec["intervals"]
    if len(set(names)) < 2:
        raise ValueError("merge_intervals needs at least two distinct interval names")
    where = {iv["name"]: i for i, iv in enumerate(ivs)}
    missing = [n for n in names if n not in where]
    if missing:
        raise ValueError(f"{root / SPEC} has no interval named {', '.join(map(repr, missing))} (names: "
                         f"{', '.join(iv['name'] for iv in ivs)})")
    idx = sorted(where[n] for n in set(names))
    if idx != list(range(idx[0], idx[-1] + 1)) or any(
            not np.isclose(ivs[i]["hi"], ivs[i + 1]["lo"]) for i in idx[:-1]):
        raise ValueError(f"intervals {', '.join(map(repr, names))} are not neighbours on the code axis: merge the "
                         "intervals between them too, or give them one name")
    model = Autoencoder.load(root)
    merged = _describe(model, [(ivs[idx[0]]["lo"], ivs[idx[-1]]["hi"])], match_cos=-2.0,
                       threads=None)[0]
    merged["name"] = name or names[0]
    merged["colour"] = ivs[idx[0]].get("colour", merged["colour"])
    merged["merged_from"] = [ivs[i]["name"] for i in idx]
    spec["intervals"] = ivs[:idx[0]] + [merged] + ivs[idx[-1] + 1:]
    _write_spec(root, spec)
    Autoencoder.load(root)
    if plot:
        lo, hi = spec["code_range"] if "code_range" in spec else code_range(model)
        grid = np.linspace(lo, hi, int(spec.get("options", {}).get("samples", 200)))
        draw_spectrum(root, grid=grid, patterns=_decode(model, grid, None), intervals=spec["intervals"])
    return spec["intervals"]


# ---------------------------------------------------------------------------------------------- the cut


def _decode(model: Autoencoder, codes: np.ndarray, threads: int | None) -> np.ndarray:
    return model.decode(np.ascontiguousarray(codes, dtype=np.float32), threads=threads).astype(np.float64)


def _centred_unit(patterns: np.ndarray) -> np.ndarray:
    """Centred, L2-normalised rows; a flat row becomes zero (cosine 0 with everything)."""
    c = patterns - patterns.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    scale = np.abs(patterns).max(axis=1, keepdims=True)
    flat = ~(norms > 1e-6 * np.maximum(scale, 1e-30))
    return np.where(flat, 0.0, c / np.where(flat, 1.0, norms))


def _split(unit: np.ndarray, merge_cos: float) -> list[int]:
    """Grid indices where intervals start: a pattern joins the open interval while cos(pattern, first) >=
    merge_cos.  Flat patterns (zero rows) group with each other."""
    starts = [0]
    first = unit[0]
    for i in range(1, len(unit)):
        both_flat = not first.any() and not unit[i].any()
        if both_flat or float(unit[i] @ first) >= merge_cos:
            continue
        starts.append(i)
        first = unit[i]
    return starts


def _absorb_narrow(model: Autoencoder, bounds: list[tuple[float, float]], min_width: float,
                   threads: int | None) -> list[tuple[float, float]]:
    """Merge intervals narrower than min_width into the neighbour with the closer prototype, narrowest first."""
    bounds = list(bounds)
    while len(bounds) > 1:
        widths = [hi - lo for lo, hi in bounds]
        i = int(np.argmin(widths))
        if widths[i] >= min_width:
            break
        centres = np.array([(lo + hi) / 2 for lo, hi in bounds])
        unit = _centred_unit(_decode(model, centres, threads))
        left = float(unit[i] @ unit[i - 1]) if i > 0 else -np.inf
        right = float(unit[i] @ unit[i + 1]) if i + 1 < len(bounds) else -np.inf
        j = i - 1 if left >= right else i + 1
        a, b = min(i, j), max(i, j)
        bounds[a:b + 1] = [(bounds[a][0], bounds[b][1])]
    return bounds


def _describe(model: Autoencoder, bounds: Sequence[tuple[float, float]], match_cos: float,
              threads: int | None) -> list[dict[str, Any]]:
    k = model.kernel_size
    bank = templates(k) if k >= 3 and k % 2 == 1 else {}
    centres = np.array([(lo + hi) / 2 for lo, hi in bounds])
    protos = _decode(model, centres, threads)
    colours = palette(len(bounds))
    bases: list[str] = []
    matches: list[tuple[str | None, float]] = []
    unnamed = 0
    for proto in protos:
        match, cos = best_match(proto, bank) if bank else (None, 0.0)
        matches.append((match, cos))
        if not np.isfinite(proto).all() or not _centred_unit(proto[None])[0].any():
            bases.append("flat")
        elif match is not None and cos >= match_cos:
            bases.append(match)
        else:
            unnamed += 1
            bases.append(f"pattern_{unnamed}")
    names = _unique_names(bases, [cos for _, cos in matches])
    return [
        {
            "lo": float(lo),
            "hi": float(hi),
            "name": name,
            "template": match,
            "template_cos": round(float(cos), 4),
            "colour": colour,
            "prototype": np.round(proto.reshape(k, k), 6).tolist(),
        }
        for (lo, hi), name, (match, cos), colour, proto in zip(bounds, names, matches, colours, protos, strict=True)
    ]


def _unique_names(bases: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Of the intervals sharing a name, the one matching its template best keeps it (the first on ties); the
    others get _2, _3, ... in axis order."""
    names = list(bases)
    for base in set(bases):
        idx = [i for i, b in enumerate(bases) if b == base]
        if len(idx) < 2:
            continue
        keep = max(idx, key=lambda i: (scores[i], -i))
        n = 1
        for i in idx:
            if i != keep:
                n += 1
                names[i] = f"{base}_{n}"
    return names  # unique: template names end in a letter, + or -, and pattern_N are numbered once


def palette(n: int) -> list[str]:
    """n distinct colours as '#rrggbb': hues spaced by the golden angle, alternating lightness."""
    out = []
    for i in range(n):
        h = (0.61803398875 * i) % 1.0
        light = (0.45, 0.62, 0.35)[i % 3]
        r, g, b = colorsys.hls_to_rgb(h, light, 0.75)
        out.append("#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255)))
    return out


def _write_spec(root: Path, spec: dict[str, Any]) -> None:
    text = json.dumps(spec, indent=1)
    atomic_write(root / SPEC, lambda p: Path(p).write_text(text))


# ---------------------------------------------------------------------------------------------- the figure


def draw_spectrum(model_dir: str | os.PathLike[str], *, grid: np.ndarray, patterns: np.ndarray,
                  intervals: Sequence[dict[str, Any]], columns: int = 50) -> Path:
    """spectrum.png: ``columns`` decoded patterns evenly along the code axis (each centred and scaled to its
    own max |w|; red positive, blue negative), under a bar of the intervals in their colours with their names
    and their edges drawn through the strip."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    k = int(round(np.sqrt(patterns.shape[1])))
    lo, hi = float(grid[0]), float(grid[-1])
    picks = np.unique(np.round(np.linspace(0, len(grid) - 1, min(columns, len(grid)))).astype(int))
    n = len(picks)
    strip = np.full((k, n * (k + 1) - 1), np.nan)  # one blank column between patterns
    for j, gi in enumerate(picks):
        p = patterns[gi].reshape(k, k) - patterns[gi].mean()
        scale = float(np.abs(p).max())
        strip[:, j * (k + 1):j * (k + 1) + k] = p / scale if scale > 0 else 0.0
    # laid out in inches so that every pattern is drawn square: strip width n * (k + 1) - 1 entries
    entry_in = 0.3 / (k + 1)  # a pattern and its gap take 0.3 inch
    strip_w = max(6.0, strip.shape[1] * entry_in)
    strip_h = strip_w * k / strip.shape[1]
    margin, bar_h, title_h, label_h = 0.3, 0.9, 0.3, 0.5
    fig_w, fig_h = strip_w + 2 * margin, strip_h + bar_h + title_h + label_h + 0.1
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax_img = fig.add_axes((margin / fig_w, label_h / fig_h, strip_w / fig_w, strip_h / fig_h))
    ax_bar = fig.add_axes((margin / fig_w, (label_h + strip_h + 0.1) / fig_h, strip_w / fig_w, bar_h / fig_h))
    # the strip spans [lo, hi]: pattern j is drawn over the j-th n-th of the axis, near its own code
    ax_img.imshow(strip, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", aspect="auto",
                  extent=(lo, hi, 0, 1))
    ax_img.set_xlim(lo, hi)
    ax_img.set_yticks([])
    ax_img.set_xlabel("code (patterns decoded at evenly spaced codes)", fontsize=8)
    ax_img.tick_params(labelsize=7)
    span = hi - lo
    for iv in intervals:
        ax_bar.add_patch(Rectangle((iv["lo"], 0), iv["hi"] - iv["lo"], 1, color=iv.get("colour", "#888888")))
        if iv["lo"] > lo:
            ax_img.axvline(iv["lo"], color="k", lw=0.8)
            ax_bar.axvline(iv["lo"], color="k", lw=0.8)
        ax_bar.text((iv["lo"] + iv["hi"]) / 2, 0.5, iv["name"], ha="center", va="center", fontsize=7,
                    rotation=90 if (iv["hi"] - iv["lo"]) < 0.06 * span else 0)
    ax_bar.set_xlim(lo, hi)
    ax_bar.set_ylim(0, 1)
    ax_bar.set_xticks([])
    ax_bar.set_yticks([])
    ax_bar.set_title(f"decoded spectrum, {k}x{k} kernels: {len(intervals)} intervals", fontsize=9)
    out = Path(model_dir) / FIGURE
    atomic_write(out, lambda p: fig.savefig(p, dpi=150, format="png"))
    plt.close(fig)
    return out
