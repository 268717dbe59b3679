"""The ``import-filterdb`` and ``export-filterdb`` verbs: a CNN Filter DB ``dataset.h5`` into a corpus, and a
corpus's 3x3 kernels back out in that format (the reading itself: ``corpus/loaders/filterdb.py``).

Import (:func:`import_filterdb`) validates the whole layout first (shapes, every filter_ids range inside
``filters``, no overlaps, the data actually present in the file) and only then opens the corpus, so a bad file
never touches it.  It streams ``filters`` one layer at a time (in blocks of ``chunk_rows``), never the whole
array (the real file is 98 GiB).  Choices that are ours:

* one corpus model per CNN Filter DB model_id, keyed ``f"{digest}:{model_id}"`` (a rerun skips imported
  models).  ``identity="meta"`` (default): digest = sha256 of the file size, the ``filters`` shape/dtype, the
  raw bytes of every dataset under ``meta`` and the first and last 4096 filters -- seconds on the real file,
  and it changes whenever the table or the file's size does.  ``identity="file"``: sha256 of the whole file
  (minutes for 98 GiB), for users who want the strict key.  Importing one file once with each mode imports
  it twice (the keys differ).
* kind (kind_inferred = True): with n filters, out_channels = c_out and in_channels = the conv's input
  channels, c_in_per_group = n / out_channels and groups = in_channels / c_in_per_group; groups = 1 ->
  regular, c_in_per_group = 1 and groups > 1 -> depthwise, else grouped (``classify_kind``).  When the
  channels are missing or do not divide n, the layer is recorded as regular with c_out = n,
  c_in_per_group = 1 and a warning.  Files written by :func:`export_filterdb` carry ``groups``,
  ``kind_inferred``, ``bn_folded`` and ``layer_name`` columns, which are used when present.
* depth / depth_norm are the file's conv_depth / conv_depth_norm, unchanged (the real file counts depths over
  all convs, not only the 3x3 ones, so they cannot be recomputed from the stored layers).
* model columns: model -> name, Name (architecture name, not unique) -> family, Task -> task,
  "Visual Category" -> category, Training-Dataset -> dataset, every other model-level column -> its
  snake_case name (producer, op_set, pretraining_dataset, ...).  Per-layer columns (in/out channels,
  layer_depth, layer_id) are not model metadata; layer_depth and the file's layer_id are kept as the extra
  layer columns ``layer_depth`` and ``filterdb_layer_id``, the model_id as the model column
  ``filterdb_model_id``.

Export (:func:`export_filterdb`) writes the stored 3x3 kernels of a corpus in exactly that format (float64
``filters`` written in blocks, ``meta`` with ``to_hdf(format="table")`` so that its data holds no pickles) to
a temporary file that is renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas.corpus.loaders.base import KINDS, ConvLayer, LoadedModel, classify_kind
from kernelatlas.corpus.loaders.filterdb import (
    _DAMAGED,
    _KNOWN_MODEL_COLUMNS,
    FILTERS_KEY,
    INDEX_LEVELS,
    LAYER_LEVEL_COLUMNS,
    META_KEY,
    MODEL_COLUMN_MAP,
    FilterDBError,
    FilterDBLayer,
    _open_h5,
    _plain,
    filterdb_identity,
    inspect_filterdb,
)

__all__ = ["ExportReport", "ImportReport", "export_filterdb", "import_filterdb"]


# ---------------------------------------------------------------------------------------------- import


class _LazyFilters:
    """A layer's filters as a 4-D [c_out, c_in_per_group, 3, 3] array-like that reads the file only when
    converted (``np.asarray``), in blocks of ``chunk_rows``, straight into the corpus dtype -- so the
    corpus writer holds one layer at a time, never a whole model."""

    def __init__(self, ds: Any, layer: FilterDBLayer, shape: tuple[int, int, int, int], dtype: np.dtype,
                 chunk_rows: int, where: str, on_rows: Callable[[int], None] | None) -> None:
        self.ds, self.layer, self.shape, self.dtype = ds, layer, shape, dtype
        self.chunk_rows, self.where, self.on_rows = chunk_rows, where, on_rows
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        n = self.layer.n
        out = np.empty((n, 9), dtype=self.dtype)
        for a in range(0, n, self.chunk_rows):
            b = min(a + self.chunk_rows, n)
            try:
                block = self.ds[self.layer.start + a:self.layer.start + b]
            except (OSError, ValueError) as exc:
                raise FilterDBError(f"{self.where}: filters {self.layer.start + a}:{self.layer.start + b} are "
                                    f"unreadable ({exc}); {_DAMAGED}") from None
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                out[a:b] = np.asarray(block).reshape(-1, 9)
            if self.on_rows is not None:
                self.on_rows(b - a)
        out = out.reshape(self.shape)
        return out if dtype is None else out.astype(dtype, copy=False)


def _truthy(value: Any) -> bool | None:
    value = _plain(value)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "t")
    return bool(value)


def _int_or_none(value: Any) -> int | None:
    value = _plain(value)
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return int(f) if np.isfinite(f) and f == int(f) else None


def _layer_shape(layer: FilterDBLayer) -> tuple[int, int, int, bool, str | None]:
    """(c_out, c_in_per_group, groups, kind_inferred, warning) from the row's channels (module docstring)."""
    n = layer.n
    row = layer.row
    out_ch = _int_or_none(row.get("out_channels"))
    in_ch = _int_or_none(row.get("in_channels"))
    groups = _int_or_none(row.get("groups"))
    inferred = _truthy(row.get("kind_inferred"))
    where = f"model_id {layer.model_id} layer {layer.layer_id}"
    if out_ch and out_ch > 0 and n % out_ch == 0:
        cipg = n // out_ch
        if groups and groups > 0:
            return out_ch, cipg, groups, True if inferred is None else inferred, None
        if in_ch and in_ch > 0 and in_ch % cipg == 0:
            return out_ch, cipg, in_ch // cipg, True, None
        return out_ch, cipg, 1, True, (f"{where}: in_channels {in_ch} does not match {n} filters / out_channels "
                                       f"{out_ch}; recorded as regular")
    return n, 1, 1, True, (f"{where}: out_channels {out_ch} does not divide its {n} filters; recorded as "
                           f"regular with c_out = {n}")


