"""`kernelatlas assign` at corpus scale: every k x k shard of a corpus through the fused native engine, into a
run directory beside the corpus (DESIGN.md):

    CORPUS/runs/RUN_ID/run.json                 what produced the run; written last (the run's commit)
    CORPUS/runs/RUN_ID/kK/labels-NNNNNN.npy     int16 per corpus shard NNNNNN, same row order
    CORPUS/runs/RUN_ID/kK/scores-NNNNNN.npy     float32 cosine(kernel, reconstruction) or best prototype cosine
    CORPUS/runs/RUN_ID/kK/codes-NNNNNN.npy      float32 1-D codes (autoencoder mode)
    CORPUS/runs/RUN_ID/assign_layers.parquet    per layer: layer_id, kernels, live, assigned_share, share_<cluster>

Labels: cluster index; -1 unclassified (below the threshold, code in no interval, or a dead / flat /
non-finite kernel -- those have score 0 and code NaN); -2 rows of layers not of the run's kind (not assigned).

Resumable shard by shard: a shard's outputs are written into temp files, fsynced and renamed (labels last),
so a shard is done exactly when its labels file exists; a killed run restarts at the first shard without one
and, the engine being deterministic, gives identical output.  RUN_ID defaults to a short hash
of (mode, model contents, options, corpus generation), so rerunning the same command resumes the same run.
Reading and writing overlap computing: the kernel is asked to read the next chunk ahead (MADV_WILLNEED), the
engine writes its outputs straight into aligned staging blocks, and a background thread writes full blocks to
disk with O_DIRECT (no page-cache copy or writeback on the engine's CPUs); labels are counted per layer by one
native pass.  BENCHMARKS.md has the speed against the in-memory engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from kernelatlas._files import (
    SequentialFile,
    advise_readahead,
    atomic_write,
    atomic_write_bytes,
    fsync_dir,
    npy_header,
)
from kernelatlas.corpus import Corpus, CorpusError
from kernelatlas.corpus.rundir import ASSIGN_FORMAT, RunLock, output_path, writable_run_dir
from kernelatlas.corpus.store import map_shard

__all__ = ["assign_corpus", "load_prototypes", "run_id_for"]

LABEL_OTHER_KIND = -2
OPTIONS = "options.json"  # what the run was started with: a resume with other options is refused


def load_prototypes(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str]]:
    """Prototypes [P, k, k] and names from a .npy ([P, k, k] or [P, k*k] square) or a text file of blocks
    "NAME:" followed by k rows of k numbers (the layout of the master-key-filter file)."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False).astype(np.float32)
        if arr.ndim == 2:
            k = round(arr.shape[1] ** 0.5)
            arr = arr.reshape(len(arr), k, k)
        return arr, [f"prototype_{i}" for i in range(len(arr))]
    blocks: list[list[list[float]]] = []
    names: list[str] = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.endswith(":"):
            names.append(re.sub(r"\W+", "_", line[:-1].strip()).strip("_").lower() or f"prototype_{len(names)}")
            blocks.append([])
            continue
        if not blocks:
            raise ValueError(f"{p}: numbers before the first 'NAME:' line")
        blocks[-1].append([float(v) for v in line.replace(",", " ").split()])
    arr = np.array(blocks, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"{p}: every prototype must be k rows of k numbers")
    return arr, names


def _model_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.json", "autoencoder.safetensors", "clusters.json"):
        f = model_dir / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _check_options(root: Path, rid: str, options: dict[str, Any]) -> None:
    """Record the run's options when it starts; refuse to resume (or reuse the id of) a run made with others."""
    path = root / OPTIONS
    if path.is_file():
        try:
            started = json.loads(path.read_text())
        except (OSError, ValueError):
            started = None
        if started != options:
            raise CorpusError(f"run {rid} in {root} was started with other options ({path}: {started}; now: "
                              f"{options}): its files cannot be reused.  Give this run another --run id (or "
                              "none: the id is derived from the options), or delete the folder")
        return
    done = root / "run.json"
    if done.is_file():  # a run written before options.json existed
        try:
            earlier = json.loads(done.read_text()).get("options")
        except (OSError, ValueError, AttributeError):
            earlier = None
        if earlier != options:
            raise CorpusError(f"run {rid} in {root} was made with other options ({done}): give this run another "
                              "--run id, or delete the folder")
    elif any(root.glob("k*/labels-*.npy")):
        raise CorpusError(f"{root} holds label files of a run whose options are unknown: give this run another "
                          "--run id, or delete the folder")
    atomic_write_bytes(path, json.dumps(options, indent=1, sort_keys=True).encode())
    fsync_dir(root)


