"""TFLite loader: every CONV_2D and DEPTHWISE_CONV_2D of the main subgraph, in PyTorch's layout.

TFLite stores a CONV_2D filter as ``[c_out, kh, kw, c_in / groups]`` and a DEPTHWISE_CONV_2D filter as
``[1, kh, kw, C * m]`` where output channel ``c * m + k`` reads input channel ``c`` (TFLite's definition,
the same order as PyTorch's depthwise ``[C * m, 1, kh, kw]``).  Both are transposed here, axis 1 of the
stored tensor (kh) staying the row axis, so a kernel row is [kh, kw] in C order exactly as PyTorch stores it.

Weights are followed through DEQUANTIZE ops to the stored constant: fp16 weights (mediapipe's files) are
returned as float16, integer weights are dequantised with their scale / zero point (per channel along
``quantized_dimension`` when given) into float32.  ``groups`` comes from the op's input tensor shape (the
channel count), so a depthwise conv with multiplier m > 1 and a grouped CONV_2D are classified exactly.
``order`` is the op's graph depth: the longest path, in ops, from a subgraph input (DEQUANTIZE ops on
constants add nothing).

The file is read into memory once and parsed with the ``tflite`` flatbuffer bindings, which do not validate
anything; every vector and buffer this loader touches is bounds-checked against the file first, so a
corrupt or lying file gives a LoaderError that names it, never a huge allocation.  Flatbuffer offsets can
point many entries at one table or vector, so counts are bounded too: at most ``MAX_OPERATORS`` operators, no
more operator inputs / outputs in all than the file has bytes, each stored filter decoded once however many
ops use it (at most ``MAX_SHARED_WEIGHT``), and the decoded filters together at most 16x the file's size.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator
from tflite.Conv2DOptions import Conv2DOptions
from tflite.DepthwiseConv2DOptions import DepthwiseConv2DOptions
from tflite.TensorType import TensorType

from .base import ConvLayer, LoadedModel, LoaderError, classify_kind, graph_depths, unique_name
from .base import check_finite as _check_finite

__all__ = ["MAX_OPERATORS", "MAX_SHARED_WEIGHT", "load"]

MAX_OPERATORS = 1_000_000  # per subgraph; real models have up to ~10^5
MAX_SHARED_WEIGHT = 256  # ops that may share one stored filter (tied weights); more is a hostile fan-out
_BUDGET_FACTOR = 16  # decoded filters may take this many times the file's bytes (int4 -> float32 is 8x) ...
_BUDGET_FLOOR = 64 << 20  # ... plus this

_IDENTIFIER = b"TFL3"
_U16, _U32, _I32 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<i")
_NO_INDICES = np.zeros(0, np.int32)
_DTYPES: dict[int, np.dtype] = {
    TensorType.FLOAT32: np.dtype("<f4"),
    TensorType.FLOAT16: np.dtype("<f2"),
    TensorType.FLOAT64: np.dtype("<f8"),
    TensorType.INT8: np.dtype("i1"),
    TensorType.UINT8: np.dtype("u1"),
    TensorType.INT16: np.dtype("<i2"),
    TensorType.INT32: np.dtype("<i4"),
}
_INT4 = getattr(TensorType, "INT4", None)
_BFLOAT16 = getattr(TensorType, "BFLOAT16", None)
_TYPE_NAMES = {v: k for k, v in vars(TensorType).items() if not k.startswith("_")}


def load(path: str | Path) -> LoadedModel:
    """Read the conv layers of the TFLite model at ``path``; raises :class:`LoaderError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LoaderError(f"{path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8 or head[4:8] != _IDENTIFIER:
        raise LoaderError(
            f"{path}: not a TFLite model (no 'TFL3' flatbuffer identifier; empty, truncated or "
            "another format)"
        )
    data = path.read_bytes()
    try:
        return _Reader(path, data).read()
    except LoaderError:
        raise
    except Exception as exc:  # struct.error, IndexError, ValueError ... from reading garbage offsets
        raise LoaderError(
            f"{path}: corrupt TFLite flatbuffer ({type(exc).__name__}: {exc}); re-download or "
            "re-convert the model"
        ) from exc


class _Reader:
    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.model = tflite.Model.GetRootAs(data, 0)
        self.warnings: list[str] = []
        self.stored: dict[int, np.ndarray] = {}  # stored tensor -> its decoded filter (TFLite layout), decoded once
        self.filters: dict[tuple[int, bool], np.ndarray] = {}  # (stored tensor, depthwise) -> weight, built once
        self.users: dict[int, list[str]] = {}  # stored tensor -> ops using it as their filter
        self.sources: dict[int, int | None] = {}  # tensor -> the stored tensor behind its DEQUANTIZE chain
        self.budget = _BUDGET_FACTOR * len(data) + _BUDGET_FLOOR
        self.indices_left = len(data)  # operator input / output indices that may still be read (see above)

    def _count(self, n: int, what: str, cap: int | None = None) -> int:
        """A vector length bounded by the file (each element takes at least 4 bytes) and by ``cap``."""
        if n < 0 or 4 * n > len(self.data):
            raise LoaderError(
                f"{self.path}: {what} claims {n} entries, more than the {len(self.data)}-byte file "
                "can hold; the file is corrupt"
            )
        if cap is not None and n > cap:
            raise LoaderError(f"{self.path}: {what} claims {n} entries; kernelatlas reads at most {cap}")
        return n

    def _charge(self, value: np.ndarray, where: str) -> None:
        """Charge a decoded filter to the budget (see the module docstring)."""
        self.budget -= value.nbytes
        if self.budget < 0:
            raise LoaderError(
                f"{where}: the decoded filters would take more than {_BUDGET_FACTOR}x the file's size; "
                "the file reuses buffers or declares sizes to make the reader allocate, refusing it"
            )

    def _get(self, fmt: struct.Struct, at: int) -> int:
        """One scalar of the file, bounds-checked (struct would count a negative offset from the end)."""
        if not 0 <= at <= len(self.data) - fmt.size:
            raise LoaderError(f"{self.path}: offset {at} points outside the {len(self.data)}-byte file; corrupt file")
        return fmt.unpack_from(self.data, at)[0]

    def _op_positions(self, graph, n_ops: int) -> list[int]:
        """Where each operator table of ``graph`` lies, read straight from its operators vector (the
        generated accessors cost ~40 us per op).  Listing one table twice is refused: no writer does it,
        and it would multiply the reader's work and output at 4 bytes an entry."""
        o = graph._tab.Offset(10)  # SubGraph.operators
        if n_ops == 0 or o == 0:
            return []
        start = graph._tab.Vector(o)
        if not 0 <= start <= len(self.data) - 4 * n_ops:
            raise LoaderError(f"{self.path}: the operator list runs past the end of the file; corrupt file")
        rel = np.frombuffer(self.data, "<u4", count=n_ops, offset=start).astype(np.int64)
        positions = start + 4 * np.arange(n_ops, dtype=np.int64) + rel
        if np.unique(positions).size != n_ops:
            raise LoaderError(
                f"{self.path}: the operator list names one operator table several times; no converter writes "
                "that, the file is corrupt or hostile"
            )
        return positions.tolist()

    def _op_fields(self, pos: int, *, indices: bool = True) -> tuple[int, np.ndarray, np.ndarray]:
        """(opcode index, input tensor indices, output tensor indices) of the operator table at ``pos``,
        read with bounds checks; the indices are charged to ``indices_left`` (many operators may point at
        one vector, which must not make the reader hold ops x length indices)."""
        vt = pos - self._get(_I32, pos)
        vt_len = self._get(_U16, vt)

        def slot(voffset: int) -> int:
            return self._get(_U16, vt + voffset) if voffset < vt_len else 0

        o = slot(4)
        opcode = self._get(_U32, pos + o) if o else 0
        if not indices:
            return opcode, _NO_INDICES, _NO_INDICES
        vectors = []
        for voffset in (6, 8):  # Operator.inputs, Operator.outputs
            o = slot(voffset)
            if not o:
                vectors.append(_NO_INDICES)
                continue
            vec = pos + o + self._get(_U32, pos + o)
            n = self._get(_U32, vec)
            self.indices_left -= n
            if self.indices_left < 0:
                raise LoaderError(
                    f"{self.path}: the operators list more tensor indices than the {len(self.data)}-byte file "
                    "holds (operators share index vectors); the file is corrupt or hostile"
                )
            if vec + 4 + 4 * n > len(self.data):
                raise LoaderError(f"{self.path}: an operator's tensor list runs past the end of the file; corrupt")
            vectors.append(np.frombuffer(self.data, "<i4", count=n, offset=vec + 4))
        return opcode, vectors[0], vectors[1]

    def read(self) -> LoadedModel:
        model = self.model
        n_subgraphs = self._count(model.SubgraphsLength(), "subgraph list")
        if n_subgraphs == 0:
            raise LoaderError(f"{self.path}: TFLite model without a subgraph; the file is corrupt")
        self.codes = [
            self._builtin_code(model.OperatorCodes(i))
            for i in range(self._count(model.OperatorCodesLength(), "operator code list"))
        ]
        self.n_buffers = self._count(model.BuffersLength(), "buffer list")
        graph = model.Subgraphs(0)
        self.graph = graph
        self.n_tensors = self._count(graph.TensorsLength(), "tensor list")
        n_ops = self._count(graph.OperatorsLength(), "operator list", MAX_OPERATORS)
        positions = self._op_positions(graph, n_ops)
        fields = [self._op_fields(pos) for pos in positions]
        op_inputs = [self._tensor_indices(f[1]) for f in fields]
        op_outputs = [self._tensor_indices(f[2]) for f in fields]
        self.op_codes = [self._op_code(f[0], i) for i, f in enumerate(fields)]
        self.producer = {t: i for i, outs in enumerate(op_outputs) for t in outs}
        self.op_inputs = op_inputs
        graph_inputs = set(self._tensor_indices(graph.InputsAsNumpy() if graph.InputsLength() else []))
        try:
            depths = graph_depths(op_inputs, op_outputs, graph_inputs)
        except ValueError as exc:
            raise LoaderError(f"{self.path}: {exc}") from exc

        layers: list[ConvLayer] = []
        names: set[str] = set()
        next_suffix: dict[str, int] = {}
        for index, code in enumerate(self.op_codes):
            if code not in (BuiltinOperator.CONV_2D, BuiltinOperator.DEPTHWISE_CONV_2D):
                continue
            op = tflite.Operator()
            op.Init(self.data, positions[index])
            layer = self._conv(op, index, depthwise=code == BuiltinOperator.DEPTHWISE_CONV_2D)
            if layer is None:
                continue
            depth = depths[index]
            layer.order = float(depth if depth is not None else 0)
            layer.name = unique_name(layer.name, names, next_suffix)
            layers.append(layer)
        seen_subgraphs = {graph._tab.Pos}
        ops_left = len(self.data) // 4  # every op entry takes 4 bytes: shared lists must not multiply work
        for s in range(1, n_subgraphs):
            sub = model.Subgraphs(s)
            if sub._tab.Pos in seen_subgraphs:
                continue
            seen_subgraphs.add(sub._tab.Pos)
            n_sub = self._count(sub.OperatorsLength(), "operator list", MAX_OPERATORS)
            ops_left -= n_sub
            if ops_left < 0:
                raise LoaderError(
                    f"{self.path}: the subgraphs list more operators than the {len(self.data)}-byte file "
                    "holds (they share operator lists); the file is corrupt or hostile"
                )
            for i, pos in enumerate(self._op_positions(sub, n_sub)):
                if self._op_code(self._op_fields(pos, indices=False)[0], i) in (
                    BuiltinOperator.CONV_2D,
                    BuiltinOperator.DEPTHWISE_CONV_2D,
                ):
                    self.warnings.append(
                        f"{self.path}: subgraph {s} holds convs; only the main subgraph is read"
                    )
                    break
        meta = {"tflite_version": int(model.Version()), "subgraphs": n_subgraphs}
        return LoadedModel(
            source_path=str(self.path), format="tflite", layers=layers, meta=meta, warnings=self.warnings
        )

    # ------------------------------------------------------------------------------------------ ops

    @staticmethod
    def _builtin_code(code) -> int:
        # Schema v3a moved codes >= 127 to builtin_code; the deprecated int8 field is kept for old readers.
        return max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))

    def _op_code(self, i: int, index: int) -> int:
        """The builtin code of opcode index ``i`` (operator ``index``)."""
        if not 0 <= i < len(self.codes):
            raise LoaderError(
                f"{self.path}: operator {index} uses opcode {i} of {len(self.codes)}; corrupt file"
            )
        return self.codes[i]

    def _tensor_indices(self, values) -> list[int]:
        out = []
        for t in np.asarray(values, dtype=np.int64).tolist():
            if t == -1:  # an optional input left out (e.g. no bias)
                continue
            if not 0 <= t < self.n_tensors:
                raise LoaderError(
                    f"{self.path}: tensor index {t} out of range (0..{self.n_tensors - 1}); corrupt file"
                )
            out.append(t)
        return out

    def _conv(self, op, index: int, *, depthwise: bool) -> ConvLayer | None:
        raw_inputs = np.asarray(op.InputsAsNumpy() if op.InputsLength() else [], dtype=np.int64).tolist()
        if len(raw_inputs) < 2 or raw_inputs[0] < 0 or raw_inputs[1] < 0:
            raise LoaderError(
                f"{self.path}: operator {index} ({'DEPTHWISE_CONV_2D' if depthwise else 'CONV_2D'}) "
                "lacks its input or filter tensor; corrupt file"
            )
        x_index, w_index = raw_inputs[0], raw_inputs[1]
        self._tensor_indices([x_index, w_index])
        stored_index = self._stored_source(w_index)
        name = self._tensor_name(stored_index if stored_index is not None else w_index)
        where = f"{self.path}: layer {name}"
        if stored_index is None:
            self.warnings.append(
                f"{where}: filter is computed at run time (not a constant behind DEQUANTIZE); skipped"
            )
            return None
        users = self.users.setdefault(stored_index, [])
        users.append(name)
        if len(users) > MAX_SHARED_WEIGHT:
            raise LoaderError(
                f"{where}: one stored filter feeds more than {MAX_SHARED_WEIGHT} convolutions; a model does "
                "not tie that many layers: the file is hostile or corrupt"
            )
        filt = self.stored.get(stored_index)
        if filt is None:
            filt = self._constant(stored_index, where)
            if filt is None:
                return None
            self._charge(filt, where)
            self.stored[stored_index] = filt
        if filt.ndim != 4:
            raise LoaderError(f"{where}: filter of shape {list(filt.shape)} is not 4-D; corrupt file")
        if 0 in filt.shape:
            raise LoaderError(f"{where}: filter of shape {list(filt.shape)} holds no kernel; corrupt file")
        in_shape = self._shape(x_index)
        in_channels = int(in_shape[-1]) if len(in_shape) == 4 and in_shape[-1] > 0 else None
        options = op.BuiltinOptions()
        extra: dict = {"op_index": index, "stored_dtype": self._type_name(stored_index)}
        if depthwise:
            opts = DepthwiseConv2DOptions()
            if options is not None:
                opts.Init(options.Bytes, options.Pos)
                extra.update(
                    stride=[opts.StrideH(), opts.StrideW()],
                    dilation=[opts.DilationHFactor(), opts.DilationWFactor()],
                    padding=opts.Padding(),
                )
            if filt.shape[0] != 1:
                raise LoaderError(
                    f"{where}: DEPTHWISE_CONV_2D filter {list(filt.shape)} must be [1, kh, kw, C*m]"
                )
            c_out = int(filt.shape[3])
            if in_channels is None:
                multiplier = opts.DepthMultiplier() if options is not None else 0
                in_channels = c_out // multiplier if multiplier > 0 and c_out % multiplier == 0 else c_out
                self.warnings.append(
                    f"{where}: input channel count unknown; took depth multiplier {c_out // in_channels}"
                )
            if in_channels <= 0 or c_out % in_channels:
                raise LoaderError(
                    f"{where}: {c_out} output channels is not a multiple of the {in_channels} input "
                    "channels of a DEPTHWISE_CONV_2D; corrupt file"
                )
            extra["depth_multiplier"] = c_out // in_channels
            # [1, kh, kw, C*m] -> [C*m, 1, kh, kw]; output channel c*m + k stays at index c*m + k.
            weight = filt[0].transpose(2, 0, 1)[:, None, :, :]
            groups = in_channels
        else:
            if options is not None:
                opts = Conv2DOptions()
                opts.Init(options.Bytes, options.Pos)
                extra.update(
                    stride=[opts.StrideH(), opts.StrideW()],
                    dilation=[opts.DilationHFactor(), opts.DilationWFactor()],
                    padding=opts.Padding(),
                )
            per_group = int(filt.shape[3])
            if in_channels is None:
                groups = 1
                self.warnings.append(f"{where}: input channel count unknown; assumed groups = 1")
            elif in_channels % per_group:
                raise LoaderError(
                    f"{where}: input has {in_channels} channels, not a multiple of the filter's "
                    f"{per_group}; corrupt file"
                )
            else:
                groups = in_channels // per_group
            if groups < 1 or filt.shape[0] % groups:
                raise LoaderError(
                    f"{where}: {groups} groups do not divide the {filt.shape[0]} output channels"
                )
            # [c_out, kh, kw, c_in/groups] -> [c_out, c_in/groups, kh, kw]
            weight = filt.transpose(0, 3, 1, 2)
        cached = self.filters.get((stored_index, depthwise))
        if cached is None:
            cached = np.ascontiguousarray(weight)
            self._charge(cached, where)
            self.filters[stored_index, depthwise] = cached
        weight = cached
        _check_finite(weight, where, self.warnings)
        return ConvLayer(
            name=name,
            weight=weight,
            groups=groups,
            kind=classify_kind(int(weight.shape[0]), int(weight.shape[1]), groups),
            kind_inferred=False,
            order=0.0,
            extra=extra,
        )

    # --------------------------------------------------------------------------------------- tensors

    def _stored_source(self, tensor_index: int) -> int | None:
        """The tensor holding the stored filter: itself, or the input of the DEQUANTIZE chain producing it.
        Remembered for every tensor on the chain, so that many convs on one long chain cost one walk."""
        memo = self.sources
        seen: dict[int, None] = {}  # ordered set
        result: int | None
        while True:
            if tensor_index in memo:
                result = memo[tensor_index]
                break
            if tensor_index not in self.producer:
                result = tensor_index
                break
            if tensor_index in seen:
                raise LoaderError(f"{self.path}: tensor {tensor_index} is produced in a cycle; corrupt file")
            seen[tensor_index] = None
            op_index = self.producer[tensor_index]
            if self.op_codes[op_index] != BuiltinOperator.DEQUANTIZE:
                result = None
                break
            inputs = self.op_inputs[op_index]
            if not inputs:
                result = None
                break
            tensor_index = inputs[0]
        for t in seen:
            memo[t] = result
        return result

    def _tensor_name(self, index: int) -> str:
        raw = self.graph.Tensors(index).Name()
        return raw.decode("utf-8", errors="replace") if raw else f"tensor_{index}"

    def _type_name(self, index: int) -> str:
        return _TYPE_NAMES.get(self.graph.Tensors(index).Type(), "UNKNOWN").lower()

    def _shape(self, index: int) -> list[int]:
        tensor = self.graph.Tensors(index)
        n = tensor.ShapeLength()
        if n == 0:
            return []
        if n > 16:
            raise LoaderError(f"{self.path}: tensor {index} claims rank {n}; corrupt file")
        return [int(d) for d in tensor.ShapeAsNumpy()]

    def _constant(self, index: int, where: str) -> np.ndarray | None:
        """The stored tensor ``index`` as a float array (float16 kept, integers dequantised to float32)."""
        tensor = self.graph.Tensors(index)
        shape = self._shape(index)
        if any(d < 0 for d in shape):
            raise LoaderError(f"{where}: stored filter has a dynamic shape {shape}; corrupt file")
        if tensor.Sparsity() is not None:
            self.warnings.append(f"{where}: filter stored in TFLite's sparse format; not supported, skipped")
            return None
        ttype = tensor.Type()
        count = math.prod(shape)
        if ttype in _DTYPES:
            dtype = _DTYPES[ttype]
            nbytes = count * dtype.itemsize
        elif ttype == _INT4:
            nbytes = (count + 1) // 2
        elif ttype == _BFLOAT16:
            nbytes = count * 2
        else:
            self.warnings.append(
                f"{where}: filter of type {_TYPE_NAMES.get(ttype, ttype)} not supported; skipped"
            )
            return None
        raw = self._buffer_bytes(tensor.Buffer(), nbytes, where)
        if ttype in _DTYPES:
            values = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)
        elif ttype == _INT4:  # two per byte, low nibble first, sign-extended
            packed = np.frombuffer(raw, dtype=np.uint8)
            nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
            values = np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)
        else:  # bfloat16: the high half of a float32
            values = (np.frombuffer(raw, dtype="<u2", count=count).astype(np.uint32) << 16).view(np.float32)
            values = values.reshape(shape)
        if values.dtype.kind == "f":
            return values.astype(np.float16 if values.dtype == np.float16 else np.float32)
        return self._dequantize(tensor, values, where)

    def _buffer_bytes(self, buffer_index: int, nbytes: int, where: str) -> bytes | memoryview:
        if not 0 < buffer_index < self.n_buffers:
            raise LoaderError(
                f"{where}: filter refers to buffer {buffer_index} of {self.n_buffers}; it holds no "
                "data (a constant without data is a corrupt file)"
            )
        buffer = self.model.Buffers(buffer_index)
        # offset/size (schema 2.14+): older bindings lack them, and then no buffer lies outside the flatbuffer.
        offset = int(buffer.Offset()) if hasattr(buffer, "Offset") else 0
        size = int(buffer.Size()) if hasattr(buffer, "Size") else 0
        if offset > 1:
            # Models > 2 GB keep buffers after the flatbuffer: offset is from the start of the file.
            start, length = offset, size
        else:
            field = buffer._tab.Offset(4)
            if field == 0:
                raise LoaderError(f"{where}: filter buffer {buffer_index} is empty; corrupt file")
            start = buffer._tab.Vector(field)
            length = buffer._tab.VectorLen(field)
        if start < 0 or length < 0 or start + length > len(self.data):
            raise LoaderError(
                f"{where}: buffer {buffer_index} declares {length} bytes at offset {start}, past the "
                f"end of the {len(self.data)}-byte file; the file is truncated or corrupt"
            )
        if length != nbytes:
            raise LoaderError(
                f"{where}: filter shape needs {nbytes} bytes but buffer {buffer_index} holds {length}; "
                "corrupt file"
            )
        return memoryview(self.data)[start : start + length]

    def _dequantize(self, tensor, values: np.ndarray, where: str) -> np.ndarray | None:
        quant = tensor.Quantization()
        n_scales = quant.ScaleLength() if quant is not None else 0
        if n_scales == 0:
            self.warnings.append(f"{where}: integer filter without quantisation scale; skipped")
            return None
        if n_scales > values.size:
            raise LoaderError(
                f"{where}: {n_scales} quantisation scales for {values.size} weights; corrupt file"
            )
        scale = quant.ScaleAsNumpy().astype(np.float32)
        n_zero = quant.ZeroPointLength()
        zero = quant.ZeroPointAsNumpy().astype(np.float32) if n_zero else np.zeros(1, np.float32)
        if n_zero not in (0, 1, n_scales):
            raise LoaderError(f"{where}: {n_zero} zero points for {n_scales} scales; corrupt file")
        if n_scales > 1:
            axis = int(quant.QuantizedDimension())
            if not 0 <= axis < values.ndim or values.shape[axis] != n_scales:
                raise LoaderError(
                    f"{where}: {n_scales} per-channel scales do not match dimension {axis} of filter "
                    f"{list(values.shape)}; corrupt file"
                )
            shape = [1] * values.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zero = zero.reshape(shape) if zero.size > 1 else zero.reshape(())
        else:
            scale, zero = scale.reshape(()), zero.reshape(())
        return (values.astype(np.float32) - zero) * scale