def _model_meta(layers: list[FilterDBLayer]) -> tuple[str | None, str, dict[str, Any]]:
    """(name, weight_set, model columns) from the model's first meta row (model-level columns repeat)."""
    from kernelatlas.corpus.store import MODEL_COLUMNS, snake_case

    first = layers[0].row
    name = None
    weight_set = ""
    meta: dict[str, Any] = {}
    for key, value in first.items():
        skey = str(key)
        if skey.startswith("Unnamed:"):  # a CSV writer's unnamed index column
            continue
        if skey in LAYER_LEVEL_COLUMNS:
            if skey == "weight_set":
                weight_set = "" if _plain(value) is None else str(_plain(value))
            continue
        value = _plain(value)
        if skey == "model":
            name = None if value is None else str(value)
            continue
        col = MODEL_COLUMN_MAP.get(skey) or snake_case(skey)
        if col in MODEL_COLUMNS and skey not in MODEL_COLUMN_MAP:
            col = f"filterdb_{col}"  # never let a file column overwrite name/format/sha256 ...
        meta[col] = value
    return name, weight_set, meta


@dataclass
class ImportReport:
    added: list[dict[str, Any]] = field(default_factory=list)   # model rows added
    skipped: list[Any] = field(default_factory=list)            # CNN Filter DB model_ids already imported
    warnings: list[str] = field(default_factory=list)
    identity: str = ""
    unreferenced: int = 0                                       # filters no meta row points to

    @property
    def kernels(self) -> int:
        return sum(int(r["n_kernels"]) for r in self.added)


