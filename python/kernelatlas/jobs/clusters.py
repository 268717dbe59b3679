"""Naming the clusters of a trained autoencoder (Babaiee et al., ICLR 2024): decode a dense grid of codes along
the one-dimensional code axis (the "spectrum"), cut it into intervals over which the decoded pattern stays the
same, and name each interval by the analytic template it matches (:mod:`kernelatlas.templates`).

The cut (ours; the paper cut its spectrum by eye) is anchored on where real kernels are (``rule="density"``,
the default).  Training records a histogram of the codes of every kernel it used (model.json
``training.code_density``); smoothed with a Gaussian (sigma ``bandwidth`` times the code range, at least one
grid step), its modes are where clusters of kernels sit, and the decoded pattern at each mode is an anchor.
Modes whose prominence (how far the density falls, on the way to a higher mode or the end of the axis, before
it rises again) is below ``min_prominence`` times the highest mode are sampling noise and are ignored.
Neighbouring anchors whose patterns have a cosine >= ``merge_cos`` are one cluster (the denser mode is kept).
Between two neighbouring anchors the axis is cut where the decoded pattern becomes closer (cosine) to the next
anchor than to the previous one -- where it switches more than once, at the switch where the density is
lowest -- and the outermost intervals extend to the ends of the range.  Each interval therefore holds one
anchor, and the stretches of the axis where (almost) no kernel's code falls -- the decoder's transitions
between clusters -- never make intervals of their own.

Why: the earlier rule, kept as ``rule="first"``, walks up the grid and lets a pattern join the current
interval while its cosine with the interval's FIRST pattern is >= ``merge_cos``; an interval that starts on a
transition pattern then ends inside the next cluster's stretch of the axis and splits that cluster in two.  On
the planted-cluster check of tests/test_train_clusters.py (12 seeds per kernel size, training and cut at their
defaults) that failed 3 of 12 models at 3x3; the density rule, cutting the same models, passed all 12, and
made 6-8 intervals per model where the first-pattern rule made 17-27.  Its remaining failures then (3 of 12 at
5x5, 1 of 12 at 7x7; the first-pattern rule failed the same models) were models that training left with two
clusters on one saturated end of the code, which no cut can separate; training's penalty on code
pre-activations beyond +-4 (``kernelatlas.train``'s ``code_penalty``, ``code_margin``) fixed them: 12 of 12 at
every size.  A model whose model.json records no code density
(trained before it was recorded, or built by hand) is cut with the "first" rule, and clusters.json says so.

Interval edges lie halfway between grid points; the first interval starts at the code range's low end and the
last ends at its high end, closed, so the intervals tile the whole range ([0, 1] for a sigmoid code).

The result is ``clusters.json`` in the model directory -- meant to be read and edited by hand: rename an
interval, or merge neighbours (:func:`merge_intervals`, or delete one and move the other's edge);
:meth:`kernelatlas.Autoencoder.load` reads the intervals' ``lo``, ``hi`` and ``name`` and nothing else.  Each
interval also records its prototype (the pattern decoded at its anchor, the mode, with the density rule; at its
centre with the first-pattern rule), a colour for figures, and its best template match; with the density rule
also its ``anchor`` (the code of its mode) and ``share`` (the share of the training kernels' codes inside it).
``spectrum.png`` draws the decoded patterns along the axis with the intervals (and the density, when known).
"""

from __future__ import annotations

import colorsys
import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas._files import atomic_write
from kernelatlas.autoencoder import Autoencoder
from kernelatlas.templates import best_match, templates

__all__ = ["RULES", "THRESHOLDS", "clusters", "code_density", "code_range", "merge_intervals", "read_spec"]

FORMAT = "kernelatlas-clusters"
FORMAT_VERSION = 1
THRESHOLDS = (0.8, 0.85, 0.9)  # reconstruction cosines to report coverage at (the paper's value is not public)
SPEC = "clusters.json"
FIGURE = "spectrum.png"
RULES = ("density", "first")
DEFAULT_BANDWIDTH = 0.01       # Gaussian sigma of the density smoothing, as a share of the code range
DEFAULT_MIN_PROMINENCE = 0.05  # a mode must stand this share of the highest mode above its key saddle


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


