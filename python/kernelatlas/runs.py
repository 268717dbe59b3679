"""`kernelatlas assign` at corpus scale: every k x k shard of a corpus through the fused native engine, into a
run directory beside the corpus (DESIGN.md):

    CORPUS/runs/RUN_ID/run.json                 what produced the run; written last (the run's commit)
    CORPUS/runs/RUN_ID/kK/labels-NNNNNN.npy     int16 per corpus shard NNNNNN, same row order
    CORPUS/runs/RUN_ID/kK/scores-NNNNNN.npy     float32 cosine(kernel, reconstruction) or best prototype cosine
    CORPUS/runs/RUN_ID/kK/codes-NNNNNN.npy      float32 1-D codes (autoencoder mode)
    CORPUS/runs/RUN_ID/assign_layers.parquet    per layer: layer_id, kernels, live, assigned_share, share_<cluster>

Labels: cluster index; -1 unclassified (below the threshold, code in no interval, or a dead / flat /
non-finite kernel -- those have score 0 and code NaN); -2 rows of layers not of the run's kind (not assigned).

Resumable shard by shard: a shard's outputs are written into temp memmaps by the engine, fsynced and renamed
(labels last), so a shard is done exactly when its labels file exists; a killed run restarts at the first
shard without one and, the engine being deterministic, gives identical output.  RUN_ID defaults to a short hash
of (mode, model contents, options, corpus generation), so rerunning the same command resumes the same run.
Reading overlaps computing: a prefetch thread touches the pages of the next chunk while the engine works on
the current one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas._files import atomic_write_bytes, fsync_dir
from kernelatlas.corpus import Corpus, CorpusError

__all__ = ["RunResult", "assign_corpus", "latest_runs", "load_prototypes", "run_id_for"]

RUN_FORMAT = "kernelatlas-run"
LABEL_OTHER_KIND = -2
_PAGE = 4096


def load_prototypes(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str]]:
    """Prototypes [P, k, k] and names from a .npy ([P, k, k] or [P, k*k] square) or a text file of blocks
    "NAME:" followed by k rows of k numbers (the layout of the master-key-filter file)."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False).astype(np.float32)
        if arr.ndim == 2:
            k = int(round(arr.shape[1] ** 0.5))
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


def run_id_for(corpus: Corpus, options: dict[str, Any]) -> str:
    blob = json.dumps({**options, "corpus_generation": corpus.manifest.get("generation", 0)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class _Spans:
    """Rows of one shard belonging to layers of the run's kind, merged into contiguous runs."""

    runs: list[tuple[int, int]]
    layers: np.ndarray  # [n, 3] layer_id, row_start, rows


def _spans(corpus: Corpus, shard: str, kind: str) -> _Spans:
    lay = corpus.layers
    sel = lay[(lay["shard"] == shard) & (lay["rows"] > 0)]
    if kind != "all":
        sel = sel[sel["kind"] == kind]
    arr = sel[["layer_id", "row_start", "rows"]].to_numpy(dtype=np.int64)
    arr = arr[np.argsort(arr[:, 1], kind="stable")] if len(arr) else arr.reshape(0, 3)
    runs: list[tuple[int, int]] = []
    for _, a, n in arr:
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], int(a + n))
        else:
            runs.append((int(a), int(a + n)))
    return _Spans(runs, arr)