def import_filterdb(h5_path: str | os.PathLike[str], corpus_path: str | os.PathLike[str], *,
                    chunk_rows: int = 1 << 20, progress: bool = True, dtype: str = "float32",
                    identity: str = "meta", commit_rows: int = 1 << 24,
                    commit_seconds: float = 60.0) -> ImportReport:
    """Import a CNN Filter DB ``dataset.h5`` into the corpus at ``corpus_path`` (created if absent): one model
    per model_id, one layer per meta row, every filter stored in the k3 shards as ``dtype``.  Resumable: work
    is committed every ``commit_rows`` kernels and a rerun skips the models already imported.  The file is
    validated before the corpus is opened (see :func:`inspect_filterdb`); ``identity``: "meta" or "file"."""
    from tqdm import tqdm

    from kernelatlas.corpus import CorpusWriter

    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    store = np.dtype(dtype)
    if store not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be float32 or float16, got {dtype}")
    path = Path(h5_path)
    layout = inspect_filterdb(path)
    digest = filterdb_identity(path, identity)
    report = ImportReport(identity=f"{identity}:{digest}", unreferenced=layout.unreferenced)
    with _open_h5(path) as f, CorpusWriter(corpus_path, dtype=store.name, commit_rows=commit_rows,
                                            commit_seconds=commit_seconds) as writer:
        ds = f[layout.filters_key]
        total = layout.n_filters - layout.unreferenced
        bar = tqdm(total=total, desc="import-filterdb", unit="filter", unit_scale=True, disable=not progress,
                   file=sys.stderr)
        for model_id, fdb_layers in layout.models.items():
            key = f"{digest}:{model_id}"
            if writer.has_model(key):
                report.skipped.append(model_id)
                bar.update(sum(layer.n for layer in fdb_layers))
                continue
            layers: list[ConvLayer] = []
            columns: list[dict[str, Any]] = []
            for layer in fdb_layers:
                c_out, cipg, groups, inferred, warning = _layer_shape(layer)
                if warning:
                    report.warnings.append(f"{path}: {warning}")
                where = f"{path}: model_id {model_id} layer {layer.layer_id}"
                weight = _LazyFilters(ds, layer, (c_out, cipg, 3, 3), store, chunk_rows, where, bar.update)
                name = _plain(layer.row.get("layer_name"))
                layers.append(ConvLayer(
                    name=str(name) if name not in (None, "") else f"layer{layer.layer_id}",
                    weight=weight,  # type: ignore[arg-type]  # read on demand, see _LazyFilters
                    groups=groups, kind=classify_kind(c_out, cipg, groups), kind_inferred=inferred,
                    order=float(layer.conv_depth), bn_folded=bool(_truthy(layer.row.get("bn_folded")))))
                cols: dict[str, Any] = {"depth": layer.conv_depth, "depth_norm": layer.conv_depth_norm,
                                        "filterdb_layer_id": _plain(layer.layer_id)}
                layer_depth = _plain(layer.row.get("layer_depth"))
                if layer_depth is not None:
                    cols["layer_depth"] = layer_depth
                columns.append(cols)
            name, weight_set, meta = _model_meta(fdb_layers)
            meta["filterdb_model_id"] = model_id
            meta["filterdb_identity"] = identity
            model = LoadedModel(source_path=str(path), format="filterdb", layers=layers, weight_set=weight_set)
            row = writer.add_model(model, sha256=key, sizes=(3,), all_convs=True, meta=meta,
                                   name=name or f"filterdb-{model_id}", layer_columns=columns)
            report.added.append(row)
            writer.maybe_commit()
        bar.close()
    return report


# ---------------------------------------------------------------------------------------------- export


@dataclass
class ExportReport:
    path: Path
    models: int
    layers: int
    filters: int
    skipped_layers: int  # layers not exported (not 3x3, not stored, or another kind)


def _export_value(values: Any) -> Any:
    """A corpus string column as numbers when every value parses (ints if all integral), else strings."""
    import pandas as pd

    text = values.astype(str)
    if (text == "").any():
        return text
    try:
        numbers = pd.to_numeric(text)
    except (ValueError, TypeError):
        return text
    return numbers


