"""Reading the CNN Filter DB (Gavrikov & Keuper, CVPR 2022) ``dataset.h5`` safely: its layout and ``meta`` table.

The file (reference/README.md, section B) holds ``filters``, an (N, 3, 3) float64 array, and ``meta``, a pandas
table written with ``to_hdf`` (PyTables): one row per conv layer, MultiIndex [model_id, conv_depth,
conv_depth_norm, layer_id], a string column ``filter_ids`` = "start:end" with an INCLUSIVE end, and model
columns (model, Name, Task, "Visual Category", Training-Dataset, producer, ...) repeated on every row.

Why this module reads ``meta`` itself instead of calling ``pandas.read_hdf``: PyTables unpickles every
attribute that looks like a pickle and pandas' "fixed" format stores object (string) columns as pickled numpy
arrays, so ``read_hdf`` on a downloaded file can run arbitrary code.  Here the HDF5 structure is read with h5py
and the few pickles pandas needs (lists of column names, object arrays of strings) go through
:class:`RestrictedUnpickler`, which admits plain data only (numpy arrays/dtypes, str, numbers, containers).
Both ``to_hdf`` formats ("fixed" and "table") are read, and the early release's CSV-bytes ``meta`` too.
The unpickler never lets numpy rebuild anything itself: arrays, dtypes and scalars are assembled from checked
parts (see the pickles section), so a crafted dtype cannot make numpy read file bytes as pointers.  Every
file is walked by ``h5safe.check_file`` when opened and every dataset's size is checked before it is read
(docs/security-hdf5.md).

Importing into a corpus and exporting one are the jobs of ``kernelatlas.jobs.filterdb`` (the
``import-filterdb`` / ``export-filterdb`` verbs).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import pickle
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas.corpus.loaders import h5safe
from kernelatlas.corpus.loaders.base import LoaderError

__all__ = [
    "FilterDBError",
    "FilterDBLayout",
    "RestrictedUnpickler",
    "filterdb_identity",
    "inspect_filterdb",
    "layer_arrays",
    "read_meta",
    "restricted_loads",
]

FILTERS_KEY = "filters"
META_KEY = "meta"
INDEX_LEVELS = ("model_id", "conv_depth", "conv_depth_norm", "layer_id")
# file column -> corpus model column
MODEL_COLUMN_MAP = {"model": "name", "Name": "family", "Task": "task", "Visual Category": "category",
                    "Training-Dataset": "dataset"}
# documented CNN Filter DB model columns whose snake_case name is not the file's name (used on export)
_KNOWN_MODEL_COLUMNS = {"paper": "Paper", "pretraining_dataset": "Pretraining-Dataset", "datatype": "Datatype",
                        "accessible": "Accessible", "dataset_url": "Dataset URL"}
# per-layer columns of the file (everything else is model metadata, repeated on each of a model's rows)
LAYER_LEVEL_COLUMNS = frozenset({"model_id", "conv_depth", "conv_depth_norm", "layer_id", "filter_ids",
                                 "in_channels", "out_channels", "layer_depth", "layer_name", "groups",
                                 "kind", "kind_inferred", "bn_folded", "weight_set", "index", "level_0"})
SAMPLE_ROWS = 4096  # filters hashed at each end of the array by identity="meta"
_DAMAGED = ("the file is damaged, or compressed with a filter this h5py lacks (`pip install hdf5plugin` adds "
            "blosc, lz4, zstd ...)")


class FilterDBError(LoaderError):
    """A CNN Filter DB file that cannot be imported, or a corpus that cannot be exported; the message names the
    file (and row or layer) and what to do."""


# ---------------------------------------------------------------------------------------------- pickles
#
# pandas "fixed" tables and PyTables attributes hold pickles of plain data: lists of column names, tuples,
# numpy scalars (numpy.core.multiarray.scalar), and numpy arrays -- ``_reconstruct(ndarray, (0,), b"b")``
# followed by a BUILD of (version, shape, dtype, fortran, data), or ``_frombuffer(data, dtype, shape, order)``
# (protocol 5) -- whose dtype is itself ``numpy.dtype(descr, align, copy)`` followed by a BUILD of its state.
# Letting numpy run those BUILDs is not safe: ``dtype.__setstate__`` accepts any fields, offsets, subarrays and
# flags, and a void dtype rebuilt with an object field and flags 0 makes numpy read file bytes as PyObject
# pointers (a crafted file crashes the process at an address it chooses).  So no numpy object is ever created
# by the unpickler: every numpy global resolves to a stand-in below, BUILD only ever reaches a stand-in, and
# the real arrays, dtypes and scalars are assembled from validated parts (plain number / bool / bytes / str
# dtypes, object arrays only from a list of plain values) once the pickle is read.

# the dtype descriptors a pickle may name: bool, integers, floats, complex, fixed-width bytes / str, object
_PICKLE_DESCR = re.compile(r"^(?:b1|[iu][1248]|f(?:2|4|8|16)|c(?:8|16|32)|[SU][1-9]\d{0,8}|O8)$")
_PICKLE_MAX_NDIM = 32
_PLAIN_ITEMS = (str, bytes, int, float, complex, bool, type(None))


class PickleRefused(FilterDBError):
    """A pickle references something other than plain data: it is never loaded."""


class _Stand:
    """Base of the stand-ins: pickle's BUILD reaches only ``__setstate__`` here, which refuses by default."""

    __slots__ = ("where",)

    def __init__(self, where: str) -> None:
        self.where = where

    def __setstate__(self, state: Any) -> None:
        raise PickleRefused(f"{self.where} holds a pickle that sets the state of a {self._what}; kernelatlas "
                            "refuses to load it (only numpy's own array and dtype pickles are accepted)")

    _what = "value"


