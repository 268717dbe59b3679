"""The on-disk corpus (DESIGN.md, "Corpus format", version 1): kernels in memory-mappable .npy shards per kernel
size, one row per kernel, plus two Parquet tables (models, layers) and manifest.json, the commit point.

Invariants this module keeps:
* Append-only.  A writer only ever adds files; committed shards are never modified.  A new shard is written
  as ``kK/.shard-NNNNNN.npy.partial`` (placeholder header, rows streamed in, sha256 computed on the way),
  then its header is completed, the file fsynced and renamed -- but it exists for readers only once
  manifest.json lists it.
* One commit = tables first (temp file, fsync, rename), then the manifest (temp, fsync, rename, fsync of the
  directory).  manifest.json records how many models and layers are committed; tables may hold more rows
  after a crash between the two renames, and every reader drops rows past those counts.  So a crash or
  ``kill -9`` at any point leaves the previous commit intact, and the next writer removes the orphans
  (partial and unlisted shards) and carries on; models are keyed by file sha256, so a rerun adds each once.
* One writer at a time: an exclusive ``flock`` on CORPUS/.lock (released by the kernel if the process dies).
* A layer never spans shards; its kernels are rows [row_start, row_start + rows) of one shard.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kernelatlas._files import acquire_lock, advise_huge_pages, atomic_write_bytes, fsync_dir, npy_header
from kernelatlas.corpus.errors import CorpusError
from kernelatlas.corpus.loaders.base import LoadedModel, conv_depths

if TYPE_CHECKING:
    from kernelatlas.corpus.rundir import AssignRun

__all__ = ["LAYER_COLUMNS", "MODEL_COLUMNS", "Chunk", "Corpus", "CorpusError", "CorpusWriter"]

FORMAT = "kernelatlas-corpus"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
STAGING = ".staging"  # where cluster workers write a distributed extract's shard files before the commit
NPY_HEADER_BYTES = 128  # fixed, so the header can be rewritten in place once the row count is known

MODEL_COLUMNS = {
    "model_id": "int64", "name": "str", "source_path": "str", "sha256": "str", "format": "str",
    "family": "str", "task": "str", "category": "str", "dataset": "str", "n_layers": "int64",
    "n_kernels": "int64", "weight_set": "str",
}
LAYER_COLUMNS = {
    "layer_id": "int64", "model_id": "int64", "name": "str", "kind": "str", "kind_inferred": "bool",
    "kh": "int32", "kw": "int32", "c_out": "int64", "c_in_per_group": "int64", "groups": "int64",
    "depth": "int32", "depth_norm": "float64", "bn_folded": "bool", "shard": "str", "row_start": "int64",
    "rows": "int64", "n_kernels": "int64", "n_zero": "int64", "n_nonfinite": "int64",
}


# layer columns only the writer sets (add_model's layer_columns may not)
_WRITER_LAYER_COLUMNS = frozenset({"layer_id", "model_id", "shard", "row_start", "rows", "n_kernels", "n_zero",
                                   "n_nonfinite"})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _npy_header(dtype: np.dtype, rows: int, d: int) -> bytes:
    """A version-1.0 .npy header of exactly NPY_HEADER_BYTES bytes for a C-order [rows, d] array."""
    try:
        return npy_header(dtype.str, (rows, d), NPY_HEADER_BYTES)
    except ValueError as exc:
        raise CorpusError(str(exc)) from exc


def _read_table(path: Path, columns: Mapping[str, str]) -> Any:
    import pandas as pd
    import pyarrow.parquet as pq

    if not path.is_file():
        return pd.DataFrame({c: pd.Series(dtype=("object" if t == "str" else t)) for c, t in columns.items()})
    return pq.read_table(path).to_pandas()


def _write_table(path: Path, frame: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _empty_frame(columns: Mapping[str, str]) -> Any:
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype=("object" if t == "str" else t)) for c, t in columns.items()})


@dataclass(frozen=True)
class Chunk:
    """Rows [start, start + len(kernels)) of one shard: ``kernels`` is a zero-copy memmap slice [rows, k*k];
    ``layers`` holds (layer_id, first_row, stop_row) of the layers overlapping the chunk, rows relative to the
    chunk; ``layer_ids`` expands that to one id per row (computed on demand)."""

    shard: str
    start: int
    kernels: np.ndarray
    layers: np.ndarray  # [n, 3] int64: layer_id, first row, stop row (relative to the chunk)

    @property
    def layer_ids(self) -> np.ndarray:
        ids = np.full(len(self.kernels), -1, dtype=np.int64)
        for layer_id, lo, hi in self.layers:
            ids[lo:hi] = layer_id
        return ids


class Corpus:
    """A committed corpus, read-only.  ``Corpus.open(path)``; ``Corpus.create(path)`` makes an empty one.
    Writing goes through :meth:`writer` (one writer at a time)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._models: Any = None
        self._layers: Any = None

    # -------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Corpus:
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise CorpusError(f"{root} is not a kernelatlas corpus (no {MANIFEST}): create one with "
                              f"`kernelatlas extract ... --out {root}`")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as exc:
            raise CorpusError(f"{mpath} is unreadable ({exc}); restore it from a backup") from None
        if manifest.get("format") != FORMAT:
            raise CorpusError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        if int(manifest.get("version", 0)) > FORMAT_VERSION:
            raise CorpusError(f"{mpath}: corpus format version {manifest['version']} is newer than this "
                              f"kernelatlas reads ({FORMAT_VERSION}): upgrade kernelatlas")
        return cls(root, manifest)

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, dtype: str = "float32") -> Corpus:
        """An empty corpus at ``path`` (which must not hold one already)."""
        root = Path(path)
        if (root / MANIFEST).exists():
            raise CorpusError(f"{root} already holds a corpus: open it with Corpus.open")
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise CorpusError(f"corpus dtype must be float32 or float16, got {dtype}")
        root.mkdir(parents=True, exist_ok=True)
        _write_table(root / "models.parquet", _empty_frame(MODEL_COLUMNS))
        _write_table(root / "layers.parquet", _empty_frame(LAYER_COLUMNS))
        manifest = _new_manifest(np.dtype(dtype).name)
        atomic_write_bytes(root / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(root)
        return cls(root, manifest)

    def writer(self, **options: Any) -> CorpusWriter:
        return CorpusWriter(self.root, **options)

    # -------------------------------------------------------------- tables
    @property
    def dtype(self) -> np.dtype:
        dtype: np.dtype = np.dtype(self.manifest["dtype"])
        return dtype

    @property
    def models(self) -> Any:
        """pandas DataFrame, one row per committed model."""
        if self._models is None:
            frame = _read_table(self.root / "models.parquet", MODEL_COLUMNS)
            self._models = frame[frame["model_id"] < self.manifest["n_models"]].reset_index(drop=True)
        return self._models

    @property
    def layers(self) -> Any:
        """pandas DataFrame, one row per committed conv layer (DESIGN.md columns)."""
        if self._layers is None:
            frame = _read_table(self.root / "layers.parquet", LAYER_COLUMNS)
            self._layers = frame[frame["layer_id"] < self.manifest["n_layers"]].reset_index(drop=True)
        return self._layers

    def model_ids(self, models: Sequence[int | str]) -> list[int]:
        """The model_ids of ``models``, each an id or a name (models.parquet ``name``), in the order given; a
        ValueError names what is not in the corpus."""
        table = self.models
        ids = {int(m) for m in table["model_id"]}
        by_name = {str(n): int(m) for m, n in zip(table["model_id"], table["name"], strict=True)}
        out = []
        for item in models:
            if str(item) in by_name:
                out.append(by_name[str(item)])
            elif isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.strip().isdigit()):
                if int(item) not in ids:
                    raise ValueError(f"{self.root} has no model with id {item} (see `kernelatlas info`)")
                out.append(int(item))
            else:
                raise ValueError(f"{self.root} has no model named {item!r}; its models are: "
                                 f"{', '.join(sorted(by_name))}")
        return out

    @property
    def kernel_sizes(self) -> list[int]:
        return sorted({int(s["k"]) for s in self.manifest["shards"]})

    def shards(self, k: int) -> list[str]:
        """Committed shard paths (relative to the corpus) holding k x k kernels, in order."""
        return [s["path"] for s in self.manifest["shards"] if int(s["k"]) == k]

    def shard_array(self, shard: str) -> np.ndarray:
        """A committed shard as a read-only memmap [rows, k*k]."""
        entry = next((s for s in self.manifest["shards"] if s["path"] == shard), None)
        if entry is None:
            raise CorpusError(f"{shard} is not a committed shard of {self.root}")
        path = self.root / shard
        if path.is_symlink() or path.parent.is_symlink():
            raise CorpusError(f"{path} is a symlink: a corpus's shards are read only from its own folders (a "
                              "corpus received from someone else could point them at any file)")
        arr: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.shape != (entry["rows"], entry["k"] ** 2):
            raise CorpusError(f"{path} has shape {arr.shape}, the manifest says "
                              f"({entry['rows']}, {entry['k'] ** 2}): the corpus is damaged")
        if arr.dtype != self.dtype:  # byte order included: a '>f4' shard would be read as garbage
            raise CorpusError(f"{path} holds {arr.dtype.str} kernels, the manifest says {self.dtype.str}: the "
                              "corpus is damaged (or was edited by hand)")
        advise_huge_pages(arr)
        return arr

    def iter_chunks(self, k: int, rows: int = 1 << 20, *, kind: str | None = None) -> Iterator[Chunk]:
        """Zero-copy memmap slices of at most ``rows`` kernels over every k x k shard, with their layers.
        ``kind``: only rows of layers of that kind (depthwise|grouped|regular); chunks then follow layer
        boundaries (still zero-copy, never spanning two layers' gaps)."""
        if rows < 1:
            raise ValueError("rows must be >= 1")
        layers = self.layers
        for shard in self.shards(k):
            arr = self.shard_array(shard)
            sl = layers[(layers["shard"] == shard) & (layers["rows"] > 0)]
            if kind is not None:
                sl = sl[sl["kind"] == kind]
            spans = sl[["layer_id", "row_start", "rows"]].to_numpy(dtype=np.int64)
            spans = spans[np.argsort(spans[:, 1], kind="stable")] if len(spans) else spans
            if kind is None:
                yield from _chunks_of_range(shard, arr, spans, 0, len(arr), rows)
            else:
                # merge contiguous layers of the kind into runs, chunk each run
                i = 0
                while i < len(spans):
                    j = i
                    while j + 1 < len(spans) and spans[j + 1, 1] == spans[j, 1] + spans[j, 2]:
                        j += 1
                    yield from _chunks_of_range(shard, arr, spans[i:j + 1], int(spans[i, 1]),
                                                int(spans[j, 1] + spans[j, 2]), rows)
                    i = j + 1

    def run(self, run_id: str | None = None, *, kernel_size: int | None = None) -> AssignRun:
        """A completed assign run joined to layers and models (:class:`kernelatlas.corpus.rundir.AssignRun`);
        default: the latest run (of ``kernel_size`` when given).  A run id of another verb (a quality run) or of
        an unfinished run raises :class:`kernelatlas.corpus.rundir.RunError` (a CorpusError) saying so."""
        from kernelatlas.corpus.rundir import AssignRun

        return AssignRun.latest(self, kernel_size) if run_id is None else AssignRun(self, run_id)

    def summary(self) -> dict[str, Any]:
        """Counts for `kernelatlas info`: models, layers, kernels by size and kind, zero/non-finite, disk."""
        lay = self.layers
        by_size: dict[str, dict[str, int]] = {}
        for (kh, kw, kind), grp in lay.groupby(["kh", "kw", "kind"]):
            entry = by_size.setdefault(f"{kh}x{kw}", {})
            entry[kind] = int(grp["n_kernels"].sum())
            entry[f"{kind}_stored"] = int(grp["rows"].sum())
        disk = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return {
            "path": str(self.root),
            "dtype": self.manifest["dtype"],
            "models": len(self.models),
            "layers": len(lay),
            "layers_by_kind": {str(k): int(v) for k, v in lay["kind"].value_counts().items()},
            "kernels_by_size": by_size,
            "kernels_stored": int(sum(s["rows"] for s in self.manifest["shards"])),
            "zero_kernels": int(lay["n_zero"].sum()),
            "nonfinite_kernels": int(lay["n_nonfinite"].sum()),
            "shards": len(self.manifest["shards"]),
            "disk_bytes": int(disk),
            "created": self.manifest.get("created"),
            "updated": self.manifest.get("updated"),
        }