def export_filterdb(corpus_path: str | os.PathLike[str], h5_path: str | os.PathLike[str], *,
                    kinds: Sequence[str] | None = None, progress: bool = True,
                    chunk_rows: int = 1 << 20) -> ExportReport:
    """Write the stored 3x3 kernels of a corpus (``kinds``: only layers of those kinds) as a CNN Filter DB
    ``dataset.h5`` at ``h5_path``: ``filters`` (N, 3, 3) float64 and ``meta`` (pandas ``to_hdf``, format
    "table", MultiIndex [model_id, conv_depth, conv_depth_norm, layer_id], inclusive filter_ids).  Written to
    a temporary file beside ``h5_path`` and renamed into place when complete."""
    import h5py
    from tqdm import tqdm

    from kernelatlas import __version__
    from kernelatlas.corpus import MODEL_COLUMNS, Corpus

    corpus = Corpus.open(corpus_path)
    out = Path(h5_path)
    if kinds is not None:
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kind(s) {sorted(unknown)}; choose from {', '.join(KINDS)}")
    layers = corpus.layers
    sel = layers[(layers["kh"] == 3) & (layers["kw"] == 3) & (layers["rows"] > 0)]
    if kinds is not None:
        sel = sel[sel["kind"].isin(list(kinds))]
    sel = sel.sort_values(["model_id", "layer_id"], kind="stable")
    if not len(sel):
        what = f" of kind {', '.join(kinds)}" if kinds else ""
        raise FilterDBError(f"{corpus.root}: no stored 3x3 kernels{what} to export (only stored 3x3 layers go "
                            "into a CNN Filter DB file; extract with --all-convs to store regular convs)")
    partial = sel[sel["rows"] != sel["n_kernels"]]
    if len(partial):
        raise FilterDBError(f"{corpus.root}: layer {int(partial['layer_id'].iloc[0])} stores "
                            f"{int(partial['rows'].iloc[0])} of {int(partial['n_kernels'].iloc[0])} kernels; "
                            "the corpus is damaged")
    models = corpus.models.set_index("model_id", drop=False)
    n_total = int(sel["rows"].sum())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    meta_rows: list[dict[str, Any]] = []
    try:
        with h5py.File(tmp, "w") as f:
            dset = f.create_dataset(FILTERS_KEY, shape=(n_total, 3, 3), dtype="<f8")
            bar = tqdm(total=n_total, desc="export-filterdb", unit="filter", unit_scale=True,
                       disable=not progress, file=sys.stderr)
            offset = 0
            shards: dict[str, np.ndarray] = {}
            ordinal: dict[int, int] = {}
            for layer in sel.itertuples(index=False):
                arr = shards.get(layer.shard)
                if arr is None:
                    arr = shards[layer.shard] = corpus.shard_array(layer.shard)
                rows = int(layer.rows)
                for a in range(0, rows, chunk_rows):
                    b = min(a + chunk_rows, rows)
                    block = arr[int(layer.row_start) + a:int(layer.row_start) + b]
                    dset[offset + a:offset + b] = np.asarray(block, dtype=np.float64).reshape(-1, 3, 3)
                    bar.update(b - a)
                mid = int(layer.model_id)
                lid = ordinal.get(mid, 0)
                ordinal[mid] = lid + 1
                row = {"model_id": mid, "conv_depth": int(layer.depth), "conv_depth_norm": float(layer.depth_norm),
                       "layer_id": lid, "filter_ids": f"{offset}:{offset + rows - 1}",
                       "in_channels": int(layer.c_in_per_group) * int(layer.groups),
                       "out_channels": int(layer.c_out)}
                layer_depth = _int_or_none(getattr(layer, "layer_depth", None)) if "layer_depth" in sel.columns \
                    else None
                row["layer_depth"] = layer_depth if layer_depth is not None else int(layer.depth)
                row["_layer"] = layer
                meta_rows.append(row)
                offset += rows
            bar.close()
        frame = _export_meta(meta_rows, models, __version__, MODEL_COLUMNS)
        frame.to_hdf(tmp, key=META_KEY, mode="a", format="table")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        with contextlib.suppress(OSError):
            fd = os.open(out.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return ExportReport(path=out, models=int(sel["model_id"].nunique()), layers=len(sel), filters=n_total,
                        skipped_layers=len(layers) - len(sel))


# corpus model columns that do not go into the file (bookkeeping of this corpus or of an earlier import)
_MODEL_NOT_EXPORTED = frozenset({"model_id", "source_path", "sha256", "format", "n_layers", "n_kernels",
                                 "filterdb_model_id", "filterdb_identity"})


def _export_meta(meta_rows: list[dict[str, Any]], models: Any, version: str, model_columns: Any) -> Any:
    import pandas as pd

    reverse = {v: k for k, v in MODEL_COLUMN_MAP.items()}
    model_cols = [c for c in models.columns if c not in _MODEL_NOT_EXPORTED]
    records = []
    for row in meta_rows:
        layer = row.pop("_layer")
        model = models.loc[row["model_id"]]
        rec: dict[str, Any] = {}
        for col in model_cols:
            if col == "weight_set" or col == "producer":
                continue
            name = reverse.get(col) or _KNOWN_MODEL_COLUMNS.get(col) or col
            if col.startswith("filterdb_") and col[9:] in model_columns:
                name = col[9:]  # a file column renamed on import (see _model_meta)
            if name in LAYER_LEVEL_COLUMNS:
                name = f"model_{name}"  # user metadata must not shadow a per-layer column
            rec[name] = str(model[col])
        rec.update(row)
        producer = str(model["producer"]) if "producer" in models.columns else ""
        rec["producer"] = producer or f"kernelatlas {version}"
        rec["weight_set"] = str(model["weight_set"])
        rec["layer_name"] = str(layer.name)
        rec["groups"] = int(layer.groups)
        rec["kind_inferred"] = bool(layer.kind_inferred)
        rec["bn_folded"] = bool(layer.bn_folded)
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    head = list(INDEX_LEVELS) + ["filter_ids"] + [reverse[c] for c in ("name", "family", "task", "category",
                                                                        "dataset")]
    head += ["in_channels", "out_channels", "layer_depth", "producer"]
    rest = [c for c in frame.columns if c not in head]
    frame = frame[head + rest]
    for col in frame.columns:
        if col in INDEX_LEVELS or col in ("in_channels", "out_channels", "layer_depth", "groups",
                                          "kind_inferred", "bn_folded"):
            continue
        if col in ("filter_ids", "layer_name", "weight_set", "producer") or col in reverse.values():
            frame[col] = frame[col].astype(str)
        else:
            frame[col] = _export_value(frame[col])
    return frame.set_index(list(INDEX_LEVELS))
