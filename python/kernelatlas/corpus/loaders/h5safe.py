"""Checks every HDF5 reader of kernelatlas runs on a file from a stranger (Keras ``.h5`` / ``.weights.h5`` /
``.keras`` members and CNN Filter DB ``dataset.h5``).

An HDF5 file can point outside itself, and can declare more data than it holds.  Left alone, h5py follows
both: an external link opens another file, a dataset with *external storage* (a DCPL external file list) or a
*virtual* layout (VDS) reads its bytes from other local files, and ``get_storage_size()`` reports what the
file declares.  So a 4 KiB checkpoint could copy ``~/.ssh/id_rsa`` into a corpus, or make the loader
allocate and fill terabytes from a fill value.  This module is the one place those are refused:

* :func:`open_checked` / :func:`check_file` walk the whole file once, right after opening it and before
  anything else is touched, through hard links only (a visited set by object address and a depth cap, so a
  group linked under its own descendants is a *cycle* error, never an endless walk), and refuse
  external links, soft links (they can leave the file through an external link or point back at an
  ancestor; no Keras or pandas writer makes them), user-defined links, any object reachable under two
  names (a tensor under N names would be copied N times), and every dataset with external storage or a
  virtual layout;
* :func:`check_dataset` compares a dataset's logical size with what its storage can hold *before* it is
  read: the bytes must lie inside the file, compressed chunks may not expand beyond what deflate can
  (``MAX_COMPRESSION_RATIO``), and never-written storage (contiguous data never allocated, chunks never
  written) is refused unless its fill value is zero and the dataset is small (``MAX_UNWRITTEN_ZERO_BYTES``);
  ``max_bytes`` caps a whole-dataset read;
* :func:`read_dataset` does both, then reads; :class:`ReadOnce` refuses a dataset read a second time
  (a config or layer list that names one tensor many times).

Every error is the caller's error class (``LoaderError`` or ``FilterDBError``) and names the file (``label``),
the HDF5 path and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .base import LoaderError

__all__ = [
    "MAX_COMPRESSION_RATIO",
    "MAX_DEPTH",
    "MAX_OBJECTS",
    "MAX_READ_BYTES",
    "MAX_UNWRITTEN_ZERO_BYTES",
    "ReadOnce",
    "check_dataset",
    "check_file",
    "check_layout",
    "object_address",
    "open_checked",
    "read_dataset",
    "walk",
]

MAX_DEPTH = 128  # groups nested deeper than this are refused (Keras nests ~2 levels per nested model)
MAX_OBJECTS = 1_000_000  # objects in one file (a Keras model has thousands, a CNN Filter DB file ~30)
MAX_COMPRESSION_RATIO = 1100  # deflate cannot expand beyond ~1032x; more is a decompression bomb
MAX_UNWRITTEN_ZERO_BYTES = 16 << 20  # never-written storage tolerated when it reads as zeros
MAX_READ_BYTES = 8 << 30  # one whole-dataset read (a conv kernel is far smaller)

_Error = type[Exception]


def object_address(obj: Any) -> int:
    """The address of an HDF5 object's header: the same for every hard link to it."""
    import h5py

    return int(h5py.h5o.get_info(obj.id).addr)


def _kind(obj: Any) -> str:
    import h5py

    if isinstance(obj, h5py.Group):
        return "group"
    if isinstance(obj, h5py.Dataset):
        return "dataset"
    return "object"


