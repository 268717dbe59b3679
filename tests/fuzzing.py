"""Fuzzing harness for every checkpoint loader (docs/security-fuzz.md).

Threat model: checkpoints come from strangers.  Reading one must end in a model or in a per-file error
(:class:`~kernelatlas.corpus.loaders.LoaderError`, :class:`~kernelatlas.corpus.loaders.filterdb.FilterDBError`, an entry in
``ExtractReport.failed`` that a loader raised) -- never a signal, a hang, a MemoryError / unbounded
allocation, or an uncaught exception.

Pieces:

* **Seeds** (:func:`seeds`): real checkpoints from ``../shared/weights`` (read, never copied into the repo) and
  small files generated here at run time for every format: torch zip and legacy pickle, safetensors (single
  and an index + shards set), ONNX (quantised chains, QLinearConv, external data), TFLite (int8 per-channel
  depthwise, fp16 behind DEQUANTIZE), Keras 3 ``.keras`` / ``.weights.h5``, Keras 2 ``.h5``, CNN Filter DB
  ``dataset.h5`` (pandas table and fixed formats).  Generator seeds (``*-gen``) build a new structurally
  varied file from a random seed: TFLite specs with lying shapes / indices / quantisation / fan-out, HDF5
  files with odd dtypes, shapes, filters, links and attributes, Filter DB tables with odd filter ranges.
* **Mutations** (:data:`MUTATORS`): bit flips, interesting integers and truncation, aimed half the time at
  the format's structure (zip headers, protobuf length fields, flatbuffer offsets and vector lengths, HDF5
  object headers, the safetensors header); size lies (safetensors offsets / shapes / header length, zip
  central-directory sizes, protobuf lengths, flatbuffer offsets); and structure-aware mutations that parse,
  change and re-serialise (ONNX ModelProto graphs and attributes, JSON configs and headers, torch pickles
  inside the zip).
* **A recipe** ``(seed, seed_param, ((mutator, param), ...), mode)`` is deterministic: the same recipe
  gives the same bytes.  hypothesis draws recipes in the default tests (fixed seed); ``run`` below draws
  them from ``random`` for the long run (``scripts/fuzz.sh``).
* **Workers**: a worker process (``python tests/fuzzing.py worker``) imports everything once, caps its
  address space (RLIMIT_AS: its size after the imports + ``--limit-mb``), then reads one input per line and
  answers per input: ``ok`` / ``error`` (a clean per-file error) / ``bug`` (anything else, with the
  traceback).  The parent kills a worker whose input runs past the time limit (``timeout``) and notices one
  that dies (``signal``); it then reruns the culprit alone in a fresh worker to confirm it, and, if that
  does not reproduce, the inputs before it one at a time.

Modes: ``load`` (``load_file`` then every layer's ``kernels()``), ``extract`` (``kernelatlas.jobs.extract.extract``
into a scratch corpus, which is then reopened and read), ``filterdb`` (``inspect_filterdb`` +
``layer_arrays``) and ``filterdb-import`` (``import_filterdb``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickletools
import random
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np

HERE = Path(__file__).resolve().parent
WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"

# Real checkpoints used as seeds (relative to WEIGHTS).  The default test run uses the small ones.
REAL_SEEDS = {
    "real-pnet.pt": ("torch", "mtcnn_facenet_pytorch/pnet.pt"),
    "real-srfnet.pth": ("torch", "sr_ntire2025/team28_bvi_srfnet_g.pth"),
    "real-cls.onnx": ("onnx", "ppocr_v4_rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "real-face.tflite": ("tflite", "mediapipe_tflite/face_detection_short_range.tflite"),
}
REAL_SEEDS_LONG = {
    **REAL_SEEDS,
    "real-rnet.pt": ("torch", "mtcnn_facenet_pytorch/rnet.pt"),
    "real-ultraface.pth": ("torch", "ultraface/version-RFB-320.pth"),
    "real-sgsdn.pth": ("torch", "sr_ntire2025/team18_SGSDN.pth"),
    "real-facemesh.tflite": ("tflite", "mediapipe_tflite/face_landmark.tflite"),
    "real-palm.tflite": ("tflite", "mediapipe_tflite/palm_detection_full.tflite"),
    "real-det.onnx": ("onnx", "ppocr_v4_rapidocr/ch_PP-OCRv4_det_infer.onnx"),
}

FAMILIES = ("torch", "safetensors", "onnx", "tflite", "keras", "filterdb")
DEFAULT_LIMIT_MB = 2048
DEFAULT_TIMEOUT = 20.0
RSS_GROWTH_MB = 768  # one input may make the worker's resident memory grow by this much (seeds are < 20 MB)
INTERESTING = (0, 1, 2, 3, 7, 8, 9, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 0x100000000, 0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF)


# ============================================================================================== seeds


@dataclass
class Seed:
    """One input: ``files`` (relative name -> bytes; several for sets such as ONNX + external data),
    ``entry`` (the file handed to the loader), ``family`` and the modes it is run in."""

    name: str
    family: str
    files: dict[str, bytes]
    entry: str
    modes: tuple[str, ...] = ("load", "extract")


def _torch_seeds() -> list[Seed]:
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {
        "stem.weight": torch.randn(4, 3, 3, 3, generator=g),
        "stem.bias": torch.zeros(4),
        "blocks.0.dw.weight": torch.randn(8, 1, 3, 3, generator=g),
        "blocks.0.bn.running_mean": torch.zeros(8),
        "blocks.1.dw.weight": torch.randn(8, 1, 5, 5, generator=g).half(),
        "head.weight": torch.randn(2, 8, 1, 1, generator=g),
    }
    out = []
    for name, kwargs in (("gen-zip.pth", {}), ("gen-legacy.pth", {"_use_new_zipfile_serialization": False})):
        buf = io.BytesIO()
        torch.save({"params": sd, "epoch": 3} if "legacy" in name else sd, buf, **kwargs)
        out.append(Seed(name, "torch", {name: buf.getvalue()}, name))
    return out


def _safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    blobs, offset = [], 0
    for key, arr in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        dtype = {"float32": "F32", "float16": "F16", "float64": "F64", "int8": "I8", "int64": "I64"}[arr.dtype.name]
        header[key] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def _safetensors_seeds() -> list[Seed]:
    rng = np.random.default_rng(1)
    tensors = {
        "features.0.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "features.1.weight": rng.standard_normal((8, 1, 3, 3)).astype(np.float16),
        "features.2.weight": rng.standard_normal((8, 1, 5, 5)).astype(np.float64),
        "features.2.num_batches_tracked": np.array(3, np.int64),
        "classifier.weight": rng.standard_normal((2, 8)).astype(np.float32),
    }
    single = _safetensors_bytes(tensors, {"format": "pt"})
    part1 = {k: tensors[k] for k in list(tensors)[:2]}
    part2 = {k: tensors[k] for k in list(tensors)[2:]}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {"total_size": 0},
             "weight_map": {**dict.fromkeys(part1, names[0]), **dict.fromkeys(part2, names[1])}}
    sharded = {"model.safetensors.index.json": json.dumps(index).encode(),
               names[0]: _safetensors_bytes(part1), names[1]: _safetensors_bytes(part2)}
    return [Seed("gen.safetensors", "safetensors", {"model.safetensors": single}, "model.safetensors"),
            Seed("gen-sharded.safetensors", "safetensors", sharded, "model.safetensors.index.json")]


def _onnx_seeds() -> list[Seed]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    q = rng.integers(-128, 128, size=(8, 1, 3, 3), dtype=np.int8)
    nodes = [
        helper.make_node("Constant", [], ["w0"], value=numpy_helper.from_array(
            rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w0c")),
        helper.make_node("Identity", ["w0"], ["w0i"]),
        helper.make_node("Conv", ["x", "w0i"], ["a"], name="stem"),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["w1"], axis=0),
        helper.make_node("Conv", ["a", "w1"], ["b"], name="dw", group=4),
        helper.make_node("BatchNormalization", ["b", "g", "beta", "m", "v"], ["bn"]),
        helper.make_node("DequantizeLinear", ["q2", "s2"], ["w2"], axis=1, block_size=2),
        helper.make_node("Conv", ["bn", "w2"], ["c"], name="blocked"),
        helper.make_node("Cast", ["w3"], ["w3f"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["c", "w3f"], ["d"], name="fp16"),
        helper.make_node("QLinearConv", ["d", "xs", "xz", "qw", "ws", "wz", "ys", "yz"], ["y"], name="qconv"),
    ]
    inits = [
        numpy_helper.from_array(q, "q1"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, 8).astype(np.float32), "s1"),
        numpy_helper.from_array(np.zeros(8, np.int8), "z1"),
        numpy_helper.from_array(rng.integers(0, 255, (6, 8, 3, 3), dtype=np.uint8), "q2"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, (6, 4, 3, 3)).astype(np.float32), "s2"),
        numpy_helper.from_array(rng.standard_normal((6, 6, 3, 3)).astype(np.float16), "w3"),
        numpy_helper.from_array(np.ones(8, np.float32), "g"),
        numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
        numpy_helper.from_array(np.zeros(8, np.float32), "m"),
        numpy_helper.from_array(np.ones(8, np.float32), "v"),
        numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(rng.integers(-128, 128, (4, 6, 3, 3), dtype=np.int8), "qw"),
        numpy_helper.from_array(np.array([0.5, 0.25, 0.125, 2.0], np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.2, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    chains = model.SerializeToString()
    # external data: two initializers in one file beside the model
    w_a = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    w_b = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    blob = w_a.tobytes() + w_b.tobytes()
    ext = []
    for name, arr, offset in (("wa", w_a, 0), ("wb", w_b, w_a.nbytes)):
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        ext.append(t)
    g2 = helper.make_graph([helper.make_node("Conv", ["x", "wa"], ["a"], name="dw", group=4),
                            helper.make_node("Conv", ["a", "wb"], ["y"], name="conv")], "g2",
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=ext)
    external = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    assert onnx.load_from_string(chains).graph.node
    return [Seed("gen-chains.onnx", "onnx", {"model.onnx": chains}, "model.onnx"),
            Seed("gen-external.onnx", "onnx", {"model.onnx": external, "weights.bin": blob}, "model.onnx")]


# ------------------------------------------------------------------------------------------------ TFLite


def _tfl(module: str) -> Any:
    import importlib

    return importlib.import_module(f"tflite.{module}")


@dataclass
class TFLiteSpec:
    """What :func:`build_tflite` writes.  tensors: (name, shape, TensorType, buffer, quant) with quant None or
    (scales, zero_points, axis); operators: (opcode index, inputs, outputs, options) with options None,
    ("conv",) or ("depthwise", m); buffers: bytes, None (empty) or (offset, size); opcodes: BuiltinOperator.
    ``op_repeat``: each operators-vector entry repeated this often (one table, many entries);
    ``op_copies``: each operator written as this many tables; ``shared_inputs``: every operator points at
    the first one's input vector; ``subgraphs``: the subgraph listed this many times."""

    tensors: list[tuple]
    operators: list[tuple]
    buffers: list[Any]
    opcodes: list[int]
    inputs: list[int]
    outputs: list[int]
    op_repeat: int = 1
    subgraphs: int = 1
    shared_inputs: bool = False
    op_copies: int = 1  # each operator written as this many distinct (identical) tables


