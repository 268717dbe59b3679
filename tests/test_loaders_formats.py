"""The ONNX, TFLite and Keras loaders: real checkpoints, orientation, and bad input.

(a) Every .onnx and .tflite file in ../shared/weights gives exactly the depthwise layer and kernel counts (and
the all-zero kernel counts) that SOURCES.md states, counted independently of this project.
(b) Orientation: one set of torch convs (a regular 3x3, a depthwise 5x5 with channel multiplier 2, a grouped
3x3, each holding a deliberately asymmetric kernel) exported to ONNX and saved by Keras 3 must give the torch
rows bit for bit; the Keras layouts used to write them are first checked against a Keras forward pass, so the
test does not merely assume them.  TFLite cannot be written from torch without tensorflow: its orientation is
checked on mediapipe's files against an independent read of the raw flatbuffer bytes, and on small files
written here with the flatbuffer builder (int8 per-channel weights, multiplier 2, a grouped CONV_2D, fp16
behind DEQUANTIZE), the expected values computed element by element from TFLite's documented layout.
(c) Bad input, all generated in tmp_path: empty, truncated and random files, hostile external-data paths,
declared sizes past the end of the file, models without convs, NaN weights.  Every error names the file.
"""

from __future__ import annotations

import ast
import builtins
import collections
import functools
import importlib
import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
tflite = pytest.importorskip("tflite")
flatbuffers = pytest.importorskip("flatbuffers")
h5py = pytest.importorskip("h5py")

from onnx import TensorProto, helper, numpy_helper
from tflite.BuiltinOperator import BuiltinOperator
from tflite.TensorType import TensorType

from kernelatlas.corpus.loaders import keras_model, onnx_model, tflite_model
from kernelatlas.corpus.loaders.base import LoadedModel, LoaderError

WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"

# SOURCES.md: depthwise {(kh, kw): (layers, kernels)} per file.
DEPTHWISE_COUNTS = {
    "ppocr_v4_rapidocr/ch_PP-OCRv4_det_infer.onnx": {(3, 3): (6, 336), (5, 5): (8, 2112)},
    "ppocr_v4_rapidocr/ch_PP-OCRv4_rec_infer.onnx": {(3, 3): (6, 432), (5, 5): (8, 2640)},
    "ppocr_v4_rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx": {(3, 3): (3, 64), (5, 5): (8, 800)},
    "mediapipe_tflite/palm_detection_full.tflite": {(5, 5): (28, 4192)},
    "mediapipe_tflite/hand_landmark_full.tflite": {(3, 3): (7, 2584), (5, 5): (9, 6336)},
    "mediapipe_tflite/face_detection_short_range.tflite": {(3, 3): (16, 978)},
    "mediapipe_tflite/face_landmark.tflite": {(3, 3): (20, 1552)},
}
LOADERS = {".onnx": onnx_model.load, ".tflite": tflite_model.load}


def needs_weights(rel: str) -> Path:
    path = WEIGHTS / rel
    if not path.is_file():
        pytest.skip(f"{path} is absent (the real checkpoints live in ../shared/weights, see SOURCES.md)")
    return path


@functools.cache
def load_real(rel: str) -> LoadedModel:
    path = needs_weights(rel)
    return LOADERS[path.suffix](path)


def depthwise_counts(model: LoadedModel) -> dict[tuple[int, int], tuple[int, int]]:
    layers, kernels = collections.Counter(), collections.Counter()
    for layer in model.layers:
        if layer.kind == "depthwise":
            layers[layer.kh, layer.kw] += 1
            kernels[layer.kh, layer.kw] += layer.kernels().shape[0]
    return {size: (layers[size], kernels[size]) for size in layers}


def zero_kernels(model: LoadedModel, size: tuple[int, int], dtype=None) -> int:
    rows = [
        layer.kernels()
        for layer in model.layers
        if layer.kind == "depthwise" and (layer.kh, layer.kw) == size
    ]
    rows = np.concatenate(rows)
    if dtype is not None:
        rows = rows.astype(dtype)
    return int(np.count_nonzero(~rows.any(axis=1)))