class _Prefetcher:
    """Touches one byte per page of a memmap range in a background thread, so the engine's threads find the
    pages already mapped (page-cache hits still cost a minor fault per page when first touched)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None

    def start(self, arr: np.ndarray, a: int, b: int) -> None:
        self.wait()
        if b <= a:
            return
        flat = arr[a:b].reshape(-1)
        step = max(1, _PAGE // flat.itemsize)
        self._thread = threading.Thread(target=lambda: float(flat[::step].sum()), daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _open_out(path: Path, rows: int, dtype: Any, fill: Any) -> np.ndarray:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows,))
    out[:] = fill
    return out


def _finish(tmp: Path, final: Path, arr: np.ndarray) -> None:
    arr.flush()
    del arr
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


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
    chunk_rows: int = 1 << 20,
    progress: bool = True,
    command: str = "",
) -> str:
    """Assign every kernel of the model's size (of layers of ``kind``: depthwise | regular | grouped | all) in
    the corpus; returns the run id.  Exactly one of ``model`` (a model directory) or ``prototypes`` (a file,
    see :func:`load_prototypes`)."""
    from tqdm import tqdm

    import kernelatlas
    from kernelatlas.autoencoder import Autoencoder
    from kernelatlas.engine import prototype_engine

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
    else:
        protos, pnames = load_prototypes(prototypes)  # type: ignore[arg-type]
        k = protos.shape[1]
        engine = prototype_engine(protos)
        clusters = [{"name": n, "lo": None, "hi": None, "colour": None, "prototype": p.tolist()}
                    for n, p in zip(pnames, engine.normalized.reshape(-1, k, k), strict=True)]
        options = {"mode": "prototypes", "prototypes": hashlib.sha256(protos.tobytes()).hexdigest(),
                   "threshold": threshold, "kind": kind, "min_abs": min_abs}
    shards = c.shards(k)
    if not shards:
        raise CorpusError(f"{c.root} stores no {k}x{k} kernels (sizes: {c.kernel_sizes or 'none'})")
    rid = run_id or run_id_for(c, options)
    root = c.root / "runs" / rid
    outdir = root / f"k{k}"
    outdir.mkdir(parents=True, exist_ok=True)
    info_path = root / "run.json"
    if info_path.is_file():
        done = json.loads(info_path.read_text())
        if done.get("completed") and done.get("options") == options:
            return rid
    spans = {s: _spans(c, s, kind) for s in shards}
    total = sum(b - a for sp in spans.values() for a, b in sp.runs)
    bar = tqdm(total=total, desc=f"assign k={k}", unit="kernel", unit_scale=True, disable=not progress,
               file=sys.stderr)
    prefetch = _Prefetcher()
    layer_rows: list[np.ndarray] = []
    n_labels = len(clusters)
    for shard in shards:
        num = re.search(r"(\d+)\.npy$", shard)
        tag = num.group(1) if num else Path(shard).stem
        final = {n: outdir / f"{n}-{tag}.npy" for n in ("labels", "scores", "codes")}
        arr = c.shard_array(shard)
        sp = spans[shard]
        if not final["labels"].is_file():
            tmp = {n: outdir / f".{n}-{tag}.npy.tmp" for n in final}
            labels = _open_out(tmp["labels"], len(arr), np.int16, LABEL_OTHER_KIND)
            scores = _open_out(tmp["scores"], len(arr), np.float32, np.nan)
            codes = _open_out(tmp["codes"], len(arr), np.float32, np.nan) if model is not None else None
            pieces = [(a0, min(a0 + chunk_rows, b)) for a, b in sp.runs for a0 in range(a, b, chunk_rows)]
            if pieces:
                prefetch.start(arr, *pieces[0])
            for i, (a, b) in enumerate(pieces):
                prefetch.wait()
                if i + 1 < len(pieces):
                    prefetch.start(arr, *pieces[i + 1])
                if model is not None:
                    kernelatlas.assign(arr[a:b], ae, threshold=threshold, min_abs=min_abs, threads=threads,
                                       decoder=decoder, out=(labels[a:b], scores[a:b], codes[a:b]))
                else:
                    kernelatlas.assign_prototypes(arr[a:b], engine, threshold=threshold, min_abs=min_abs,
                                                  threads=threads, out=(labels[a:b], scores[a:b]))
                bar.update(b - a)
            prefetch.wait()
            # labels last: its presence marks the shard done
            if codes is not None:
                _finish(tmp["codes"], final["codes"], codes)
            _finish(tmp["scores"], final["scores"], scores)
            _finish(tmp["labels"], final["labels"], labels)
            fsync_dir(outdir)
        else:
            bar.update(sum(b - a for a, b in sp.runs))
        labels_done = np.load(final["labels"], mmap_mode="r")
        scores_done = np.load(final["scores"], mmap_mode="r")
        codes_done = np.load(final["codes"], mmap_mode="r") if final["codes"].is_file() else None
        for layer_id, a, n in sp.layers:
            lab = labels_done[a:a + n]
            counts = np.bincount(lab.astype(np.int64) + 1, minlength=n_labels + 1)  # index 0: -1
            # dead / flat / non-finite kernels: code NaN (autoencoder mode), score 0 and label -1 (prototypes)
            dead = int(np.count_nonzero(np.isnan(codes_done[a:a + n]))) if codes_done is not None else \
                int(np.count_nonzero((lab == -1) & (scores_done[a:a + n] == 0)))
            layer_rows.append(np.concatenate([[layer_id, n, n - dead], counts]).astype(np.int64))
    bar.close()
    _write_layers(root, layer_rows, [cl["name"] for cl in clusters])
    info = {"format": RUN_FORMAT, "run_id": rid, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "completed": True,
            "mode": options["mode"], "kernel_size": k, "kind": kind, "threshold": threshold,
            "model_dir": str(Path(model).resolve()) if model is not None else None,
            "prototypes": str(Path(prototypes).resolve()) if prototypes is not None else None,
            "clusters": clusters, "shards": shards, "command": command, "options": options,
            "corpus_generation": c.manifest.get("generation", 0), "rows_assigned": total}
    atomic_write_bytes(info_path, json.dumps(info, indent=1).encode())
    return rid


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
    tmp = root / ".assign_layers.parquet.tmp"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    os.replace(tmp, root / "assign_layers.parquet")


def latest_runs(corpus: Corpus) -> dict[int, str]:
    """The latest completed run per kernel size: {k: run_id}."""
    best: dict[int, tuple[str, str]] = {}
    for info_path in sorted((corpus.root / "runs").glob("*/run.json")):
        info = json.loads(info_path.read_text())
        if not info.get("completed"):
            continue
        k = int(info["kernel_size"])
        if k not in best or info["created"] > best[k][0]:
            best[k] = (info["created"], info["run_id"])
    return {k: rid for k, (_, rid) in best.items()}


class RunResult:
    """A completed run joined to the corpus: ``layers`` is assign_layers.parquet joined with the corpus's
    layers and models tables; ``labels(shard)``, ``scores(shard)``, ``codes(shard)`` are memmaps in the
    shard's row order."""

    def __init__(self, corpus: Corpus, run_id: str) -> None:
        self.corpus = corpus
        self.root = corpus.root / "runs" / run_id
        path = self.root / "run.json"
        if not path.is_file():
            raise CorpusError(f"{path} not found: run `kernelatlas assign` (or it has not completed yet)")
        self.info = json.loads(path.read_text())
        self.run_id = run_id
        self.kernel_size = int(self.info["kernel_size"])

    @property
    def clusters(self) -> list[str]:
        return [c["name"] for c in self.info["clusters"]]

    @property
    def layers(self) -> Any:
        import pandas as pd

        per = pd.read_parquet(self.root / "assign_layers.parquet")
        lay = self.corpus.layers.merge(per, on="layer_id", how="inner")
        models = self.corpus.models.add_prefix("model_").rename(columns={"model_model_id": "model_id"})
        return lay.merge(models, on="model_id", how="left")

    def _array(self, what: str, shard: str) -> np.ndarray:
        num = re.search(r"(\d+)\.npy$", shard)
        return np.load(self.root / f"k{self.kernel_size}" / f"{what}-{num.group(1) if num else shard}.npy",
                       mmap_mode="r")

    def labels(self, shard: str) -> np.ndarray:
        return self._array("labels", shard)

    def scores(self, shard: str) -> np.ndarray:
        return self._array("scores", shard)

    def codes(self, shard: str) -> np.ndarray:
        return self._array("codes", shard)