def walk(root: Any, *, label: str, error: _Error = LoaderError, max_depth: int = MAX_DEPTH,
         max_objects: int = MAX_OBJECTS) -> Iterator[tuple[str, Any]]:
    """(HDF5 path, object) for every object below ``root``, each exactly once, following hard links only.
    Raises ``error`` for an external, soft or user-defined link, an object reached under a second name
    (a cycle when it is an ancestor of the link), nesting deeper than ``max_depth`` or more than
    ``max_objects`` objects."""
    import h5py

    root_name = root.name or "/"
    try:
        seen: dict[int, str] = {object_address(root): root_name}
    except Exception as exc:
        raise error(f"{label}: {root_name} is unreadable ({exc}); the file is truncated or damaged") from None
    stack: list[tuple[Any, str, int]] = [(root, root_name.rstrip("/"), 0)]
    count = 0
    while stack:
        group, prefix, depth = stack.pop()
        try:
            names = list(group)
        except Exception as exc:
            raise error(f"{label}: group {prefix or '/'} is unreadable ({exc}); the file is truncated or "
                        "damaged") from None
        for name in names:
            path = f"{prefix}/{name}"
            try:
                link = group.get(name, getlink=True)
            except Exception as exc:
                raise error(f"{label}: {path} is a link h5py cannot classify ({exc}); kernelatlas follows "
                            "hard links only") from None
            if isinstance(link, h5py.ExternalLink):
                raise error(f"{label}: {path} is an external link to {link.filename!r}:{link.path}; kernelatlas "
                            "never follows links out of the file (it would read another local file)")
            if isinstance(link, h5py.SoftLink):
                raise error(f"{label}: {path} is a soft link to {link.path!r}; kernelatlas follows hard links "
                            "only (a soft link can leave the file through an external link or point back at "
                            "its own ancestors)")
            if not isinstance(link, h5py.HardLink):
                raise error(f"{label}: {path} is a {type(link).__name__}; kernelatlas follows hard links only")
            try:
                obj = group[name]
                address = object_address(obj)
            except Exception as exc:
                raise error(f"{label}: {path} is unreadable ({exc}); the file is truncated or damaged") from None
            first = seen.get(address)
            if first is not None:
                if path.startswith(first.rstrip("/") + "/"):
                    raise error(f"{label}: {path} is a hard link back to its ancestor {first}: a group cycle; "
                                "kernelatlas refuses it (walking it would never end)")
                raise error(f"{label}: {path} is a hard link to the {_kind(obj)} {first} (one object under two "
                            "names); kernelatlas refuses it (a tensor reachable N times would be copied N times)")
            seen[address] = path
            count += 1
            if count > max_objects:
                raise error(f"{label}: more than {max_objects:,} HDF5 objects; refusing to walk the file")
            yield path, obj
            if isinstance(obj, h5py.Group):
                if depth + 1 >= max_depth:
                    raise error(f"{label}: {path} is nested {depth + 1} groups deep (more than {max_depth}); "
                                "the file is too deep to be a checkpoint")
                stack.append((obj, path, depth + 1))


def check_layout(ds: Any, *, label: str, error: _Error = LoaderError, where: str | None = None) -> None:
    """Refuse a dataset whose bytes would come from another file: external storage or a virtual layout."""
    import h5py

    name = where or ds.name
    try:
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        n_external = dcpl.get_external_count()
    except Exception as exc:
        raise error(f"{label}: {name}: storage layout unreadable ({exc}); the file is damaged") from None
    if layout == h5py.h5d.VIRTUAL:
        try:
            n = dcpl.get_virtual_count()
            sources = sorted({dcpl.get_virtual_filename(i) for i in range(min(n, 8))})
        except Exception:
            sources = []
        raise error(f"{label}: {name} is a virtual dataset (its data would be read from {sources or 'other files'})"
                    "; kernelatlas refuses virtual datasets")
    if n_external:
        try:
            files = sorted({dcpl.get_external(i)[0].decode("utf-8", "replace") for i in range(min(n_external, 8))})
        except Exception:
            files = []
        raise error(f"{label}: {name} keeps its data in external file(s) {files or '?'}; kernelatlas refuses "
                    "external storage (it would copy another local file)")
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT):
        raise error(f"{label}: {name} has an unknown storage layout ({layout}); kernelatlas refuses it")


def check_file(f: Any, *, label: str, error: _Error = LoaderError) -> None:
    """Walk the whole open file (see :func:`walk`) and refuse every dataset stored outside it."""
    import h5py

    for path, obj in walk(f, label=label, error=error):
        if isinstance(obj, h5py.Dataset):
            check_layout(obj, label=label, error=error, where=path)


class open_checked:
    """``h5py.File(source, "r")`` checked with :func:`check_file` before it is handed out; a file that cannot
    be opened raises ``error`` with ``open_hint``."""

    def __init__(self, source: Any, *, label: str, error: _Error = LoaderError, open_hint: str = "") -> None:
        self.source, self.label, self.error, self.open_hint = source, label, error, open_hint
        self.file: Any = None

    def __enter__(self) -> Any:
        import h5py

        try:
            self.file = h5py.File(self.source, "r")
        except Exception as exc:
            raise self.error(f"{self.label}: not a readable HDF5 file ({exc}){self.open_hint}") from None
        try:
            check_file(self.file, label=self.label, error=self.error)
        except BaseException:
            self.file.close()
            raise
        return self.file

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()


def _fill_is_zero(ds: Any, dcpl: Any) -> tuple[bool, str]:
    """Whether never-written storage of ``ds`` reads as zeros, and the fill value in words."""
    import h5py

    try:
        if dcpl.fill_value_defined() == h5py.h5d.FILL_VALUE_UNDEFINED:
            return False, "undefined"
        if dcpl.get_fill_time() == h5py.h5d.FILL_TIME_NEVER:
            return False, "never written either (fill time 'never')"
        value = ds.fillvalue
        raw = np.asarray(value).tobytes()
    except Exception:
        return False, "unknown"
    return not any(raw), repr(value.item() if isinstance(value, np.generic) else value)