def expect_loader_error(load, path: Path, *fragments: str) -> LoaderError:
    with pytest.raises(LoaderError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message, f"the error does not name the file: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


# ================================================================================ (a) real checkpoints


def test_every_real_file_has_expected_counts():
    """A new .onnx/.tflite file in ../shared/weights must get its SOURCES.md counts here."""
    if not WEIGHTS.is_dir():
        pytest.skip(f"{WEIGHTS} is absent")
    found = {p.relative_to(WEIGHTS).as_posix() for ext in LOADERS for p in WEIGHTS.rglob(f"*{ext}")}
    assert found == set(DEPTHWISE_COUNTS)


@pytest.mark.parametrize("rel", sorted(DEPTHWISE_COUNTS))
def test_real_depthwise_counts(rel):
    model = load_real(rel)
    assert depthwise_counts(model) == DEPTHWISE_COUNTS[rel]
    assert model.warnings == []
    assert all(not layer.kind_inferred for layer in model.layers)
    assert all(layer.order >= 1 for layer in model.layers)
    assert len({layer.name for layer in model.layers}) == len(model.layers)


def test_real_tflite_fp16_weights_stay_fp16():
    model = load_real("mediapipe_tflite/palm_detection_full.tflite")
    assert {layer.weight.dtype for layer in model.layers} == {np.dtype(np.float16)}
    assert {layer.extra["stored_dtype"] for layer in model.layers} == {"float16"}


def test_real_pruned_hand_landmark_zero_kernels():
    model = load_real("mediapipe_tflite/hand_landmark_full.tflite")
    assert zero_kernels(model, (3, 3)) == 660
    assert zero_kernels(model, (5, 5)) == 2052


def test_real_ppocr_rec_zero_kernels():
    """SOURCES.md's 27 all-zero 5x5 kernels are a float16 count: 15 are exactly zero in the stored float32,
    12 more hold only |w| < 1e-8 and become zero once stored as float16 (the corpus's --dtype float16)."""
    model = load_real("ppocr_v4_rapidocr/ch_PP-OCRv4_rec_infer.onnx")
    assert zero_kernels(model, (5, 5), np.float16) == 27
    assert zero_kernels(model, (5, 5)) == 15
    assert zero_kernels(model, (3, 3)) == 0


def test_real_face_detection_regular_5x5_is_not_depthwise():
    model = load_real("mediapipe_tflite/face_detection_short_range.tflite")
    five = [layer for layer in model.layers if (layer.kh, layer.kw) == (5, 5)]
    assert len(five) == 1
    assert five[0].kind == "regular" and five[0].groups == 1 and five[0].c_in_per_group > 1


def test_real_onnx_graph_depth_orders():
    """Graph depth, not node index: the first conv sits right after the input; orders grow along the net."""
    model = load_real("ppocr_v4_rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    orders = [layer.order for layer in model.layers]
    assert orders[0] == 1.0
    assert orders == sorted(orders)
    assert model.meta["bn_folded_by_export"] is False  # paddle2onnx left 35 BatchNormalization nodes unfolded
    det = load_real("ppocr_v4_rapidocr/ch_PP-OCRv4_det_infer.onnx")
    assert det.meta["bn_folded_by_export"] is True and det.meta["convs_followed_by_bn"] == 2


# ================================================================================ (b) orientation


@pytest.fixture(scope="module")
def torch_convs() -> nn.Sequential:
    """A regular 3x3, a depthwise 5x5 with multiplier 2 and a grouped 3x3, with random asymmetric weights and
    one explicit ramp kernel each in the first two (kernel[0, 1] = 1 but kernel[1, 0] = kw)."""
    torch.manual_seed(7)
    regular = nn.Conv2d(4, 6, 3)
    depthwise = nn.Conv2d(6, 12, 5, padding=2, groups=6)
    grouped = nn.Conv2d(12, 6, 3, groups=3)
    with torch.no_grad():
        regular.weight[2, 1] = torch.arange(9.0).reshape(3, 3)
        depthwise.weight[3, 0] = torch.arange(25.0).reshape(5, 5)  # output channel 3 = input channel 1, k = 1
    return nn.Sequential(regular, depthwise, grouped).eval()


def assert_torch_rows(layers, model: nn.Sequential, *, exact_kinds: bool = True) -> None:
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    layers = sorted(layers, key=lambda layer: layer.order)
    assert len(layers) == len(convs)
    for layer, conv in zip(layers, convs, strict=True):
        expected = conv.weight.detach().numpy()
        assert layer.weight.shape == expected.shape, layer.name
        assert np.array_equal(
            layer.kernels(), expected.reshape(-1, conv.kernel_size[0] * conv.kernel_size[1])
        )
        if exact_kinds:
            assert layer.groups == conv.groups and not layer.kind_inferred
    # x/y explicitly: a transposed kernel would put 3 (resp. 5) at [0, 1]
    regular, depthwise = layers[0].weight, layers[1].weight
    assert (regular[2, 1, 0, 1], regular[2, 1, 1, 0], regular[2, 1, 0, 2]) == (1, 3, 2)
    assert (depthwise[3, 0, 0, 1], depthwise[3, 0, 1, 0], depthwise[3, 0, 4, 3]) == (1, 5, 23)
    if exact_kinds:
        assert [layer.kind for layer in layers] == ["regular", "depthwise", "grouped"]
        assert layers[1].groups == 6 and layers[1].c_out == 12


def test_onnx_export_orientation(torch_convs, tmp_path):
    """torch.onnx.export, TorchScript exporter (dynamo=False): the dynamo exporter needs onnxscript."""
    path = tmp_path / "convs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch_convs, (torch.randn(1, 4, 12, 12),), str(path), dynamo=False)
    model = onnx_model.load(path)
    assert_torch_rows(model.layers, torch_convs)
    assert [layer.order for layer in model.layers] == [1.0, 2.0, 3.0]
    assert model.format == "onnx" and model.warnings == []


def _onnx_model(nodes, initializers, *, inputs=("x",), outputs=("y",), opset=21) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializer=initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_onnx_quantised_and_cast_chains(torch_convs, tmp_path):
    """Weights behind Constant / DequantizeLinear (per tensor, per axis, per block) / Cast / Identity."""
    rng = np.random.default_rng(0)
    w_regular = torch_convs[0].weight.detach().numpy()
    q = rng.integers(-128, 128, size=(12, 1, 5, 5), dtype=np.int8)
    scale = rng.uniform(0.01, 0.1, size=12).astype(np.float32)
    zero = rng.integers(-5, 5, size=12, dtype=np.int8)
    q3 = rng.integers(0, 255, size=(6, 4, 3, 3), dtype=np.uint8)
    block_scale = rng.uniform(0.01, 0.1, size=(6, 2, 3, 3)).astype(np.float32)  # blocks of 2 along axis 1
    w16 = rng.standard_normal((6, 4, 3, 3)).astype(np.float16)
    nodes = [
        helper.make_node("Constant", [], ["w0"], value=numpy_helper.from_array(w_regular, "w0c")),
        helper.make_node("Identity", ["w0"], ["w0i"]),
        helper.make_node("Conv", ["x", "w0i"], ["a"], name="regular"),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["w1"], axis=0),
        helper.make_node("Conv", ["a", "w1"], ["b"], name="depthwise", group=6),
        helper.make_node("DequantizeLinear", ["q2", "s2"], ["w2"], axis=1, block_size=2),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="blocked"),
        helper.make_node("Cast", ["w3"], ["w3f"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["c", "w3f"], ["y"], name="fp16"),
    ]
    inits = [
        numpy_helper.from_array(q, "q1"),
        numpy_helper.from_array(scale, "s1"),
        numpy_helper.from_array(zero, "z1"),
        numpy_helper.from_array(q3, "q2"),
        numpy_helper.from_array(block_scale, "s2"),
        numpy_helper.from_array(w16, "w3"),
    ]
    path = tmp_path / "chains.onnx"
    onnx.save(_onnx_model(nodes, inits), str(path))
    model = onnx_model.load(path)
    layers = {layer.name: layer for layer in model.layers}
    assert list(layers) == ["regular", "depthwise", "blocked", "fp16"]
    assert np.array_equal(layers["regular"].weight, w_regular)
    expected = np.empty((12, 1, 5, 5), np.float32)
    for o in range(12):  # element by element, not by broadcasting
        expected[o] = (q[o].astype(np.float32) - float(zero[o])) * scale[o]
    assert np.array_equal(layers["depthwise"].weight, expected)
    assert layers["depthwise"].kind == "depthwise" and layers["depthwise"].groups == 6
    expected_blocked = np.empty((6, 4, 3, 3), np.float32)
    for i in range(4):
        expected_blocked[:, i] = q3[:, i].astype(np.float32) * block_scale[:, i // 2]
    assert np.array_equal(layers["blocked"].weight, expected_blocked)
    assert layers["fp16"].weight.dtype == np.float16 and np.array_equal(layers["fp16"].weight, w16)
    assert [layer.order for layer in model.layers] == [1.0, 2.0, 3.0, 4.0]


def test_onnx_qlinearconv_per_channel(tmp_path):
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, size=(4, 3, 3, 3), dtype=np.int8)
    w_scale = np.array([0.5, 0.25, 0.125, 2.0], np.float32)
    w_zero = np.zeros(4, np.int8)
    names = ["x_s", "x_z", "w", "w_s", "w_z", "y_s", "y_z"]
    values = [np.float32(0.1), np.uint8(128), q, w_scale, w_zero, np.float32(0.2), np.uint8(128)]
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, values, strict=True)]
    node = helper.make_node("QLinearConv", ["x", *names], ["y"], name="qconv")
    path = tmp_path / "qconv.onnx"
    onnx.save(_onnx_model([node], inits), str(path))
    (layer,) = onnx_model.load(path).layers
    assert np.array_equal(layer.weight, q.astype(np.float32) * w_scale[:, None, None, None])