def map_shard(path: str | os.PathLike[str], shape: Sequence[int]) -> np.ndarray:
    """A shard file memory-mapped by a cluster worker (which has no Corpus open), checked against the shape the
    client read from the manifest."""
    arr: np.ndarray = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.shape != tuple(shape):
        raise CorpusError(f"{path} has shape {arr.shape} on this worker, {tuple(shape)} on the client: the corpus "
                          "folder must be the same on every host")
    advise_huge_pages(arr)  # as Corpus.shard_array: 2 MiB folios, far fewer page faults per task
    return arr


def _chunks_of_range(shard: str, arr: np.ndarray, spans: np.ndarray, lo: int, hi: int, rows: int) -> Iterator[Chunk]:
    starts = spans[:, 1] if len(spans) else np.zeros(0, np.int64)
    stops = starts + (spans[:, 2] if len(spans) else 0)
    for a in range(lo, hi, rows):
        b = min(a + rows, hi)
        sel = (starts < b) & (stops > a)
        ls = spans[sel]
        rel = np.stack([ls[:, 0], np.maximum(ls[:, 1], a) - a, np.minimum(ls[:, 1] + ls[:, 2], b) - a], axis=1) \
            if len(ls) else np.zeros((0, 3), np.int64)
        yield Chunk(shard, a, arr[a:b], rel.astype(np.int64))