def run_id_for(corpus: Corpus, options: dict[str, Any]) -> str:
    blob = json.dumps({**options, "corpus_generation": corpus.manifest.get("generation", 0)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_chunk_rows(row_bytes: int) -> int:
    """Kernels per engine call over a corpus: ~256 MiB of input, between 2^16 and 2^22 rows.  Fewer, larger
    calls cost less per kernel (a fork/join, the per-chunk label counts and Python glue: 1M-row chunks of 3x3
    kernels ran at 0.92 of the in-memory speed, 4M-row ones at 0.94), while the cap keeps the output staging
    blocks (3 per output file) near 120 MiB."""
    return int(min(1 << 22, max(1 << 16, (256 << 20) // max(1, int(row_bytes)))))


@dataclass
class _Spans:
    """Rows of one shard belonging to layers of the run's kind, merged into contiguous runs."""

    runs: list[tuple[int, int]]
    layers: np.ndarray  # [n, 3] layer_id, row_start, rows


def _check_disjoint(corpus: Corpus, shard: str, layers: np.ndarray) -> None:
    """Layers own disjoint row ranges of a shard inside it (DESIGN.md); a damaged layers table would otherwise
    misalign every output silently.  ``layers``: [n, 3] layer_id, row_start, rows."""
    arr = layers[np.argsort(layers[:, 1], kind="stable")]
    bad = np.flatnonzero(arr[1:, 1] < arr[:-1, 1] + arr[:-1, 2]) if len(arr) > 1 else np.zeros(0, np.int64)
    if len(bad) or (len(arr) and arr[0, 1] < 0):
        i = int(bad[0]) if len(bad) else 0
        other = arr[min(i + 1, len(arr) - 1), 0]
        raise CorpusError(f"{corpus.root / 'layers.parquet'}: layers {arr[i, 0]} and {other} "
                          f"claim overlapping rows of {shard}: the corpus is damaged; outputs would be misaligned, "
                          "so nothing is assigned")


def _spans(corpus: Corpus, shard: str, kind: str, models: Sequence[int] | None = None) -> _Spans:
    lay = corpus.layers
    sel = lay[(lay["shard"] == shard) & (lay["rows"] > 0)]
    _check_disjoint(corpus, shard, sel[["layer_id", "row_start", "rows"]].to_numpy(dtype=np.int64))
    if kind != "all":
        sel = sel[sel["kind"] == kind]
    if models is not None:
        sel = sel[sel["model_id"].isin(list(models))]
    arr = sel[["layer_id", "row_start", "rows"]].to_numpy(dtype=np.int64)
    arr = arr[np.argsort(arr[:, 1], kind="stable")] if len(arr) else arr.reshape(0, 3)
    runs: list[tuple[int, int]] = []
    for _, a, n in arr:
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], int(a + n))
        else:
            runs.append((int(a), int(a + n)))
    return _Spans(runs, arr)


def _layer_counts(layers: np.ndarray, a: int, labels: np.ndarray, scores: np.ndarray, codes: np.ndarray | None,
                  n_labels: int, into: dict[int, np.ndarray]) -> None:
    """Add the label counts (index 0: -1, i + 1: cluster i) and the dead-kernel count (last) of rows
    [a, a + len(labels)) to ``into[layer_id]`` for every layer of ``layers`` ([n, 3] layer_id, row_start, rows,
    sorted by row_start) overlapping them.  Dead / flat / non-finite kernels have code NaN (autoencoder mode),
    score 0 and label -1 (prototype mode).  One native pass over the rows."""
    from kernelatlas import _core

    b = a + len(labels)
    first = max(0, int(np.searchsorted(layers[:, 1], a, side="right")) - 1)
    last = int(np.searchsorted(layers[:, 1], b, side="left"))
    sel = layers[first:last]
    starts = np.clip(sel[:, 1], a, b) - a
    stops = np.clip(sel[:, 1] + sel[:, 2], a, b) - a
    keep = stops > starts
    sel, starts, stops = sel[keep], starts[keep], stops[keep]
    values = codes if codes is not None else scores
    counts = _core.label_counts(labels, values, starts, stops, n_labels, codes is not None)
    _merge_counts(into, dict(zip(sel[:, 0].tolist(), counts, strict=True)))


def _merge_counts(into: dict[int, np.ndarray], part: Mapping[int, np.ndarray]) -> None:
    """Add per-layer label counts ``part`` to ``into`` (integer sums: the order parts arrive in does not matter)."""
    for layer_id, row in part.items():
        acc = into.get(layer_id)
        if acc is None:
            into[layer_id] = row.copy()
        else:
            acc += row


def _chunks(runs: Sequence[tuple[int, int]], chunk_rows: int) -> list[tuple[int, int]]:
    """The engine calls over row ranges ``runs``: pieces of at most ``chunk_rows`` rows, in order."""
    return [(a0, min(a0 + chunk_rows, b)) for a, b in runs for a0 in range(a, b, chunk_rows)]


ROW_ALIGN = 2048  # cluster tasks start at multiples of this row: every output file's offset is then 4 KiB-aligned


def temp_paths(final: Mapping[str, Path]) -> dict[str, Path]:
    """Where a shard's outputs are written before they are renamed into place."""
    return {n: f.with_name(f".{f.name}.tmp") for n, f in final.items()}


def _create_outputs(tmp: Mapping[str, Path], rows: int) -> None:
    """A shard's temp output files at full size, the .npy header written and the rest sparse, for cluster tasks
    to fill in (each its own rows)."""
    for name, path in tmp.items():
        dtype = _ShardOutput._DTYPE[name]
        with open(path, "wb") as fh:
            fh.write(npy_header(dtype.str, (rows,), _ShardOutput.HEADER))
            fh.truncate(_ShardOutput.HEADER + rows * dtype.itemsize)


def _commit_outputs(final: Mapping[str, Path], tmp: Mapping[str, Path]) -> None:
    """Rename a shard's finished output files into place, labels last (its labels file marks the shard done)."""
    for name in [n for n in ("codes", "scores", "labels") if n in final]:
        os.replace(tmp[name], final[name])
    fsync_dir(final["labels"].parent)


class _ShardOutput:
    """The outputs of one shard (labels, scores and, with a model, codes), written in row order through
    :class:`SequentialFile`: ``buffers(a, b)`` hands the engine views of the files' staging blocks for rows
    [a, b) (writing fill values first for rows of other kinds before ``a``), so the engine writes its outputs
    in place; ``put`` counts their labels per layer (native, one pass) and appends them, and a background
    thread writes them to disk while the engine computes the next chunk.  The .npy header is one 4 KiB block,
    so the data starts block-aligned for O_DIRECT.  ``close()`` fsyncs; ``commit()`` renames the files into
    place, labels last."""

    HEADER = 4096
    _FILL: ClassVar[Mapping[str, float]] = {"labels": LABEL_OTHER_KIND, "scores": np.nan, "codes": np.nan}
    _DTYPE: ClassVar[Mapping[str, np.dtype]] = {"labels": np.dtype(np.int16), "scores": np.dtype(np.float32),
                                                "codes": np.dtype(np.float32)}

    def __init__(self, final: dict[str, Path], rows: int, chunk_rows: int, layers: np.ndarray, n_labels: int, *,
                 lo: int | None = None) -> None:
        """``lo``: write only rows [lo, rows) into the existing temp files (created at full size by
        :func:`_create_outputs`) -- a cluster task's part of the shard (``lo`` a multiple of ROW_ALIGN); closing
        neither fsyncs nor removes anything (the client does, once per shard)."""
        self.final = final
        self.rows = rows
        self.layers = layers
        self.n_labels = n_labels
        self.counts: dict[int, np.ndarray] = {}
        self.tmp = temp_paths(final)
        self._part = lo is not None
        self._files: dict[str, SequentialFile] = {}
        self._written = lo or 0
        self._open: tuple[int, int, dict[str, np.ndarray]] | None = None
        try:
            for name, path in self.tmp.items():
                item = self._DTYPE[name].itemsize
                block = max(1 << 22, chunk_rows * item + 2 * SequentialFile.ALIGN)
                if lo is None:
                    self._files[name] = SequentialFile(path, block=block)
                    self._files[name].write(npy_header(self._DTYPE[name].str, (rows,), self.HEADER))
                else:
                    self._files[name] = SequentialFile(path, block=block, offset=self.HEADER + lo * item)
        except BaseException:
            self.discard()
            raise

    def buffers(self, a: int, b: int) -> dict[str, np.ndarray]:
        """Writable views for rows [a, b) (b - a <= chunk_rows), to be filled by the engine, then ``put``."""
        self._fill_to(a)
        views = {name: f.reserve((b - a) * self._DTYPE[name].itemsize).view(self._DTYPE[name])
                 for name, f in self._files.items()}
        self._open = (a, b, views)
        return views

    def put(self) -> None:
        """Count and append the rows the engine wrote into the views of the last ``buffers`` call."""
        assert self._open is not None
        a, b, views = self._open
        _layer_counts(self.layers, a, views["labels"], views["scores"], views.get("codes"), self.n_labels, self.counts)
        for name, f in self._files.items():
            f.advance((b - a) * self._DTYPE[name].itemsize)
        self._written, self._open = b, None

    def close(self) -> None:
        """Write the rest (fill values) and fsync."""
        self._fill_to(self.rows)
        for f in self._files.values():
            f.close()

    def commit(self) -> None:
        _commit_outputs(self.final, self.tmp)

    def discard(self) -> None:
        """Stop writing and remove the temp files (a part: only stop; the files belong to the whole shard)."""
        for f in self._files.values():
            f.abandon()
        if not self._part:
            for path in self.tmp.values():
                path.unlink(missing_ok=True)

    def _fill_to(self, row: int) -> None:
        while self._written < row:
            n = min(row - self._written, 1 << 20)
            for name, f in self._files.items():
                f.write(np.full(n, self._FILL[name], self._DTYPE[name]).data)
            self._written += n


def assign_corpus(
    corpus: Corpus | str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    prototypes: str | os.PathLike[str] | None = None,
    threshold: float = 0.85,
    kind: str = "depthwise",
    run_id: str | None = None,
    threads: int | None = None,
    min_abs: float = 0.0,
    decoder: str = "auto",
    chunk_rows: int | None = None,
    models: Sequence[int | str] | None = None,
    progress: bool = True,
    command: str = "",
    cluster: Any = None,
    client: Any = None,
    task_rows: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> str:
    """Assign every kernel of the model's size (of layers of ``kind``: depthwise | regular | grouped | all) in
    the corpus; returns the run id.  Exactly one of ``model`` (a model directory) or ``prototypes`` (a file,
    see :func:`load_prototypes`).  ``chunk_rows``: kernels per engine call (default: ~256 MiB of input, at most
    2^22 rows; it changes no output, only the overhead per call and the staging memory, ~30 bytes a row).
    ``models``: only the layers of these models (ids or names; e.g. a per-model autoencoder's own model): the
    run then covers only the shards that hold them, and other rows are labelled -2.

    With an autoencoder, run.json also records the model's held-out split (so the report can give coverage on
    kernels the model never saw) and the random-kernel control: the share of random centred Gaussian kernels
    the model classifies at each threshold of :data:`kernelatlas.holdout.CONTROL_GRID`.

    ``cluster`` (a spec: ``local:N``, ``tcp://HOST:PORT``, a scheduler file; default $KERNELATLAS_CLUSTER) or
    ``client`` (a dask.distributed Client): run the shards as tasks of at most ``task_rows`` rows (default: one
    engine chunk) on a Dask cluster whose workers share the corpus folder; each task writes its rows of the
    shard's output files in place, and this process alone renames a shard's files once all its tasks are done
    and commits the run.  The files are byte-identical to an in-process run's (kernelatlas.cluster).

    ``device``: 'cpu' (the default), 'cuda' (every chunk streamed through the GPU: kernelatlas.gpu) or 'auto'
    (the GPU when one passes its self-check, else the CPU).  The cluster path runs on the workers' CPUs.

    ``precision`` (autoencoder runs): 'fp32' (default, exact), 'bf16' (CPUs with AVX512_BF16, workers
    included) or 'tf32' (the GPU's tensor cores) -- see :func:`kernelatlas.assign`; a run's id includes it, so
    runs of different precisions never mix."""

    from kernelatlas import gpu
    from kernelatlas.autoencoder import Autoencoder
    from kernelatlas.engine import prototype_engine

    if device == "auto":
        device = "cuda" if gpu.available() and gpu.self_check() is None else "cpu"
    if device == "cuda" and (cluster is not None or client is not None):
        raise ValueError("--device cuda runs in this process; with --cluster the workers use their CPUs: drop one")
    if precision not in ("fp32", "bf16", "tf32"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'tf32', got {precision!r}")
    if precision != "fp32" and prototypes is not None:
        raise ValueError(f"precision={precision!r} is for the autoencoder's encoder; prototype runs are fp32")
    gpu.check_precision(device, precision)
    if precision == "bf16" and cluster is None and client is None:  # (workers check their own CPUs)
        from kernelatlas import build_info

        info = build_info()
        if not info.get("bf16"):
            raise ValueError(f"precision='bf16' is not available: {info.get('bf16_note')}")
    c = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    if (model is None) == (prototypes is None):
        raise ValueError("give exactly one of --model MODEL or --prototypes FILE")
    if kind not in ("depthwise", "regular", "grouped", "all"):
        raise ValueError(f"kind must be depthwise, regular, grouped or all, got {kind!r}")
    if model is not None:
        mdir = Path(model)
        ae = Autoencoder.load(mdir)
        k = ae.kernel_size
        names = ae.cluster_names or ["classified"]
        clusters = []
        meta_path = mdir / "clusters.json"
        spec = json.loads(meta_path.read_text()).get("intervals", []) if meta_path.is_file() else []
        for i, name in enumerate(names):
            iv = spec[i] if i < len(spec) else {}
            lo, hi = (ae.clusters[i] if ae.clusters else (0.0, 1.0))
            clusters.append({"name": name, "lo": lo, "hi": hi, "colour": iv.get("colour"),
                             "prototype": iv.get("prototype")})
        options = {"mode": "autoencoder", "model": _model_digest(mdir), "threshold": threshold, "kind": kind,
                   "min_abs": min_abs, "decoder": decoder}
        if precision != "fp32":  # (absent for fp32: the ids of earlier fp32 runs stay as they were)
            options["precision"] = precision
        extra = {"holdout": ae.info.get("holdout")}  # + the control, computed when the run is committed
    else:
        protos, pnames = load_prototypes(prototypes)  # type: ignore[arg-type]
        k = protos.shape[1]
        engine = prototype_engine(protos)
        clusters = [{"name": n, "lo": None, "hi": None, "colour": None, "prototype": p.tolist()}
                    for n, p in zip(pnames, engine.normalized.reshape(-1, k, k), strict=True)]
        options = {"mode": "prototypes", "prototypes": hashlib.sha256(protos.tobytes()).hexdigest(),
                   "threshold": threshold, "kind": kind, "min_abs": min_abs}
        extra = {}
    model_ids = None if models is None else sorted(set(c.model_ids(models)))
    if model_ids is not None:
        options["models"] = model_ids
    shards = c.shards(k)
    if not shards:
        raise CorpusError(f"{c.root} stores no {k}x{k} kernels (sizes: {c.kernel_sizes or 'none'})")
    spans = {s: _spans(c, s, kind, model_ids) for s in shards}
    if model_ids is not None:
        shards = [s for s in shards if spans[s].runs]
        if not shards:
            raise CorpusError(f"{c.root}: models {model_ids} hold no stored {kind} {k}x{k} kernels")
    rid = run_id if run_id is not None else run_id_for(c, options)
    root = writable_run_dir(c.root, rid)
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if task_rows is not None and task_rows < 1:
        raise ValueError(f"task_rows must be >= 1, got {task_rows}")
    root.mkdir(parents=True, exist_ok=True)
    from kernelatlas.cluster import session

    with RunLock(root, verb="assign"), session(cluster, client) as cl:
        _check_options(root, rid, options)
        info_path = root / "run.json"
        if info_path.is_file() and json.loads(info_path.read_text()).get("completed"):
            return rid
        outdir = root / f"k{k}"
        if outdir.is_symlink():
            raise CorpusError(f"{outdir} is a symlink: replace it with a folder (or delete the run)")
        outdir.mkdir(exist_ok=True)
        _assign_shards(c, root, outdir, rid, shards, spans, k=k, model=model, prototypes=prototypes,
                       threshold=threshold, kind=kind, options=options, clusters=clusters, extra=extra,
                       model_ids=model_ids, threads=threads, min_abs=min_abs, decoder=decoder,
                       chunk_rows=chunk_rows, progress=progress, command=command,
                       runner=(ae if model is not None else engine), cluster=cl, task_rows=task_rows,
                       remote=(("autoencoder", str(Path(model).resolve()), options["model"]) if model is not None
                               else ("prototypes", protos)), device=device, precision=precision)
    return rid


def _assign_shards(c: Corpus, root: Path, outdir: Path, rid: str, shards: list[str], spans: dict[str, _Spans], *,
                   k: int, model: Any, prototypes: Any, threshold: float, kind: str, options: dict[str, Any],
                   clusters: list[dict[str, Any]], extra: dict[str, Any], model_ids: list[int] | None,
                   threads: int | None, min_abs: float, decoder: str, chunk_rows: int | None, progress: bool,
                   command: str, runner: Any, cluster: Any = None, task_rows: int | None = None,
                   remote: tuple[Any, ...] = (), device: str = "cpu", precision: str = "fp32") -> None:
    """The shards of a run, each committed labels-last, then assign_layers.parquet and run.json (the commit),
    every file and folder fsynced before the next step depends on it.  With a cluster, the shards not done yet
    are computed by its workers first (:func:`_assign_on_cluster`)."""
    from tqdm import tqdm


    total = sum(b - a for sp in spans.values() for a, b in sp.runs)
    bar = tqdm(total=total, desc=f"assign k={k}", unit="kernel", unit_scale=True, disable=not progress,
               file=sys.stderr)
    layer_rows: list[np.ndarray] = []
    n_labels = len(clusters)
    computed: dict[str, dict[int, np.ndarray]] = {}
    if cluster is not None:
        computed = _assign_on_cluster(cluster, c, root, k, shards, spans, bar=bar, n_labels=n_labels,
                                      with_codes=model is not None, threshold=threshold, min_abs=min_abs,
                                      decoder=decoder, chunk_rows=chunk_rows, task_rows=task_rows, remote=remote,
                                      precision=precision)
    for shard in shards:
        arr = c.shard_array(shard)
        rows_per_call = chunk_rows or default_chunk_rows(arr.strides[0])
        sp = spans[shard]
        names = ("labels", "scores", "codes") if model is not None else ("labels", "scores")
        final = {n: output_path(root, k, shard, n) for n in names}
        pieces = _chunks(sp.runs, rows_per_call)
        counts: dict[int, np.ndarray] = {}
        if shard in computed:
            counts = computed[shard]
        elif not final["labels"].is_file():
            out = _ShardOutput(final, len(arr), rows_per_call, sp.layers, n_labels)
            _fill_outputs(arr, out, pieces, runner, with_model=model is not None, threshold=threshold,
                          min_abs=min_abs, threads=threads, decoder=decoder, done=bar.update, device=device,
                          precision=precision)
            out.commit()
            counts = out.counts
        else:  # done by an earlier, interrupted run: count from its files
            done = {n: np.load(f, mmap_mode="r") for n, f in final.items()}
            for a, b in pieces:
                _layer_counts(sp.layers, a, done["labels"][a:b], done["scores"][a:b],
                              done["codes"][a:b] if "codes" in done else None, n_labels, counts)
            bar.update(sum(b - a for a, b in sp.runs))
        for layer_id, _, n in sp.layers:
            acc = counts[int(layer_id)]
            layer_rows.append(np.concatenate([[layer_id, n, n - acc[-1]], acc[:-1]]).astype(np.int64))
    bar.close()
    _write_layers(root, layer_rows, [cl["name"] for cl in clusters])
    info = {"format": ASSIGN_FORMAT, "run_id": rid, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "completed": True,
            "mode": options["mode"], "kernel_size": k, "kind": kind, "threshold": threshold,
            "model_dir": str(Path(model).resolve()) if model is not None else None,
            "prototypes": str(Path(prototypes).resolve()) if prototypes is not None else None,
            "clusters": clusters, "shards": shards, "command": command, "options": options,
            "corpus_generation": c.manifest.get("generation", 0), "rows_assigned": total,
            "models": model_ids, **extra}
    if model is not None:  # only for a run being written: a completed one returns before this
        info["control"] = control_curve(runner, threads=threads)
    fsync_dir(outdir)
    fsync_dir(root)  # assign_layers.parquet's rename is durable before run.json marks the run complete
    atomic_write_bytes(root / "run.json", json.dumps(info, indent=1).encode())
    fsync_dir(root)


def _fill_outputs(arr: np.ndarray, out: _ShardOutput, pieces: Sequence[tuple[int, int]], runner: Any, *,
                  with_model: bool, threshold: float, min_abs: float, threads: int | None, decoder: str,
                  done: Any = None, device: str = "cpu", precision: str = "fp32") -> None:
    """The engine over ``pieces`` (row ranges, ascending) of a shard, its outputs written in place into ``out``'s
    staging blocks, the next piece's pages asked for ahead; ``out`` closed (the rows up to its end filled) or,
    on an error, discarded.  ``done(rows)`` after each piece.  The one loop of in-process runs and cluster
    tasks."""
    import kernelatlas

    try:
        if pieces:
            advise_readahead(arr, *pieces[0])
        for i, (a, b) in enumerate(pieces):
            if i + 1 < len(pieces):
                advise_readahead(arr, *pieces[i + 1])
            buf = out.buffers(a, b)
            if with_model:
                kernelatlas.assign(arr[a:b], runner, threshold=threshold, min_abs=min_abs, threads=threads,
                                   decoder=decoder, out=(buf["labels"], buf["scores"], buf["codes"]), device=device,
                                   precision=precision)
            else:
                kernelatlas.assign_prototypes(arr[a:b], runner, threshold=threshold, min_abs=min_abs,
                                              threads=threads, out=(buf["labels"], buf["scores"]), device=device)
            out.put()
            if done is not None:
                done(b - a)
        out.close()
    except BaseException:
        out.discard()
        raise


def _task_pieces(rows: int, runs: Sequence[tuple[int, int]], task_rows: int,
                 align: int = ROW_ALIGN) -> list[tuple[int, int]]:
    """Row ranges tiling [0, rows) of a shard, each starting at a multiple of ``align`` and holding fewer than
    ``task_rows + align`` rows to assign (stretches of other kinds' rows, which only get fill values, ride along
    with the task before or after them)."""
    if rows == 0:
        return []
    cuts = sorted({0}.union(*((x - x % align for x in range(a, b, task_rows)) for a, b in runs)))
    return [(lo, hi) for lo, hi in zip(cuts, [*cuts[1:], rows], strict=True) if hi > lo]


def _assign_on_cluster(cluster: Any, c: Corpus, root: Path, k: int, shards: list[str], spans: dict[str, _Spans], *,
                       bar: Any, n_labels: int, with_codes: bool, threshold: float, min_abs: float, decoder: str,
                       chunk_rows: int | None, task_rows: int | None,
                       remote: tuple[Any, ...], precision: str = "fp32") -> dict[str, dict[int, np.ndarray]]:
    """Compute every shard without a labels file on the cluster; returns its per-layer label counts.  Each
    shard's output files are created here at full size (the 4 KiB .npy header written, the rest sparse); every
    task writes its own rows (engine outputs, fill values between runs) in place, so the bytes do not depend on
    which worker ran it, how often (a retry after a worker died rewrites the same bytes) or when.  A shard's
    files are fsynced and renamed into place, labels last, as soon as its last task is done."""
    cluster.check_shared(c.root)
    cluster.announce(f"assign k={k}")
    names = ("labels", "scores", "codes") if with_codes else ("labels", "scores")
    tasks: list[tuple[Any, ...]] = []
    owner: list[str] = []
    outputs: dict[str, tuple[dict[str, Path], dict[str, Path]]] = {}
    for shard in shards:
        final = {n: output_path(root, k, shard, n) for n in names}
        if final["labels"].is_file():
            continue
        arr = c.shard_array(shard)  # checks shape and dtype against the manifest
        rows_per_call = chunk_rows or default_chunk_rows(arr.strides[0])
        per_task = task_rows or rows_per_call
        tmp = temp_paths(final)
        _create_outputs(tmp, len(arr))
        sp = spans[shard]
        for lo, hi in _task_pieces(len(arr), sp.runs, per_task):
            runs = [(max(a, lo), min(b, hi)) for a, b in sp.runs if a < hi and b > lo]
            tasks.append((str(c.root / shard), arr.shape, lo, hi, runs, sp.layers,
                          {n: str(p) for n, p in final.items()}, remote, threshold, min_abs, decoder,
                          rows_per_call, n_labels, precision))
            owner.append(shard)
        outputs[shard] = (final, tmp)
    left = Counter(owner)
    for shard, (final, tmp) in outputs.items():
        if not left[shard]:  # no rows at all: nothing for a worker to write
            _commit_outputs(final, tmp)
    counts: dict[str, dict[int, np.ndarray]] = {s: {} for s in outputs}
    weights = [sum(b - a for a, b in t[4]) for t in tasks]
    for i, result in cluster.map(_assign_task, tasks, weights=weights, bar=bar, key=f"assign-k{k}"):
        shard = owner[i]
        _merge_counts(counts[shard], result)
        left[shard] -= 1
        if left[shard] == 0:
            final, tmp = outputs[shard]
            for path in tmp.values():  # durable here too (a shared filesystem's client cache)
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _commit_outputs(final, tmp)
    return counts


_RUNNERS: dict[tuple[str, str], Any] = {}  # per worker process: the autoencoders its tasks loaded


def _task_runner(remote: tuple[Any, ...]) -> Any:
    from kernelatlas.autoencoder import Autoencoder
    from kernelatlas.engine import prototype_engine

    if remote[0] == "prototypes":
        return prototype_engine(remote[1])
    _, model_dir, digest = remote
    key = (model_dir, digest)
    if key not in _RUNNERS:
        if _model_digest(Path(model_dir)) != digest:
            raise CorpusError(f"{model_dir} on this worker differs from the client's model (another file, or it "
                              "changed since the run started): the model folder must be shared and unchanged")
        _RUNNERS.clear()
        _RUNNERS[key] = Autoencoder.load(model_dir)
    return _RUNNERS[key]


def _assign_task(shard_file: str, shape: tuple[int, int], lo: int, hi: int, runs: list[tuple[int, int]],
                 layers: np.ndarray, final: dict[str, str], remote: tuple[Any, ...], threshold: float,
                 min_abs: float, decoder: str, chunk_rows: int, n_labels: int,
                 precision: str = "fp32") -> dict[int, np.ndarray]:
    """One cluster task (runs on a worker): rows [lo, hi) of a shard -- the rows of ``runs`` through the
    engine, fill values for the rest -- written in place into the temp files of the shard's outputs ``final``
    by the in-process loop (:func:`_fill_outputs`, O_DIRECT writes off the engine's thread); returns the
    per-layer label counts of its rows."""
    from kernelatlas.cluster import engine_threads

    arr = map_shard(shard_file, shape)
    pieces = _chunks(runs, chunk_rows)
    # staging blocks sized to the task's largest piece, not the engine chunk: small tasks stay cheap to set up
    largest = max((b - a for a, b in pieces), default=1)
    out = _ShardOutput({n: Path(p) for n, p in final.items()}, hi, largest, layers, n_labels, lo=lo)
    _fill_outputs(arr, out, pieces, _task_runner(remote), with_model=remote[0] == "autoencoder",
                  threshold=threshold, min_abs=min_abs, threads=engine_threads() or None, decoder=decoder,
                  precision=precision)
    return out.counts


def control_curve(model: Any, *, threads: int | None = None) -> dict[str, Any]:
    """The random-kernel control of an autoencoder with clusters, as run.json stores it."""
    from kernelatlas.holdout import CONTROL_GRID, CONTROL_KERNELS, CONTROL_SEED, random_control

    shares = random_control(model, CONTROL_GRID, n=CONTROL_KERNELS, seed=CONTROL_SEED, threads=threads)
    return {"kernels": CONTROL_KERNELS, "seed": CONTROL_SEED, "what": "i.i.d. N(0, 1) entries, centred",
            "thresholds": [float(t) for t in CONTROL_GRID], "share": [round(shares[float(t)], 6) for t in CONTROL_GRID]}


def _write_layers(root: Path, rows: list[np.ndarray], names: Sequence[str]) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = np.stack(rows) if rows else np.zeros((0, 3 + len(names) + 1), np.int64)
    live = data[:, 2].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        frame = pd.DataFrame({"layer_id": data[:, 0], "kernels": data[:, 1], "live": data[:, 2],
                              "assigned_share": data[:, 4:].sum(axis=1) / live})
        for i, name in enumerate(names):
            frame[f"share_{name}"] = data[:, 4 + i] / live
    atomic_write(root / "assign_layers.parquet",
                 lambda tmp: pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp))