@pytest.fixture(scope="module")
def keras():
    """Keras 3 on the torch backend (KERAS_BACKEND must be set before keras is first imported)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_BACKEND", "torch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was already imported with the {keras.backend.backend()} backend")
    return keras


def keras_convs(keras, torch_convs: nn.Sequential):
    """The same three convs as Keras layers, weights set in Keras's own layouts."""
    regular, depthwise, grouped = torch_convs
    inp = keras.Input((12, 12, 4))
    x = keras.layers.Conv2D(6, 3, name="regular")(inp)
    x = keras.layers.DepthwiseConv2D(5, depth_multiplier=2, padding="same", name="depthwise")(x)
    x = keras.layers.Conv2D(6, 3, groups=3, name="grouped")(x)
    model = keras.Model(inp, x)

    def numpy(t):
        return t.detach().numpy()

    # Conv2D: [out, in/g, kh, kw] -> [kh, kw, in/g, out].
    # DepthwiseConv2D: [C*m, 1, kh, kw] -> [kh, kw, C, m].
    model.get_layer("regular").set_weights([numpy(regular.weight).transpose(2, 3, 1, 0), numpy(regular.bias)])
    dw = numpy(depthwise.weight)[:, 0].transpose(1, 2, 0).reshape(5, 5, 6, 2)
    model.get_layer("depthwise").set_weights([dw, numpy(depthwise.bias)])
    model.get_layer("grouped").set_weights([numpy(grouped.weight).transpose(2, 3, 1, 0), numpy(grouped.bias)])
    return model


