"""ONNX loader: every 2-D ``Conv`` (and ``QLinearConv``) of the main graph whose weight is stored in the file.

A weight is taken when it is an initializer or a chain of ``Constant`` / ``Identity`` / ``Cast`` /
``DequantizeLinear`` nodes ending in stored tensors; anything else (a weight computed at run time, a weight
fed as a graph input) is skipped with a warning naming the node.  ONNX already stores conv weights as
``[c_out, c_in / group, kh, kw]`` with rows over (y, x), i.e. PyTorch's layout, so nothing is transposed.

``group`` decides the kind exactly (``kind_inferred = False``).  ``order`` is the node's graph depth: the
longest path, in nodes, from a graph input to the node (constant-only chains such as ``Constant ->
DequantizeLinear`` add nothing), so that the corpus can rank depths the way CNN Filter DB's ``conv_depth``
does.

External data is read only from files inside the model's folder (after resolving symlinks), and only after
the byte range a tensor declares has been checked against that file's size, so a hostile
``location`` or a lying length can neither read elsewhere nor allocate more than the file holds.

BatchNorm: exporters (torch.onnx, tf2onnx, paddle2onnx) fold inference BatchNorm into the preceding conv.
The loader never folds anything (``bn_folded`` stays False: the weights are returned as stored); a conv whose
output goes straight into a ``BatchNormalization`` gets ``extra["bn_follows"] = True``, and
``meta["bn_folded_by_export"]`` is a heuristic: True when fewer than half of the convs feed a
BatchNormalization (BN was folded by the exporter, or the net never had any; it cannot tell the two apart),
False otherwise.  Not "no BatchNormalization node at all": PaddleOCR's det model keeps two BN nodes after
convs (and one after a ConvTranspose) while the other 60 convs have theirs folded.
``meta["convs_followed_by_bn"]`` gives the count.

Sizes from the file are never trusted before they are checked against the bytes actually stored: a tensor's
dims against its data, DequantizeLinear's ``axis`` / ``block_size`` and scale / zero-point shapes against the
quantised tensor (before anything is expanded), and weight chains are at most ``MAX_CHAIN`` nodes long.
Every stored tensor is decoded once, however many convs use it (they share the array), a tensor may feed at
most ``MAX_SHARED_WEIGHT`` convs, and all decoded weights together may take at most 16x the bytes read from
disk (the model file, each external-data file once) + 64 MiB, so a small file can neither make the loader
allocate far more than it holds nor hand the corpus the same tensor 10^5 times (docs/security-fuzz.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .base import ConvLayer, LoadedModel, LoaderError, classify_kind, graph_depths, unique_name
from .base import check_finite as _check_finite

__all__ = ["MAX_CHAIN", "MAX_SHARED_WEIGHT", "load"]

MAX_CHAIN = 64  # Constant/Identity/Cast/DequantizeLinear nodes between a conv and its stored weight
MAX_SHARED_WEIGHT = 256  # convs that may share one weight tensor (tied weights); more is a hostile fan-out
# Decoded weights may take this many times the bytes read from disk (int4 -> float32 is 8x), plus a floor.
_BUDGET_FACTOR = 16
_BUDGET_FLOOR = 64 << 20

# Weight producers followed back to stored tensors.  Everything else is "computed at run time".
_PASS_THROUGH = ("Identity", "Cast", "DequantizeLinear", "Constant")
# Packed sub-byte types (onnx >= 1.16 / 1.18 / newer): bits per element, for the declared-size check.
_SUB_BYTE_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                       ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(TensorProto, name)
}


def load(path: str | Path) -> LoadedModel:
    """Read the conv layers of the ONNX model at ``path``; raises :class:`LoaderError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LoaderError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise LoaderError(f"{path}: empty file, not an ONNX model")
    try:
        # External data is never loaded by onnx itself: _ExternalData below checks every path and size first.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, but protobuf raises several kinds on corrupt input
        raise LoaderError(
            f"{path}: not a readable ONNX model (truncated or corrupt protobuf: {exc}); "
            "re-export or re-download it"
        ) from exc
    if not model.HasField("graph") or (not model.opset_import and not model.graph.node):
        raise LoaderError(f"{path}: no ONNX graph in this file (corrupt, or not an ONNX model)")
    try:
        return _Reader(path, model).read()
    except LoaderError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, OverflowError) as exc:  # a malformed node
        raise LoaderError(f"{path}: malformed ONNX graph ({type(exc).__name__}: {exc})") from exc


class _Reader:
    """One pass over one model's main graph."""

    def __init__(self, path: Path, model: onnx.ModelProto) -> None:
        self.path = path
        self.model = model
        self.graph = model.graph
        self.external = _ExternalData(path)
        self.warnings: list[str] = []
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producers: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producers[out] = node
        self.graph_inputs = {i.name for i in self.graph.input} - set(self.initializers)
        self.decoded: dict[str, np.ndarray] = {}  # tensor name -> its value, decoded once
        self.weights: dict[tuple[str, ...], np.ndarray] = {}  # a conv's weight inputs -> its float weight
        self.users: dict[int, list[str]] = {}  # id(weight array) -> convs using it
        self.budget = _BUDGET_FACTOR * path.stat().st_size + _BUDGET_FLOOR
        self.charged: dict[int, np.ndarray] = {}

    def read(self) -> LoadedModel:
        nodes = list(self.graph.node)
        try:
            depths = graph_depths(
                [[t for t in n.input if t] for n in nodes],
                [[t for t in n.output if t] for n in nodes],
                self.graph_inputs,
            )
        except ValueError as exc:
            raise LoaderError(f"{self.path}: {exc}") from exc
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in nodes:
            for name in node.input:
                consumers.setdefault(name, []).append(node)

        layers: list[ConvLayer] = []
        names: set[str] = set()
        next_suffix: dict[str, int] = {}
        convs_followed_by_bn = 0
        for index, node in enumerate(nodes):
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "QLinearConv"):
                continue
            layer = self._conv_layer(node, index, depths[index])
            if layer is None:
                continue
            bn_follows = any(c.op_type == "BatchNormalization" for c in consumers.get(node.output[0], ()))
            convs_followed_by_bn += bn_follows
            layer.extra["bn_follows"] = bn_follows
            layer.name = unique_name(layer.name, names, next_suffix)
            layers.append(layer)
        self._warn_about_subgraphs()
        meta = {
            "opset": {o.domain or "ai.onnx": int(o.version) for o in self.model.opset_import},
            "producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
            "bn_folded_by_export": bool(layers) and 2 * convs_followed_by_bn < len(layers),
            "convs_followed_by_bn": convs_followed_by_bn,
        }
        return LoadedModel(
            source_path=str(self.path), format="onnx", layers=layers, meta=meta, warnings=self.warnings
        )

    # ------------------------------------------------------------------------------------------ one conv

    def _conv_layer(self, node: onnx.NodeProto, index: int, depth: int | None) -> ConvLayer | None:
        name = node.name or (node.input[1] if len(node.input) > 1 else f"{node.op_type}_{index}")
        where = f"{self.path}: layer {name}"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "QLinearConv":
            if len(node.input) < 6:
                raise LoaderError(f"{where}: QLinearConv needs 6+ inputs, got {len(node.input)}")
            key = ("QLinearConv", *node.input[3:6])
        else:
            if len(node.input) < 2 or not node.input[1]:
                raise LoaderError(f"{where}: Conv node without a weight input; the graph is broken")
            key = ("Conv", node.input[1])
        weight = self.weights.get(key)
        first_use = weight is None
        if first_use:
            if node.op_type == "QLinearConv":
                weight = self._quantized_weight(node.input[3], node.input[4], node.input[5], axis=0, where=where)
            else:
                weight = self._constant(node.input[1], where)
        if weight is None:
            return None
        if weight.ndim != 4:
            self.warnings.append(
                f"{where}: {weight.ndim - 2}-D conv (weight {list(weight.shape)}) skipped; "
                "only 2-D convs are kept"
            )
            return None
        if 0 in weight.shape:
            raise LoaderError(f"{where}: weight of shape {list(weight.shape)} holds no kernel; the model is invalid")
        groups = int(attrs.get("group", 1))
        c_out = int(weight.shape[0])
        if groups < 1 or c_out % groups:
            raise LoaderError(
                f"{where}: group={groups} does not divide the {c_out} output channels of weight "
                f"{list(weight.shape)}; the model is invalid"
            )
        if first_use:
            weight = _float_weight(weight)
            self._account(weight, where)
            self.weights[key] = weight
        users = self.users.setdefault(id(weight), [])
        users.append(name)
        if len(users) > MAX_SHARED_WEIGHT:
            raise LoaderError(
                f"{where}: one weight tensor feeds more than {MAX_SHARED_WEIGHT} convs ({users[0]!r}, "
                f"{users[1]!r}, ...); a model does not tie that many layers: the file is hostile or corrupt"
            )
        _check_finite(weight, where, self.warnings)
        extra: dict[str, object] = {"op_type": node.op_type, "node_index": index}
        for attr in ("strides", "dilations", "pads", "auto_pad"):
            if attr in attrs:
                value = attrs[attr]
                extra[attr] = value.decode() if isinstance(value, bytes) else list(value)
        return ConvLayer(
            name=name,
            weight=weight,
            groups=groups,
            kind=classify_kind(c_out, int(weight.shape[1]), groups),
            kind_inferred=False,
            order=float(depth if depth is not None else 0),
            bn_folded=False,
            extra=extra,
        )

    # ------------------------------------------------------------------------ stored tensors and chains

    def _constant(self, name: str, where: str, seen: frozenset[str] = frozenset()) -> np.ndarray | None:
        """The stored value of tensor ``name``; None (with a warning) when it is computed at run time.
        Decoded once per name (``self.decoded``): convs and chains sharing a tensor share the array."""
        if name in seen:
            raise LoaderError(f"{where}: weight chain through {name!r} is cyclic; the graph is broken")
        if len(seen) >= MAX_CHAIN:
            raise LoaderError(
                f"{where}: weight chain through {name!r} is longer than {MAX_CHAIN} nodes; "
                "no exporter writes that, the file is hostile or corrupt"
            )
        cached = self.decoded.get(name)
        if cached is not None:
            return cached
        value = self._compute(name, where, seen | {name})
        if value is not None:
            self._account(value, where)
            self.decoded[name] = value
        return value

    def _account(self, value: np.ndarray, where: str) -> None:
        """Charge a newly decoded array to the model's budget (see the module docstring); an array handed on
        unchanged (Identity, a float32 weight) is charged once."""
        if id(value) in self.charged:
            return
        self.charged[id(value)] = value  # kept alive, so that its id is not reused
        self.budget -= value.nbytes
        if self.budget < 0:
            raise LoaderError(
                f"{where}: the decoded weights would take more than {_BUDGET_FACTOR}x the file's size; "
                "the file reuses tensors or declares sizes to make the reader allocate, refusing it"
            )

    def _compute(self, name: str, where: str, seen: frozenset[str]) -> np.ndarray | None:
        if name in self.initializers:
            return self._tensor(self.initializers[name], where)
        node = self.producers.get(name)
        if node is None:
            if name in self.graph_inputs:
                self.warnings.append(
                    f"{where}: weight {name!r} is a graph input (not stored in the file); skipped"
                )
                return None
            raise LoaderError(
                f"{where}: weight {name!r} is neither stored nor produced by any node; "
                "the graph is broken (truncated file?)"
            )
        if node.op_type not in _PASS_THROUGH or node.domain not in ("", "ai.onnx"):
            self.warnings.append(
                f"{where}: weight {name!r} is computed by a {node.op_type} node at run time; "
                "skipped (only Constant/Identity/Cast/DequantizeLinear chains are followed)"
            )
            return None
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant":
            return self._constant_node(node, attrs, where)
        if node.op_type == "Identity":
            return self._constant(node.input[0], where, seen)
        if node.op_type == "Cast":
            value = self._constant(node.input[0], where, seen)
            if value is None:
                return None
            target = np.dtype(helper.tensor_dtype_to_np_dtype(helper.get_attribute_value(attrs["to"])))
            if value.dtype == np.float16 and target in (np.float32, np.float64):
                return value  # an exact widening: keep the weights as stored
            if target.kind in "OSUaMmc" or target.itemsize > 8:
                raise LoaderError(f"{where}: Cast of weight {name!r} to {target} (not a real number type)")
            return value.astype(target)
        # DequantizeLinear
        axis = int(helper.get_attribute_value(attrs["axis"])) if "axis" in attrs else 1
        block = int(helper.get_attribute_value(attrs["block_size"])) if "block_size" in attrs else 0
        zero = node.input[2] if len(node.input) > 2 else ""
        return self._quantized_weight(
            node.input[0], node.input[1], zero, axis=axis, block_size=block, where=where, seen=seen
        )

    def _constant_node(self, node: onnx.NodeProto, attrs: dict, where: str) -> np.ndarray | None:
        if "value" in attrs:
            return self._tensor(attrs["value"].t, where)
        for key, dtype in (
            ("value_float", np.float32),
            ("value_floats", np.float32),
            ("value_int", np.int64),
            ("value_ints", np.int64),
        ):
            if key in attrs:
                return np.asarray(helper.get_attribute_value(attrs[key]), dtype=dtype)
        self.warnings.append(f"{where}: Constant node {node.name!r} holds no dense tensor; skipped")
        return None

    def _quantized_weight(
        self,
        q_name: str,
        scale_name: str,
        zero_name: str,
        *,
        axis: int,
        where: str,
        block_size: int = 0,
        seen: frozenset[str] = frozenset(),
    ) -> np.ndarray | None:
        """(q - zero_point) * scale, per tensor, per axis or per block (DequantizeLinear's three modes).  Every
        size involved (axis, block_size, scale and zero-point shapes) is checked against the quantised tensor
        before anything is expanded, so the result never holds more than ``q.size`` values."""
        q = self._constant(q_name, where, seen)
        scale = self._constant(scale_name, where, seen)
        zero = self._constant(zero_name, where, seen) if zero_name else None
        if q is None or scale is None or (zero_name and zero is None):
            return None
        if zero is not None and zero.shape != scale.shape:
            raise LoaderError(
                f"{where}: zero point shape {list(zero.shape)} differs from scale shape {list(scale.shape)}"
            )
        if q.ndim == 0:
            raise LoaderError(f"{where}: quantised weight {q_name!r} is a scalar")
        if scale.size > q.size:
            raise LoaderError(
                f"{where}: {scale.size} scales for the {q.size} values of quantised weight {q_name!r}"
            )
        scale = scale.astype(np.float32)
        zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
        if not -q.ndim <= axis < q.ndim:
            raise LoaderError(f"{where}: axis {axis} is outside quantised weight {q_name!r} of shape {list(q.shape)}")
        axis = axis + q.ndim if axis < 0 else axis
        if block_size < 0:
            raise LoaderError(f"{where}: negative block_size {block_size}")
        if scale.size == 1:
            scale, zero = scale.reshape(()), zero.reshape(())
        elif block_size > 0:
            # Blocked: scale has q's shape except along axis, where it holds ceil(n / block_size) entries.
            # Checked first, then expanded by indexing (never by np.repeat of a size from the file).
            n = q.shape[axis]
            want = list(q.shape)
            want[axis] = -(-n // block_size)
            if scale.ndim != q.ndim or list(scale.shape) != want:
                raise LoaderError(
                    f"{where}: block scales of shape {list(scale.shape)} (block_size {block_size}) do not "
                    f"cover weight {q_name!r} of shape {list(q.shape)} on axis {axis} (need {want})"
                )
            index = np.arange(n) // block_size
            scale, zero = scale.take(index, axis=axis), zero.take(index, axis=axis)
        elif scale.ndim == 1 and scale.shape[0] == q.shape[axis]:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        else:
            raise LoaderError(
                f"{where}: scale of shape {list(scale.shape)} does not fit quantised weight "
                f"{q_name!r} of shape {list(q.shape)} on axis {axis}"
            )
        return (q.astype(np.float32) - zero) * scale

    def _tensor(self, tensor: onnx.TensorProto, where: str) -> np.ndarray:
        """A TensorProto as numpy, external bytes checked and read by _ExternalData."""
        label = f"{where}: tensor {tensor.name!r}"
        if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            raise LoaderError(f"{label}: has no numeric type ({tensor.data_type})")
        declared = _declared_nbytes(tensor, label)
        if tensor.data_location == TensorProto.EXTERNAL:
            stored = TensorProto()
            stored.CopyFrom(tensor)
            stored.raw_data = self.external.read(tensor, declared, label)
            self.budget += _BUDGET_FACTOR * self.external.new_bytes  # an external file's size counts once
            del stored.external_data[:]
            stored.data_location = TensorProto.DEFAULT
            tensor = stored
        elif tensor.HasField("raw_data") and declared is not None and len(tensor.raw_data) != declared:
            raise LoaderError(
                f"{label}: dims {list(tensor.dims)} declare {declared} bytes but the file stores "
                f"{len(tensor.raw_data)}; the model is corrupt"
            )
        try:
            return numpy_helper.to_array(tensor)
        except Exception as exc:
            raise LoaderError(f"{label}: cannot decode ({exc}); the model is corrupt") from exc

    def _warn_about_subgraphs(self) -> None:
        for node in self.graph.node:
            for attr in node.attribute:
                graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
                if any(n.op_type == "Conv" for g in graphs for n in g.node):
                    self.warnings.append(
                        f"{self.path}: {node.op_type} node {node.name!r} holds convs in a "
                        "subgraph; only the main graph is read"
                    )
                    return


def external_files(path: Path) -> list[Path]:
    """The external-data files an ONNX model's tensors point to (resolved, inside the model's folder, existing),
    sorted: part of the model's identity, since they hold its weights.  Unreadable models give [] (the loader
    reports what is wrong with them)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []
    folder = path.parent.resolve()
    found: set[Path] = set()
    graphs = [model.graph]
    seen = 0
    while graphs and seen < 100_000:  # iterative: subgraphs nest without recursion limits
        graph = graphs.pop()
        seen += 1
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
        for tensor in tensors:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            # a location that is not text (protobuf hands back bytes for invalid UTF-8), too long for the
            # filesystem, or a symlink loop is not a file of this model: the loader reports it
            if not isinstance(location, str) or not location or Path(location).is_absolute() or "\x00" in location:
                continue
            try:
                target = (folder / location).resolve()
                if target.is_relative_to(folder) and target.is_file():
                    found.add(target)
            except (OSError, RuntimeError, ValueError):
                continue
    return sorted(found)


class _ExternalData:
    """Reads external tensor bytes from files inside the model's folder, after checking the byte range."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.folder = model_path.parent.resolve()
        self.files: set[Path] = set()
        self.new_bytes = 0  # size of the file the last read opened, when no read before had opened it

    def read(self, tensor: onnx.TensorProto, declared: int | None, label: str) -> bytes:
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise LoaderError(f"{label}: external data without a location")
        if not isinstance(location, str):
            raise LoaderError(f"{label}: external data location {location!r} is not text")
        if Path(location).is_absolute() or "\x00" in location:
            raise LoaderError(
                f"{label}: external data path {location!r} is absolute; only files inside "
                f"{self.folder} are read"
            )
        try:
            target = (self.folder / location).resolve()
            is_file = target.is_file()
        except (OSError, RuntimeError) as exc:  # a name too long for the filesystem, a symlink loop
            raise LoaderError(f"{label}: external data path {location!r} cannot be resolved ({exc})") from None
        if not target.is_relative_to(self.folder):
            raise LoaderError(
                f"{label}: external data path {location!r} escapes the model's folder "
                f"{self.folder}; refusing to read it"
            )
        if not is_file:
            raise LoaderError(
                f"{label}: external data file {location!r} is missing next to the model; copy it "
                "into the model's folder"
            )
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else declared
        except ValueError as exc:
            raise LoaderError(f"{label}: external data offset/length is not an integer") from exc
        if length is None:
            raise LoaderError(f"{label}: external data of unknown size (no length, unsized type)")
        if declared is not None and length != declared:
            raise LoaderError(
                f"{label}: external data length {length} differs from the {declared} bytes its dims "
                f"{list(tensor.dims)} declare"
            )
        size = target.stat().st_size
        self.new_bytes = 0 if target in self.files else size
        self.files.add(target)
        if offset < 0 or length < 0 or offset + length > size:
            raise LoaderError(
                f"{label}: declares {length} bytes at offset {offset} of {location!r}, which holds "
                f"only {size} bytes; the external data is truncated or the model is corrupt"
            )
        with open(target, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)


def _declared_nbytes(tensor: onnx.TensorProto, label: str) -> int | None:
    """Bytes the dims declare for raw storage; None for types whose packing is not known here."""
    if any(d < 0 for d in tensor.dims):
        raise LoaderError(f"{label}: negative dimension in {list(tensor.dims)}")
    count = math.prod(tensor.dims)
    if tensor.data_type in _SUB_BYTE_BITS:
        return (count * _SUB_BYTE_BITS[tensor.data_type] + 7) // 8
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):  # a type this onnx release does not map to numpy
        return None
    return count * itemsize


def _float_weight(weight: np.ndarray) -> np.ndarray:
    """float16 stays float16 (as stored); every other dtype becomes float32."""
    if weight.dtype == np.float16 or weight.dtype == np.float32:
        return np.ascontiguousarray(weight)
    return np.ascontiguousarray(weight.astype(np.float32))