def build_tflite(spec: TFLiteSpec) -> bytes:
    import flatbuffers
    from tflite.BuiltinOptions import BuiltinOptions

    b = flatbuffers.Builder(1024)
    Model, SubGraph, Tensor, Operator = (_tfl(n) for n in ("Model", "SubGraph", "Tensor", "Operator"))
    OperatorCode, Buffer, Quant = (_tfl(n) for n in ("OperatorCode", "Buffer", "QuantizationParameters"))

    def table_vector(start, items):
        start(b, len(items))
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return b.EndVector()

    buffer_offsets = []
    for data in spec.buffers:
        vec = b.CreateNumpyVector(np.frombuffer(data, np.uint8)) if isinstance(data, bytes) else None
        Buffer.Start(b)
        if vec is not None:
            Buffer.AddData(b, vec)
        if isinstance(data, tuple):
            Buffer.AddOffset(b, data[0] % 2**64)
            Buffer.AddSize(b, data[1] % 2**64)
        buffer_offsets.append(Buffer.End(b))
    tensor_offsets = []
    for name, shape, ttype, buffer, quant in spec.tensors:
        name_off = b.CreateString(name)
        shape_off = b.CreateNumpyVector(np.asarray(shape, np.int32))
        quant_off = None
        if quant is not None:
            scales = b.CreateNumpyVector(np.asarray(quant[0], np.float32))
            zeros = b.CreateNumpyVector(np.asarray(quant[1], np.int64))
            Quant.Start(b)
            Quant.AddScale(b, scales)
            Quant.AddZeroPoint(b, zeros)
            Quant.AddQuantizedDimension(b, (quant[2] + 2**31) % 2**32 - 2**31)
            quant_off = Quant.End(b)
        Tensor.Start(b)
        Tensor.AddShape(b, shape_off)
        Tensor.AddType(b, ttype)
        Tensor.AddBuffer(b, buffer % 2**32)
        Tensor.AddName(b, name_off)
        if quant_off is not None:
            Tensor.AddQuantization(b, quant_off)
        tensor_offsets.append(Tensor.End(b))
    op_offsets = []
    shared = None
    for opcode, ins, outs, options in [o for o in spec.operators for _ in range(max(1, spec.op_copies))]:
        if spec.shared_inputs and shared is not None:
            ins_off = shared
        else:
            ins_off = b.CreateNumpyVector(np.asarray(ins, np.int32))
            shared = ins_off
        outs_off = b.CreateNumpyVector(np.asarray(outs, np.int32))
        opt_off = opt_type = None
        if options is not None:
            if options[0] == "depthwise":
                Opt = _tfl("DepthwiseConv2DOptions")
                Opt.Start(b)
                Opt.AddDepthMultiplier(b, (options[1] + 2**31) % 2**32 - 2**31)
                opt_type = BuiltinOptions.DepthwiseConv2DOptions
            else:
                Opt = _tfl("Conv2DOptions")
                Opt.Start(b)
                opt_type = BuiltinOptions.Conv2DOptions
            Opt.AddStrideH(b, 1)
            Opt.AddStrideW(b, 1)
            opt_off = Opt.End(b)
        Operator.Start(b)
        Operator.AddOpcodeIndex(b, opcode % 2**32)
        Operator.AddInputs(b, ins_off)
        Operator.AddOutputs(b, outs_off)
        if opt_off is not None:
            Operator.AddBuiltinOptionsType(b, opt_type)
            Operator.AddBuiltinOptions(b, opt_off)
        op_offsets.append(Operator.End(b))
    repeat = min(max(1, spec.op_repeat), max(1, 2_000_000 // max(1, len(op_offsets))))  # bounded file size
    op_offsets = [o for o in op_offsets for _ in range(repeat)]
    tensors_vec = table_vector(SubGraph.StartTensorsVector, tensor_offsets)
    ops_vec = table_vector(SubGraph.StartOperatorsVector, op_offsets)
    inputs_vec = b.CreateNumpyVector(np.asarray(spec.inputs, np.int32))
    outputs_vec = b.CreateNumpyVector(np.asarray(spec.outputs, np.int32))
    SubGraph.Start(b)
    SubGraph.AddTensors(b, tensors_vec)
    SubGraph.AddInputs(b, inputs_vec)
    SubGraph.AddOutputs(b, outputs_vec)
    SubGraph.AddOperators(b, ops_vec)
    subgraph = SubGraph.End(b)
    code_offsets = []
    for code in spec.opcodes:
        OperatorCode.Start(b)
        OperatorCode.AddDeprecatedBuiltinCode(b, max(-128, min(code, 127)))
        OperatorCode.AddBuiltinCode(b, code)
        OperatorCode.AddVersion(b, 1)
        code_offsets.append(OperatorCode.End(b))
    codes_vec = table_vector(Model.StartOperatorCodesVector, code_offsets)
    subgraphs_vec = table_vector(Model.StartSubgraphsVector, [subgraph] * max(1, spec.subgraphs))
    buffers_vec = table_vector(Model.StartBuffersVector, buffer_offsets)
    Model.Start(b)
    Model.AddVersion(b, 3)
    Model.AddOperatorCodes(b, codes_vec)
    Model.AddSubgraphs(b, subgraphs_vec)
    Model.AddBuffers(b, buffers_vec)
    b.Finish(Model.End(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def base_tflite_spec() -> TFLiteSpec:
    """input [1,8,8,3] -> DEPTHWISE_CONV_2D (int8 per-channel [1,3,3,6], multiplier 2) -> CONV_2D with an fp16
    filter [4,3,3,3] behind DEQUANTIZE on 6 channels (2 groups)."""
    from tflite.BuiltinOperator import BuiltinOperator
    from tflite.TensorType import TensorType

    rng = np.random.default_rng(3)
    F32, F16, I8 = TensorType.FLOAT32, TensorType.FLOAT16, TensorType.INT8
    q = rng.integers(-127, 128, size=(1, 3, 3, 6), dtype=np.int8)
    scales = rng.uniform(0.01, 0.1, size=6).astype(np.float32)
    zeros = rng.integers(-3, 4, size=6).astype(np.int64)
    conv16 = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    return TFLiteSpec(
        tensors=[("input", [1, 8, 8, 3], F32, 0, None), ("dw/filter", [1, 3, 3, 6], I8, 1, (scales, zeros, 3)),
                 ("dw/out", [1, 8, 8, 6], F32, 0, None), ("conv/filter", [4, 3, 3, 3], F16, 2, None),
                 ("conv/filter_dequantize", [4, 3, 3, 3], F32, 0, None), ("conv/out", [1, 6, 6, 4], F32, 0, None)],
        operators=[(0, [3], [4], None), (1, [0, 1, -1], [2], ("depthwise", 2)), (2, [2, 4, -1], [5], ("conv",))],
        buffers=[None, q.tobytes(), conv16.tobytes()],
        opcodes=[BuiltinOperator.DEQUANTIZE, BuiltinOperator.DEPTHWISE_CONV_2D, BuiltinOperator.CONV_2D],
        inputs=[0], outputs=[5])


def random_tflite(rnd: random.Random) -> bytes:
    """A structurally varied TFLite file: the base spec with 1-3 lies or odd choices."""
    from tflite.TensorType import TensorType

    spec = base_tflite_spec()
    types = [v for k, v in vars(TensorType).items() if not k.startswith("_")]
    for _ in range(rnd.randint(1, 3)):
        what = rnd.randrange(12)
        t = rnd.randrange(len(spec.tensors))
        name, shape, ttype, buf, quant = spec.tensors[t]
        if what == 0:  # a lying or odd shape
            shape = list(shape)
            if shape and rnd.random() < 0.7:
                shape[rnd.randrange(len(shape))] = rnd.choice([0, -1, 1, 2, 3, 2**16, 2**31 - 1, -2**31])
            else:
                shape = [rnd.choice([1, 3, 5]) for _ in range(rnd.choice([0, 1, 3, 5, 16, 17]))]
            spec.tensors[t] = (name, shape, ttype, buf, quant)
        elif what == 1:  # another type
            spec.tensors[t] = (name, shape, rnd.choice(types), buf, quant)
        elif what == 2:  # another buffer index
            spec.tensors[t] = (name, shape, ttype, rnd.choice([-1, 0, 1, 2, 3, 2**31 - 1]), quant)
        elif what == 3:  # quantisation lies
            n = rnd.choice([0, 1, 5, 6, 7, 1000])
            axis = rnd.choice([-1, 0, 3, 4, 100])
            spec.tensors[t] = (name, shape, ttype, buf, (np.full(n, 0.1, np.float32),
                                                         np.zeros(rnd.choice([0, 1, n, n + 1]), np.int64), axis))
        elif what == 4:  # buffer bytes: short, long, empty, or outside the flatbuffer
            i = rnd.randrange(1, len(spec.buffers))
            spec.buffers[i] = rnd.choice([b"", b"\x00" * 7, (spec.buffers[i] or b"") + b"\x01" * 9,
                                          (rnd.choice([2, 100, 2**40]), rnd.choice([0, 54, 2**33])), None])
        elif what == 5:  # operator tensor indices out of range / cyclic
            o = rnd.randrange(len(spec.operators))
            code, ins, outs, opts = spec.operators[o]
            ins = list(ins)
            ins[rnd.randrange(len(ins))] = rnd.choice([-2, -1, 0, 4, 5, 6, 2**31 - 1])
            if rnd.random() < 0.3:
                outs = [rnd.choice([1, 3, 4])]
            spec.operators[o] = (code, ins, outs, opts)
        elif what == 6:  # opcode index out of range / another operator
            o = rnd.randrange(len(spec.operators))
            code, ins, outs, opts = spec.operators[o]
            spec.operators[o] = (rnd.choice([-1, 0, 1, 2, 3, 255]), ins, outs, opts)
        elif what == 7:  # fan-out: one op table listed many times
            spec.op_repeat = rnd.choice([2, 300, 20000])
        elif what == 8:  # one subgraph listed many times
            spec.subgraphs = rnd.choice([2, 50, 20000])
        elif what == 9:  # every op shares one input vector; many distinct copies of every op
            spec.shared_inputs = rnd.random() < 0.5
            spec.op_copies = rnd.choice([2, 300, 3000])
        elif what == 10:  # depth multiplier lies
            o = 1
            code, ins, outs, _ = spec.operators[o]
            spec.operators[o] = (code, ins, outs, ("depthwise", rnd.choice([0, -1, 7, 2**31 - 1])))
        else:  # opcodes themselves
            spec.opcodes[rnd.randrange(len(spec.opcodes))] = rnd.choice([0, 3, 4, 6, 127, 200, -1])
    return build_tflite(spec)


def _tflite_seeds() -> list[Seed]:
    data = build_tflite(base_tflite_spec())
    return [Seed("gen.tflite", "tflite", {"model.tflite": data}, "model.tflite")]


# ------------------------------------------------------------------------------------------------- HDF5

KSHAPE = (3, 3, 4, 8)  # a Keras Conv2D kernel [kh, kw, c_in, c_out]


def _conv_config(names: Sequence[str]) -> dict[str, Any]:
    return {"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "Conv2D", "config": {"name": n, "groups": 1}} for n in names]}}


def _h5_bytes(write: Callable[[Any], None]) -> bytes:
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        write(f)
    return buf.getvalue()


def _kernel(rng: np.random.Generator, shape: tuple[int, ...] = KSHAPE) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _keras2_writer(rng: np.random.Generator, make: Callable | None = None, names: Sequence[str] = ("conv", "dw"),
                   config: dict | None = None) -> Callable[[Any], None]:
    def write(f: Any) -> None:
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array([n.encode() for n in names])
        root.attrs["keras_version"] = b"2.13.1"
        f.attrs["model_config"] = _dumps(config or _conv_config(sorted(set(names)))).decode()
        for name in sorted(set(names)):
            group = root.create_group(name)
            group.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()])
            sub = group.create_group(name)
            if make is not None:
                make(sub, "kernel:0")
            else:
                sub.create_dataset("kernel:0", data=_kernel(rng))
            sub.create_dataset("bias:0", data=np.zeros(KSHAPE[-1], np.float32))
    return write


def _keras3_writer(rng: np.random.Generator, make: Callable | None = None) -> Callable[[Any], None]:
    def write(f: Any) -> None:
        for name, shape in (("conv2d", KSHAPE), ("depthwise_conv2d", (5, 5, 4, 1))):
            group = f.create_group(f"layers/{name}/vars")
            if make is not None and name == "conv2d":
                make(group, "0")
            else:
                group.create_dataset("0", data=_kernel(rng, shape))
            group.create_dataset("1", data=np.zeros(shape[-1], np.float32))
    return write


def _keras_zip(weights: bytes, config: Any = None, compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    members = (("config.json", _dumps(config if config is not None else _keras3_config())),
               ("metadata.json", json.dumps({"keras_version": "3.6.0"})), ("model.weights.h5", weights))
    with zipfile.ZipFile(buf, "w", compression) as archive:
        for name, data in members:
            # A fixed member time: writestr(name) stamps the wall clock, and a recipe must give the same bytes
            # whenever it is materialised (two calls a second apart once differed in CI).
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = compression
            archive.writestr(info, data)
    return buf.getvalue()


def _keras3_config() -> dict[str, Any]:
    return {"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "Conv2D", "config": {"name": "conv2d", "groups": 1}},
        {"class_name": "DepthwiseConv2D", "config": {"name": "depthwise_conv2d", "depth_multiplier": 1}}]}}


def _keras_seeds() -> list[Seed]:
    rng = np.random.default_rng(4)
    k2 = _h5_bytes(_keras2_writer(rng))
    k3 = _h5_bytes(_keras3_writer(rng))
    return [Seed("gen-keras2.h5", "keras", {"model.h5": k2}, "model.h5"),
            Seed("gen-bare.weights.h5", "keras", {"model.weights.h5": k3}, "model.weights.h5"),
            Seed("gen.keras", "keras", {"model.keras": _keras_zip(k3)}, "model.keras"),
            Seed("gen-deflated.keras", "keras", {"model.keras": _keras_zip(k3, compression=zipfile.ZIP_DEFLATED)},
                 "model.keras")]


def _odd_dataset(rnd: random.Random, rng: np.random.Generator) -> Callable[[Any, str], None]:
    """A kernel dataset maker with an odd dtype, shape, layout or link (one per call)."""
    import h5py

    kind = rnd.randrange(14)

    def make(group: Any, name: str) -> None:
        if kind == 0:  # unwritten chunks of a huge declared shape (fill value)
            group.create_dataset(name, shape=(3, 3, rnd.choice([4096, 65536]), rnd.choice([4096, 65536])),
                                 dtype="f4", chunks=(3, 3, 64, 64), fillvalue=rnd.choice([0.0, 1.5]))
        elif kind == 1:  # a gzip bomb: zeros compress to nothing
            group.create_dataset(name, data=np.zeros((3, 3, 1024, 1024), np.float32), chunks=(3, 3, 1024, 1024),
                                 compression="gzip", compression_opts=9)
        elif kind == 2:
            dtype = rnd.choice(["f2", "f8", "i1", "u1", "i8", "?", "c8", "S4", "<u4", ">f4", ">f8"])
            group.create_dataset(name, data=_kernel(rng).astype(dtype) if dtype not in ("S4",) else
                                 np.full(KSHAPE, b"ab", "S4"))
        elif kind == 3:  # compound, enum, vlen, reference
            choice = rnd.randrange(4)
            if choice == 0:
                dt = np.dtype([("a", "f4"), ("b", "i4")])
                group.create_dataset(name, shape=KSHAPE, dtype=dt)
            elif choice == 1:
                dt = h5py.enum_dtype({"A": 0, "B": 1}, basetype="i1")
                group.create_dataset(name, data=np.zeros(KSHAPE, "i1"), dtype=dt)
            elif choice == 2:
                dt = h5py.vlen_dtype(np.float32)
                ds = group.create_dataset(name, shape=(3, 3), dtype=dt)
                ds[0, 0] = np.ones(rnd.choice([1, 100000]), np.float32)
            else:
                group.create_dataset(name, shape=KSHAPE[:2], dtype=h5py.ref_dtype)
        elif kind == 4:  # odd ranks and zero sizes
            shape = rnd.choice([(), (9,), (3, 3, 4), (3, 3, 4, 8, 1), (0, 3, 4, 8), (3, 3, 0, 8), (3, 3, 4, 0),
                                (1, 1, 1, 1), (3, 3, 1, 2**20)])
            group.create_dataset(name, data=np.ones(shape, np.float32))
        elif kind == 5:  # NaN / inf
            data = _kernel(rng)
            data[rnd.randrange(3)] = rnd.choice([np.nan, np.inf, -np.inf])
            group.create_dataset(name, data=data)
        elif kind == 6:  # soft link to elsewhere, or dangling
            group.file.create_dataset(f"/elsewhere_{name.replace(':', '_')}", data=_kernel(rng))
            group[name] = h5py.SoftLink(rnd.choice([f"/elsewhere_{name.replace(':', '_')}", "/nowhere", "/"]))
        elif kind == 7:  # external link / external raw storage
            if rnd.random() < 0.5:
                group[name] = h5py.ExternalLink("/etc/hostname", "/data")
            else:
                group.create_dataset(name, shape=KSHAPE, dtype="f4", external=[("/etc/hostname", 0, 4 * 288)])
        elif kind == 8:  # filters: shuffle, fletcher32, scaleoffset, lzf
            opts = rnd.choice([{"shuffle": True, "compression": "gzip"}, {"fletcher32": True}, {"scaleoffset": 3},
                               {"compression": "lzf"}])
            group.create_dataset(name, data=_kernel(rng), chunks=(3, 3, 4, 8), **opts)
        elif kind == 9:  # a group where a dataset is expected
            group.create_group(name).create_dataset("0", data=_kernel(rng))
        elif kind == 10:  # a hard link to the parent (cycle)
            group[name] = group
        elif kind == 11:  # an attribute bomb on the dataset
            ds = group.create_dataset(name, data=_kernel(rng))
            ds.attrs["huge"] = np.zeros(rnd.choice([10, 16000]), np.float64)
        elif kind == 12:  # maxshape unlimited, resized
            ds = group.create_dataset(name, data=_kernel(rng), maxshape=(None, None, None, None), chunks=True)
            ds.resize((3, 3, 4, rnd.choice([8, 0, 2**20])))
        else:  # a scalar / empty dataset
            group.create_dataset(name, data=h5py.Empty("f4") if rnd.random() < 0.5 else np.float32(1.0))
    return make


def random_keras(rnd: random.Random) -> tuple[str, bytes]:
    """(file name, bytes): a Keras 2 .h5, bare .weights.h5 or .keras archive with odd datasets / attributes /
    configs."""
    rng = np.random.default_rng(rnd.randrange(2**32))
    kind = rnd.randrange(3)
    make = _odd_dataset(rnd, rng) if rnd.random() < 0.8 else None
    if kind == 0:
        names: list[str] = ["conv", "dw"]
        if rnd.random() < 0.3:
            names = rnd.choice([["conv"] * rnd.choice([2, 5000]), ["a/b", "../x"], ["conv", ""], ["x" * 5000]])
        config = _conv_config(sorted(set(names)))
        if rnd.random() < 0.3:
            config = _mutate_json_value(config, rnd)
        try:
            return "model.h5", _h5_bytes(_keras2_writer(rng, make, names, config))
        except (ValueError, TypeError, OSError, KeyError):
            return "model.h5", _h5_bytes(_keras2_writer(rng, None, ["conv"], config))
    try:
        data = _h5_bytes(_keras3_writer(rng, make))
    except (ValueError, TypeError, OSError, KeyError):  # h5py refused the odd choice: a plain file then
        data = _h5_bytes(_keras3_writer(rng, None))
    if kind == 1:
        return "model.weights.h5", data
    config: Any = _keras3_config()
    if rnd.random() < 0.5:
        config = _mutate_json_value(config, rnd)
    return "model.keras", _keras_zip(data, config, rnd.choice([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))


# --------------------------------------------------------------------------------------------- Filter DB

FILTERDB_LAYERS = ((2, 3, 6), (4, 4, 4), (2, 4, 4), (4, 4, 8))  # (in_channels, out_channels, filters)


def filterdb_bytes(rnd: random.Random | None = None, fmt: str = "table") -> bytes:
    """A small CNN Filter DB dataset.h5 (filters float64 [N, 3, 3]; meta by pandas ``to_hdf``); with ``rnd``,
    the meta rows and the filters dataset get lies (filter ranges, channel counts, shapes, dtypes)."""
    import warnings

    import h5py
    import pandas as pd

    rng = np.random.default_rng(5 if rnd is None else rnd.randrange(2**32))
    rows, blocks, offset = [], [], 0
    for model_id in (7, 3):
        for layer_id, (in_ch, out_ch, n) in enumerate(FILTERDB_LAYERS):
            blocks.append(rng.standard_normal((n, 3, 3)) * 0.1)
            rows.append({"model_id": model_id, "conv_depth": layer_id, "conv_depth_norm": layer_id / 3,
                         "layer_id": layer_id, "filter_ids": f"{offset}:{offset + n - 1}", "model": f"m{model_id}",
                         "Name": "Net", "in_channels": in_ch, "out_channels": out_ch})
            offset += n
    filters = np.concatenate(blocks)
    shape_lie = None
    if rnd is not None:
        fmt = rnd.choice(["table", "fixed"])
        for _ in range(rnd.randint(1, 3)):
            what = rnd.randrange(7)
            row = rows[rnd.randrange(len(rows))]
            if what == 0:
                row["filter_ids"] = rnd.choice(["5:2", "-1:3", "0:999999999999", "a:b", "", "3", "0:0:0", "1e3:2e3",
                                                f"0:{len(filters)}", f"{len(filters) - 1}:{len(filters) - 1}"])
            elif what == 1:
                row[rnd.choice(["in_channels", "out_channels"])] = rnd.choice([0, -1, 2**40, 7, 3.5])
            elif what == 2:
                row["model_id"] = rnd.choice([rows[0]["model_id"], -5, 2**62])
            elif what == 3:
                row["layer_id"] = rows[0]["layer_id"]
            elif what == 4:
                filters = filters[: rnd.choice([0, 1, 10, len(filters) - 1])]
            elif what == 5:
                shape_lie = rnd.choice([(len(filters), 9), (len(filters), 5, 5), (len(filters), 3, 3, 1), (len(filters),)])
            else:
                row["groups"] = rnd.choice([0, -2, 3, 10**6])
    frame = pd.DataFrame(rows).set_index(["model_id", "conv_depth", "conv_depth_norm", "layer_id"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset.h5"
        with h5py.File(path, "w") as f:
            data = filters if shape_lie is None else np.resize(filters, shape_lie)
            f.create_dataset("filters", data=data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame.to_hdf(path, key="meta", format=fmt)
        return path.read_bytes()


def _filterdb_seeds() -> list[Seed]:
    modes = ("filterdb", "filterdb-import")
    return [Seed("gen-table.filterdb", "filterdb", {"dataset.h5": filterdb_bytes(fmt="table")}, "dataset.h5", modes),
            Seed("gen-fixed.filterdb", "filterdb", {"dataset.h5": filterdb_bytes(fmt="fixed")}, "dataset.h5", modes)]


def _one_file(name: str, data: bytes) -> tuple[dict[str, bytes], str]:
    return {name: data}, name


# Generator seeds: a new file from a random seed each time (seed_param).
GENERATORS: dict[str, tuple[str, Callable[[random.Random], tuple[dict[str, bytes], str]], tuple[str, ...]]] = {
    "tflite-gen": ("tflite", lambda rnd: ({"model.tflite": random_tflite(rnd)}, "model.tflite"), ("load", "extract")),
    "keras-gen": ("keras", lambda rnd: _one_file(*random_keras(rnd)), ("load", "extract")),
    "filterdb-gen": ("filterdb", lambda rnd: ({"dataset.h5": filterdb_bytes(rnd)}, "dataset.h5"),
                     ("filterdb", "filterdb-import")),
}


_SEED_CACHE: dict[bool, dict[str, Seed]] = {}


def seeds(long: bool = False) -> dict[str, Seed]:
    """Every seed by name (real files that are present, generated ones); cached."""
    if long in _SEED_CACHE:
        return _SEED_CACHE[long]
    out: dict[str, Seed] = {}
    for name, (family, rel) in (REAL_SEEDS_LONG if long else REAL_SEEDS).items():
        path = WEIGHTS / rel
        if path.is_file():
            suffix = Path(rel).suffix
            out[name] = Seed(name, family, {f"model{suffix}": path.read_bytes()}, f"model{suffix}")
    for make in (_torch_seeds, _safetensors_seeds, _onnx_seeds, _tflite_seeds, _keras_seeds, _filterdb_seeds):
        for seed in make():
            out[seed.name] = seed
    _SEED_CACHE[long] = out
    return out


def seed_names(family: str, long: bool = False) -> list[str]:
    names = [n for n, s in seeds(long).items() if s.family == family]
    return names + [n for n, (fam, _, _) in GENERATORS.items() if fam == family]


# ============================================================================================ mutations

Files = dict[str, bytes]


def _target(files: Files, entry: str, rnd: random.Random) -> str:
    """The file a mutation changes: mostly the entry file, sometimes another of the set."""
    others = [n for n in files if n != entry]
    return entry if not others or rnd.random() < 0.7 else rnd.choice(others)


def _interesting(rnd: random.Random, size: int) -> int:
    value = rnd.choice(INTERESTING + (size, size + 1, size - 1, size * 2, rnd.randrange(2**32)))
    if rnd.random() < 0.2:
        value = -value
    return value


def _hotspots(data: bytes) -> list[int]:
    """Offsets of structure in a file of any format we read: zip headers, HDF5 signatures, the safetensors
    header, protobuf / flatbuffer fields (best effort, bounded)."""
    spots: list[int] = []
    for magic in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07", b"\x89HDF", b"OHDR",
                  b"OCHK", b"TREE", b"HEAP", b"SNOD", b"BTHD", b"BTLF", b"FRHP", b"FHDB", b"FHIB", b"FSHD", b"GCOL",
                  b"TFL3"):
        start = 0
        for _ in range(200):
            i = data.find(magic, start)
            if i < 0:
                break
            spots.append(i)
            start = i + 1
    spots.extend(range(min(len(data), 64)))
    if len(data) > 8 and data[8:9] == b"{":
        (n,) = struct.unpack("<Q", data[:8])
        spots.extend(range(8, min(len(data), 8 + n), max(1, n // 64)))
    spots.extend(range(max(0, len(data) - 64), len(data)))
    return spots


def _position(data: bytes, rnd: random.Random, width: int = 1) -> int:
    if len(data) <= width:
        return 0
    if rnd.random() < 0.5:
        spots = _structure_spots(data)
        if spots:
            return min(max(0, rnd.choice(spots) + rnd.randint(-8, 8)), len(data) - width)
    return rnd.randrange(len(data) - width + 1)


_SPOT_CACHE: dict[bytes, list[int]] = {}


def _structure_spots(data: bytes) -> list[int]:
    key = hashlib.sha1(data).digest()
    if key not in _SPOT_CACHE:
        spots = _hotspots(data)
        if data[4:8] == b"TFL3":
            with contextlib.suppress(Exception):
                spots += [p for p, _ in _flatbuffer_fields(data)][:4000]
        elif data[:1] == b"\x08":  # an ONNX ModelProto starts with ir_version (field 1, varint)
            with contextlib.suppress(Exception):
                spots += [p for p, _, _ in _protobuf_lengths(data, limit=4000)]
        if len(_SPOT_CACHE) > 64:
            _SPOT_CACHE.clear()
        _SPOT_CACHE[key] = spots
    return _SPOT_CACHE[key]


def m_flip(files: Files, entry: str, rnd: random.Random) -> Files:
    name = _target(files, entry, rnd)
    data = bytearray(files[name])
    for _ in range(rnd.randint(1, 8)):
        if data:
            data[_position(bytes(data), rnd)] ^= 1 << rnd.randrange(8)
    return {**files, name: bytes(data)}


def m_int(files: Files, entry: str, rnd: random.Random) -> Files:
    """Overwrite 1, 2, 4 or 8 bytes at a structure-ish offset with an interesting integer."""
    name = _target(files, entry, rnd)
    data = bytearray(files[name])
    width = rnd.choice([1, 2, 4, 4, 8])
    if len(data) < width:
        return files
    pos = _position(bytes(data), rnd, width)
    value = _interesting(rnd, len(data)) % (1 << (8 * width))
    data[pos:pos + width] = value.to_bytes(width, rnd.choice(["little", "little", "big"]))
    return {**files, name: bytes(data)}


def m_truncate(files: Files, entry: str, rnd: random.Random) -> Files:
    name = _target(files, entry, rnd)
    data = files[name]
    cut = rnd.choice([rnd.randrange(len(data) + 1), len(data) - rnd.randint(1, 64), rnd.randint(0, 64)])
    return {**files, name: data[:max(0, cut)]}


def m_splice(files: Files, entry: str, rnd: random.Random) -> Files:
    """Delete, duplicate or insert a chunk (shifts every offset after it)."""
    name = _target(files, entry, rnd)
    data = files[name]
    if len(data) < 2:
        return files
    a = _position(data, rnd)
    b = min(len(data), a + rnd.choice([1, 4, 16, 256, 4096]))
    op = rnd.randrange(3)
    if op == 0:
        data = data[:a] + data[b:]
    elif op == 1:
        data = data[:b] + data[a:b] * rnd.choice([1, 2, 50]) + data[b:]
    else:
        data = data[:a] + bytes(rnd.randrange(256) for _ in range(rnd.choice([1, 8, 64]))) + data[a:]
    return {**files, name: data}


# ------------------------------------------------------------------------------------------- JSON values


def _deep(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _mutate_json_value(value: Any, rnd: random.Random) -> Any:
    """Replace one node of a parsed JSON document (random walk from the root) with an odd value."""
    value = json.loads(json.dumps(value))
    path: list[Any] = []
    node = value
    for _ in range(rnd.randint(0, 8)):
        if isinstance(node, dict) and node:
            key = rnd.choice(list(node))
        elif isinstance(node, list) and node:
            key = rnd.randrange(len(node))
        else:
            break
        path.append(key)
        node = node[key]
    replacement = rnd.choice([
        None, 0, -1, 2**31, 2**63, 10**40, -(10**40), 1.5, float("nan"), float("inf"), "", "x" * 100000, [], {},
        _deep(rnd.choice([50, 5000, 100000])), {"__metadata__": {"a": 1}}, [node, node], {"": node}, True,
        "F8_E5M2", "U64", "bogus", [0, 2**64], [-4, 4], [1] * 300,
    ])
    if not path:
        return replacement if rnd.random() < 0.3 else value
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if rnd.random() < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return value


def _dumps(value: Any) -> bytes:
    try:
        return json.dumps(value).encode()
    except (ValueError, RecursionError):
        return b"[" * 100000 + b"]" * 100000


def m_json(files: Files, entry: str, rnd: random.Random) -> Files:
    """Structure-aware: a JSON file (index, Keras config inside a .keras) or the safetensors header, parsed,
    changed and re-serialised (the safetensors length prefix follows, or lies)."""
    name = _target(files, entry, rnd)
    data = files[name]
    if name.endswith(".json"):
        try:
            doc = json.loads(data)
        except ValueError:
            return m_flip(files, entry, rnd)
        return {**files, name: _dumps(_mutate_json_value(doc, rnd))}
    if name.endswith(".keras") or data[:4] == b"PK\x03\x04":
        return _zip_member_mutation(files, name, rnd, json_only=True)
    if len(data) >= 8 and data[8:9] == b"{":  # safetensors
        (n,) = struct.unpack("<Q", data[:8])
        try:
            header = json.loads(data[8:8 + n])
        except ValueError:
            return m_flip(files, entry, rnd)
        body = data[8 + n:]
        header = _safetensors_lie(header, rnd, len(body)) if rnd.random() < 0.7 else _mutate_json_value(header, rnd)
        text = _dumps(header)
        prefix = len(text)
        if rnd.random() < 0.2:
            prefix = rnd.choice([0, 1, prefix - 1, prefix + 1, len(text) + len(body), 2**63, 2**64 - 1])
        return {**files, name: struct.pack("<Q", prefix % 2**64) + text + body}
    return m_flip(files, entry, rnd)


def _safetensors_lie(header: Any, rnd: random.Random, data_size: int) -> Any:
    if not isinstance(header, dict):
        return header
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return header
    entry = header[rnd.choice(keys)]
    if not isinstance(entry, dict):
        return header
    what = rnd.randrange(6)
    if what == 0:
        entry["data_offsets"] = rnd.choice([[0, 2**62], [data_size, data_size + 4], [8, 4], [-8, 0], [0, data_size],
                                            [0, 0], [2**64, 2**64 + 36], [0]])
    elif what == 1:
        entry["shape"] = rnd.choice([[2**31, 2**31], [-1, 3, 3, 3], [0, 3, 3, 3], [1] * 1000, [2**62, 4, 3, 3],
                                     [3.0, 3], ["3"], [], None])
    elif what == 2:
        entry["dtype"] = rnd.choice(["F64", "F16", "BF16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "I64", "C64",
                                     "X", 7])
    elif what == 3:  # two tensors over the same bytes (fan-out)
        for key in keys:
            if isinstance(header[key], dict):
                header[key] = dict(entry)
    elif what == 4:  # many tensors sharing one range (fan-out by name)
        for i in range(rnd.choice([100, 20000])):
            header[f"layer{i}.weight"] = dict(entry)
    else:
        header["__metadata__"] = rnd.choice([{"a": _deep(10000)}, [1, 2], {"k": 1}, "x"])
    return header


# -------------------------------------------------------------------------------------------- zip files


def _zip_records(data: bytes) -> list[tuple[str, int]]:
    """(kind, offset) of the zip's local headers, central directory entries and end records."""
    out = []
    for kind, magic in (("local", b"PK\x03\x04"), ("central", b"PK\x01\x02"), ("end", b"PK\x05\x06"),
                        ("end64", b"PK\x06\x06"), ("loc64", b"PK\x06\x07")):
        start = 0
        for _ in range(10000):
            i = data.find(magic, start)
            if i < 0:
                break
            out.append((kind, i))
            start = i + 1
    return out


# field offsets and widths that hold sizes / counts / offsets, per record kind
_ZIP_FIELDS = {
    "local": [(8, 2), (18, 4), (22, 4), (26, 2), (28, 2)],
    "central": [(10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (34, 2), (42, 4)],
    "end": [(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
    "end64": [(24, 8), (32, 8), (40, 8), (48, 8)],
    "loc64": [(8, 8), (16, 4)],
}


def m_zip_lie(files: Files, entry: str, rnd: random.Random) -> Files:
    """A size / offset / count / method field of a zip record set to an interesting value."""
    name = _target(files, entry, rnd)
    data = bytearray(files[name])
    records = [r for r in _zip_records(bytes(data)) if r[1] + 50 <= len(data)]
    if not records:
        return m_int(files, entry, rnd)
    kind, at = rnd.choice(records)
    off, width = rnd.choice(_ZIP_FIELDS[kind])
    value = _interesting(rnd, len(data))
    if off in (8, 10) and kind in ("local", "central") and width == 2 and rnd.random() < 0.5:
        value = rnd.choice([0, 1, 8, 12, 14, 93, 99, 0xFFFF])  # compression method
    data[at + off:at + off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return {**files, name: bytes(data)}


def _rezip(src: zipfile.ZipFile, replace: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            data = replace.get(info.filename)
            out.writestr(info, src.read(info) if data is None else data)
    return buf.getvalue()


def _zip_member_mutation(files: Files, name: str, rnd: random.Random, json_only: bool = False) -> Files:
    """Rewrite the archive with one member changed: a JSON member re-serialised with an odd value, a pickle
    with lying integers / strings, any other member flipped, truncated or grown."""
    try:
        src = zipfile.ZipFile(io.BytesIO(files[name]))
        infos = src.infolist()
        members = [i for i in infos if not json_only or i.filename.endswith(".json")] or infos
        info = rnd.choice(members)
        data = src.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError, KeyError):
        return m_flip(files, name, rnd)
    if info.filename.endswith(".json"):
        try:
            data = _dumps(_mutate_json_value(json.loads(data), rnd))
        except ValueError:
            data = data[: len(data) // 2]
    elif info.filename.endswith(".pkl"):
        data = _pickle_lie(data, rnd)
    else:
        sub = {"m": data}
        op = rnd.choice([m_flip, m_int, m_truncate, m_splice])
        data = op(sub, "m", rnd)["m"]
        if rnd.random() < 0.1:
            data = data + b"\x00" * rnd.choice([1, 4096])
    try:
        return {**files, name: _rezip(src, {info.filename: data})}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
        return m_flip(files, name, rnd)


def m_zip_member(files: Files, entry: str, rnd: random.Random) -> Files:
    name = _target(files, entry, rnd)
    if files[name][:4] != b"PK\x03\x04":
        return m_flip(files, entry, rnd)
    return _zip_member_mutation(files, name, rnd)


def _pickle_lie(data: bytes, rnd: random.Random) -> bytes:
    """Structure-aware pickle mutation: one integer argument (shapes, strides, storage offsets, numel) or one
    string (storage type, key, location) replaced; re-encoded, so lengths stay consistent."""
    try:
        ops = list(pickletools.genops(data))
    except Exception:
        return m_flip({"m": data}, "m", rnd)["m"]
    ints = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
    strs = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BINUNICODE", "SHORT_BINUNICODE")]
    choice = rnd.random()
    if ints and (choice < 0.6 or not strs):
        op, arg, pos = rnd.choice(ints)
        end = _op_end(data, op, pos)
        value = rnd.choice([0, 1, -1, 2**31 - 1, -2**31, 2**40, 2**62, 10**30, (arg or 0) + 1, (arg or 0) * 1000])
        if 0 <= value < 256:
            enc = b"K" + bytes([value])
        elif -2**31 <= value < 2**31:
            enc = b"J" + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            enc = b"\x8a" + bytes([len(raw)]) + raw
        return data[:pos] + enc + data[end:]
    if strs:
        op, arg, pos = rnd.choice(strs)
        end = _op_end(data, op, pos)
        new = rnd.choice(["HalfStorage", "LongStorage", "BoolStorage", "ComplexFloatStorage", "QInt8Storage",
                          "BFloat16Storage", "cuda:0", "meta", "../../etc/passwd", "0" * 300, "", "storage",
                          "_rebuild_tensor_v2", "9999"])
        raw = new.encode()
        enc = b"X" + struct.pack("<I", len(raw)) + raw
        return data[:pos] + enc + data[end:]
    return m_flip({"m": data}, "m", rnd)["m"]


def _op_end(data: bytes, op: Any, pos: int) -> int:
    """The offset after the opcode at ``pos`` (pickletools gives only starts)."""
    for _nxt_op, _, nxt in pickletools.genops(data[pos:]):
        if nxt > 0:
            return pos + nxt
    return len(data)


# --------------------------------------------------------------------------------------------- protobuf


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _protobuf_lengths(data: bytes, limit: int = 20000) -> list[tuple[int, int, int]]:
    """(offset of the length varint, offset after it, length) of length-delimited fields, nested messages
    included (best effort: a field whose payload does not parse as a message is a leaf)."""
    out: list[tuple[int, int, int]] = []

    def walk(start: int, end: int, depth: int) -> bool:
        i = start
        found: list[tuple[int, int, int, int]] = []
        while i < end:
            key, i = _varint(data, i)
            wire, field_no = key & 7, key >> 3
            if field_no == 0:
                return False
            if wire == 0:
                _, i = _varint(data, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                n, j = _varint(data, i)
                if j + n > end:
                    return False
                found.append((i, j, n, depth))
                i = j + n
            else:
                return False
        if i != end:
            return False
        for at, j, n, d in found:
            if len(out) >= limit:
                break
            out.append((at, j, n))
            if d < 8 and n > 1:
                mark = len(out)
                try:
                    ok = walk(j, j + n, d + 1)
                except ValueError:
                    ok = False
                if not ok:
                    del out[mark:]
        return True

    with contextlib.suppress(ValueError):
        walk(0, len(data), 0)
    return out


def m_protobuf_length(files: Files, entry: str, rnd: random.Random) -> Files:
    """A protobuf length field (ONNX) set to a lie: longer / shorter than its payload, 0, huge."""
    name = _target(files, entry, rnd)
    data = files[name]
    fields = _protobuf_lengths(data)
    if not fields:
        return m_int(files, entry, rnd)
    at, after, n = rnd.choice(fields)
    new = rnd.choice([n + 1, n - 1, n * 2, 0, 1, 2**31 - 1, 2**32, 2**63, len(data), len(data) - after + 1])
    return {**files, name: data[:at] + _encode_varint(max(0, new)) + data[after:]}


def m_onnx(files: Files, entry: str, rnd: random.Random) -> Files:
    """Structure-aware ONNX mutation: parse the ModelProto, change dims / types / data / attributes / wiring
    / fan-out / chains / nesting, re-serialise."""
    import onnx
    from onnx import TensorProto, helper

    try:
        model = onnx.load_from_string(files[entry])
    except Exception:
        return m_protobuf_length(files, entry, rnd)
    g = model.graph
    what = rnd.randrange(14)
    convs = [n for n in g.node if n.op_type in ("Conv", "QLinearConv")]
    inits = list(g.initializer)
    if what == 0 and inits:  # dims lie
        t = rnd.choice(inits)
        dims = list(t.dims)
        choice = rnd.randrange(4)
        if choice == 0 and dims:
            dims[rnd.randrange(len(dims))] = rnd.choice([0, -1, 2**31, 2**40, 1])
        elif choice == 1:
            dims.append(rnd.choice([1, 2, 2**20]))
        elif choice == 2:
            dims = dims[:-1]
        else:
            dims = [2**62, 2**62]
        del t.dims[:]
        t.dims.extend(dims)
    elif what == 1 and inits:  # data type lie
        t = rnd.choice(inits)
        t.data_type = rnd.choice([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 16, 17, 21, 22, 23, 24, 25, 26, 99])
    elif what == 2 and inits:  # raw data cut / moved to typed fields / external
        t = rnd.choice(inits)
        choice = rnd.randrange(4)
        if choice == 0 and t.raw_data:
            t.raw_data = t.raw_data[: rnd.randrange(len(t.raw_data))]
        elif choice == 1:
            t.ClearField("raw_data")
            t.float_data.extend([1.0] * rnd.choice([0, 1, 5, 81]))
        elif choice == 2:
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in rnd.choice([
                (("location", "weights.bin"), ("offset", "0"), ("length", str(2**40))),
                (("location", "../../etc/hostname"),), (("location", "/etc/hostname"),),
                (("location", "weights.bin"), ("offset", "-4")), (("location", "model.onnx"),),
                (("location", "weights.bin"), ("offset", "x")), (("location", "."),),
            ]):
                e = t.external_data.add()
                e.key, e.value = key, value
        else:
            t.segment.begin = 0
            t.segment.end = 4
    elif what == 3 and convs:  # conv attributes
        node = rnd.choice(convs)
        del node.attribute[:]
        key = rnd.choice(["group", "strides", "pads", "dilations", "auto_pad", "kernel_shape"])
        value = rnd.choice([0, -1, 1, 2, 3, 2**40, [1, 1], [], "SAME", 1.5, [2**62] * 4])
        with contextlib.suppress(Exception):
            node.attribute.append(helper.make_attribute(key, value))
    elif what == 4:  # DequantizeLinear attributes (block_size / axis lies)
        deq = [n for n in g.node if n.op_type == "DequantizeLinear"]
        if deq:
            node = rnd.choice(deq)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute(rnd.choice(["axis", "block_size"]), rnd.choice(
                [-5, -1, 0, 1, 3, 4, 2**31 - 1, 2**40, 2**62])))
            if rnd.random() < 0.5:
                node.attribute.append(helper.make_attribute("block_size", rnd.choice([1, 2, 3, 2**40])))
    elif what == 5 and g.node:  # rewire an input
        node = rnd.choice(list(g.node))
        names = [o for n in g.node for o in n.output] + [t.name for t in inits] + ["x", "", "nowhere"]
        if node.input:
            node.input[rnd.randrange(len(node.input))] = rnd.choice(names)
    elif what == 6 and convs:  # fan-out: one conv copied many times (same weight)
        node = rnd.choice(convs)
        for i in range(rnd.choice([10, 300, 20000])):
            copy = g.node.add()
            copy.CopyFrom(node)
            copy.output[0] = f"fan{i}"
    elif what == 7 and convs:  # a long Identity chain in front of a weight
        node = rnd.choice(convs)
        w = node.input[1] if node.op_type == "Conv" and len(node.input) > 1 else None
        if w:
            prev = w
            for i in range(rnd.choice([10, 70, 5000])):
                g.node.add().CopyFrom(helper.make_node("Identity", [prev], [f"chain{i}"]))
                prev = f"chain{i}"
            node.input[1] = prev
    elif what == 8:  # op type swap
        if g.node:
            node = rnd.choice(list(g.node))
            node.op_type = rnd.choice(["Conv", "QLinearConv", "DequantizeLinear", "Identity", "Cast", "Constant",
                                       "ConvTranspose", "If", "Loop"])
            if rnd.random() < 0.3:
                node.domain = rnd.choice(["", "com.microsoft", "ai.onnx"])
    elif what == 9:  # nested subgraphs
        inner = helper.make_graph(list(g.node)[:3], "inner", [], [])
        empty = helper.make_graph([], "e", [], [])
        depth = rnd.choice([1, 10, 200])
        for _ in range(depth):  # one branch nests (both would double the size at every level)
            wrapper = helper.make_node("If", ["x"], ["o"], then_branch=inner, else_branch=empty)
            inner = helper.make_graph([wrapper], "w", [], [])
        g.node.add().CopyFrom(helper.make_node("If", ["x"], ["nested"], then_branch=inner, else_branch=empty))
    elif what == 10 and convs:  # the same name for many convs
        for node in convs:
            node.name = "same"
        for i in range(rnd.choice([5, 3000])):
            copy = g.node.add()
            copy.CopyFrom(convs[0])
            copy.output[0] = f"same{i}"
    elif what == 11:  # Constant nodes with odd attributes
        const = [n for n in g.node if n.op_type == "Constant"]
        if const:
            node = rnd.choice(const)
            del node.attribute[:]
            node.attribute.append(rnd.choice([
                helper.make_attribute("value_floats", [1.0] * rnd.choice([0, 9, 100000])),
                helper.make_attribute("value_int", 2**62),
                helper.make_attribute("sparse_value", helper.make_sparse_tensor(
                    helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
                    helper.make_tensor("i", TensorProto.INT64, [1], [0]), [2**40, 2**40])),
                helper.make_attribute("value_string", "abc"),
            ]))
    elif what == 12:  # opset / model fields
        del model.opset_import[:]
        if rnd.random() < 0.5:
            model.opset_import.add().version = rnd.choice([-1, 0, 1, 2**62])
        model.ir_version = rnd.choice([0, -1, 2**62, 3])
    else:  # Cast chains to odd types
        for node in g.node:
            if node.op_type == "Cast":
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("to", rnd.choice([0, 8, 9, 14, 15, 16, 23, 99, -1])))
    try:
        data = model.SerializeToString()
    except Exception:
        return m_protobuf_length(files, entry, rnd)
    return {**files, entry: data}


# ------------------------------------------------------------------------------------------- flatbuffers

# TFLite schema: which fields (by slot) are vectors of tables, tables, vectors of scalars / strings
_FB_SCHEMA: dict[str, dict[int, tuple[str, str | None]]] = {
    "Model": {1: ("vtab", "OperatorCode"), 2: ("vtab", "SubGraph"), 3: ("vec", None), 4: ("vtab", "Buffer"),
              5: ("vec", None), 6: ("vtab", "Metadata"), 7: ("vtab", None)},
    "SubGraph": {0: ("vtab", "Tensor"), 1: ("vec", None), 2: ("vec", None), 3: ("vtab", "Operator"),
                 4: ("vec", None)},
    "Tensor": {0: ("vec", None), 3: ("vec", None), 4: ("tab", "Quant"), 6: ("tab", None), 7: ("vec", None)},
    "Operator": {1: ("vec", None), 2: ("vec", None), 4: ("tab", None), 5: ("vec", None), 6: ("vec", None),
                 7: ("vec", None)},
    "Buffer": {0: ("vec", None)},
    "Quant": {0: ("vec", None), 1: ("vec", None), 2: ("vec", None), 3: ("vec", None), 5: ("tab", None)},
    "OperatorCode": {1: ("vec", None)},
    "Metadata": {0: ("vec", None)},
}


def _flatbuffer_fields(data: bytes, limit: int = 20000) -> list[tuple[int, str]]:
    """(offset, kind) of the fields of a TFLite flatbuffer: 'field' (a scalar or an offset), 'voff' (a vtable
    entry), 'veclen' (a vector's length), 'elem' (an offset in a vector of tables).  Walks the schema above
    with bounds checks; stops quietly at the first thing that does not parse."""
    if len(data) < 8 or data[4:8] != b"TFL3":
        return []
    out: list[tuple[int, str]] = [(0, "field")]
    seen: set[int] = set()

    def u32(i: int) -> int:
        return struct.unpack_from("<I", data, i)[0]

    def table(pos: int, kind: str | None, depth: int) -> None:
        if pos in seen or len(out) > limit or depth > 6 or not 0 <= pos <= len(data) - 4:
            return
        seen.add(pos)
        vt = pos - struct.unpack_from("<i", data, pos)[0]
        if not 0 <= vt <= len(data) - 4:
            return
        vt_len = struct.unpack_from("<H", data, vt)[0]
        if vt + vt_len > len(data):
            return
        schema = _FB_SCHEMA.get(kind or "", {})
        for slot in range((vt_len - 4) // 2):
            voff = struct.unpack_from("<H", data, vt + 4 + 2 * slot)[0]
            out.append((vt + 4 + 2 * slot, "voff"))
            if not voff or pos + voff + 4 > len(data):
                continue
            at = pos + voff
            out.append((at, "field"))
            how, sub = schema.get(slot, ("scalar", None))
            if how == "scalar":
                continue
            target = at + u32(at)
            if target + 4 > len(data):
                continue
            if how == "tab":
                table(target, sub, depth + 1)
                continue
            out.append((target, "veclen"))
            if how == "vtab":
                n = u32(target)
                for i in range(min(n, 400)):
                    elem = target + 4 + 4 * i
                    if elem + 4 > len(data):
                        break
                    out.append((elem, "elem"))
                    table(elem + u32(elem), sub, depth + 1)

    table(u32(0), "Model", 0)
    return out


def m_flatbuffer(files: Files, entry: str, rnd: random.Random) -> Files:
    """A TFLite flatbuffer field, vtable entry, vector length or table offset set to an interesting value."""
    name = _target(files, entry, rnd)
    data = bytearray(files[name])
    fields = _flatbuffer_fields(bytes(data))
    if not fields:
        return m_int(files, entry, rnd)
    at, kind = rnd.choice(fields)
    width = 2 if kind == "voff" else 4
    if at + width > len(data):
        return files
    old = int.from_bytes(data[at:at + width], "little")
    value = rnd.choice([_interesting(rnd, len(data)), old + 1, old - 1, old + 4, old * 2, old + 2**16,
                        len(data) - at, 0])
    data[at:at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return {**files, name: bytes(data)}


MUTATORS: dict[str, Callable[[Files, str, random.Random], Files]] = {
    "flip": m_flip, "int": m_int, "truncate": m_truncate, "splice": m_splice, "json": m_json,
    "zip_lie": m_zip_lie, "zip_member": m_zip_member, "protobuf_length": m_protobuf_length, "onnx": m_onnx,
    "flatbuffer": m_flatbuffer,
}
GENERIC = ("flip", "int", "truncate", "splice")
FAMILY_MUTATORS: dict[str, tuple[str, ...]] = {
    "torch": GENERIC + ("zip_lie", "zip_member", "zip_member"),
    "safetensors": GENERIC + ("json", "json", "json"),
    "onnx": GENERIC + ("protobuf_length", "onnx", "onnx", "onnx"),
    "tflite": GENERIC + ("flatbuffer", "flatbuffer", "flatbuffer"),
    "keras": GENERIC + ("zip_lie", "zip_member", "json"),
    "filterdb": GENERIC + ("flip", "int"),
}


# =============================================================================================== recipes


@dataclass(frozen=True)
class Recipe:
    """seed name, seed_param (generator seeds: the file's random seed), mutations ((name, param), ...), mode."""

    seed: str
    seed_param: int
    ops: tuple[tuple[str, int], ...]
    mode: str

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "seed_param": self.seed_param, "ops": [list(o) for o in self.ops],
                "mode": self.mode}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Recipe:
        return cls(d["seed"], int(d["seed_param"]), tuple((str(a), int(b)) for a, b in d["ops"]), d["mode"])

    def family(self, long: bool = False) -> str:
        return GENERATORS[self.seed][0] if self.seed in GENERATORS else seeds(long)[self.seed].family


def materialise(recipe: Recipe, long: bool = False) -> tuple[Files, str]:
    """The files of a recipe and the entry file's name (deterministic)."""
    if recipe.seed in GENERATORS:
        try:
            files, entry = GENERATORS[recipe.seed][1](random.Random(recipe.seed_param))
        except Exception:
            plain = next(s for s in seeds(long).values() if s.family == GENERATORS[recipe.seed][0])
            files, entry = dict(plain.files), plain.entry
    else:
        seed = seeds(long)[recipe.seed]
        files, entry = dict(seed.files), seed.entry
    for name, param in recipe.ops:
        try:
            files = MUTATORS[name](files, entry, random.Random(param))
        except Exception:
            files = m_flip(files, entry, random.Random(param))
    return files, entry


def modes_of(seed: str, long: bool = False) -> tuple[str, ...]:
    return GENERATORS[seed][2] if seed in GENERATORS else seeds(long)[seed].modes


def random_recipe(rnd: random.Random, family: str, long: bool = False) -> Recipe:
    seed = rnd.choice(seed_names(family, long))
    ops = tuple((rnd.choice(FAMILY_MUTATORS[family]), rnd.randrange(2**32))
                for _ in range(0 if seed in GENERATORS and rnd.random() < 0.5 else rnd.randint(1, 3)))
    modes = modes_of(seed, long)
    mode = modes[0] if rnd.random() < 0.85 else rnd.choice(modes)
    return Recipe(seed, rnd.randrange(2**32), ops, mode)


# ================================================================================================ worker


def _tb() -> str:
    """The current traceback, each line clipped (a mutated file name can be 10^5 characters long)."""
    lines = [ln if len(ln) < 300 else ln[:150] + " ... " + ln[-100:] for ln in traceback.format_exc().splitlines()]
    return "\n".join(lines)[-8000:]


def _chain(exc: BaseException | None) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _run_one(path: Path, mode: str, scratch: Path) -> dict[str, Any]:
    """Run one input through the real entry point; classify the outcome."""
    if mode.startswith("selftest-"):
        return _selftest(mode)
    from kernelatlas.corpus.loaders import LoaderError, load_file

    result: dict[str, Any] = {"outcome": "ok"}
    try:
        if mode == "load":
            model = load_file(path)
            rows = 0
            for layer in model.layers:
                k = layer.kernels()
                rows += k.shape[0]
                np.isfinite(k).sum()
            result["detail"] = f"{len(model.layers)} layers, {rows} kernels"
        elif mode == "extract":
            from kernelatlas.corpus import Corpus
            from kernelatlas.jobs.extract import extract

            corpus = scratch / "corpus"
            report = extract([path], corpus, progress=False)
            if report.failed:
                reason = report.failed[0][1]
                result.update(outcome="error", detail=reason[:500])
                if "cannot be read (" in reason:  # the boundary caught something a loader should have named
                    result.update(outcome="bug", kind="uncaught-in-extract", type=reason.split("(", 2)[1][:80],
                                  detail=reason[:2000])
                elif "MemoryError" in reason:
                    result.update(outcome="bug", kind="memory", type="MemoryError", detail=reason[:2000])
            c = Corpus.open(corpus)
            for k in c.kernel_sizes:
                for shard in c.shards(k):
                    np.asarray(c.shard_array(shard)).sum()
            result.setdefault("detail", f"added {len(report.added)}")
        elif mode == "filterdb":
            from kernelatlas.corpus.loaders.filterdb import inspect_filterdb, layer_arrays

            layout = inspect_filterdb(path)
            n = 0
            for _, arr in layer_arrays(path, layout=layout):
                n += len(arr)
            result["detail"] = f"{n} filters"
        elif mode == "filterdb-import":
            from kernelatlas.jobs.filterdb import import_filterdb

            report = import_filterdb(path, scratch / "corpus", progress=False)
            result["detail"] = f"added {len(report.added)}"
        else:
            raise ValueError(f"unknown mode {mode}")
    except LoaderError as exc:  # FilterDBError is one too
        result.update(outcome="error", type=type(exc).__name__, detail=str(exc)[:500])
        if any(isinstance(e, MemoryError) for e in _chain(exc)):
            result.update(outcome="bug", kind="memory", type="MemoryError (wrapped in a LoaderError)",
                          detail=str(exc)[:500], traceback=_tb())
    except MemoryError as exc:
        result.update(outcome="bug", kind="memory", type="MemoryError", detail=str(exc)[:500],
                      traceback=_tb())
    except Exception as exc:
        result.update(outcome="bug", kind="uncaught", type=type(exc).__name__, detail=str(exc)[:500],
                      traceback=_tb())
    return result


def _selftest(mode: str) -> dict[str, Any]:
    """Inputs that misbehave on purpose, so that the harness's own detection is tested: a segfault, an
    abort, a hang, an allocation past the limit, an uncaught exception, and a clean run."""
    if mode == "selftest-segv":
        import ctypes

        ctypes.string_at(0)
    elif mode == "selftest-abort":
        os.abort()
    elif mode == "selftest-hang":
        while True:
            time.sleep(1)
    elif mode == "selftest-alloc":
        try:
            np.ones(1 << 40, np.uint8)
        except MemoryError as exc:
            return {"outcome": "bug", "kind": "memory", "type": "MemoryError", "detail": str(exc)[:200]}
    elif mode == "selftest-raise":
        try:
            raise KeyError("selftest")
        except KeyError as exc:
            return {"outcome": "bug", "kind": "uncaught", "type": "KeyError", "detail": str(exc),
                    "traceback": traceback.format_exc()}
    return {"outcome": "ok", "detail": "selftest"}


def _address_space() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker_main(limit_mb: int, light: bool = False) -> None:
    """Read ``{"id", "path", "mode"}`` lines from stdin; for each write ``START id`` then ``DONE {json}``.
    ``light``: import nothing up front (the harness's self-tests)."""
    import warnings

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.simplefilter("ignore")
    if not light:
        import h5py  # noqa: F401 -- everything imported before the limit is set
        import onnx  # noqa: F401
        import pandas  # noqa: F401
        import tflite  # noqa: F401
        import torch

        import kernelatlas.jobs.extract  # noqa: F401
        from kernelatlas.corpus.loaders import filterdb, keras_model, onnx_model, tflite_model, torch_checkpoint  # noqa: F401

        torch.set_num_threads(1)
    if limit_mb:
        limit = _address_space() + limit_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    out = sys.stdout
    scratch_root = Path(tempfile.mkdtemp(prefix="ka-fuzz-worker-"))
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            job = json.loads(line)
            out.write(f"START {job['id']}\n")
            out.flush()
            scratch = scratch_root / "s"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            t0 = time.monotonic()
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            result = _run_one(Path(job["path"]), job["mode"], scratch)
            result["seconds"] = round(time.monotonic() - t0, 4)
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) // 1024
            result["rss_growth_mb"] = grown
            if grown > RSS_GROWTH_MB and result["outcome"] != "bug":
                result.update(outcome="bug", kind="memory", type="resident memory",
                              detail=f"resident memory grew by {grown} MiB reading one input "
                                     f"({result.get('detail', '')[:300]})")
            result["id"] = job["id"]
            out.write("DONE " + json.dumps(result) + "\n")
            out.flush()
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)


# ================================================================================================ parent


@dataclass
class Result:
    recipe: Recipe
    family: str
    outcome: str  # ok | error | bug
    kind: str = ""  # bug kind: uncaught | memory | signal | timeout | uncaught-in-extract
    type: str = ""
    detail: str = ""
    traceback: str = ""
    seconds: float = 0.0

    def signature(self) -> str:
        return f"{self.family}:{self.kind}:{self.type}"


class Worker:
    """One worker process; ``run(path, mode)`` -> result dict, with a per-input time limit."""

    def __init__(self, limit_mb: int = DEFAULT_LIMIT_MB, timeout: float = DEFAULT_TIMEOUT, light: bool = False) -> None:
        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 -- open for the worker's life, closed by close()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        cmd = [sys.executable, "-u", str(Path(__file__)), "worker", "--limit-mb", str(limit_mb)]
        self.proc = subprocess.Popen(cmd + (["--light"] if light else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env,
                                     start_new_session=True)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.started = False  # first input: allow for the imports

    def _line(self, deadline: float) -> str | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return ""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:].decode(errors="replace")

    def run(self, job_id: str, path: Path, mode: str) -> dict[str, Any]:
        try:
            self.proc.stdin.write((json.dumps({"id": job_id, "path": str(path), "mode": mode}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        startup = 0 if self.started else 120
        line = self._line(time.monotonic() + self.timeout + startup)
        if line is None:
            self.kill()
            return {"outcome": "bug", "kind": "timeout", "type": "timeout",
                    "detail": f"no answer within {self.timeout:.0f} s"}
        if not line.startswith("START"):
            return self._died()
        self.started = True
        line = self._line(time.monotonic() + self.timeout)
        if line is None:
            self.kill()
            return {"outcome": "bug", "kind": "timeout", "type": "timeout",
                    "detail": f"still running after {self.timeout:.0f} s (a hang, or far too slow)"}
        if not line.startswith("DONE "):
            return self._died()
        return json.loads(line[5:])

    def _died(self) -> dict[str, Any]:
        code = self.proc.wait(timeout=30)
        sig = -code if code < 0 else 0
        name = signal.Signals(sig).name if sig else f"exit {code}"
        return {"outcome": "bug", "kind": "signal" if sig else "exit", "type": name,
                "detail": f"the worker died ({name})", "traceback": self.stderr_tail()}

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.sel.close()
        self.proc.stdout.close()
        self.stderr.close()


class Pool:
    """Workers that run batches of recipes; a dead or hung worker is replaced and its culprit confirmed
    alone (and, if that does not reproduce, the inputs before it are rerun one at a time)."""

    def __init__(self, n: int = 2, limit_mb: int = DEFAULT_LIMIT_MB, timeout: float = DEFAULT_TIMEOUT,
                 long: bool = False, workdir: Path | None = None, light: bool = False) -> None:
        self.n, self.limit_mb, self.timeout, self.long, self.light = n, limit_mb, timeout, long, light
        self.workers: list[Worker | None] = [None] * n
        self.tmp = Path(tempfile.mkdtemp(prefix="ka-fuzz-", dir=workdir))
        self.count = 0

    def _worker(self, i: int) -> Worker:
        w = self.workers[i]
        if w is None or not w.alive:
            if w is not None:
                w.close()
            w = self.workers[i] = Worker(self.limit_mb, self.timeout, light=self.light)
        return w

    def _write(self, recipe: Recipe, files: Files, entry: str) -> Path:
        self.count += 1
        folder = self.tmp / f"in{self.count}"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return folder / entry

    def run_batch(self, recipes: Sequence[Recipe]) -> list[Result]:
        """Materialise recipes and run them on the workers; one Result per recipe, in order."""
        jobs = []
        for recipe in recipes:
            files, entry = materialise(recipe, self.long)
            jobs.append((self._write(recipe, files, entry), recipe.mode))
        try:
            answers = self.run_paths(jobs)
        finally:
            for path, _ in jobs:
                shutil.rmtree(path.parent, ignore_errors=True)
        return [_result(r, r.family(self.long), a) for r, a in zip(recipes, answers, strict=True)]

    def run_paths(self, jobs: Sequence[tuple[Path, str]]) -> list[dict[str, Any]]:
        """Run (path, mode) jobs on the workers, each worker taking the next job when free; one answer dict
        per job, in order."""
        import threading

        answers: list[dict[str, Any] | None] = [None] * len(jobs)
        lock = threading.Lock()
        queue = list(range(len(jobs)))

        def loop(i: int) -> None:
            history: list[int] = []
            while True:
                with lock:
                    if not queue:
                        return
                    j = queue.pop(0)
                path, mode = jobs[j]
                answer = self._worker(i).run(str(j), path, mode)
                if answer.get("kind") in ("signal", "exit", "timeout"):
                    answer = self._confirm(i, jobs, history, j, answer)
                    history = []
                else:
                    history.append(j)
                answers[j] = answer

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(min(self.n, len(jobs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [a if a is not None else {"outcome": "bug", "kind": "lost", "detail": "no answer"} for a in answers]

    def _confirm(self, i: int, jobs: Sequence[tuple[Path, str]], history: list[int], j: int,
                 answer: dict[str, Any]) -> dict[str, Any]:
        """The worker died or hung on job j: rerun j alone in a fresh worker; if it passes there, the damage
        came from an earlier job of that worker: rerun those one at a time (each in a fresh worker) and name
        the first that fails alone."""
        if answer.get("kind") == "timeout":
            return answer  # a hang is a hang; rerunning it costs another time limit
        alone = self._isolated(*jobs[j])
        if alone.get("outcome") == "bug":
            alone["detail"] = alone.get("detail", "") + " (confirmed alone in a fresh worker)"
            return alone
        culprit = next((h for h in history if self._isolated(*jobs[h]).get("outcome") == "bug"), None)
        answer["detail"] = (answer.get("detail", "") + f"; it did not reproduce alone; it ran after "
                            f"{len(history)} other inputs in that worker"
                            + (f", of which {jobs[culprit][0]} fails alone" if culprit is not None else ""))
        return answer

    def _isolated(self, path: Path, mode: str) -> dict[str, Any]:
        w = Worker(self.limit_mb, self.timeout, light=self.light)
        try:
            return w.run("alone", path, mode)
        finally:
            w.close()

    def close(self) -> None:
        for w in self.workers:
            if w is not None:
                w.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _result(recipe: Recipe, family: str, answer: dict[str, Any]) -> Result:
    return Result(recipe, family, answer.get("outcome", "bug"), answer.get("kind", ""), answer.get("type", ""),
                  answer.get("detail", ""), answer.get("traceback", ""), float(answer.get("seconds", 0.0)))


def save_finding(out: Path, result: Result, long: bool = False) -> Path:
    """Write a failing input (every file of its set), its recipe and what happened under ``out``."""
    files, entry = materialise(result.recipe, long)
    digest = hashlib.sha256(json.dumps(result.recipe.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    folder = out / f"{result.family}-{result.kind}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "finding.json").write_text(json.dumps({
        "entry": entry, "recipe": result.recipe.to_json(), "outcome": result.outcome, "kind": result.kind,
        "type": result.type, "detail": result.detail, "traceback": result.traceback}, indent=1))
    return folder


# Findings in loaders this harness does not fix (docs/security-fuzz.md has each with a recipe; the default
# tests reproduce each one, xfail(strict), in test_fuzz_loaders.py).  The seeded run tolerates a bug matching
# one of these -- (finding, family, kinds, type substring, text substring of detail + traceback) -- and fails
# on anything else.  Remove an entry once its finding is fixed.
_LOAD = ("uncaught", "uncaught-in-extract")
KNOWN: list[tuple[str, str, tuple[str, ...], str, str]] = []


def known_finding(result: Result) -> str | None:
    """The id of the known finding ``result`` matches, or None."""
    text = result.detail + result.traceback
    for finding, family, kinds, type_part, text_part in KNOWN:
        if result.family == family and result.kind in kinds and type_part in (result.type + text) and text_part in text:
            return finding
    return None


def is_known(result: Result) -> bool:
    return known_finding(result) is not None


# ================================================================================================== CLI


def run(seconds: float, out: Path, *, families: Sequence[str] = FAMILIES, seed: int | None = None,
        workers: int = 2, batch: int = 40, limit_mb: int = DEFAULT_LIMIT_MB, timeout: float = DEFAULT_TIMEOUT,
        long: bool = True) -> dict[str, Any]:
    """The long run: random recipes over every family until ``seconds`` pass; failing inputs saved in ``out``."""
    seed = seed if seed is not None else int(time.time())
    rnd = random.Random(seed)
    stats: dict[str, Any] = {"seed": seed, "inputs": 0, "ok": 0, "error": 0, "bug": 0, "findings": [],
                             "per_family": {f: {"inputs": 0, "ok": 0, "error": 0, "bug": 0} for f in families}}
    t0 = time.monotonic()
    signatures: set[str] = set()
    with Pool(workers, limit_mb, timeout, long=long) as pool:
        while time.monotonic() - t0 < seconds:
            recipes = [random_recipe(rnd, rnd.choice(list(families)), long) for _ in range(batch)]
            for r in pool.run_batch(recipes):
                fam = r.family
                stats["inputs"] += 1
                stats[r.outcome] += 1
                stats["per_family"][fam]["inputs"] += 1
                stats["per_family"][fam][r.outcome] += 1
                if r.outcome == "bug":
                    folder = save_finding(out, r, long)
                    first = r.signature() not in signatures
                    signatures.add(r.signature())
                    known = known_finding(r)
                    stats["findings"].append({"folder": str(folder), "signature": r.signature(), "new": first,
                                              "known": known, "detail": r.detail[:300]})
                    if first:
                        label = f"known {known}" if known else "NEW"
                        print(f"FINDING ({label}) {r.signature()}: {r.detail[:200]} -> {folder}", flush=True)
            elapsed = time.monotonic() - t0
            print(f"{elapsed:7.0f} s  {stats['inputs']} inputs ({stats['inputs'] / elapsed:.1f}/s), "
                  f"{stats['error']} clean errors, {stats['bug']} bugs", flush=True)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    stats["per_second"] = round(stats["inputs"] / max(stats["seconds"], 1e-9), 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(stats, indent=1))
    return stats


# --------------------------------------------------------------------------------- atheris (optional)

ATHERIS_SUFFIX = {"torch": ".pth", "safetensors": ".safetensors", "onnx": ".onnx", "tflite": ".tflite",
                  "keras": ".h5", "filterdb": ".h5"}


def atheris_family(family: str, seconds: float, out: Path, limit_mb: int) -> None:
    """Coverage-guided fuzzing of one family with atheris (libFuzzer) in this process: the single-file seeds
    are its starting corpus, every input goes through the same entry points and oracle as the workers, and
    a bug that is not a known finding is raised, so that libFuzzer saves the input under ``out``.  libFuzzer
    itself enforces the time (-timeout) and resident-memory (-rss_limit_mb) limits.  Never returns."""
    import warnings

    import atheris  # an optional extra: pip install atheris

    warnings.simplefilter("ignore")

    start = out / f"corpus-{family}"
    start.mkdir(parents=True, exist_ok=True)
    for seed in seeds(long=True).values():
        if seed.family == family and len(seed.files) == 1:
            (start / seed.name).write_bytes(seed.files[seed.entry])
    mode = "filterdb" if family == "filterdb" else "load"
    import kernelatlas.jobs.extract  # noqa: F401
    from kernelatlas.corpus.loaders import filterdb, keras_model, onnx_model, tflite_model, torch_checkpoint  # noqa: F401

    _instrument(atheris, ("kernelatlas", "onnx.numpy_helper", "onnx.helper", "flatbuffers", "tflite", "zipfile",
                          "json", "h5py._hl", "torch._weights_only_unpickler", "safetensors"))
    work = Path(tempfile.mkdtemp(prefix=f"ka-atheris-{family}-"))

    def one(data: bytes) -> None:
        suffix = ATHERIS_SUFFIX[family]
        if family == "keras" and data[:4] == b"PK\x03\x04":
            suffix = ".keras"
        path = work / ("dataset.h5" if family == "filterdb" else f"model{suffix}")
        path.write_bytes(data)
        scratch = work / "s"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        answer = _run_one(path, mode, scratch)
        if answer["outcome"] == "bug":
            result = _result(Recipe("atheris", 0, (), mode), family, answer)
            if not is_known(result):
                raise RuntimeError(f"{result.signature()}: {result.detail}\n{result.traceback}")

    rss = _address_space() // (1 << 20) + limit_mb
    atheris.Setup([sys.argv[0], f"-max_total_time={int(seconds)}", f"-rss_limit_mb={rss}", "-timeout=20",
                   f"-artifact_prefix={out}/{family}-", str(start)], one)
    atheris.Fuzz()


def _instrument(atheris: Any, prefixes: Sequence[str]) -> None:
    """Coverage instrumentation of the Python functions of the modules named by ``prefixes`` (already
    imported: atheris's import hook does not see modules served by the editable install's finder, and
    instrumenting everything loaded -- torch included -- takes minutes)."""
    import inspect

    def patch(owner: Any, name: str, fn: Any) -> None:
        with contextlib.suppress(Exception):
            setattr(owner, name, atheris.instrument_func(fn))

    for mod_name, module in list(sys.modules.items()):
        if module is None or not any(mod_name == p or mod_name.startswith(p + ".") for p in prefixes):
            continue
        for name, value in list(vars(module).items()):
            if inspect.isfunction(value) and value.__module__ == mod_name:
                patch(module, name, value)
            elif inspect.isclass(value) and value.__module__ == mod_name:
                for attr, member in list(vars(value).items()):
                    if inspect.isfunction(member):
                        patch(value, attr, member)


def atheris_run(seconds: float, out: Path, families: Sequence[str], limit_mb: int) -> int:
    """atheris on every family in turn (a process each: libFuzzer exits when done), ``seconds`` split."""
    failed = 0
    for family in families:
        code = subprocess.call([sys.executable, str(Path(__file__)), "atheris-one", "--family", family, "--seconds",
                                str(max(1, int(seconds / len(families)))), "--out", str(out), "--limit-mb",
                                str(limit_mb)])
        print(f"atheris {family}: exit status {code}", flush=True)
        failed += code != 0
    print(f"crashing inputs (if any) are saved under {out} as <family>-crash-*, -timeout-*, -oom-*")
    return 1 if failed else 0


def replay(folder: Path, limit_mb: int = DEFAULT_LIMIT_MB, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Rerun a saved finding (its files as saved) in a fresh worker."""
    info = json.loads((folder / "finding.json").read_text())
    w = Worker(limit_mb, timeout)
    try:
        return w.run("replay", folder / info["entry"], info["recipe"]["mode"])
    finally:
        w.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="internal: run inputs read from stdin")
    w.add_argument("--limit-mb", type=int, default=DEFAULT_LIMIT_MB)
    w.add_argument("--light", action="store_true")
    r = sub.add_parser("run", help="the long fuzzing run")
    r.add_argument("--seconds", type=float, default=600)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seed", type=int)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--families", default=",".join(FAMILIES))
    r.add_argument("--limit-mb", type=int, default=DEFAULT_LIMIT_MB)
    r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    p = sub.add_parser("replay", help="rerun a saved finding folder")
    p.add_argument("folder", type=Path)
    a = sub.add_parser("atheris", help="coverage-guided fuzzing with atheris (optional), every family in turn")
    a.add_argument("--seconds", type=float, default=600)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--families", default=",".join(FAMILIES))
    a.add_argument("--limit-mb", type=int, default=DEFAULT_LIMIT_MB)
    one = sub.add_parser("atheris-one", help="internal: atheris on one family")
    one.add_argument("--family", required=True, choices=FAMILIES)
    one.add_argument("--seconds", type=float, default=60)
    one.add_argument("--out", type=Path, required=True)
    one.add_argument("--limit-mb", type=int, default=DEFAULT_LIMIT_MB)
    args = parser.parse_args(argv)
    if args.command == "atheris":
        return atheris_run(args.seconds, args.out, args.families.split(","), args.limit_mb)
    if args.command == "atheris-one":
        atheris_family(args.family, args.seconds, args.out, args.limit_mb)
        return 0
    if args.command == "worker":
        worker_main(args.limit_mb, args.light)
        return 0
    if args.command == "replay":
        print(json.dumps(replay(args.folder), indent=1))
        return 0
    stats = run(args.seconds, args.out, families=args.families.split(","), seed=args.seed, workers=args.workers,
                limit_mb=args.limit_mb, timeout=args.timeout)
    print(json.dumps({k: v for k, v in stats.items() if k != "findings"}, indent=1))
    print(f"{len(stats['findings'])} failing inputs saved under {args.out}")
    unknown = [f for f in stats["findings"] if not f["known"]]
    print(f"{len(unknown)} of them match no known finding (fuzzing.KNOWN)")
    return 1 if unknown else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