@pytest.fixture(scope="module")
def keras_files(keras, torch_convs, tmp_path_factory):
    # The layouts above are Keras's, not an assumption: the Keras model computes what the torch one does.
    x = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch_convs(x).numpy()
    folder = tmp_path_factory.mktemp("keras")
    files = {
        "keras": folder / "convs.keras",
        "weights": folder / "convs.weights.h5",
        "h5": folder / "convs.h5",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keras' torch backend trips numpy 2's __array__ DeprecationWarning
        model = keras_convs(keras, torch_convs)
        got = keras.ops.convert_to_numpy(model(x.permute(0, 2, 3, 1).numpy())).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        model.save(files["keras"])
        model.save_weights(files["weights"])
        model.save(files["h5"])  # Keras 2's legacy HDF5 layout (model_weights + model_config)
    return files


@pytest.mark.parametrize("kind", ["keras", "h5"])
def test_keras_orientation(keras_files, torch_convs, kind):
    model = keras_model.load(keras_files[kind])
    assert_torch_rows(model.layers, torch_convs)
    assert [layer.name for layer in model.layers] == ["regular", "depthwise", "grouped"]
    assert model.format == "keras" and model.warnings == []


def test_keras_deflated_archive(keras_files, torch_convs, tmp_path):
    """Keras writes .keras members uncompressed (read in place); a re-zipped, deflated one reads the same."""
    deflated = tmp_path / "deflated.keras"
    with (
        zipfile.ZipFile(keras_files["keras"]) as source,
        zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for info in source.infolist():
            out.writestr(info.filename, source.read(info))
    assert_torch_rows(keras_model.load(deflated).layers, torch_convs)


def test_keras_bare_weights_orientation(keras_files, torch_convs):
    """A bare .weights.h5 holds no config: Conv2D groups are unknown (taken as 1, kind_inferred), depthwise
    layers are exact, and the rows are the same."""
    model = keras_model.load(keras_files["weights"])
    assert_torch_rows(model.layers, torch_convs, exact_kinds=False)
    regular, depthwise, grouped = sorted(model.layers, key=lambda layer: layer.order)
    assert (depthwise.kind, depthwise.groups, depthwise.kind_inferred) == ("depthwise", 6, False)
    assert regular.kind_inferred and grouped.kind_inferred and grouped.groups == 1
    assert model.meta["order_from"].startswith("hdf5")


def test_keras_separable_and_nested(keras, tmp_path):
    """SeparableConv2D gives its depthwise half (multiplier order c*m + k) and its pointwise 1x1; a nested
    Sequential is flattened in place; all three file kinds agree."""
    rng = np.random.default_rng(5)
    dw = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    pw = rng.standard_normal((1, 1, 6, 4)).astype(np.float32)
    paths = [tmp_path / "s.keras", tmp_path / "s.weights.h5", tmp_path / "s.h5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner = keras.Sequential([keras.layers.Conv2D(3, 3, padding="same", name="inner")], name="block")
        inp = keras.Input((8, 8, 2))
        x = keras.layers.SeparableConv2D(4, 3, depth_multiplier=3, name="sep")(inp)
        x = inner(x)
        model = keras.Model(inp, x)
        model.get_layer("sep").set_weights([dw, pw, np.zeros(4, np.float32)])
        model.save(paths[0])
        model.save_weights(paths[1])
        model.save(paths[2])
    loaded = [keras_model.load(p) for p in paths]
    for result in loaded:
        names = [layer.name for layer in sorted(result.layers, key=lambda layer: layer.order)]
        assert names == ["sep/depthwise", "sep/pointwise", "block/inner"]
        depthwise, pointwise = result.layers[0], result.layers[1]
        for c in range(2):
            for k in range(3):
                assert np.array_equal(depthwise.weight[c * 3 + k, 0], dw[:, :, c, k])
        assert (depthwise.kind, depthwise.groups) == ("depthwise", 2)
        assert pointwise.kind == "regular" and np.array_equal(pointwise.weight[:, :, 0, 0], pw[0, 0].T)
    for other in loaded[1:]:
        for a, b in zip(loaded[0].layers, other.layers, strict=True):
            assert np.array_equal(a.weight, b.weight)


def write_tf_keras2_h5(path: Path, kernels: dict, *, with_config: bool) -> None:
    """A file laid out the way TF-Keras 2 writes one (hdf5_format.save_weights_to_hdf5_group): ':0' weight
    names, a nested functional model whose weights sit under the outer layer's group with their own short
    names, groups created in name order, and layer_names split into layer_names0/1 chunks."""
    layers = [
        ("stem", "Conv2D", {"groups": 1}, ["stem/kernel:0", "stem/bias:0"]),
        ("backbone", "Functional", None, ["dw/depthwise_kernel:0", "bn/gamma:0", "pw/kernel:0"]),
        ("head", "Conv2D", {"groups": 2}, ["head/kernel:0"]),
    ]
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if with_config else f
        root.attrs["layer_names0"] = np.array([b"stem", b"backbone"])
        root.attrs["layer_names1"] = np.array([b"head"])
        root.attrs["keras_version"] = b"2.13.1"
        for name, _, _, weight_names in sorted(layers):
            group = root.create_group(name)
            group.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
            for weight_name in weight_names:
                group.create_dataset(weight_name, data=kernels[weight_name])
        if with_config:
            nested = [
                {"class_name": "DepthwiseConv2D", "config": {"name": "dw", "depth_multiplier": 2}},
                {"class_name": "BatchNormalization", "config": {"name": "bn"}},
                {"class_name": "Conv2D", "config": {"name": "pw", "groups": 1}},
            ]
            config = {
                "class_name": "Functional",
                "config": {
                    "name": "m",
                    "layers": [
                        {"class_name": "Conv2D", "config": {"name": "stem", "groups": 1}},
                        {"class_name": "Functional", "config": {"name": "backbone", "layers": nested}},
                        {"class_name": "Conv2D", "config": {"name": "head", "groups": 2}},
                    ],
                },
            }
            f.attrs["model_config"] = json.dumps(config)


@pytest.mark.parametrize("with_config", [True, False])
def test_keras2_tf_layout(with_config, tmp_path):
    rng = np.random.default_rng(9)
    kernels = {
        "stem/kernel:0": rng.standard_normal((3, 3, 3, 4)),
        "stem/bias:0": np.zeros(4),
        "dw/depthwise_kernel:0": rng.standard_normal((5, 5, 4, 2)),
        "bn/gamma:0": np.ones(8),
        "pw/kernel:0": rng.standard_normal((1, 1, 8, 6)),
        "head/kernel:0": rng.standard_normal((3, 3, 3, 4)),
    }
    kernels = {k: v.astype(np.float32) for k, v in kernels.items()}
    path = tmp_path / "tf2.h5"
    write_tf_keras2_h5(path, kernels, with_config=with_config)
    model = keras_model.load(path)
    assert [layer.name for layer in model.layers] == ["stem", "dw", "pw", "head"]
    assert [layer.order for layer in model.layers] == sorted(layer.order for layer in model.layers)
    stem, dw, _, head = model.layers
    assert np.array_equal(stem.weight[2, 1], kernels["stem/kernel:0"][:, :, 1, 2])
    for c in range(4):
        for k in range(2):
            assert np.array_equal(dw.weight[c * 2 + k, 0], kernels["dw/depthwise_kernel:0"][:, :, c, k])
    assert (dw.kind, dw.groups, dw.kind_inferred) == ("depthwise", 4, False)
    assert np.array_equal(head.weight[3, 2], kernels["head/kernel:0"][:, :, 2, 3])
    if with_config:
        assert (head.kind, head.groups, head.kind_inferred) == ("grouped", 2, False)
    else:  # a bare 4-D 'kernel' could be a Conv2DTranspose, and its groups are not stored
        assert (head.kind, head.groups, head.kind_inferred) == ("regular", 1, True)
    assert model.warnings == []


# --------------------------------------------------------------------------------------------- TFLite


def _tfl(module: str):
    return importlib.import_module(f"tflite.{module}")


def build_tflite(tensors, operators, buffers, opcodes, *, inputs=(0,), outputs=None) -> bytes:
    """A TFLite flatbuffer written with the generated builder functions (the fuzzing harness's builder, which
    this file's tests share).

    tensors: (name, shape, TensorType, buffer index, quant) with quant None or (scales, zero_points, axis);
    operators: (opcode index, inputs, outputs, options) with options None, ("conv",) or ("depthwise", m);
    buffers: bytes, None (empty) or (offset, size) for data outside the flatbuffer; opcodes: BuiltinOperator.
    """
    from fuzzing import TFLiteSpec
    from fuzzing import build_tflite as build

    return build(TFLiteSpec(tensors=list(tensors), operators=list(operators), buffers=list(buffers),
                            opcodes=list(opcodes), inputs=list(inputs),
                            outputs=list(outputs) if outputs is not None else [len(tensors) - 1]))


F32, F16, I8 = TensorType.FLOAT32, TensorType.FLOAT16, TensorType.INT8
OPCODES = [BuiltinOperator.DEQUANTIZE, BuiltinOperator.DEPTHWISE_CONV_2D, BuiltinOperator.CONV_2D]


def small_tflite(q, scales, zeros, conv16, *, conv_buffer=None) -> bytes:
    """input [1,8,8,3] -> DEPTHWISE_CONV_2D (int8 per-channel filter [1,3,3,6], multiplier 2) -> CONV_2D with
    an fp16 filter [4,3,3,3] behind DEQUANTIZE, on 6 input channels (2 groups)."""
    tensors = [
        ("input", [1, 8, 8, 3], F32, 0, None),
        ("dw/filter", [1, 3, 3, 6], I8, 1, (scales, zeros, 3)),
        ("dw/out", [1, 8, 8, 6], F32, 0, None),
        ("conv/filter", [4, 3, 3, 3], F16, 2, None),
        ("conv/filter_dequantize", [4, 3, 3, 3], F32, 0, None),
        ("conv/out", [1, 6, 6, 4], F32, 0, None),
    ]
    operators = [
        (0, [3], [4], None),
        (1, [0, 1, -1], [2], ("depthwise", 2)),
        (2, [2, 4, -1], [5], ("conv",)),
    ]
    buffers = [None, q.tobytes(), conv16.tobytes() if conv_buffer is None else conv_buffer]
    return build_tflite(tensors, operators, buffers, OPCODES)


@pytest.fixture(scope="module")
def tflite_parts():
    rng = np.random.default_rng(11)
    q = rng.integers(-127, 128, size=(1, 3, 3, 6), dtype=np.int8)
    scales = rng.uniform(0.01, 0.1, size=6).astype(np.float32)
    zeros = rng.integers(-3, 4, size=6).astype(np.int64)
    conv16 = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    return q, scales, zeros, conv16


def test_tflite_written_by_hand(tflite_parts, tmp_path):
    q, scales, zeros, conv16 = tflite_parts
    path = tmp_path / "small.tflite"
    path.write_bytes(small_tflite(q, scales, zeros, conv16))
    model = tflite_model.load(path)
    depthwise, conv = model.layers
    assert (depthwise.name, conv.name) == ("dw/filter", "conv/filter")
    # DEPTHWISE_CONV_2D: output channel c*m + k reads input channel c; filter[0, y, x, c*m + k].
    assert (depthwise.kind, depthwise.groups, depthwise.weight.shape) == ("depthwise", 3, (6, 1, 3, 3))
    assert depthwise.extra["depth_multiplier"] == 2
    for c in range(3):
        for k in range(2):
            o = c * 2 + k
            for y in range(3):
                for x in range(3):
                    want = (np.float32(q[0, y, x, o]) - np.float32(zeros[o])) * scales[o]
                    assert depthwise.weight[o, 0, y, x] == want
    # CONV_2D: filter[o, y, x, i]; 6 input channels / 3 per group = 2 groups.
    assert (conv.kind, conv.groups, conv.weight.dtype) == ("grouped", 2, np.float16)
    for o in range(4):
        for i in range(3):
            for y in range(3):
                for x in range(3):
                    assert conv.weight[o, i, y, x] == conv16[o, y, x, i]
    assert (depthwise.order, conv.order) == (1.0, 2.0)  # DEQUANTIZE on a constant adds no depth


def _first_depthwise_raw(path: Path) -> tuple[np.ndarray, int]:
    """Independent of the loader: the fp16 bytes of the first DEPTHWISE_CONV_2D's filter, read through its
    DEQUANTIZE op straight from the flatbuffer, as TFLite's [1, kh, kw, C]."""
    data = path.read_bytes()
    model = tflite.Model.GetRootAs(data, 0)
    graph = model.Subgraphs(0)
    codes = [
        max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
        for i in range(model.OperatorCodesLength())
    ]
    ops = [graph.Operators(i) for i in range(graph.OperatorsLength())]
    producer = {int(t): op for op in ops for t in op.OutputsAsNumpy()}
    for index, op in enumerate(ops):
        if codes[op.OpcodeIndex()] == BuiltinOperator.DEPTHWISE_CONV_2D:
            dequantize = producer[int(op.Inputs(1))]
            tensor = graph.Tensors(int(dequantize.Inputs(0)))
            assert tensor.Type() == TensorType.FLOAT16
            raw = model.Buffers(tensor.Buffer()).DataAsNumpy().tobytes()
            return np.frombuffer(raw, "<f2").reshape(tensor.ShapeAsNumpy()), index
    raise AssertionError(f"{path}: no DEPTHWISE_CONV_2D")


@pytest.mark.parametrize(
    "rel",
    ["mediapipe_tflite/palm_detection_full.tflite", "mediapipe_tflite/face_detection_short_range.tflite"],
)
def test_tflite_orientation_on_mediapipe(rel):
    raw, op_index = _first_depthwise_raw(needs_weights(rel))
    layer = next(layer for layer in load_real(rel).layers if layer.extra["op_index"] == op_index)
    assert layer.kind == "depthwise" and raw.shape[0] == 1
    _, kh, kw, channels = raw.shape
    assert layer.weight.shape == (channels, 1, kh, kw)
    for c in range(channels):
        for y in range(kh):
            for x in range(kw):
                assert layer.weight[c, 0, y, x] == raw[0, y, x, c]
    # the check above would see an x/y swap: pick a channel whose kernel is not symmetric
    c = next(c for c in range(channels) if raw[0, 0, 1, c] != raw[0, 1, 0, c])
    assert layer.weight[c, 0, 0, 1] == raw[0, 0, 1, c] != layer.weight[c, 0, 1, 0]


# ================================================================================ (c) bad input


@pytest.mark.parametrize(
    "load, suffix",
    [
        (onnx_model.load, ".onnx"),
        (tflite_model.load, ".tflite"),
        (keras_model.load, ".h5"),
        (keras_model.load, ".keras"),
        (keras_model.load, ".weights.h5"),
    ],
)
def test_empty_random_and_missing_files(load, suffix, tmp_path):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    expect_loader_error(load, empty)
    noise = tmp_path / f"noise{suffix}"
    noise.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_loader_error(load, noise)
    expect_loader_error(load, tmp_path / f"missing{suffix}", "no such file")


def _first_half(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_truncated_real_onnx_and_tflite(tmp_path):
    onnx_path = needs_weights("ppocr_v4_rapidocr/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    expect_loader_error(
        onnx_model.load, _first_half(onnx_path, tmp_path / "cut.onnx"), "truncated or corrupt"
    )
    tfl_path = needs_weights("mediapipe_tflite/face_detection_short_range.tflite")
    expect_loader_error(tflite_model.load, _first_half(tfl_path, tmp_path / "cut.tflite"), "corrupt")


def test_truncated_generated_files(tflite_parts, keras_files, tmp_path, torch_convs):
    full = tmp_path / "small.tflite"
    full.write_bytes(small_tflite(*tflite_parts))
    expect_loader_error(tflite_model.load, _first_half(full, tmp_path / "cut.tflite"))
    onnx_full = tmp_path / "convs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch_convs, (torch.randn(1, 4, 12, 12),), str(onnx_full), dynamo=False)
    expect_loader_error(onnx_model.load, _first_half(onnx_full, tmp_path / "cut.onnx"))
    for kind in ("h5", "weights", "keras"):
        source = keras_files[kind]
        expect_loader_error(keras_model.load, _first_half(source, tmp_path / f"cut_{source.name}"))


def test_keras_archive_without_weights(tmp_path):
    path = tmp_path / "bad.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", "{}")
    expect_loader_error(keras_model.load, path, "model.weights.h5")


def _external_model(folder: Path, location: str, *, length: int | None = None, dims=(2, 1, 3, 3)) -> Path:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims))
    weight.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0"}
    if length is not None:
        entries["length"] = str(length)
    for key, value in entries.items():
        weight.external_data.add(key=key, value=value)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(_onnx_model([node], [weight]), str(path))
    return path


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every file the ONNX loader's own code opens (onnx.load opens only the model file)."""
    seen: list[str] = []

    def spy(file, *args, **kwargs):
        seen.append(str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(onnx_model, "open", spy, raising=False)
    return seen


@pytest.mark.parametrize(
    "location", ["../../etc/passwd", "/etc/passwd", "../secret.bin", "sub/../../secret.bin"]
)
def test_onnx_external_data_outside_the_folder(location, tmp_path, opened):
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 72)
    path = _external_model(tmp_path / "model", location)
    expect_loader_error(onnx_model.load, path, location)
    assert opened == []


def test_onnx_external_data_symlink_escaping(tmp_path, opened):
    (tmp_path / "secret.bin").write_bytes(b"\x00" * 72)
    folder = tmp_path / "model"
    folder.mkdir()
    try:
        (folder / "w.bin").symlink_to(tmp_path / "secret.bin")
    except OSError:
        pytest.skip("cannot create symlinks here")
    expect_loader_error(onnx_model.load, _external_model(folder, "w.bin"), "escapes")
    assert opened == []


def test_onnx_external_data_inside_the_folder(tmp_path, opened):
    weight = np.arange(18, dtype=np.float32).reshape(2, 1, 3, 3)
    path = _external_model(tmp_path / "model", "data/w.bin", length=weight.nbytes)
    (tmp_path / "model" / "data").mkdir()
    (tmp_path / "model" / "data" / "w.bin").write_bytes(weight.tobytes())
    (layer,) = onnx_model.load(path).layers
    assert np.array_equal(layer.weight, weight) and layer.weight[0, 0, 0, 1] == 1
    assert opened == [str((tmp_path / "model" / "data" / "w.bin").resolve())]


def test_onnx_declared_size_exceeds_the_file(tmp_path, opened):
    folder = tmp_path / "model"
    path = _external_model(folder, "w.bin", dims=(4096, 512, 3, 3))  # 72 MiB declared
    (folder / "w.bin").write_bytes(b"\x00" * 100)
    expect_loader_error(onnx_model.load, path, "holds only 100 bytes")
    assert opened == []
    path = _external_model(folder, "w.bin", length=10**12)  # a length that disagrees with the dims
    expect_loader_error(onnx_model.load, path, "differs")
    # an embedded tensor whose dims declare more than its raw bytes
    weight = TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[1 << 20, 64, 3, 3], raw_data=b"\x00" * 36
    )
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    embedded = tmp_path / "embedded.onnx"
    onnx.save(_onnx_model([node], [weight]), str(embedded))
    expect_loader_error(onnx_model.load, embedded, "declare")