def code_density(model: Autoencoder, codes: np.ndarray, bandwidth: float = DEFAULT_BANDWIDTH) -> np.ndarray | None:
    """The density of the training kernels' codes (model.json ``training.code_density``, a histogram) at
    ``codes``, smoothed with a Gaussian of sigma ``bandwidth`` times the histogram's range (at least one bin),
    in kernels per unit of code; None when the model records no density (or an empty one)."""
    hist = model.info.get("training", {}).get("code_density") or {}
    counts = np.asarray(hist.get("counts", []), dtype=np.float64)
    if not len(counts) or not np.isfinite(counts).all() or counts.sum() <= 0 or "lo" not in hist or "hi" not in hist:
        return None
    lo, hi = float(hist["lo"]), float(hist["hi"])
    if not hi > lo:
        return None
    width = (hi - lo) / len(counts)
    centres = lo + (np.arange(len(counts)) + 0.5) * width
    sigma = max(float(bandwidth) * (hi - lo), width)
    z = (np.asarray(codes, dtype=np.float64)[:, None] - centres[None, :]) / sigma
    return (np.exp(-0.5 * z * z) @ counts) / (sigma * np.sqrt(2 * np.pi))


def clusters(
    model_dir: str | os.PathLike[str],
    *,
    samples: int = 200,
    rule: str = "density",
    merge_cos: float = 0.9,
    match_cos: float = 0.7,
    min_width: float = 0.0,
    bandwidth: float = DEFAULT_BANDWIDTH,
    min_prominence: float = DEFAULT_MIN_PROMINENCE,
    plot: bool = True,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Cut the code axis of the model in ``model_dir`` into named intervals; write clusters.json (and, with
    ``plot``, spectrum.png) there and return the intervals (dicts as in clusters.json).

    ``rule``: how the axis is cut (the module docstring has the details and the reasons).  "density" (default):
    one interval per mode of the training kernels' code density -- modes of the density smoothed with a
    Gaussian of sigma ``bandwidth`` (a share of the code range, at least one grid step) that stand at least
    ``min_prominence`` times the highest mode above the density between them and any higher mode; the pattern
    decoded at each mode is its anchor; neighbouring anchors with a cosine >= ``merge_cos`` merge (the denser
    mode stays); the cut between neighbouring anchors falls where the decoded pattern becomes closer to the next
    anchor than to the previous one.  Anchoring on the kernels means an interval can no longer start on a
    transition pattern (where few kernels are) and split the next cluster, which the "first" rule did for 3 of
    12 seeds of the 3x3 planted-cluster check.  "first": walking up the grid, a pattern stays in the current
    interval while its cosine with the interval's first pattern is at least ``merge_cos``.  A model without a
    recorded code density (older or hand-built models) is cut with "first"; clusters.json ``options.rule``
    records the rule used.

    ``samples``: grid points decoded along the axis (the edges are halfway between them).  ``match_cos``: an
    interval takes its best template's name when their cosine (centred, signs count) is at least this, else a
    numbered name ``pattern_N``.  ``min_width``: intervals narrower than this (in code units) are merged into
    the neighbour whose prototype is closer (0: keep every interval).  Names that occur twice get suffixes
    (``dx+``, ``dx+_2``) in axis order.  Deterministic: the same model gives the same intervals.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}, got {rule!r}")
    if not -1.0 <= merge_cos <= 1.0 or not -1.0 <= match_cos <= 1.0:
        raise ValueError(f"merge_cos and match_cos are cosines in [-1, 1], got {merge_cos} and {match_cos}")
    if min_width < 0:
        raise ValueError(f"min_width must be >= 0, got {min_width}")
    if not bandwidth > 0 or not 0 <= min_prominence <= 1:
        raise ValueError(f"bandwidth must be > 0 and min_prominence in [0, 1], got {bandwidth} and {min_prominence}")
    root = Path(model_dir)
    model = Autoencoder.load(root)
    lo, hi = code_range(model)
    grid = np.linspace(lo, hi, samples)
    patterns = _decode(model, grid, threads)
    unit = _centred_unit(patterns)
    # smoothing finer than the grid would leave modes between grid points: sigma is at least one grid step
    density = code_density(model, grid, max(bandwidth, 1.0 / (samples - 1)))
    options: dict[str, Any] = {"samples": samples, "rule": rule, "merge_cos": merge_cos, "match_cos": match_cos,
                               "min_width": min_width}
    if rule == "density" and density is None:
        options["rule"] = "first"
        options["rule_note"] = ("the model records no code density (model.json training.code_density: trained "
                                "before it was recorded, or built by hand), so the density rule could not be used")
    anchors: list[float] | None = None
    if options["rule"] == "density":
        assert density is not None
        options |= {"bandwidth": bandwidth, "min_prominence": min_prominence}
        modes = _modes(density, min_prominence) or [int(np.argmax(density))]
        kept = _merge_anchors(unit, density, modes, merge_cos)
        starts = [0] + [_cut(unit, density, a, b) for a, b in itertools.pairwise(kept)]
        anchors = [float(grid[i]) for i in kept]
    else:
        starts = _split(unit, merge_cos)
    edges = [lo] + [float((grid[s - 1] + grid[s]) / 2) for s in starts[1:]] + [hi]
    bounds = list(itertools.pairwise(edges))
    if min_width > 0:
        bounds, anchors = _absorb_narrow(model, bounds, min_width, threads, anchors)
    intervals = _describe(model, bounds, match_cos, threads, anchors)
    spec = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kernel_size": model.kernel_size,
        "code_range": [lo, hi],
        "intervals": intervals,
        "thresholds": list(THRESHOLDS),
        "options": options,
        "note": ("intervals are [lo, hi) on the code axis, the last closed at hi; the engine reads lo, hi and name "
                 "only. Rename freely; to merge neighbours, delete one and set the other's lo/hi to cover both (or "
                 "use kernelatlas.jobs.clusters.merge_intervals); a code in a gap between intervals gets label -1."),
    }
    _write_spec(root, spec)
    # check now that the engine accepts what was written, not at the first assign
    Autoencoder.load(root)
    if plot:
        draw_spectrum(root, grid=grid, patterns=patterns, intervals=intervals, density=density)
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
    one named ``name`` (default: the first of ``names``), with a new prototype and template match: decoded at
    the anchor of the merged interval that holds the largest share of the kernels when they have anchors (the
    density rule), else at the new centre.  Returns the new intervals.  Non-neighbours cannot be merged (the
    engine's clusters are single intervals): give them one name instead, or merge every interval between them
    too."""
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
    anchors = None
    if all(ivs[i].get("anchor") is not None for i in idx):
        densest = max(idx, key=lambda i: (float(ivs[i].get("share", 0.0)), -i))
        anchors = [float(ivs[densest]["anchor"])]
    merged = _describe(model, [(ivs[idx[0]]["lo"], ivs[idx[-1]]["hi"])], match_cos=-2.0,
                       threads=None, anchors=anchors)[0]
    merged["name"] = name or names[0]
    merged["colour"] = ivs[idx[0]].get("colour", merged["colour"])
    merged["merged_from"] = [ivs[i]["name"] for i in idx]
    spec["intervals"] = ivs[:idx[0]] + [merged] + ivs[idx[-1] + 1:]
    _write_spec(root, spec)
    Autoencoder.load(root)
    if plot:
        lo, hi = spec["code_range"] if "code_range" in spec else code_range(model)
        grid = np.linspace(lo, hi, int(spec.get("options", {}).get("samples", 200)))
        bandwidth = float(spec.get("options", {}).get("bandwidth", DEFAULT_BANDWIDTH))
        draw_spectrum(root, grid=grid, patterns=_decode(model, grid, None), intervals=spec["intervals"],
                      density=code_density(model, grid, bandwidth))
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
    """The "first" rule: grid indices where intervals start; a pattern joins the open interval while
    cos(pattern, first) >= merge_cos.  Flat patterns (zero rows) group with each other."""
    starts = [0]
    first = unit[0]
    for i in range(1, len(unit)):
        both_flat = not first.any() and not unit[i].any()
        if both_flat or float(unit[i] @ first) >= merge_cos:
            continue
        starts.append(i)
        first = unit[i]
    return starts


def _modes(density: np.ndarray, min_prominence: float) -> list[int]:
    """Grid indices of the modes of ``density`` whose prominence is at least ``min_prominence`` times the
    highest mode, in axis order.  The density is taken as 0 beyond the ends of the range, so a pile of codes at
    an end (a saturated sigmoid) is a mode.  A mode's prominence: its height minus the higher of the lowest
    densities on its two sides, each side searched up to a higher density or the end of the range (the
    topographic prominence; a mode that is the highest has its full height)."""
    f = np.concatenate([[0.0], np.asarray(density, dtype=np.float64), [0.0]])
    n = len(density)
    peaks = []
    i = 1
    while i <= n:  # runs of equal values; a run is a peak when both its neighbours are lower
        j = i
        while j < n and f[j + 1] == f[i]:
            j += 1
        if f[i - 1] < f[i] and f[j + 1] < f[i]:
            peaks.append((i + j) // 2)
        i = j + 1
    if not peaks:
        return []
    top = max(f[p] for p in peaks)
    keep = []
    for p in peaks:
        h = f[p]
        sides = []
        for step in (-1, 1):
            low, q = h, p
            while 0 < q < n + 1 and f[q + step] <= h:
                q += step
                low = min(low, f[q])
            sides.append(low)
        if h - max(sides) >= min_prominence * top:
            keep.append(p - 1)
    return keep


def _similar(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine of two rows of _centred_unit; two flat patterns count as the same."""
    if not u.any() and not v.any():
        return 1.0
    return float(u @ v)


def _merge_anchors(unit: np.ndarray, density: np.ndarray, modes: Sequence[int], merge_cos: float) -> list[int]:
    """Merge neighbouring anchors (grid indices of modes) whose patterns have a cosine >= merge_cos, the most
    similar pair first; of a pair, the mode with the higher density stays (the left one on a tie)."""
    kept = list(modes)
    while len(kept) > 1:
        cos = [_similar(unit[a], unit[b]) for a, b in itertools.pairwise(kept)]
        i = int(np.argmax(cos))
        if cos[i] < merge_cos:
            break
        del kept[i + 1 if density[kept[i]] >= density[kept[i + 1]] else i]
    return kept


def _cut(unit: np.ndarray, density: np.ndarray, a: int, b: int) -> int:
    """Where the interval of anchor ``b`` starts, between neighbouring anchors at grid indices a < b: the first
    grid point of a switch from patterns closer to anchor a to patterns closer to anchor b (cosine); of several
    switches, the one with the lowest density (the first on a tie)."""
    rows = unit[a:b + 1]
    nearer_b = rows @ unit[b] > rows @ unit[a]
    nearer_b[0], nearer_b[-1] = False, True  # an anchor is nearest itself (flat anchors have cosine 0 with all)
    switches = [a + j for j in range(1, len(rows)) if nearer_b[j] and not nearer_b[j - 1]]
    return min(switches, key=lambda s: (float(density[s - 1] + density[s]), s))


def _absorb_narrow(model: Autoencoder, bounds: list[tuple[float, float]], min_width: float,
                   threads: int | None, anchors: list[float] | None = None
                   ) -> tuple[list[tuple[float, float]], list[float] | None]:
    """Merge intervals narrower than min_width into the neighbour with the closer prototype (decoded at the
    anchors when given, else at the centres), narrowest first; the merged interval keeps the neighbour's
    anchor."""
    bounds = list(bounds)
    anchors = None if anchors is None else list(anchors)
    while len(bounds) > 1:
        widths = [hi - lo for lo, hi in bounds]
        i = int(np.argmin(widths))
        if widths[i] >= min_width:
            break
        at = np.array(anchors if anchors is not None else [(lo + hi) / 2 for lo, hi in bounds])
        unit = _centred_unit(_decode(model, at, threads))
        left = float(unit[i] @ unit[i - 1]) if i > 0 else -np.inf
        right = float(unit[i] @ unit[i + 1]) if i + 1 < len(bounds) else -np.inf
        j = i - 1 if left >= right else i + 1
        lo, hi = min(i, j), max(i, j)
        bounds[lo:hi + 1] = [(bounds[lo][0], bounds[hi][1])]
        if anchors is not None:
            anchors[lo:hi + 1] = [anchors[j]]
    return bounds, anchors


def _shares(model: Autoencoder, bounds: Sequence[tuple[float, float]]) -> list[float] | None:
    """The share of the training kernels' codes in each interval, from model.json's histogram (within a bin,
    codes taken as spread evenly); None without a histogram."""
    hist = model.info.get("training", {}).get("code_density") or {}
    counts = np.asarray(hist.get("counts", []), dtype=np.float64)
    if not len(counts) or counts.sum() <= 0:
        return None
    edges = np.linspace(float(hist["lo"]), float(hist["hi"]), len(counts) + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(counts)]) / counts.sum()
    return [float(np.interp(hi, edges, cumulative) - np.interp(lo, edges, cumulative)) for lo, hi in bounds]