def check_dataset(ds: Any, *, label: str, error: _Error = LoaderError, where: str | None = None,
                  require_written: bool = False, max_bytes: int | None = MAX_READ_BYTES,
                  zero_fill_cap: int = MAX_UNWRITTEN_ZERO_BYTES) -> int:
    """Check, before reading, that the dataset's declared size is what its storage holds; returns its
    logical size in bytes.  ``require_written``: refuse any never-written part, whatever the fill value."""
    import h5py

    name = where or ds.name
    check_layout(ds, label=label, error=error, where=name)
    try:
        shape = ds.shape
        itemsize = int(ds.id.get_type().get_size())
        dcpl = ds.id.get_create_plist()
        layout = dcpl.get_layout()
        file_size = int(ds.file.id.get_filesize())
    except Exception as exc:
        raise error(f"{label}: {name} is unreadable ({exc}); the file is damaged") from None
    if shape is None:  # a null dataspace holds nothing
        return 0
    n = math.prod(int(s) for s in shape)
    logical = n * itemsize
    if logical == 0:
        return 0
    what = f"{name} ({'x'.join(str(s) for s in shape)} of {ds.dtype}, {logical:,} bytes)"
    if max_bytes is not None and logical > max_bytes:
        raise error(f"{label}: {what} is larger than the {max_bytes:,}-byte cap on one read; refused")
    try:
        if layout == h5py.h5d.COMPACT:
            return logical  # stored in the object header itself, which HDF5 has read
        if layout == h5py.h5d.CONTIGUOUS:
            offset = ds.id.get_offset()
            stored = int(ds.id.get_storage_size()) if offset is not None else 0
            if offset is not None and offset + stored > file_size:
                raise error(f"{label}: {what} ends at byte {offset + stored:,} but the file has {file_size:,} "
                            "bytes: the file is truncated; download it again")
            unwritten = max(0, logical - stored)
            missing = "" if not unwritten else f"{unwritten:,} of its bytes were never written"
        else:
            chunk_bytes = math.prod(int(c) for c in ds.chunks) * itemsize
            count = end = stored = 0
            if hasattr(ds.id, "chunk_iter"):
                def visit(info: Any) -> None:
                    nonlocal count, end, stored
                    count += 1
                    stored += info.size
                    end = max(end, info.byte_offset + info.size)
                ds.id.chunk_iter(visit)
            else:
                for i in range(ds.id.get_num_chunks()):
                    info = ds.id.get_chunk_info(i)
                    count += 1
                    stored += info.size
                    end = max(end, info.byte_offset + info.size)
            if end > file_size:
                raise error(f"{label}: chunks of {what} reach byte {end:,} but the file has {file_size:,} bytes: "
                            "the file is truncated; download it again")
            capacity = count * chunk_bytes
            if dcpl.get_nfilters() and min(capacity, logical) > max(stored, 1) * MAX_COMPRESSION_RATIO:
                raise error(f"{label}: {what}: {stored:,} compressed bytes would expand to "
                            f"{min(capacity, logical):,} (more than {MAX_COMPRESSION_RATIO}x, beyond what "
                            "deflate can do): a decompression bomb or a damaged file; refused")
            expected = math.prod(-(-int(s) // int(c)) for s, c in zip(shape, ds.chunks, strict=True))
            unwritten = min(logical, (expected - count) * chunk_bytes) if count < expected else 0
            missing = f"{expected - count:,} of its {expected:,} chunks were never written"
    except Exception as exc:
        if isinstance(exc, (LoaderError, error)):
            raise
        raise error(f"{label}: {name}: storage unreadable ({exc}); the file is damaged") from None
    if unwritten:
        zero, fill = _fill_is_zero(ds, dcpl)
        if require_written or not zero or logical > zero_fill_cap:
            raise error(f"{label}: {what}: {missing} (they would read as its fill value, {fill}); the file "
                        "does not hold the data it declares (incomplete, or crafted to make the reader fill "
                        "memory)")
    return logical


def read_dataset(ds: Any, *, label: str, error: _Error = LoaderError, where: str | None = None,
                 max_bytes: int | None = MAX_READ_BYTES, hint: str = "the file is damaged") -> np.ndarray:
    """``ds[...]`` after :func:`check_dataset`; a read error raises ``error`` naming the dataset."""
    check_dataset(ds, label=label, error=error, where=where, max_bytes=max_bytes)
    try:
        return ds[...]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise error(f"{label}: {where or ds.name} is unreadable ({exc}); {hint}") from None


class ReadOnce:
    """Remembers which datasets (by object address) were read, for whom; a second read is refused."""

    def __init__(self) -> None:
        self.read: dict[int, str] = {}

    def claim(self, ds: Any, *, label: str, who: str, error: _Error = LoaderError) -> None:
        address = object_address(ds)
        first = self.read.get(address)
        if first is not None:
            raise error(f"{label}: {who}: dataset {ds.name} was already read for {first}; a file that points "
                        "several layers at one tensor is refused (it would be copied once per reference)")
        self.read[address] = who