def test_tflite_declared_size_exceeds_the_file(tflite_parts, tmp_path):
    q, scales, zeros, conv16 = tflite_parts
    # a buffer stored "after the flatbuffer" (the > 2 GB layout) far past the end of the file
    path = tmp_path / "offset.tflite"
    path.write_bytes(small_tflite(q, scales, zeros, conv16, conv_buffer=(1 << 40, conv16.nbytes)))
    expect_loader_error(tflite_model.load, path, "past the end")
    # a real file whose first filter buffer's length field is patched to ~2 GiB
    source = needs_weights("mediapipe_tflite/face_detection_short_range.tflite")
    data = bytearray(source.read_bytes())
    model = tflite.Model.GetRootAs(bytes(data), 0)
    buffer = model.Buffers(1)
    start = buffer._tab.Vector(buffer._tab.Offset(4))
    assert buffer.DataLength() > 0
    data[start - 4 : start] = (0x7FFFFFF0).to_bytes(4, "little")
    patched = tmp_path / "lying.tflite"
    patched.write_bytes(bytes(data))
    expect_loader_error(tflite_model.load, patched, "past the end")
    # a shape that does not match the stored bytes
    path = tmp_path / "short.tflite"
    path.write_bytes(small_tflite(q, scales, zeros, conv16, conv_buffer=conv16.tobytes()[:10]))
    expect_loader_error(tflite_model.load, path, "needs 216 bytes")