def _describe(model: Autoencoder, bounds: Sequence[tuple[float, float]], match_cos: float,
              threads: int | None, anchors: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """The intervals as clusters.json holds them: prototypes decoded at ``anchors`` when given (the density
    rule, which also records each anchor and share), else at the centres."""
    k = model.kernel_size
    bank = templates(k) if k >= 3 and k % 2 == 1 else {}
    at = np.array(anchors if anchors is not None else [(lo + hi) / 2 for lo, hi in bounds], dtype=np.float64)
    protos = _decode(model, at, threads)
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
    shares = _shares(model, bounds) if anchors is not None else None
    out = []
    for i, ((lo, hi), name, (match, cos), colour, proto) in enumerate(
            zip(bounds, names, matches, colours, protos, strict=True)):
        iv: dict[str, Any] = {"lo": float(lo), "hi": float(hi), "name": name, "template": match,
                              "template_cos": round(float(cos), 4), "colour": colour}
        if anchors is not None:
            iv["anchor"] = float(at[i])
            if shares is not None:
                iv["share"] = round(shares[i], 6)
        iv["prototype"] = np.round(proto.reshape(k, k), 6).tolist()
        out.append(iv)
    return out


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
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out


def _write_spec(root: Path, spec: dict[str, Any]) -> None:
    text = json.dumps(spec, indent=1)
    atomic_write(root / SPEC, lambda p: Path(p).write_text(text))


# ---------------------------------------------------------------------------------------------- the figure


def draw_spectrum(model_dir: str | os.PathLike[str], *, grid: np.ndarray, patterns: np.ndarray,
                  intervals: Sequence[dict[str, Any]], columns: int = 50,
                  density: np.ndarray | None = None) -> Path:
    """spectrum.png: ``columns`` decoded patterns evenly along the code axis (each centred and scaled to its
    own max |w|; red positive, blue negative), under a bar of the intervals in their colours with their names
    and their edges drawn through the strip; ``density`` (at ``grid``), when given, is drawn over the bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    k = math.isqrt(patterns.shape[1])
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
    if density is not None and np.max(density) > 0:
        ax_bar.plot(grid, 0.92 * np.asarray(density) / np.max(density), color="k", lw=0.6)
    ax_bar.set_xlim(lo, hi)
    ax_bar.set_ylim(0, 1)
    ax_bar.set_xticks([])
    ax_bar.set_yticks([])
    ax_bar.set_title(f"decoded spectrum, {k}x{k} kernels: {len(intervals)} intervals", fontsize=9)
    out = Path(model_dir) / FIGURE
    atomic_write(out, lambda p: fig.savefig(p, dpi=150, format="png"))
    plt.close(fig)
    return out