def _new_manifest(dtype: str) -> dict[str, Any]:
    now = _now()
    return {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype, "kernel_sizes": [], "shards": [],
            "n_models": 0, "n_layers": 0, "next_shard": 0, "generation": 0, "created": now, "updated": now}


class _PendingShard:
    """A shard being written: ``kK/.shard-NNNNNN.npy.partial`` (or ``partial``: a staged file of a cluster
    worker) with a placeholder header."""

    def __init__(self, root: Path, k: int, index: int, dtype: np.dtype, partial: Path | None = None) -> None:
        self.k, self.dtype = k, dtype
        self.path = f"k{k}/shard-{index:06d}.npy"
        if partial is None:
            (root / f"k{k}").mkdir(exist_ok=True)
            partial = root / f"k{k}" / f".shard-{index:06d}.npy.partial"
        self.partial = partial
        self.fh = open(self.partial, "wb")  # noqa: SIM115 - held across append() calls, closed by commit/discard
        self.fh.write(_npy_header(dtype, 0, k * k))
        self.rows = 0
        self.hash = hashlib.sha256()

    def append(self, rows: np.ndarray) -> int:
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        start = self.rows
        buf = memoryview(data).cast("B")  # type: ignore[arg-type]  # numpy's stubs do not declare the buffer protocol
        self.fh.write(buf)
        self.hash.update(buf)
        self.rows += len(data)
        return start

    def mark(self) -> tuple[int, Any]:
        """Where the shard stands now, for :meth:`rewind`."""
        return self.rows, self.hash.copy()

    def rewind(self, mark: tuple[int, Any]) -> None:
        """Forget the rows appended since ``mark`` (a model whose reading failed half-way)."""
        rows, digest = mark
        self.fh.flush()
        self.fh.truncate(len(_npy_header(self.dtype, 0, self.k * self.k)) + rows * self.k * self.k
                         * self.dtype.itemsize)
        self.fh.seek(0, os.SEEK_END)
        self.rows, self.hash = rows, digest

    def finish(self, root: Path | None) -> dict[str, Any]:
        """Complete the header and fsync; move the file into the corpus at ``root`` (None: leave it where it is,
        a staged file)."""
        self.fh.seek(0)
        self.fh.write(_npy_header(self.dtype, self.rows, self.k * self.k))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if root is not None:
            os.replace(self.partial, root / self.path)
        return {"path": self.path, "k": self.k, "rows": self.rows, "sha256": self.hash.hexdigest()}

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(OSError):
            self.partial.unlink()