def test_tflite_bad_indices(tflite_parts, tmp_path):
    tensors = [("input", [1, 4, 4, 1], F32, 0, None), ("out", [1, 4, 4, 1], F32, 0, None)]
    path = tmp_path / "bad_tensor.tflite"
    path.write_bytes(build_tflite(tensors, [(0, [0, 9], [1], None)], [None], [BuiltinOperator.ADD]))
    expect_loader_error(tflite_model.load, path, "tensor index 9")
    path = tmp_path / "bad_opcode.tflite"
    path.write_bytes(build_tflite(tensors, [(5, [0, 0], [1], None)], [None], [BuiltinOperator.ADD]))
    expect_loader_error(tflite_model.load, path, "opcode 5")


def test_models_without_convs(keras, tmp_path):
    tensors = [("input", [1, 4, 4, 1], F32, 0, None), ("out", [1, 4, 4, 1], F32, 0, None)]
    path = tmp_path / "add.tflite"
    path.write_bytes(build_tflite(tensors, [(0, [0, 0], [1], None)], [None], [BuiltinOperator.ADD]))
    model = tflite_model.load(path)
    assert model.layers == [] and model.warnings == []
    path = tmp_path / "relu.onnx"
    onnx.save(_onnx_model([helper.make_node("Relu", ["x"], ["y"])], []), str(path))
    model = onnx_model.load(path)
    assert model.layers == [] and model.warnings == [] and model.meta["bn_folded_by_export"] is False
    for name in ("dense.keras", "dense.weights.h5", "dense.h5"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dense = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
            dense.save_weights(tmp_path / name) if name.endswith(".weights.h5") else dense.save(
                tmp_path / name
            )
        model = keras_model.load(tmp_path / name)
        assert model.layers == [] and model.warnings == []


def test_nan_weights_warn_with_the_layer_name(keras, torch_convs, tflite_parts, tmp_path):
    bad = np.ones((2, 1, 3, 3), np.float32)
    bad[1, 0, 2, 2] = np.nan
    bad[0, 0, 0, 0] = np.inf
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="poisoned", group=2)
    path = tmp_path / "nan.onnx"
    onnx.save(_onnx_model([node], [numpy_helper.from_array(bad, "w")]), str(path))
    model = onnx_model.load(path)
    (layer,) = model.layers
    assert np.array_equal(layer.weight, bad, equal_nan=True)  # kept, not dropped
    assert model.warnings == [
        f"{path}: layer poisoned: 2 of 2 kernels hold NaN/Inf (kept; the engine labels them -1)"
    ]

    q, scales, zeros, conv16 = tflite_parts
    conv16 = conv16.copy()
    conv16[1, 2, 0, 1] = np.nan
    path = tmp_path / "nan.tflite"
    path.write_bytes(small_tflite(q, scales, zeros, conv16))
    model = tflite_model.load(path)
    assert len(model.warnings) == 1 and "conv/filter" in model.warnings[0] and str(path) in model.warnings[0]

    path = tmp_path / "nan.keras"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kmodel = keras_convs(keras, torch_convs)
        kernel, bias = kmodel.get_layer("grouped").get_weights()
        kernel[0, 1, 2, 3] = np.nan
        kmodel.get_layer("grouped").set_weights([kernel, bias])
        kmodel.save(path)
    model = keras_model.load(path)
    assert len(model.warnings) == 1 and "grouped" in model.warnings[0] and str(path) in model.warnings[0]
    assert math.isnan(model.layers[2].weight[3, 2, 0, 1])


