"""The runs a report is about: :func:`load_run` validates one run.json (:class:`RunInfo`, with its clusters),
:func:`find_runs` picks the latest completed run per (kernel size, kind, models) by the run-directory rule
(:func:`kernelatlas.corpus.rundir.latest`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas.corpus import rundir
from kernelatlas.corpus.rundir import RunError
from kernelatlas.holdout import Holdout, control_at

RUN_MODES = ("autoencoder", "prototypes")

RUN_KINDS = ("depthwise", "regular", "grouped", "all")

UNCLASSIFIED_COLOUR = "#c9c9c9"
# tab10 without its grey (grey means unclassified / no cluster here), then darker tab20b/c shades
FALLBACK_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                    "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")

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
    return _run_info(rundir.require(root, run_id, rundir.ASSIGN_FORMAT), root)


def _run_info(run: rundir.RunDir, root: Path) -> RunInfo:
    """The checks of :func:`load_run` on a completed assign run already read."""
    spec, spec_path, path, run_id = run.info or {}, run.spec_path, run.path, run.run_id
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
    dirs: list[rundir.RunDir] = []
    for found in rundir.scan(root):  # each run.json read once
        if found.info is not None and found.format != rundir.ASSIGN_FORMAT:
            continue  # a quality run: its own report section
        try:
            valid[found.run_id] = _run_info(rundir.check(found, rundir.ASSIGN_FORMAT), root)
        except RunError as exc:
            notes.append(f"skipped: {exc}")
        else:
            dirs.append(found)
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