class _NDArrayClass(_Stand):
    """``numpy.ndarray`` as named by ``_reconstruct(numpy.ndarray, ...)``; not callable."""

    __slots__ = ()
    _what = "numpy.ndarray reference"


class _NA(_Stand):
    """``pandas.NA`` (a process-wide singleton: BUILD must never reach it)."""

    __slots__ = ()
    _what = "pandas.NA"


class _DType(_Stand):
    """A pickled ``numpy.dtype(descr, align, copy)``: a plain descriptor only.  Its BUILD may set the byte
    order and nothing else (no fields, offsets, subarray, flags or metadata)."""

    __slots__ = ("built", "dtype")
    _what = "numpy dtype"

    def __init__(self, where: str, descr: Any, align: Any = False, copy: Any = False) -> None:
        super().__init__(where)
        if not isinstance(descr, str) or not _PICKLE_DESCR.match(descr) or not isinstance(align, bool) \
                or not isinstance(copy, bool):
            raise PickleRefused(f"{where} holds a pickled numpy dtype {descr!r}; kernelatlas refuses to load it "
                                "(only plain number, bool, bytes, str and object dtypes are accepted: a crafted "
                                "dtype makes numpy read file bytes as memory pointers)")
        self.dtype = np.dtype(descr)
        self.built = False

    def __setstate__(self, state: Any) -> None:
        refused = PickleRefused(f"{self.where} holds a pickled numpy dtype {self.dtype.str!r} rebuilt with the "
                                f"state {str(state)[:200]}; kernelatlas refuses to load it (only a byte order may "
                                "be set: fields, offsets, subarrays and flags can make numpy read file bytes as "
                                "memory pointers)")
        if self.built or not isinstance(state, tuple) or not 7 <= len(state) <= 9:
            raise refused
        version, endian, subarray, names, fields, elsize, alignment = state[:7]
        rest = state[7:]
        flags = rest[0] if rest else 0
        metadata = rest[1] if len(rest) > 1 else None
        if version not in (1, 2, 3, 4) or subarray is not None or names is not None or fields is not None \
                or metadata is not None or endian not in ("<", ">", "|", "=") \
                or not all(type(v) is int for v in (elsize, alignment, flags)) \
                or elsize not in (-1, self.dtype.itemsize):
            raise refused
        if endian in "<>" and self.dtype.kind in "iufcU" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(endian)
        self.built = True


class _Scalar(_Stand):
    """``numpy.core.multiarray.scalar(dtype, data)``: a numpy scalar read from exactly one item's bytes (or,
    for the object dtype, the plain value itself)."""

    __slots__ = ("value",)
    _what = "numpy scalar"

    def __init__(self, where: str, dtype: Any, data: Any = None) -> None:
        super().__init__(where)
        if type(dtype) is not _DType:
            raise PickleRefused(f"{where} holds a pickled numpy scalar without a plain dtype; kernelatlas refuses "
                                "to load it")
        dt = dtype.dtype
        if dt.kind == "O":
            self.value = _plain_item(where, data)
            return
        if isinstance(data, str):
            data = data.encode("latin1")  # a protocol-0/2 pickle written by Python 2
        if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
            held = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray)) else f"a {type(data).__name__}"
            raise FilterDBError(f"{where}: a pickled numpy {dt} scalar holds {held}, not {dt.itemsize} bytes; the "
                                "file is damaged")
        self.value = np.frombuffer(bytes(data), dtype=dt, count=1)[0]


class _Array(_Stand):
    """A pickled numpy array, assembled here from checked parts: ``_reconstruct`` makes an empty one and its
    BUILD (once) gives (version, shape, dtype, fortran, data); ``_frombuffer`` gives them at once."""

    __slots__ = ("value",)
    _what = "numpy array"

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self.value: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.value is not None or not isinstance(state, tuple) or len(state) not in (4, 5) \
                or (len(state) == 5 and state[0] != 1):
            super().__setstate__(state)
        shape, dtype, fortran, data = state[-4:]
        self.value = _assemble(self.where, shape, dtype, "F" if fortran else "C", data)


def _plain_item(where: str, item: Any) -> Any:
    """An element of a pickled object array: a plain Python value, a checked numpy scalar, or pd.NA."""
    if type(item) in _PLAIN_ITEMS:
        return item
    if type(item) is _Scalar:
        return item.value
    if type(item) is _NA:
        import pandas as pd

        return pd.NA
    raise PickleRefused(f"{where} holds a pickled object array with an element of type {type(item).__name__}; "
                        "kernelatlas refuses to load it (only strings, numbers, None and NA are accepted)")


