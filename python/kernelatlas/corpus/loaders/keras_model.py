"""Keras loader: Conv2D, DepthwiseConv2D and SeparableConv2D weights from Keras 3 ``.keras`` / ``.weights.h5``
and Keras 2 ``.h5`` files, read with h5py alone (no keras or tensorflow import, nothing unpickled or
evaluated: the model config is parsed as JSON and only read).

Keras stores every conv kernel as ``[kh, kw, c_in / groups, c_out]`` (whatever ``data_format``), and a
depthwise kernel as ``[kh, kw, C, m]`` where output channel ``c * m + k`` comes from input channel ``c``
(TensorFlow's definition).  They are returned as PyTorch's ``[c_out, c_in / groups, kh, kw]`` and
``[C * m, 1, kh, kw]``, kh staying the row axis.  A SeparableConv2D gives two layers: ``NAME/depthwise`` and
``NAME/pointwise`` (a regular 1x1 conv), the pointwise half ordered just after the depthwise one.

Where the layer classes come from:
- ``.keras`` (zip of config.json + model.weights.h5): the config's layer lists, matched to the weight
  file's groups by Keras 3's naming (snake-cased class name, ``_1``, ``_2`` ... per class within a
  container), or by the ``name`` attribute Keras 3 writes on each ``vars`` group.  ``groups`` comes from
  the config: everything is exact (``kind_inferred = False``).
- bare Keras 3 ``.weights.h5``: the group names alone (they are the snake-cased class names).  Depthwise
  and separable layers are exact; a Conv2D's ``groups`` is not stored, so it is taken as 1 with
  ``kind_inferred = True``.  The layer order is not stored either: it is taken from the HDF5 allocation
  order of each layer's first variable (Keras writes layers in model order), ``meta["order_from"]`` says so.
- Keras 2 ``.h5`` (``model_weights`` + ``model_config``, or a weights-only file): ``layer_names`` gives the
  order and ``model_config`` the classes and ``groups``; without a config the weight names decide
  (``depthwise_kernel`` / ``pointwise_kernel`` exact, a 4-D ``kernel`` taken as Conv2D with
  ``kind_inferred = True``).

``order`` is the position in the layer list (nested models flattened in place).

Files come from strangers (docs/security-hdf5.md): every HDF5 file is walked by ``h5safe.check_file`` before
it is read (no external / soft links, no hard-link cycles or objects under two names, no external storage or
virtual datasets), each kernel's declared size is checked against its storage before it is read, and read
once; a compressed ``.keras`` member is refused when its declared sizes make it a zip bomb.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import h5safe
from .base import ConvLayer, LoadedModel, LoaderError, check_finite, classify_kind
from .base import unique_name as _unique

__all__ = ["load"]

_CONV_CLASSES = {
    "Conv2D": "conv",
    "Convolution2D": "conv",
    "DepthwiseConv2D": "depthwise",
    "SeparableConv2D": "separable",
    "SeparableConvolution2D": "separable",
}
# Keras 3 names weight-file groups after the snake-cased class name.
_SNAKE_CLASSES = {
    "conv2d": "Conv2D",
    "depthwise_conv2d": "DepthwiseConv2D",
    "separable_conv2d": "SeparableConv2D",
}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MAX_CONFIG_BYTES = 256 << 20
# A compressed .keras member is copied out before h5py opens it: refused when it declares more than this, or
# more than _MAX_MEMBER_RATIO times its compressed size (deflate cannot exceed ~1032x; bzip2 and lzma can
# reach millions: a zip bomb) once past _MEMBER_RATIO_FLOOR bytes.
_MAX_MEMBER_BYTES = 64 << 30
_MAX_MEMBER_RATIO = 1100
_MEMBER_RATIO_FLOOR = 16 << 20
_MAX_NESTING = 64  # nested models in a config
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the 30-byte local file header of a zip member


def load(path: str | Path) -> LoadedModel:
    """Read the conv layers of the Keras file at ``path``; raises :class:`LoaderError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LoaderError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise LoaderError(f"{path}: empty file, not a Keras model")
    if zipfile.is_zipfile(path):
        return _load_keras_zip(path)
    if not _has_hdf5_signature(path, size):
        with open(path, "rb") as handle:
            if handle.read(4) == b"PK\x03\x04":
                raise LoaderError(
                    f"{path}: zip archive without its central directory (a truncated .keras file?); "
                    "re-save or re-download it"
                )
        raise LoaderError(f"{path}: neither a .keras zip nor an HDF5 file (.h5 / .weights.h5)")
    with _open_h5(path, path) as h5:
        return _read_h5(path, h5, config=None)


# ----------------------------------------------------------------------------------------- containers


def _has_hdf5_signature(path: Path, size: int) -> bool:
    # HDF5 looks for its signature at 0, 512, 1024, 2048 ... (a user block may precede it).
    with open(path, "rb") as handle:
        offset = 0
        while offset + 8 <= size:
            handle.seek(offset)
            if handle.read(8) == _HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def _open_h5(source: Any, label: Path) -> h5safe.open_checked:
    """h5py.File with HDF5's errors turned into LoaderErrors naming ``label``, walked by h5safe.check_file
    before anything reads it: external / soft links, hard-link cycles, one object under two names, external
    storage and virtual datasets are refused (issue 12; see loaders/h5safe.py)."""
    return h5safe.open_checked(source, label=str(label), error=LoaderError,
                               open_hint=" -- truncated or corrupt")


def _load_keras_zip(path: Path) -> LoadedModel:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise LoaderError(f"{path}: not a readable .keras archive ({exc})") from exc
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        if "model.weights.h5" not in members:
            found = ", ".join(sorted(members)[:8]) or "nothing"
            raise LoaderError(
                f"{path}: .keras archive without model.weights.h5 (holds {found}); sharded or "
                "non-HDF5 weight stores are not supported"
            )
        config = None
        if "config.json" in members:
            info = members["config.json"]
            if info.file_size > _MAX_CONFIG_BYTES:
                raise LoaderError(
                    f"{path}: config.json declares {info.file_size} bytes; refusing to parse it"
                )
            _check_member(path, info)
            try:
                config = json.loads(archive.read(info).decode("utf-8"))
            except RecursionError:
                raise LoaderError(f"{path}: config.json is nested too deeply to be a model config") from None
            except (ValueError, zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError, EOFError,
                    zlib.error) as exc:
                raise LoaderError(f"{path}: config.json cannot be read as JSON ({exc})") from exc
        info = members["model.weights.h5"]
        label = Path(f"{path}!model.weights.h5")
        _check_member(path, info)
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as handle:
                window = _MemberWindow(handle, _member_data_offset(path, handle, info), info.file_size, path)
                with _open_h5(window, label) as h5:
                    return _read_h5(path, h5, config=config)
        # A compressed member cannot be seeked cheaply: copy it out, bounded by its declared size (checked
        # above against the compressed size and the free space) and counted while it streams.
        with tempfile.TemporaryFile() as copy:
            _copy_member(path, archive, info, copy)
            copy.seek(0)
            with _open_h5(copy, label) as h5:
                return _read_h5(path, h5, config=config)


def _check_member(path: Path, info: zipfile.ZipInfo) -> None:
    """Refuse a member whose declared sizes make it a zip bomb, before a byte of it is decompressed."""
    name = info.filename
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise LoaderError(
                f"{path}: {name} is stored uncompressed but declares {info.file_size} bytes in a "
                f"{info.compress_size}-byte entry; the archive is corrupt"
            )
        return
    if info.file_size > _MAX_MEMBER_BYTES:
        raise LoaderError(
            f"{path}: {name} declares {info.file_size:,} bytes uncompressed (more than the "
            f"{_MAX_MEMBER_BYTES:,}-byte cap on a compressed member); re-save it uncompressed"
        )
    if info.file_size > max(_MEMBER_RATIO_FLOOR, max(info.compress_size, 1) * _MAX_MEMBER_RATIO):
        raise LoaderError(
            f"{path}: {name} declares {info.file_size:,} bytes compressed into {info.compress_size:,} "
            f"({info.file_size / max(info.compress_size, 1):,.0f}x, more than the {_MAX_MEMBER_RATIO}x any "
            "model weights compress): a zip bomb; refused before extracting it"
        )


def _copy_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, out) -> None:
    """Stream a compressed member into ``out``, never past its declared size; a member whose real size
    differs from the declared one is refused."""
    name = info.filename
    try:
        free = shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        free = None
    if free is not None and info.file_size > free:
        raise LoaderError(
            f"{path}: {name} declares {info.file_size:,} bytes but the temporary folder has {free:,} free"
        )
    written = 0
    try:
        with archive.open(info) as member:
            while True:
                block = member.read(min(1 << 20, info.file_size - written + 1))
                if not block:
                    break
                written += len(block)
                if written > info.file_size:
                    raise LoaderError(
                        f"{path}: {name} holds more than the {info.file_size:,} bytes it declares; refused"
                    )
                out.write(block)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, zlib.error) as exc:
        raise LoaderError(f"{path}: {name} cannot be extracted ({type(exc).__name__}: {exc})") from exc
    if written != info.file_size:
        raise LoaderError(
            f"{path}: {name} declares {info.file_size:,} bytes but holds {written:,}; the archive is corrupt"
        )


def _member_data_offset(path: Path, handle, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes start, checked against the archive's size."""
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    handle.seek(info.header_offset)
    header = handle.read(_ZIP_LOCAL_HEADER.size)
    if len(header) != _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise LoaderError(f"{path}: corrupt .keras archive (bad local header for {info.filename})")
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    start = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[-2] + fields[-1]
    if start + info.file_size > size:
        raise LoaderError(
            f"{path}: {info.filename} declares {info.file_size} bytes at offset {start}, past the "
            f"end of the {size}-byte archive; the file is truncated"
        )
    return start


class _MemberWindow(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + size) of an open file, for h5py."""

    def __init__(self, handle, start: int, size: int, path: Path) -> None:
        super().__init__()
        self.handle, self.start, self.size, self.pos, self.path = handle, start, size, 0, path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        if n == 0:
            return 0
        self.handle.seek(self.start + self.pos)
        got = self.handle.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


# ----------------------------------------------------------------------------------------- HDF5 layouts


def _read_h5(path: Path, h5: h5py.File, *, config: dict | None) -> LoadedModel:
    try:
        if "model_weights" in h5 or "layer_names" in h5.attrs or "layer_names0" in h5.attrs:
            reader: _Keras2Reader | _Keras3Reader = _Keras2Reader(path, h5)
        elif "layers" in h5 or "vars" in h5:
            reader = _Keras3Reader(path, h5, config)
        else:
            raise LoaderError(
                f"{path}: HDF5 file holds no Keras weights (no model_weights, layer_names or layers group)"
            )
        return reader.read()
    except LoaderError:
        raise
    except (OSError, KeyError, IndexError, ValueError, TypeError) as exc:  # HDF5 errors, malformed config
        raise LoaderError(f"{path}: damaged Keras weight file ({type(exc).__name__}: {exc})") from exc


class _LayerSink:
    """Turns Keras kernels into ConvLayers (shared by both layouts)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.layers: list[ConvLayer] = []
        self.warnings: list[str] = []
        self.names: set[str] = set()
        self._next_suffix: dict[str, int] = {}
        self.read_once = h5safe.ReadOnce()

    def array(self, dataset: h5py.Dataset, where: str) -> np.ndarray | None:
        """A kernel dataset, read once per file, its declared size checked against what the file stores
        before reading (h5safe.check_dataset: inside the file, no decompression bomb, nothing unwritten)."""
        if not isinstance(dataset, h5py.Dataset):
            raise LoaderError(f"{where}: expected a weight array, found an HDF5 {type(dataset).__name__}")
        if dataset.dtype.kind != "f":
            self.warnings.append(
                f"{where}: kernel of dtype {dataset.dtype} (quantised?) not supported; skipped"
            )
            return None
        who = where.removeprefix(f"{self.path}: ")
        self.read_once.claim(dataset, label=str(self.path), who=who)
        values = h5safe.read_dataset(dataset, label=where, hint="the file is truncated or corrupt")
        return values if values.dtype in (np.float16, np.float32) else values.astype(np.float32)

    def conv(
        self,
        name: str,
        kernel: np.ndarray,
        groups: int,
        order: float,
        *,
        inferred: bool,
        extra: dict | None = None,
    ) -> None:
        """A Conv2D kernel [kh, kw, c_in / groups, c_out]."""
        where = f"{self.path}: layer {name}"
        if kernel.ndim != 4:
            raise LoaderError(f"{where}: Conv2D kernel of shape {list(kernel.shape)} is not 4-D")
        if groups < 1 or kernel.shape[3] % groups:
            raise LoaderError(f"{where}: groups={groups} does not divide the {kernel.shape[3]} filters")
        self._add(name, kernel.transpose(3, 2, 0, 1), groups, order, inferred, extra)

    def depthwise(self, name: str, kernel: np.ndarray, order: float, extra: dict | None = None) -> None:
        """A depthwise kernel [kh, kw, C, m]: output channel c*m + k -> row block c*m + k."""
        where = f"{self.path}: layer {name}"
        if kernel.ndim != 4:
            raise LoaderError(f"{where}: depthwise kernel of shape {list(kernel.shape)} is not 4-D")
        kh, kw, channels, multiplier = kernel.shape
        weight = kernel.reshape(kh, kw, channels * multiplier).transpose(2, 0, 1)[:, None, :, :]
        self._add(
            name, weight, channels, order, False, {**(extra or {}), "depth_multiplier": int(multiplier)}
        )

    def _add(
        self, name: str, weight: np.ndarray, groups: int, order: float, inferred: bool, extra: dict | None
    ) -> None:
        weight = np.ascontiguousarray(weight)
        name = _unique(name, self.names, self._next_suffix)
        where = f"{self.path}: layer {name}"
        if 0 in weight.shape:
            self.warnings.append(f"{where}: empty kernel {list(weight.shape)}; skipped")
            return
        check_finite(weight, where, self.warnings)
        self.layers.append(
            ConvLayer(
                name=name,
                weight=weight,
                groups=int(groups),
                kind=classify_kind(int(weight.shape[0]), int(weight.shape[1]), int(groups)),
                kind_inferred=inferred,
                order=float(order),
                extra=dict(extra or {}),
            )
        )

    def emit(
        self, cls: str, name: str, kernels: list[np.ndarray], conf: dict, order: float, *, inferred: bool
    ) -> None:
        """One Keras layer of class ``cls`` with its 4-D kernels in storage order."""
        extra = {k: conf[k] for k in ("strides", "dilation_rate", "padding") if k in conf}
        role = _CONV_CLASSES[cls]
        if role == "conv":
            self.conv(
                name, kernels[0], int(conf.get("groups", 1) or 1), order, inferred=inferred, extra=extra
            )
        elif role == "depthwise":
            self.depthwise(name, kernels[0], order, extra)
        else:
            if len(kernels) < 2:
                raise LoaderError(
                    f"{self.path}: layer {name}: SeparableConv2D needs a depthwise and a pointwise "
                    f"kernel, found {len(kernels)}"
                )
            self.depthwise(f"{name}/depthwise", kernels[0], order, extra)
            self.conv(f"{name}/pointwise", kernels[1], 1, order + 0.5, inferred=False)


class _Keras3Reader:
    """``layers/<snake_class>[_N]/vars/<i>`` groups, nested models under ``.../layers/...``."""

    def __init__(self, path: Path, h5: h5py.File, config: dict | None) -> None:
        self.path, self.h5, self.config = path, h5, config
        self.sink = _LayerSink(path)
        self.position = 0
        self.meta: dict[str, Any] = {"keras_format": "keras3"}

    def read(self) -> LoadedModel:
        layer_list = _layer_list(self.config) if self.config is not None else None
        if layer_list is not None:
            self.meta["order_from"] = "config"
            self._walk_config(layer_list, "", "", 0)
        else:
            if self.config is not None:
                self.sink.warnings.append(
                    f"{self.path}: config.json holds no layer list (subclassed model?); layer "
                    "classes taken from the weight file's group names"
                )
            self.meta["order_from"] = "hdf5 allocation order (no config)"
            self._walk_groups()
        return LoadedModel(
            source_path=str(self.path),
            format="keras",
            layers=self.sink.layers,
            meta=self.meta,
            warnings=self.sink.warnings,
        )

    def _walk_config(self, layer_list: list, group_path: str, name_prefix: str, depth: int) -> None:
        if depth > _MAX_NESTING:
            raise LoaderError(
                f"{self.path}: config nests models more than {_MAX_NESTING} deep ({name_prefix[:200]}...)"
            )
        container = self.h5.get(f"{group_path}/layers" if group_path else "layers")
        by_name = {}  # Keras >= 3.? writes the layer's name on its vars group: the sure way to match
        if isinstance(container, h5py.Group):
            for key, child in container.items():
                vars_group = child.get("vars") if isinstance(child, h5py.Group) else None
                if vars_group is not None and "name" in vars_group.attrs:
                    by_name[_text(vars_group.attrs["name"])] = key
        used: dict[str, int] = {}
        for entry in layer_list:
            if not isinstance(entry, dict):
                continue
            cls = str(entry.get("class_name", ""))
            conf = _config_of(entry)
            name = str(conf.get("name") or entry.get("name") or cls)
            key = _snake_case(cls)
            if key in used:
                used[key] += 1
                key = f"{key}_{used[key]}"
            else:
                used[key] = 0
            key = by_name.get(name, key)
            child_path = f"{group_path}/layers/{key}" if group_path else f"layers/{key}"
            order = self.position
            self.position += 1
            if cls in _CONV_CLASSES:
                kernels = self._kernels(child_path, f"{self.path}: layer {name_prefix}{name}")
                if kernels is not None:
                    self.sink.emit(cls, name_prefix + name, kernels, conf, order, inferred=False)
            nested = _layer_list(entry)
            if nested is not None:
                self._walk_config(nested, child_path, f"{name_prefix}{name}/", depth + 1)

    def _kernels(self, group_path: str, where: str) -> list[np.ndarray] | None:
        group = self.h5.get(f"{group_path}/vars")
        if not isinstance(group, h5py.Group):
            raise LoaderError(
                f"{where}: no weights at {group_path}/vars; the weight file does not match its config"
            )
        kernels = []
        for index in range(len(group)):
            if str(index) not in group:
                break
            dataset = group[str(index)]
            if isinstance(dataset, h5py.Dataset) and dataset.ndim == 4:
                values = self.sink.array(dataset, where)
                if values is None:
                    return None
                kernels.append(values)
        if not kernels:
            raise LoaderError(f"{where}: conv layer without a 4-D kernel at {group_path}/vars")
        return kernels

    def _walk_groups(self) -> None:
        found = []  # (allocation address, class, name, group path)
        for group_path, group in _groups_with_vars(self.h5, str(self.path)):
            key = group_path.rsplit("/", 1)[-1]
            cls = _SNAKE_CLASSES.get(re.sub(r"_\d+$", "", key))
            vars_group = group["vars"]
            first = vars_group.get("0")
            if cls is None:
                if isinstance(first, h5py.Dataset) and first.ndim == 4 and key != "vars":
                    self.sink.warnings.append(
                        f"{self.path}: layer {group_path}: 4-D weights of an unknown layer "
                        f"class {key!r} skipped (save as .keras to keep the classes)"
                    )
                continue
            if not isinstance(first, h5py.Dataset):
                continue
            name = _text(vars_group.attrs["name"]) if "name" in vars_group.attrs else key
            prefix = _nested_prefix(self.h5, group_path)
            found.append((h5py.h5o.get_info(first.id).addr, cls, prefix + name, group_path))
        for order, (_, cls, name, group_path) in enumerate(sorted(found)):
            kernels = self._kernels(group_path, f"{self.path}: layer {name}")
            if kernels is not None:
                # groups is not in a bare weight file: a Conv2D is taken as groups=1, kind inferred.
                self.sink.emit(cls, name, kernels, {}, order, inferred=_CONV_CLASSES[cls] == "conv")


class _Keras2Reader:
    """``[model_weights/]<layer>`` groups listed by ``layer_names``, each with ``weight_names``."""

    def __init__(self, path: Path, h5: h5py.File) -> None:
        self.path, self.h5 = path, h5
        self.sink = _LayerSink(path)

    def read(self) -> LoadedModel:
        root = self.h5.get("model_weights", self.h5)
        version = _text(self.h5.attrs.get("keras_version", root.attrs.get("keras_version", "")))
        if version.startswith("1."):
            raise LoaderError(
                f"{self.path}: Keras {version} file; Keras 1 kernel layouts are not supported "
                "(re-save it with Keras 2 or 3)"
            )
        config = None
        if "model_config" in self.h5.attrs:
            try:
                config = json.loads(_text(self.h5.attrs["model_config"]))
            except ValueError as exc:
                raise LoaderError(f"{self.path}: model_config attribute is not valid JSON ({exc})") from exc
            except RecursionError:
                raise LoaderError(f"{self.path}: model_config is nested too deeply to be a model config") \
                    from None
        top = {}
        for entry in _layer_list(config) or []:
            if isinstance(entry, dict):
                conf = _config_of(entry)
                top[str(conf.get("name") or entry.get("name"))] = entry
        layer_names = _attr_list(root, "layer_names")
        if layer_names is None:
            raise LoaderError(f"{self.path}: Keras 2 weights without a layer_names attribute")
        position = 0
        for layer_name in layer_names:
            if layer_name not in root:
                raise LoaderError(
                    f"{self.path}: layer {layer_name} listed in layer_names has no weight group"
                )
            group = root[layer_name]
            weight_names = _attr_list(group, "weight_names") or []
            for owner, variables in _by_owner(layer_name, weight_names):
                entry = _find_layer(top.get(layer_name), owner.rsplit("/", 1)[-1])
                self._emit(group, owner, variables, entry, position, config is not None)
                position += 1
        meta = {"keras_format": "keras2", "keras_version": version, "order_from": "layer_names"}
        return LoadedModel(
            source_path=str(self.path),
            format="keras",
            layers=self.sink.layers,
            meta=meta,
            warnings=self.sink.warnings,
        )

    def _emit(
        self,
        group: h5py.Group,
        owner: str,
        variables: list[tuple[str, str]],
        entry: dict | None,
        position: int,
        have_config: bool,
    ) -> None:
        where = f"{self.path}: layer {owner}"
        datasets = {var: group[weight_name] for var, weight_name in variables if weight_name in group}
        if len(datasets) != len(variables):
            missing = [w for _, w in variables if w not in group]
            raise LoaderError(f"{where}: weights {missing} listed in weight_names are missing")
        four_d = {var: ds for var, ds in datasets.items() if isinstance(ds, h5py.Dataset) and ds.ndim == 4}
        if not four_d:
            return
        if entry is not None:
            cls = str(entry.get("class_name", ""))
            conf = _config_of(entry)
            if cls not in _CONV_CLASSES:
                return  # Conv2DTranspose, Conv3D, ... are not 2-D convs of the kind kept here
            inferred = False
        else:
            if have_config:
                self.sink.warnings.append(
                    f"{where}: not found in model_config; classified from its weight names"
                )
            guessed, conf = self._class_from_names(four_d), {}
            if guessed is None:
                return
            cls = guessed
            # 'depthwise_kernel' names the class exactly; a bare 4-D 'kernel' may be a Conv2DTranspose and
            # its groups are unknown.
            inferred = cls == "Conv2D"
        order_names = {
            "conv": ["kernel"],
            "depthwise": ["depthwise_kernel", "kernel"],
            "separable": ["depthwise_kernel", "pointwise_kernel"],
        }[_CONV_CLASSES[cls]]
        kernels = [four_d[v] for v in order_names if v in four_d] or list(four_d.values())
        arrays = []
        for dataset in kernels:
            values = self.sink.array(dataset, where)
            if values is None:
                return
            arrays.append(values)
        self.sink.emit(cls, owner, arrays, conf, position, inferred=inferred)

    @staticmethod
    def _class_from_names(four_d: dict) -> str | None:
        if "depthwise_kernel" in four_d:
            return "SeparableConv2D" if "pointwise_kernel" in four_d else "DepthwiseConv2D"
        if "kernel" in four_d:
            return "Conv2D"  # could be a Conv2DTranspose: kind_inferred says so
        return None


# ----------------------------------------------------------------------------------------- helpers


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _attr_list(group: h5py.Group, name: str) -> list[str] | None:
    """A list attribute as Keras 2 writes it: whole, or split into name0, name1 ... when over HDF5's 64 KiB
    object-header limit."""
    if name in group.attrs:
        return [_text(v) for v in np.atleast_1d(group.attrs[name])]
    if f"{name}0" not in group.attrs:
        return None
    values: list[Any] = []
    chunk = 0
    while f"{name}{chunk}" in group.attrs:
        values.extend(_text(v) for v in np.atleast_1d(group.attrs[f"{name}{chunk}"]))
        chunk += 1
    return values


def _snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case: how Keras 3 names a layer's group in the weight file."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _layer_list(entry: Any) -> list | None:
    """The layer list of a model config ({"class_name", "config": {"layers": [...]}}); Keras 2.0-2.2
    Sequential configs are the list itself."""
    if not isinstance(entry, dict):
        return None
    conf = entry.get("config")
    if isinstance(conf, list):
        return conf
    if isinstance(conf, dict) and isinstance(conf.get("layers"), list):
        return conf["layers"]
    return None


def _config_of(entry: dict) -> dict:
    """A layer entry's "config" object ({} when it has none, or not an object)."""
    conf = entry.get("config")
    return conf if isinstance(conf, dict) else {}


def _find_layer(entry: dict | None, name: str, depth: int = 0) -> dict | None:
    """The config of layer ``name``: ``entry`` itself or a layer nested in it (depth first, at most
    ``_MAX_NESTING`` models deep)."""
    if entry is None or depth > _MAX_NESTING:
        return None
    conf = _config_of(entry)
    if str(conf.get("name") or entry.get("name")) == name:
        return entry
    for child in _layer_list(entry) or []:
        found = _find_layer(child, name, depth + 1) if isinstance(child, dict) else None
        if found is not None:
            return found
    return None


def _by_owner(layer_name: str, weight_names: list[str]) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Group a layer's weight names ('conv1/kernel:0', 'sequential/conv2d/bias') by the layer owning them,
    in first-appearance order; yields (owner path, [(variable name, weight name)])."""
    owners: dict[str, list[tuple[str, str]]] = {}
    for weight_name in weight_names:
        owner, _, var = weight_name.rpartition("/")
        owners.setdefault(owner or layer_name, []).append((var.split(":")[0], weight_name))
    yield from owners.items()


def _groups_with_vars(h5: h5py.File, label: str) -> Iterator[tuple[str, h5py.Group]]:
    """Every group (outside ``vars`` groups) that holds a ``vars`` group, by h5safe.walk: hard links only,
    each object once (a group linked under its own descendants is an error, not an endless walk), depth
    capped."""
    for path, child in h5safe.walk(h5, label=label):
        parts = path.strip("/").split("/")
        if not isinstance(child, h5py.Group) or "vars" in parts:
            continue
        if isinstance(child.get("vars"), h5py.Group):
            yield "/".join(parts), child


def _nested_prefix(h5: h5py.File, group_path: str) -> str:
    """'layers/sequential/layers/conv2d' -> 'sequential/' (the enclosing models' names)."""
    parts = group_path.split("/")
    prefix = []
    for depth in range(1, len(parts) - 1):
        if parts[depth - 1] == "layers" and parts[depth + 1] == "layers":
            vars_group = h5.get("/".join(parts[: depth + 1]) + "/vars")
            name = parts[depth]
            if isinstance(vars_group, h5py.Group) and "name" in vars_group.attrs:
                name = _text(vars_group.attrs["name"])
            prefix.append(name + "/")
    return "".join(prefix)