class CorpusWriter:
    """The one writer of a corpus (context manager).  ``add_model`` streams a loaded model's kernels into
    pending shards; ``commit`` makes everything added so far visible atomically.  Uncommitted work is lost
    on a crash and redone by a rerun; committed work never is.

    ``shard_rows``: a new shard is started once a pending one holds this many rows (default 2^26).
    ``commit_rows`` / ``commit_seconds``: ``maybe_commit`` commits once this much is pending.
    """

    def __init__(self, root: str | os.PathLike[str], *, dtype: str | None = None, shard_rows: int = 1 << 26,
                 commit_rows: int = 1 << 24, commit_seconds: float = 60.0) -> None:
        self.root = Path(root)
        self.shard_rows, self.commit_rows, self.commit_seconds = shard_rows, commit_rows, commit_seconds
        self._pending: dict[int, _PendingShard] = {}
        self._finished: list[_PendingShard] = []
        if not (self.root / MANIFEST).is_file():
            Corpus.create(self.root, dtype=dtype or "float32")
        try:
            self._lock_fh = acquire_lock(self.root / LOCK)
        except BlockingIOError as exc:
            holder = getattr(exc, "holder", "another process")
            raise CorpusError(f"{self.root} is being written by {holder} (lock {self.root / LOCK}); wait for "
                              "it to finish -- two writers would corrupt the corpus") from None
        except OSError as exc:
            raise CorpusError(f"cannot open the corpus lock {self.root / LOCK} ({exc}): remove it if it is a "
                              "symlink (a corpus received from someone else may hold one pointing at your files)"
                              ) from None
        self.corpus = Corpus.open(self.root)
        self.manifest = self.corpus.manifest
        if dtype is not None and np.dtype(dtype).name != self.manifest["dtype"]:
            self.close()
            raise CorpusError(f"{self.root} stores {self.manifest['dtype']} kernels; extract with "
                              f"--dtype {self.manifest['dtype']} or into a new corpus")
        self.dtype = np.dtype(self.manifest["dtype"])
        self._remove_orphans()
        self.models = self.corpus.models.copy()
        self.layers = self.corpus.layers.copy()
        self._new_models: list[dict[str, Any]] = []
        self._new_layers: list[dict[str, Any]] = []
        self._staged: list[tuple[Path, dict[str, Any]]] = []  # (staged file, its shard entry), add_staged
        self._pending_rows = 0
        self._last_commit = time.monotonic()
        self._known = set(self.models["sha256"].astype(str))

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:  # a failed commit (a full disk) still releases the files and the lock
            self.close()

    def close(self) -> None:
        """Release the lock; uncommitted work is discarded."""
        for p in list(self._pending.values()) + self._finished:
            p.discard()
        self._pending.clear()
        self._finished.clear()
        if not self._lock_fh.closed:
            fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()

    def _remove_orphans(self) -> None:
        listed = {s["path"] for s in self.manifest["shards"]}
        for sub in self.root.glob("k*"):
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                rel = f"{sub.name}/{f.name}"
                if rel not in listed and (f.name.endswith(".partial") or f.name.startswith("shard-")):
                    f.unlink()
        for f in self.root.glob(".*.tmp"):
            f.unlink()
        staging = self.root / STAGING
        if staging.is_dir() and not staging.is_symlink():  # staged files of a distributed extract that died
            shutil.rmtree(staging, ignore_errors=True)

    # -------------------------------------------------------------- adding
    def has_model(self, sha256: str) -> bool:
        return sha256 in self._known

    def known_models(self) -> frozenset[str]:
        """The sha256 keys of every model committed or added so far."""
        return frozenset(self._known)

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    def add_model(self, model: LoadedModel, *, sha256: str, sizes: Sequence[int] = (3, 5, 7),
                  all_convs: bool = False, meta: Mapping[str, Any] | None = None,
                  name: str | None = None,
                  layer_columns: Sequence[Mapping[str, Any]] | None = None,
                  on_layer: Callable[[int], object] | None = None) -> dict[str, Any]:
        """Stream one loaded model into pending shards and table rows (not yet committed).  Layers of square
        sizes in ``sizes`` are stored when depthwise, or always with ``all_convs``; every conv layer is
        recorded in the layers table.  Returns the model's row.

        ``layer_columns``: one mapping per layer, merged into that layer's row: ``depth``/``depth_norm``
        replace the computed ones (for sources that record their own, e.g. CNN Filter DB's conv_depth /
        conv_depth_norm), other names become extra columns (stored as strings).  Columns the writer owns
        (ids, shard, rows, counts) cannot be set.  ``on_layer(n_kernels)`` is called after each layer (for
        progress bars)."""
        if sha256 in self._known:
            raise CorpusError(f"{model.source_path} (sha256 {sha256[:12]}) is already in {self.root}")
        if layer_columns is not None:
            if len(layer_columns) != len(model.layers):
                raise ValueError(f"{model.source_path}: layer_columns has {len(layer_columns)} entries for "
                                 f"{len(model.layers)} layers")
            owned = {c for cols in layer_columns for c in cols} & _WRITER_LAYER_COLUMNS
            if owned:
                raise ValueError(f"{model.source_path}: layer_columns cannot set {sorted(owned)} (written by "
                                 "the corpus writer)")
        state = self._mark()
        try:
            return self._add_model(model, sha256=sha256, sizes=sizes, all_convs=all_convs, meta=meta, name=name,
                                   layer_columns=layer_columns, on_layer=on_layer)
        except BaseException:
            self._rewind(state)  # nothing of a model that failed half-way reaches a commit
            raise

    def _mark(self) -> dict[str, Any]:
        return {"pending": {k: (p, p.mark()) for k, p in self._pending.items()}, "finished": len(self._finished),
                "layers": len(self._new_layers), "next_shard": self.manifest["next_shard"]}

    def _rewind(self, state: dict[str, Any]) -> None:
        before = {id(p) for p, _ in state["pending"].values()}
        for pend in self._finished[state["finished"]:] + list(self._pending.values()):
            if id(pend) not in before:
                pend.discard()
        del self._finished[state["finished"]:]
        self._pending = {}
        for k, (pend, mark) in state["pending"].items():
            pend.rewind(mark)
            self._pending[k] = pend
        del self._new_layers[state["layers"]:]
        self.manifest["next_shard"] = state["next_shard"]

    def _add_model(self, model: LoadedModel, *, sha256: str, sizes: Sequence[int], all_convs: bool,
                   meta: Mapping[str, Any] | None, name: str | None,
                   layer_columns: Sequence[Mapping[str, Any]] | None,
                   on_layer: Callable[[int], object] | None) -> dict[str, Any]:
        def store(k: int, kernels: np.ndarray) -> tuple[str, int]:
            pend = self._shard_for(k, len(kernels))
            return pend.path, pend.append(kernels)

        row, layer_rows = model_rows(model, sha256=sha256, sizes=sizes, all_convs=all_convs, meta=meta, name=name,
                                     layer_columns=layer_columns, on_layer=on_layer, store=store)
        return self._register(row, layer_rows)

    def _register(self, row: dict[str, Any], layer_rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Give a model's rows their ids and queue them for the next commit."""
        model_id = int(self.manifest["n_models"]) + len(self._new_models)
        layer_id0 = int(self.manifest["n_layers"]) + len(self._new_layers)
        for i, layer_row in enumerate(layer_rows):
            layer_row["layer_id"], layer_row["model_id"] = layer_id0 + i, model_id
        row["model_id"] = model_id
        self._new_layers.extend(layer_rows)
        self._new_models.append(row)
        self._known.add(row["sha256"])
        self._pending_rows += sum(int(r["rows"]) for r in layer_rows)
        return row

    def add_staged(self, staged: StagedModel) -> dict[str, Any]:
        """Add a model a cluster worker read and wrote as shard files of its own in the staging area
        (:func:`stage_model`): at the next commit each file is moved into the corpus as a new shard (renamed,
        never copied), before the tables and the manifest that list it.  Returns the model's row."""
        if staged.row["sha256"] in self._known:
            raise CorpusError(f"{staged.row['source_path']} (sha256 {staged.row['sha256'][:12]}) is already in "
                              f"{self.root}")
        shard_of: dict[str, str] = {}
        for k, entry in sorted(staged.files.items()):
            path = Path(entry["file"])
            expect = NPY_HEADER_BYTES + int(entry["rows"]) * int(k) ** 2 * self.dtype.itemsize
            inside = path.resolve().parent.parent == (self.root / STAGING).resolve()
            if not inside or path.is_symlink() or not path.is_file() or path.stat().st_size != expect:
                raise CorpusError(f"{path}: a staged shard of {staged.row['source_path']} is missing or has the "
                                  f"wrong size (expected {expect} bytes): the staging area "
                                  f"{self.root / STAGING} must be on the shared corpus filesystem")
            index = int(self.manifest["next_shard"])
            self.manifest["next_shard"] = index + 1
            shard = f"k{int(k)}/shard-{index:06d}.npy"
            self._staged.append((path, {"path": shard, "k": int(k), "rows": int(entry["rows"]),
                                        "sha256": entry["sha256"]}))
            shard_of[f"k{int(k)}"] = shard
        layer_rows = [dict(r, shard=shard_of[r["shard"]] if r["shard"] else "") for r in staged.layers]
        return self._register(dict(staged.row), layer_rows)

    def staging_area(self) -> Path:
        """The folder (in the corpus, so on its filesystem) where workers stage files for :meth:`add_staged`."""
        path = self.root / STAGING
        path.mkdir(exist_ok=True)
        return path

    def _shard_for(self, k: int, rows: int) -> _PendingShard:
        pend = self._pending.get(k)
        if pend is not None and pend.rows > 0 and pend.rows + rows > self.shard_rows:
            self._finished.append(pend)
            pend = None
        if pend is None:
            index = int(self.manifest["next_shard"])
            self.manifest["next_shard"] = index + 1
            pend = self._pending[k] = _PendingShard(self.root, k, index, self.dtype)
        return pend

    def maybe_commit(self) -> bool:
        """Commit when enough rows or time have accumulated since the last commit."""
        if self._new_models and (self._pending_rows >= self.commit_rows
                                 or time.monotonic() - self._last_commit >= self.commit_seconds):
            self.commit()
            return True
        return False

    def commit(self) -> None:
        """Make every model added so far visible, atomically (see the module docstring for the order)."""
        import pandas as pd

        if not self._new_models:
            return
        new_shards = [p.finish(self.root) for p in self._finished + list(self._pending.values()) if p.rows > 0]
        for p in self._finished + list(self._pending.values()):
            if p.rows == 0:
                p.discard()
        self._finished.clear()
        self._pending.clear()
        for src, entry in self._staged:  # a cluster worker's file becomes a shard: renamed, never copied
            (self.root / f"k{entry['k']}").mkdir(exist_ok=True)
            os.replace(src, self.root / entry["path"])
            new_shards.append(entry)
        self._staged.clear()
        for sub in {Path(s["path"]).parent for s in new_shards}:
            fsync_dir(self.root / sub)
        models = pd.concat([self.models, pd.DataFrame(self._new_models)], ignore_index=True)
        layers = pd.concat([self.layers, pd.DataFrame(self._new_layers)],
                           ignore_index=True) if self._new_layers else self.layers
        models = _typed(models, MODEL_COLUMNS)
        layers = _typed(layers, LAYER_COLUMNS)
        _write_table(self.root / "models.parquet", models)
        _write_table(self.root / "layers.parquet", layers)
        manifest = dict(self.manifest)
        manifest["shards"] = list(self.manifest["shards"]) + new_shards
        manifest["kernel_sizes"] = sorted({int(s["k"]) for s in manifest["shards"]})
        manifest["n_models"] = len(models)
        manifest["n_layers"] = len(layers)
        manifest["generation"] = int(self.manifest.get("generation", 0)) + 1
        manifest["updated"] = _now()
        atomic_write_bytes(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(self.root)
        self.manifest = manifest
        self.models, self.layers = models, layers
        self._new_models, self._new_layers = [], []
        self._pending_rows = 0
        self._last_commit = time.monotonic()


@dataclass
class StagedModel:
    """A model read by a cluster worker: its table rows (no ids yet; a layer's ``shard`` is "kK" for the staged
    file of that size) and its staged shard files, k -> {file, rows, sha256}."""

    row: dict[str, Any]
    layers: list[dict[str, Any]]
    files: dict[int, dict[str, Any]]


def model_rows(model: LoadedModel, *, sha256: str, sizes: Sequence[int], all_convs: bool,
               meta: Mapping[str, Any] | None, name: str | None, layer_columns: Sequence[Mapping[str, Any]] | None,
               on_layer: Callable[[int], object] | None,
               store: Callable[[int, np.ndarray], tuple[str, int]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The models-table row and the layers-table rows of a loaded model (without ids), storing the kernels of
    each stored layer through ``store(k, kernels) -> (shard, row_start)``."""
    depths, depth_norms = conv_depths([layer.order for layer in model.layers])
    kernels_total = 0
    layer_rows: list[dict[str, Any]] = []
    for i, layer in enumerate(model.layers):
        kernels = layer.kernels()
        finite = np.isfinite(kernels).all(axis=1)
        n_nonfinite = int(len(kernels) - finite.sum())
        n_zero = int((finite & ~kernels.any(axis=1)).sum())
        stored = layer.kh == layer.kw and layer.kh in sizes and (layer.kind == "depthwise" or all_convs)
        shard, row_start, rows = "", 0, 0
        if stored and len(kernels):
            shard, row_start = store(layer.kh, kernels)
            rows = len(kernels)
        layer_row = {
            "layer_id": -1, "model_id": -1, "name": layer.name, "kind": layer.kind,
            "kind_inferred": bool(layer.kind_inferred), "kh": layer.kh, "kw": layer.kw, "c_out": layer.c_out,
            "c_in_per_group": layer.c_in_per_group, "groups": int(layer.groups), "depth": depths[i],
            "depth_norm": depth_norms[i], "bn_folded": bool(layer.bn_folded), "shard": shard,
            "row_start": row_start, "rows": rows, "n_kernels": len(kernels), "n_zero": n_zero,
            "n_nonfinite": n_nonfinite,
        }
        if layer_columns is not None:
            layer_row.update({key: value if key in LAYER_COLUMNS else ("" if value is None else str(value))
                              for key, value in layer_columns[i].items()})
        layer_rows.append(layer_row)
        if on_layer is not None:
            on_layer(len(kernels))
        kernels_total += len(kernels)
    meta = dict(model.meta) | dict(meta or {})
    row = {
        "model_id": -1, "name": name or model.name, "source_path": str(model.source_path),
        "sha256": sha256, "format": model.format, "family": "", "task": "", "category": "", "dataset": "",
        "n_layers": len(model.layers), "n_kernels": kernels_total, "weight_set": model.weight_set,
    }
    for key, value in meta.items():
        col = snake_case(key)
        if col in ("model_id", "sha256", "n_layers", "n_kernels"):
            continue
        row[col] = "" if value is None else str(value)
    return row, layer_rows


def stage_model(model: LoadedModel, staging: Path, prefix: str, *, sha256: str, dtype: str,
                sizes: Sequence[int] = (3, 5, 7), all_convs: bool = False, meta: Mapping[str, Any] | None = None,
                name: str | None = None) -> StagedModel:
    """Write a loaded model's stored kernels as one staged shard file per kernel size, ``staging/PREFIX-kK.npy``
    (complete .npy files, fsynced; written again whole if the task is retried), for
    :meth:`CorpusWriter.add_staged` on the client."""
    pending: dict[int, _PendingShard] = {}

    def store(k: int, kernels: np.ndarray) -> tuple[str, int]:
        pend = pending.get(k)
        if pend is None:
            pend = pending[k] = _PendingShard(staging, k, 0, np.dtype(dtype), partial=staging / f"{prefix}-k{k}.npy")
        return f"k{k}", pend.append(kernels)

    try:
        row, layer_rows = model_rows(model, sha256=sha256, sizes=sizes, all_convs=all_convs, meta=meta, name=name,
                                     layer_columns=None, on_layer=None, store=store)
        files = {}
        for k, pend in pending.items():
            done = pend.finish(None)
            files[k] = {"file": str(pend.partial), "rows": done["rows"], "sha256": done["sha256"]}
    except BaseException:
        for pend in pending.values():
            pend.discard()
        raise
    return StagedModel(row, layer_rows, files)


def snake_case(key: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "_" for c in key.strip())
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_") or "meta"


def _typed(frame: Any, columns: Mapping[str, str]) -> Any:
    for col, typ in columns.items():
        if col not in frame.columns:
            frame[col] = "" if typ == "str" else 0
        frame[col] = frame[col].fillna("").astype(str) if typ == "str" else frame[col].astype(typ)
    extra = [c for c in frame.columns if c not in columns]
    for col in extra:
        frame[col] = frame[col].fillna("").astype(str)
    return frame[list(columns) + extra]