def _assemble(where: str, shape: Any, dtype: Any, order: Any, data: Any) -> np.ndarray:
    if type(dtype) is not _DType:
        raise PickleRefused(f"{where} holds a pickled numpy array without a plain dtype; kernelatlas refuses to "
                            "load it")
    dt = dtype.dtype
    if not isinstance(shape, tuple) or len(shape) > _PICKLE_MAX_NDIM \
            or not all(type(s) is int and s >= 0 for s in shape) or order not in ("C", "F"):
        raise FilterDBError(f"{where}: a pickled numpy array has the shape {str(shape)[:100]} (order "
                            f"{str(order)[:10]}); the file is damaged")
    n = math.prod(shape)
    if dt.kind == "O":
        if type(data) is not list or len(data) != n:
            raise PickleRefused(f"{where} holds a pickled object array of shape {shape} whose data is not a list "
                                f"of {n} values; kernelatlas refuses to load it (numpy would read its bytes as "
                                "memory pointers)")
        out = np.empty(n, dtype=object)
        for i, item in enumerate(data):
            out[i] = _plain_item(where, item)
        shaped = out.reshape(shape)  # numpy lists an object array's items in C order, whatever its memory order
        return np.asfortranarray(shaped) if order == "F" else shaped
    if isinstance(data, str):
        data = data.encode("latin1")  # a protocol-0/2 pickle written by Python 2
    if not isinstance(data, (bytes, bytearray)) or len(data) != n * dt.itemsize:
        held = f"{len(data):,} bytes" if isinstance(data, (bytes, bytearray)) else f"a {type(data).__name__}"
        raise FilterDBError(f"{where}: a pickled numpy array declares {shape} of {dt} ({n * dt.itemsize:,} bytes) "
                            f"but holds {held}; the file is damaged")
    return np.frombuffer(bytes(data), dtype=dt, count=n).reshape(shape, order=order).copy()


def _resolve(value: Any, where: str) -> Any:
    """The unpickled value with every stand-in replaced by the real numpy array / dtype / scalar / pd.NA."""
    memo: dict[int, Any] = {}

    def real(obj: Any) -> Any:
        kind = type(obj)
        if kind is _Array:
            if obj.value is None:
                raise FilterDBError(f"{where}: a pickled numpy array has no data; the file is damaged")
            return obj.value
        if kind is _DType:
            return obj.dtype
        if kind is _Scalar:
            return obj.value
        if kind is _NA:
            import pandas as pd

            return pd.NA
        if kind is _NDArrayClass:
            raise PickleRefused(f"{where} holds a pickle of the numpy.ndarray class itself; kernelatlas refuses "
                                "to load it")
        if kind not in (list, dict, tuple, set, frozenset):
            return obj
        key = id(obj)
        if key in memo:
            return memo[key]
        if kind is list:
            memo[key] = obj
            obj[:] = [real(v) for v in obj]
            return obj
        if kind is dict:
            memo[key] = obj
            items = list(obj.items())
            obj.clear()
            for k, v in items:
                obj[real(k)] = real(v)
            return obj
        out = kind(real(v) for v in obj)
        memo[key] = out
        return out

    try:
        return real(value)
    except RecursionError:
        raise FilterDBError(f"{where}: a pickled value is nested too deeply; the file is damaged") from None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data only: numpy arrays, dtypes and scalars (rebuilt from checked parts, see above),
    pd.NA, and what pickle builds without a global (str, bytes, numbers, None, lists, tuples, dicts, sets).
    Any other global -- ``os.system``, ``builtins.eval``, a class to instantiate -- raises
    :class:`PickleRefused` before anything is called, and no BUILD ever reaches a numpy or pandas object."""

    def __init__(self, file: Any, *, where: str) -> None:
        super().__init__(file, fix_imports=True, encoding="latin1")
        self.where = where
        self._globals = self._make_globals()

    def _make_globals(self) -> dict[tuple[str, str], Any]:
        where = self.where
        ndarray = _NDArrayClass(where)

        def reconstruct(cls: Any, shape: Any = None, typecode: Any = None) -> _Array:
            if cls is not ndarray:
                raise PickleRefused(f"{where} holds a pickle that rebuilds a {type(cls).__name__} as a numpy "
                                    "array; kernelatlas refuses to load it (only numpy.ndarray is accepted)")
            return _Array(where)

        def frombuffer(data: Any, dtype: Any, shape: Any, order: Any) -> _Array:
            if type(dtype) is _DType and dtype.dtype.kind == "O":
                raise PickleRefused(f"{where} holds an object array pickled as raw bytes; kernelatlas refuses to "
                                    "load it")
            out = _Array(where)
            out.value = _assemble(where, shape, dtype, order, data)
            return out

        def dtype(descr: Any, align: Any = False, copy: Any = False) -> _DType:
            return _DType(where, descr, align, copy)

        def scalar(dt: Any, data: Any = None) -> _Scalar:
            return _Scalar(where, dt, data)

        na = _NA(where)
        allowed: dict[tuple[str, str], Any] = {
            ("numpy", "ndarray"): ndarray,
            ("numpy", "dtype"): dtype,
            ("_codecs", "encode"): __import__("_codecs").encode,  # protocol-2 pickles of bytes
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("builtins", "complex"): complex,
            ("builtins", "bytearray"): bytearray,
            ("pandas._libs.missing", "NA"): na,
            ("pandas", "NA"): na,
        }
        # numpy 1.x pickles name numpy.core.*, numpy 2.x numpy._core.*: both map to the stand-ins
        for core in ("numpy.core", "numpy._core"):
            allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
            allowed[(f"{core}.multiarray", "scalar")] = scalar
            allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
        # numpy 2 names a dtype's class (numpy.dtypes.Float64DType ...) in some pickles: plain ones only
        with contextlib.suppress(ImportError):
            import numpy.dtypes as npdtypes

            for dname in dir(npdtypes):
                if not dname.endswith("DType"):
                    continue
                try:
                    dt = getattr(npdtypes, dname)()
                except Exception:
                    continue
                descr = f"{dt.kind}{dt.itemsize}"
                if isinstance(dt, np.dtype) and _PICKLE_DESCR.match(descr):
                    allowed[("numpy.dtypes", dname)] = (lambda d=descr: _DType(where, d))
        return allowed

    def find_class(self, module: str, name: str) -> Any:
        obj = self._globals.get((module, name))
        if obj is None:
            raise PickleRefused(
                f"{self.where} holds a pickle that references {module}.{name}; kernelatlas refuses to load it "
                "(unpickling it could run code -- pandas.read_hdf would).  Only plain data (numpy arrays, "
                "strings, numbers) is accepted: re-create the meta table from a trusted copy, e.g. with "
                "DataFrame.to_hdf(path, key='meta', format='table')")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise PickleRefused(f"{self.where} holds a pickle with persistent ids; kernelatlas refuses to load it")

    def load(self) -> Any:
        return _resolve(super().load(), self.where)


def restricted_loads(data: bytes, *, where: str) -> Any:
    """``pickle.loads`` limited to plain data (see :class:`RestrictedUnpickler`).  Raises
    :class:`PickleRefused` for a forbidden global or numpy state and :class:`FilterDBError` for a damaged
    pickle."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), where=where).load()
    except FilterDBError:
        raise
    except Exception as exc:
        raise FilterDBError(f"{where}: cannot decode a pickled value ({type(exc).__name__}: {str(exc)[:200]}); "
                            "the file is damaged or not a pandas table") from None


