"""The report's tables (pandas, one row per model / cluster / layer / threshold) and the formatting of their
cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kernelatlas.jobs.report.runs import UNCLASSIFIED_COLOUR
from kernelatlas.jobs.report.scan import CURVE_GRID, RunStats


def fmt_threshold(t: float) -> str:
    """A threshold in column names and headers: two decimals (0.80), more only when it has them (0.875)."""
    return f"{t:.2f}" if round(t, 2) == t else f"{t:g}"


def share_of(num: Any, den: Any) -> Any:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.asarray(den) > 0, np.asarray(num, dtype=np.float64) / np.maximum(den, 1), np.nan)


def fmt_pct(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return "<0.1%" if 0 < x < 0.0005 else f"{100 * x:.1f}%"


def fmt_count(x: Any) -> str:
    return f"{int(x):,}"


def model_table(stats: RunStats, models: Any) -> Any:
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
        out[f"classified_{fmt_threshold(t)}"] = per_model[stats.cls_col(t)]
    for t in stats.thresholds:
        out[f"share_{fmt_threshold(t)}"] = share_of(per_model[stats.cls_col(t)], per_model["live"])
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
        out[f"share_in_sample_{fmt_threshold(t)}"] = share_of(cls_in, live_in) if has_split else np.nan
        out[f"share_held_out_{fmt_threshold(t)}"] = share_of(cls_ho, live_ho) if has_split else np.nan
    for t in stats.thresholds:
        control = stats.run.control(t)
        out[f"control_{fmt_threshold(t)}"] = np.nan if control is None else control


def total_row(stats: RunStats) -> dict[str, Any]:
    lay = stats.layers
    row: dict[str, Any] = {"kernel_size": stats.run.kernel_size, "kind": stats.run.kind, "run_id": stats.run.run_id,
                           "models": int(lay["model_id"].nunique()), "layers": len(lay),
                           "kernels": int(lay["assigned"].sum()), "dead": int(lay["dead"].sum()),
                           "live": int(lay["live"].sum())}
    for t in stats.thresholds:
        row[f"classified_{fmt_threshold(t)}"] = int(lay[stats.cls_col(t)].sum())
    for t in stats.thresholds:
        row[f"share_{fmt_threshold(t)}"] = float(share_of(row[f"classified_{fmt_threshold(t)}"], row["live"]))
    import pandas as pd

    sums = {c: [int(lay[c].sum())] for c in ["live", "live_ho"] + [stats.cls_col(t) for t in stats.thresholds]
            + [f"cls_ho_{t!r}" for t in stats.thresholds]}
    frame = pd.DataFrame(index=[0])
    _split_columns(frame, sums, stats)
    row.update({k: (v.item() if hasattr(v, "item") else v) for k, v in frame.iloc[0].to_dict().items()})
    return row


def cluster_table(stats: RunStats) -> Any:
    """Per cluster: interval, kernels with that stored label, share of the live kernels of the run."""
    import pandas as pd

    lay = stats.layers
    live = int(lay["live"].sum())
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(stats.run.clusters):
        n = int(lay[f"n_{i}"].sum())
        rows.append({"cluster": c.name, "lo": c.lo, "hi": c.hi, "colour": c.colour, "kernels": n,
                     "share": float(share_of(n, live))})
    labelled = sum(r["kernels"] for r in rows)
    rows.append({"cluster": "unclassified", "lo": None, "hi": None, "colour": UNCLASSIFIED_COLOUR,
                 "kernels": live - labelled, "share": float(share_of(live - labelled, live))})
    return pd.DataFrame(rows)


def layer_table(stats: RunStats, models: Any) -> Any:
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
        out[f"share_{c.name}"] = share_of(lay[f"n_{i}"], lay["live"])
        labelled += lay[f"n_{i}"].to_numpy()
    out["share_unclassified"] = share_of(lay["live"].to_numpy() - labelled, lay["live"])
    for t in stats.thresholds:
        out[f"share_classified_{fmt_threshold(t)}"] = share_of(lay[stats.cls_col(t)], lay["live"])
    return out.sort_values(["model_id", "depth", "layer_id"], kind="stable").reset_index(drop=True)


def curve_table(all_stats: Sequence[RunStats], models: Any) -> Any:
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
                "share": share_of(per_model.get(int(m), np.zeros(len(CURVE_GRID))), int(live[m]))[::every]}))
        frames.append(pd.DataFrame({
            "kernel_size": st.run.kernel_size, "kind": st.run.kind, "run_id": st.run.run_id, "model_id": -1,
            "model": "ALL", "threshold": grid, "share": share_of(total, int(live.sum()))[::every]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