def test_onnx_weights_not_stored(tmp_path):
    """A weight fed as a graph input or computed at run time is skipped with a warning, not invented; a
    weight that nothing produces is a broken graph."""
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "wi"], ["a"], name="from_input"),
        helper.make_node("Mul", ["w", "w"], ["w2"]),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="computed"),
    ]
    path = tmp_path / "dynamic.onnx"
    onnx.save(_onnx_model(nodes, [w], inputs=("x", "wi")), str(path))
    model = onnx_model.load(path)
    assert model.layers == []
    assert len(model.warnings) == 2
    assert "from_input" in model.warnings[0] and "graph input" in model.warnings[0]
    assert "computed" in model.warnings[1] and "Mul" in model.warnings[1]
    path = tmp_path / "dangling.onnx"
    onnx.save(_onnx_model([helper.make_node("Conv", ["x", "nowhere"], ["y"], name="c")], []), str(path))
    expect_loader_error(onnx_model.load, path, "nowhere")


def test_keras_loader_imports_neither_keras_nor_tensorflow():
    """The Keras loader runs on h5py + json alone: no keras, tensorflow or pickle at run time."""
    tree = ast.parse(Path(keras_model.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert imported.isdisjoint({"keras", "tensorflow", "tf_keras", "pickle", "dill"}), imported
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert calls.isdisjoint({"eval", "exec"})