# ---------------------------------------------------------------------------------------------- meta reading


class _MetaReader:
    """Reads the pandas table under ``meta`` with h5py; ``where`` prefixes every error message."""

    def __init__(self, node: Any, where: str) -> None:
        self.node = node
        self.where = where
        self.encoding = "UTF-8"
        self.errors = "strict"

    # attributes ---------------------------------------------------------------
    def _raw_attr(self, obj: Any, name: str) -> Any:
        try:
            return obj.attrs[name]
        except KeyError:
            return None
        except (OSError, TypeError, ValueError) as exc:
            raise FilterDBError(f"{self.where}{obj.name}: attribute {name!r} is unreadable ({exc})") from None

    def text_attr(self, obj: Any, name: str, default: str | None = None) -> str | None:
        import h5py

        raw = self._raw_attr(obj, name)
        if raw is None:
            return default
        if isinstance(raw, (bytes, np.bytes_)):
            text = bytes(raw)
            if text == b"N.":  # PyTables' pickle of None
                return default
            return text.decode(self.encoding, self.errors)
        if isinstance(raw, str):
            return raw
        if isinstance(raw, h5py.Empty):
            return ""
        return str(raw)

    def int_attr(self, obj: Any, name: str) -> int:
        raw = self._raw_attr(obj, name)
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise FilterDBError(f"{self.where}{obj.name}: attribute {name!r} should be an integer, got "
                                f"{raw!r}") from None

    def object_attr(self, obj: Any, name: str) -> Any:
        """An attribute PyTables stored as a pickle (a list or dict), decoded with the restricted unpickler."""
        raw = self._raw_attr(obj, name)
        if raw is None:
            raise FilterDBError(f"{self.where}{obj.name}: attribute {name!r} is missing; not a pandas table")
        if isinstance(raw, (bytes, np.bytes_)):
            return restricted_loads(bytes(raw), where=f"{self.where}{obj.name} attribute {name!r}")
        if isinstance(raw, np.ndarray):
            return raw.tolist()
        return raw

    def name_attr(self, obj: Any) -> str | None:
        """An index node's ``name``: a plain string, or a pickle (None, or a non-string label)."""
        raw = self._raw_attr(obj, "name")
        if raw is None:
            return None
        if isinstance(raw, (bytes, np.bytes_)):
            data = bytes(raw)
            if data.endswith(b"."):
                try:
                    value = restricted_loads(data, where=f"{self.where}{obj.name} attribute 'name'")
                    return None if value is None else str(value)
                except PickleRefused:
                    raise
                except FilterDBError:
                    pass  # a plain name that merely ends with '.'
            return data.decode(self.encoding, self.errors)
        return str(raw)

    # values -------------------------------------------------------------------
    def read_dataset(self, ds: Any) -> np.ndarray:
        """A whole dataset, its declared size checked against its storage first (see loaders/h5safe.py)."""
        return h5safe.read_dataset(ds, label=self.where, error=FilterDBError, hint=_DAMAGED)

    def _empty_shape(self, ds: Any, shape: Any) -> tuple[int, ...]:
        """pandas writes a ``shape`` attribute on the placeholder of an EMPTY array only; anything else would
        make the reader allocate what the attribute says."""
        try:
            dims = tuple(int(s) for s in np.atleast_1d(shape))
        except (TypeError, ValueError):
            dims = ()
        if not 1 <= len(dims) <= 32 or min(dims) < 0 or math.prod(dims) != 0:
            raise FilterDBError(f"{self.where}: {ds.name} has a shape attribute {str(shape)[:80]}; pandas writes "
                                "it only on an empty array (one of its dimensions 0), so the file is damaged or "
                                "crafted")
        return dims

    def decode_strings(self, values: np.ndarray) -> np.ndarray:
        flat = values.ravel()
        out = np.empty(len(flat), dtype=object)
        for i, v in enumerate(flat):
            out[i] = v.decode(self.encoding, self.errors) if isinstance(v, (bytes, np.bytes_)) else v
        return out.reshape(values.shape)

    def read_array(self, ds: Any) -> np.ndarray:
        """A pandas "fixed" array node: plain, or a VLArray holding one pickled object array."""
        if not hasattr(ds, "dtype"):
            raise FilterDBError(f"{self.where}{ds.name} should be an array, found a group")
        cls = self.text_attr(ds, "CLASS", "")
        if cls == "VLARRAY":
            if self.text_attr(ds, "PSEUDOATOM", "") != "object":
                raise FilterDBError(f"{self.where}{ds.name}: unsupported variable-length array")
            if ds.shape != (1,):
                raise FilterDBError(f"{self.where}{ds.name}: expected one pickled array, found shape {ds.shape}")
            rows = self.read_dataset(ds)
            value = restricted_loads(np.asarray(rows[0], dtype=np.uint8).tobytes(), where=f"{self.where}{ds.name}")
            values = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
        else:
            shape = self._raw_attr(ds, "shape")
            if shape is not None:  # pandas' placeholder for an empty array
                values = np.empty(self._empty_shape(ds, shape), dtype=object)
            else:
                values = self.read_dataset(ds)
        if values.dtype.kind == "S":
            values = self.decode_strings(values)
        transposed = self._raw_attr(ds, "transposed")
        if transposed is not None and bool(transposed):
            values = values.T
        return values

    def read_index_node(self, ds: Any) -> tuple[np.ndarray, str | None]:
        kind = self.text_attr(ds, "kind", "")
        values = self.read_array(ds)
        if kind == "string":
            values = values.astype(object)
        return values, self.name_attr(ds)

    def read_index(self, key: str) -> list[tuple[str | None, np.ndarray]]:
        """(name, values per row) for each level of the index stored under ``key``."""
        group = self.node
        variety = self.text_attr(group, f"{key}_variety", "regular")
        if variety == "regular":
            values, name = self.read_index_node(self._child(key))
            return [(name, values)]
        if variety != "multi":
            raise FilterDBError(f"{self.where}: index {key!r} has an unknown variety {variety!r}")
        levels = []
        for i in range(self.int_attr(group, f"{key}_nlevels")):
            level, name = self.read_index_node(self._child(f"{key}_level{i}"))
            codes = np.asarray(self.read_array(self._child(f"{key}_label{i}")), dtype=np.int64)
            if len(codes) and (codes.max() >= len(level) or codes.min() < -1):
                raise FilterDBError(f"{self.where}: index level {i} of {key!r} has codes outside its "
                                    f"{len(level)} values; the file is damaged")
            if (codes == -1).any():
                per_row = np.asarray(level, dtype=object)[np.maximum(codes, 0)]
                per_row[codes == -1] = np.nan
            else:
                per_row = np.asarray(level)[codes]
            levels.append((name, per_row))
        return levels

    def read_flat_index(self, key: str) -> np.ndarray:
        levels = self.read_index(key)
        if len(levels) != 1:
            raise FilterDBError(f"{self.where}: {key} is a {len(levels)}-level index; the meta table's columns "
                                "must be plain labels")
        return levels[0][1]

    def _child(self, name: str) -> Any:
        try:
            return self.node[name]
        except KeyError:
            raise FilterDBError(f"{self.where}: {self.node.name}/{name} is missing; not a pandas table "
                                "written by to_hdf, or the file is damaged") from None
        except (OSError, ValueError) as exc:
            raise FilterDBError(f"{self.where}: {self.node.name}/{name} is unreadable ({exc})") from None

    # formats ------------------------------------------------------------------
    def read(self) -> Any:
        import pandas as pd

        node = self.node
        if not hasattr(node, "keys"):  # a dataset: the early release stored meta as CSV bytes
            return self.read_csv_bytes(node)
        self.encoding = self.text_attr(node, "encoding", "UTF-8") or "UTF-8"
        self.errors = self.text_attr(node, "errors", "strict") or "strict"
        pandas_type = self.text_attr(node, "pandas_type", "")
        if pandas_type == "frame":
            frame = self.read_fixed()
        elif pandas_type == "frame_table":
            frame = self.read_table()
        else:
            raise FilterDBError(f"{self.where}: /{META_KEY} is not a pandas DataFrame written by to_hdf "
                                f"(pandas_type {pandas_type!r}); expected a CNN Filter DB dataset.h5")
        return frame.reset_index(drop=True) if isinstance(frame, pd.DataFrame) else frame

    def read_csv_bytes(self, ds: Any) -> Any:
        import pandas as pd

        raw = self.read_dataset(ds)
        data = raw.tobytes() if isinstance(raw, np.ndarray) and raw.dtype.kind in "uiS" else bytes(raw)
        try:
            return pd.read_csv(io.StringIO(data.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FilterDBError(f"{self.where}/{META_KEY}: not a pandas table nor CSV text ({exc})") from None

    def read_fixed(self) -> Any:
        import pandas as pd

        node = self.node
        if self.int_attr(node, "ndim") != 2:
            raise FilterDBError(f"{self.where}/{META_KEY} is not a 2-D DataFrame")
        columns = self.read_flat_index("axis0")
        index_levels = self.read_index("axis1")
        n_rows = len(index_levels[0][1])
        data: dict[Any, np.ndarray] = {}
        for i in range(self.int_attr(node, "nblocks")):
            items = self.read_flat_index(f"block{i}_items")
            values = self.read_array(self._child(f"block{i}_values"))
            if values.ndim == 1:
                if len(items) != 1:
                    raise FilterDBError(f"{self.where}: block {i} holds {len(items)} columns in a 1-D array")
                block = values[:, None]
            else:
                block = values.T
            if block.shape != (n_rows, len(items)):
                raise FilterDBError(f"{self.where}: block {i} has shape {block.shape}, expected "
                                    f"({n_rows}, {len(items)}); the file is damaged")
            for j, item in enumerate(items):
                data[item] = block[:, j]
        missing = [c for c in columns if c not in data]
        if missing:
            raise FilterDBError(f"{self.where}: columns {missing} have no data block; the file is damaged")
        frame = pd.DataFrame({c: data[c] for c in columns})
        for level, (name, values) in enumerate(index_levels):
            frame.insert(level, name if name is not None else f"level_{level}", values)
        return frame

    def read_table(self) -> Any:
        import pandas as pd

        node = self.node
        table = self._child("table")
        if not hasattr(table, "dtype"):
            raise FilterDBError(f"{self.where}/{META_KEY}/table should be an array, found a group")
        rows = self.read_dataset(table)
        if rows.dtype.names is None:
            raise FilterDBError(f"{self.where}/{META_KEY}/table is not a PyTables table")
        nan_rep = self.text_attr(node, "nan_rep", None) or "nan"
        data: dict[Any, np.ndarray] = {}
        for field_name in rows.dtype.names:
            if field_name == "index":
                continue
            kind_list = self.object_attr(table, f"{field_name}_kind")
            if not isinstance(kind_list, (list, tuple)):
                raise FilterDBError(f"{self.where}: {field_name}_kind should list column names")
            values = rows[field_name]
            if values.ndim == 1:
                values = values[:, None]
            if values.shape[1] != len(kind_list):
                raise FilterDBError(f"{self.where}: {field_name} holds {values.shape[1]} columns, its kind "
                                    f"lists {len(kind_list)}; the file is damaged")
            for j, col in enumerate(kind_list):
                column = values[:, j]
                if column.dtype.kind == "S":
                    column = self.decode_strings(column)
                    column[column == nan_rep] = np.nan
                data[col] = column
        non_index = self.object_attr(node, "non_index_axes")
        try:
            [(_, order)] = non_index
            order = list(order)
        except (TypeError, ValueError):
            raise FilterDBError(f"{self.where}: unexpected non_index_axes {non_index!r}") from None
        frame = pd.DataFrame({c: data[c] for c in order if c in data})
        levels = self.object_attr(node, "levels") if "levels" in node.attrs else []
        if isinstance(levels, (list, tuple)) and levels:
            head = [c for c in levels if c in frame.columns]
            frame = frame[head + [c for c in frame.columns if c not in head]]
        return frame


def _open_h5(path: Path) -> Any:
    """The file opened read-only, after :func:`h5safe.check_file` walked it: no external / soft links, no
    hard-link cycles or objects under two names, no dataset stored in another file (external storage,
    virtual datasets) -- every refusal a FilterDBError naming the file and the HDF5 path."""
    if not path.is_file():
        raise FilterDBError(f"{path}: no such file")
    return h5safe.open_checked(path, label=str(path), error=FilterDBError,
                               open_hint="; is it truncated or still compressed (dataset.h5.xz: run `xz -d` "
                                         "first)?")


def _read_meta_frame(f: Any, path: Path) -> Any:
    if META_KEY not in f:
        raise FilterDBError(f"{path}: no /{META_KEY} table; expected a CNN Filter DB dataset.h5")
    try:
        node = f[META_KEY]
    except (OSError, KeyError, ValueError) as exc:
        raise FilterDBError(f"{path}: /{META_KEY} is unreadable ({exc}); {_DAMAGED}") from None
    try:
        return _MetaReader(node, str(path)).read()
    except FilterDBError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OSError) as exc:
        raise FilterDBError(f"{path}: the /{META_KEY} table is malformed ({type(exc).__name__}: {exc}); "
                            "expected a pandas DataFrame written by to_hdf") from None


def read_meta(h5_path: str | os.PathLike[str]) -> Any:
    """The ``meta`` table of a CNN Filter DB file as a pandas DataFrame, indexed like the file
    ([model_id, conv_depth, conv_depth_norm, layer_id] where present), read without unrestricted pickle."""
    path = Path(h5_path)
    with _open_h5(path) as f:
        frame = _read_meta_frame(f, path)
    levels = [c for c in INDEX_LEVELS if c in frame.columns]
    return frame.set_index(levels) if levels else frame


# ---------------------------------------------------------------------------------------------- layout


@dataclass
class FilterDBLayer:
    """One meta row: its filters are rows [start, stop) of ``filters`` (stop = the file's end + 1)."""

    model_id: Any
    layer_id: Any
    conv_depth: int
    conv_depth_norm: float
    start: int
    stop: int
    row: dict[str, Any]

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass
class FilterDBLayout:
    """A validated CNN Filter DB file: ``models`` maps each model_id to its layers (in filter order); models
    are in the order of their first filter."""

    path: Path
    n_filters: int
    filters_key: str
    filters_dtype: str
    models: dict[Any, list[FilterDBLayer]]
    meta: Any  # flat DataFrame (index levels as columns)
    unreferenced: int  # filters no meta row points to

    @property
    def n_layers(self) -> int:
        return sum(len(v) for v in self.models.values())


_RANGE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def _filters_dataset(f: Any, path: Path) -> tuple[str, Any]:
    key = FILTERS_KEY if FILTERS_KEY in f else ("filter" if "filter" in f else None)
    if key is None:
        raise FilterDBError(f"{path}: no /{FILTERS_KEY} array; expected a CNN Filter DB dataset.h5")
    ds = f[key]
    if not hasattr(ds, "shape"):
        raise FilterDBError(f"{path}: /{key} is a group, expected an (N, 3, 3) array")
    shape = ds.shape
    if not (len(shape) == 3 and shape[1:] == (3, 3)) and not (len(shape) == 2 and shape[1] == 9):
        raise FilterDBError(f"{path}: /{key} has shape {shape}, expected (N, 3, 3) (or (N, 9))")
    if ds.dtype.kind != "f":
        raise FilterDBError(f"{path}: /{key} has dtype {ds.dtype}, expected float64 (or another float)")
    return key, ds


def _check_storage(ds: Any, path: Path) -> None:
    """The bytes of ``filters`` lie inside the file and every chunk was written, whatever the fill value (a
    truncated, partly written or crafted file is refused before anything is imported)."""
    h5safe.check_dataset(ds, label=str(path), error=FilterDBError, require_written=True, max_bytes=None)


def _int_column(frame: Any, col: str, path: Path) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FilterDBError(f"{path}: meta row {i}: {col} = {frame[col].iloc[i]!r} is not an integer")
    return values.astype(np.int64)


def _plan(frame: Any, n_filters: int, path: Path) -> tuple[dict[Any, list[FilterDBLayer]], int]:
    import pandas as pd

    for col in ("model_id", "filter_ids", "conv_depth", "conv_depth_norm"):
        if col not in frame.columns:
            raise FilterDBError(f"{path}: the meta table has no {col!r} (index level or column); columns: "
                                f"{list(frame.columns)[:12]}")
    n = len(frame)
    starts = np.empty(n, np.int64)
    stops = np.empty(n, np.int64)
    for i, text in enumerate(frame["filter_ids"].to_numpy()):
        m = _RANGE.match(text.decode() if isinstance(text, bytes) else str(text))
        if m is None:
            raise FilterDBError(f"{path}: meta row {i} (model_id {frame['model_id'].iloc[i]}): filter_ids "
                                f"{text!r} is not 'start:end'")
        start, end = int(m.group(1)), int(m.group(2))
        if end < start:
            raise FilterDBError(f"{path}: meta row {i} (model_id {frame['model_id'].iloc[i]}): filter_ids "
                                f"{text!r} is reversed (end before start); the meta table is damaged")
        if start < 0 or end >= n_filters:
            raise FilterDBError(f"{path}: meta row {i} (model_id {frame['model_id'].iloc[i]}): filter_ids "
                                f"{text!r} is outside /filters (0:{n_filters - 1}, end inclusive); the meta "
                                "table does not belong to these filters")
        starts[i], stops[i] = start, end + 1
    order = np.argsort(starts, kind="stable")
    if n > 1:
        clash = np.flatnonzero(starts[order][1:] < stops[order][:-1])
        if len(clash):
            a, b = order[clash[0]], order[clash[0] + 1]
            raise FilterDBError(f"{path}: meta rows {a} and {b} claim overlapping filters "
                                f"({frame['filter_ids'].iloc[a]!r}, {frame['filter_ids'].iloc[b]!r}); the file "
                                "is damaged")
    conv_depth = _int_column(frame, "conv_depth", path)
    depth_norm = pd.to_numeric(frame["conv_depth_norm"], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(depth_norm).all():
        i = int(np.flatnonzero(~np.isfinite(depth_norm))[0])
        raise FilterDBError(f"{path}: meta row {i}: conv_depth_norm {frame['conv_depth_norm'].iloc[i]!r} is not "
                            "a number")
    layer_ids = frame["layer_id"].to_numpy() if "layer_id" in frame.columns else None
    records = frame.to_dict("records")
    models: dict[Any, list[FilterDBLayer]] = {}
    for i in order:
        record = records[i]
        model_id = _plain(record["model_id"])
        if model_id is None or model_id == "":
            raise FilterDBError(f"{path}: meta row {i} has no model_id")
        layer_id = _plain(layer_ids[i]) if layer_ids is not None else None
        models.setdefault(model_id, []).append(FilterDBLayer(
            model_id=model_id, layer_id=layer_id, conv_depth=int(conv_depth[i]),
            conv_depth_norm=float(depth_norm[i]), start=int(starts[i]), stop=int(stops[i]), row=record))
    for layers in models.values():
        for j, layer in enumerate(layers):
            if layer.layer_id is None:
                layer.layer_id = j
    unreferenced = n_filters - int((stops - starts).sum())
    return models, unreferenced


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (so they hash and print plainly); NaN -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def inspect_filterdb(h5_path: str | os.PathLike[str]) -> FilterDBLayout:
    """Open and validate a CNN Filter DB file without importing it: ``filters`` shape and dtype, the meta
    table (read safely), every filter_ids range inside ``filters``, no two rows sharing a filter, and the
    array's bytes present in the file.  Raises :class:`FilterDBError` naming the file and row."""
    path = Path(h5_path)
    with _open_h5(path) as f:
        key, ds = _filters_dataset(f, path)
        n_filters = int(ds.shape[0])
        _check_storage(ds, path)
        if n_filters:
            try:  # fails fast when the data needs a compression filter h5py lacks
                ds[:1], ds[n_filters - 1:]
            except (OSError, ValueError) as exc:
                raise FilterDBError(f"{path}: /{key} is unreadable ({exc}); {_DAMAGED}") from None
        frame = _read_meta_frame(f, path)
        models, unreferenced = _plan(frame, n_filters, path)
        return FilterDBLayout(path=path, n_filters=n_filters, filters_key=key, filters_dtype=str(ds.dtype),
                              models=models, meta=frame, unreferenced=unreferenced)


def filterdb_identity(h5_path: str | os.PathLike[str], mode: str = "meta") -> str:
    """The digest that keys a file's models in a corpus (see the module docstring): ``"meta"`` (fast) or
    ``"file"`` (sha256 of every byte)."""
    path = Path(h5_path)
    if mode == "file":
        from kernelatlas.jobs.extract import sha256_file

        return sha256_file(path)
    if mode != "meta":
        raise ValueError(f"identity must be 'meta' or 'file', got {mode!r}")
    h = hashlib.sha256(b"kernelatlas filterdb identity v1\0")
    h.update(struct.pack("<q", path.stat().st_size))
    with _open_h5(path) as f:
        key, ds = _filters_dataset(f, path)
        h.update(f"{key} {ds.shape} {ds.dtype.str}\0".encode())
        import h5py

        node = f[META_KEY]
        items: list[tuple[str, Any]] = []
        if isinstance(node, h5py.Group):  # every dataset below meta, each once (h5safe.walk: hard links only)
            prefix = node.name.rstrip("/") + "/"
            items.extend((p[len(prefix):], obj) for p, obj in h5safe.walk(node, label=str(path), error=FilterDBError)
                         if isinstance(obj, h5py.Dataset))
        else:
            items.append(("", node))
        for name, obj in sorted(items, key=lambda kv: kv[0]):
            if name.split("/")[0].startswith("_i_"):
                continue  # PyTables' column indexes: derived, may be rebuilt
            h.update(name.encode() + b"\0")
            values = h5safe.read_dataset(obj, label=str(path), error=FilterDBError, hint=_DAMAGED)
            if values.dtype == object:
                for v in values.ravel():
                    h.update(np.asarray(v).tobytes() if not isinstance(v, (bytes, str)) else
                             (v if isinstance(v, bytes) else v.encode()))
            else:
                h.update(np.ascontiguousarray(values).tobytes())
        n = int(ds.shape[0])
        h.update(np.ascontiguousarray(ds[:min(n, SAMPLE_ROWS)]).tobytes())
        h.update(np.ascontiguousarray(ds[max(0, n - SAMPLE_ROWS):n]).tobytes())
    return h.hexdigest()


def layer_arrays(h5_path: str | os.PathLike[str], *, model_id: Any = None,
                 layout: FilterDBLayout | None = None) -> Iterator[tuple[FilterDBLayer, np.ndarray]]:
    """The original per-layer filters of a CNN Filter DB file, float64 [n, 9] (rows as in the file), one
    layer at a time, in the order :func:`import_filterdb` adds them (models by first filter, layers by filter
    position); ``model_id``: only that model.  Each layer comes with its meta row (``FilterDBLayer.row``),
    so a corpus layer is matched by (``filterdb_model_id``, ``filterdb_layer_id``)."""
    layout = layout or inspect_filterdb(h5_path)
    with _open_h5(layout.path) as f:
        ds = f[layout.filters_key]
        for mid, layers in layout.models.items():
            if model_id is not None and mid != model_id:
                continue
            for layer in layers:
                yield layer, np.asarray(ds[layer.start:layer.stop], dtype=np.float64).reshape(-1, 9)
