"""Tests of the PyTorch loaders: torch checkpoints and safetensors files (torch_checkpoint.py) and live
modules (torch_module.py).

The real checkpoints in ../shared/weights (see its SOURCES.md; never committed here) are checked against the
depthwise layer and kernel counts read off them independently; a torchvision-style ResNet-18, written out
below in plain torch, against CNN Filter DB's 1,220,608 3x3 kernels; BatchNorm folding against running the
conv and the BatchNorm; and every bad input is generated in tmp_path at run time.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch
from torch import nn

from kernelatlas.corpus.loaders.base import LoadedModel, LoaderError
from kernelatlas.corpus.loaders.torch_checkpoint import load, load_safetensors
from kernelatlas.corpus.loaders.torch_module import load_module

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / ".." / "shared" / "weights"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# SOURCES.md: (kh, kw) -> (depthwise layers, depthwise kernels); zero counts where SOURCES.md states them
EXPECTED_DW = {
    "mobilenet_v2_torchvision/mobilenet_v2-b0353104.pth": {(3, 3): (17, 7136)},
    "efficientnet_lite0/efficientnet-lite0-57934424.pth": {(3, 3): (7, 2624), (5, 5): (9, 6336)},
    "ultraface/version-RFB-320.pth": {(3, 3): (18, 1904)},
    "mtcnn_facenet_pytorch/pnet.pt": {},
    "mtcnn_facenet_pytorch/rnet.pt": {},
    "mtcnn_facenet_pytorch/onet.pt": {},
    "sr_ntire2025/team28_bvi_srfnet_g.pth": {(5, 5): (5, 480)},
    "sr_ntire2025/team54_HITSR.pth": {(5, 5): (24, 2880)},
    "sr_ntire2025/team18_SGSDN.pth": {
        (3, 3): (32, 960), (1, 11): (24, 576), (11, 1): (24, 576), (1, 5): (24, 576), (5, 1): (24, 576),
    },
}
EXPECTED_ZERO = {"efficientnet_lite0/efficientnet-lite0-57934424.pth": {(3, 3): 4, (5, 5): 1}}
RESNET18_3X3 = 1_220_608  # reference/README.md section B


def real_file(rel: str) -> Path:
    path = WEIGHTS / rel
    if not path.is_file():
        pytest.skip(f"{rel} not found under {WEIGHTS} (the shared real checkpoints are not on this machine)")
    return path


def depthwise_counts(model: LoadedModel) -> dict[tuple[int, int], tuple[int, int]]:
    layers: collections.Counter = collections.Counter()
    kernels: collections.Counter = collections.Counter()
    for layer in model.layers:
        if layer.kind == "depthwise":
            layers[layer.kh, layer.kw] += 1
            kernels[layer.kh, layer.kw] += layer.c_out * layer.c_in_per_group
    return {size: (layers[size], kernels[size]) for size in layers}


def zero_counts(model: LoadedModel) -> dict[tuple[int, int], int]:
    zeros: collections.Counter = collections.Counter()
    for layer in model.layers:
        if layer.kind == "depthwise":
            zeros[layer.kh, layer.kw] += int((layer.kernels() == 0).all(axis=1).sum())
    return dict(zeros)


def kernels_of_size(model: LoadedModel, kh: int, kw: int) -> int:
    return sum(ly.c_out * ly.c_in_per_group for ly in model.layers if (ly.kh, ly.kw) == (kh, kw))


def quietly(fn, *args, **kwargs):
    """Call a torch API that warns about its own deprecation (weight_norm, TorchScript, quantisation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------- (a) the real checkpoints


@pytest.mark.parametrize("rel", sorted(EXPECTED_DW))
def test_real_checkpoint_depthwise_counts(rel: str) -> None:
    model = load(real_file(rel))
    assert model.format == "torch"
    assert depthwise_counts(model) == EXPECTED_DW[rel]
    for size, zeros in EXPECTED_ZERO.get(rel, {}).items():
        assert zero_counts(model)[size] == zeros
    assert all(layer.kind_inferred for layer in model.layers)
    assert not model.warnings
    orders = [layer.order for layer in model.layers]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)


def test_every_shared_torch_file_has_expected_counts() -> None:
    if not WEIGHTS.is_dir():
        pytest.skip(f"{WEIGHTS} not found (the shared real checkpoints are not on this machine)")
    found = {p.relative_to(WEIGHTS).as_posix() for p in WEIGHTS.rglob("*") if p.suffix in TORCH_SUFFIXES}
    assert found <= set(EXPECTED_DW), f"no expected counts for {sorted(found - set(EXPECTED_DW))}"


@pytest.mark.parametrize("net", ["pnet", "rnet", "onet"])
def test_mtcnn_convs_are_regular(net: str) -> None:
    model = load(real_file(f"mtcnn_facenet_pytorch/{net}.pt"))
    assert model.layers and all(layer.kind == "regular" and layer.groups == 1 for layer in model.layers)
    assert kernels_of_size(model, 3, 3) > 0


def test_real_strip_kernels_are_rows_of_their_own_size() -> None:
    model = load(real_file("sr_ntire2025/team18_SGSDN.pth"))
    strips = [layer for layer in model.layers if (layer.kh, layer.kw) == (1, 11)]
    assert strips and all(layer.kernels().shape == (layer.c_out, 11) for layer in strips)


# ---------------------------------------------------------------------------------- (b) wrappers, weight sets


def tiny_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """A small network's state_dict: regular 3x3 stem + BN, depthwise 5x5 (multiplier 2), 1x1, Linear."""
    g = torch.Generator().manual_seed(seed)
    return {
        "stem.weight": torch.randn(8, 3, 3, 3, generator=g),
        "stem_bn.weight": torch.rand(8, generator=g),
        "stem_bn.bias": torch.randn(8, generator=g),
        "stem_bn.running_mean": torch.randn(8, generator=g),
        "stem_bn.running_var": torch.rand(8, generator=g) + 0.5,
        "stem_bn.num_batches_tracked": torch.tensor(7),
        "dw.weight": torch.randn(16, 1, 5, 5, generator=g),
        "pw.weight": torch.randn(4, 16, 1, 1, generator=g),
        "fc.weight": torch.randn(10, 4, generator=g),
        "fc.bias": torch.randn(10, generator=g),
    }


TINY_CONVS = ["stem.weight", "dw.weight", "pw.weight"]


def check_tiny(model: LoadedModel, sd: dict[str, torch.Tensor], prefix: str = "") -> None:
    assert [layer.name for layer in model.layers] == [prefix + k for k in TINY_CONVS]
    for layer, key in zip(model.layers, TINY_CONVS, strict=True):
        np.testing.assert_array_equal(layer.weight, sd[key].numpy())
    assert [layer.kind for layer in model.layers] == ["regular", "depthwise", "regular"]
    assert model.layers[1].groups == 16


def test_basicsr_real_file_takes_params_ema() -> None:
    path = real_file("sr_ntire2025/team18_SGSDN.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model = load(path)
    assert model.weight_set == "params_ema"
    assert sorted(model.meta["weight_sets"]) == ["params", "params_ema"]
    first = model.layers[0]
    assert first.name == "fea_conv.weight"
    np.testing.assert_array_equal(first.weight, raw["params_ema"]["fea_conv.weight"].numpy())
    other = load(path, weight_set="params")
    assert other.weight_set == "params"
    np.testing.assert_array_equal(other.layers[0].weight, raw["params"]["fea_conv.weight"].numpy())
    assert depthwise_counts(other) == depthwise_counts(model)


def ddp(sd: dict) -> dict:
    return {"module." + k: v for k, v in sd.items()}


# (wrapped checkpoint built from state_dicts a (raw) and b (averaged), the set expected, its tensors)
WRAPPERS = {
    "basicsr": (lambda a, b: {"params": a, "params_ema": b}, "params_ema", "b"),
    "basicsr_ema_first": (lambda a, b: {"params_ema": b, "params": a}, "params_ema", "b"),
    "model_ema": (lambda a, b: {"model": a, "model_ema": b, "epoch": 3}, "model_ema", "b"),
    "timm": (lambda a, b: {"state_dict": a, "state_dict_ema": b, "optimizer": {"state": {}}, "arch": "x"},
             "state_dict_ema", "b"),
    "ema_under_ddp": (lambda a, b: {"model": a, "ema": ddp(b)}, "ema", "b"),
    "lightning_flat_prefixes": (
        lambda a, b: {"state_dict": {**{"model." + k: v for k, v in a.items()},
                                     **{"model_ema." + k: v for k, v in b.items()}}},
        "state_dict.model_ema", "b"),
    "stylegan_g_ema": (lambda a, b: {"g": a, "g_ema": b}, "g_ema", "b"),
    "single_params": (lambda a, b: {"params": a}, "", "a"),
    "single_state_dict_ddp": (lambda a, b: {"state_dict": ddp(a), "epoch": 90}, "", "a"),
    "net": (lambda a, b: {"net": a}, "", "a"),
    "bare": (lambda a, b: a, "", "a"),
}


@pytest.mark.parametrize("case", sorted(WRAPPERS))
def test_wrappers_give_one_weight_set(tmp_path: Path, case: str) -> None:
    wrap, expected_set, which = WRAPPERS[case]
    a, b = tiny_state_dict(1), tiny_state_dict(2)
    path = tmp_path / "wrapped.pth"
    torch.save(wrap(a, b), path)
    model = load(path)
    assert model.weight_set == expected_set
    check_tiny(model, {"a": a, "b": b}[which])


def test_weight_set_names_the_other_set(tmp_path: Path) -> None:
    a, b = tiny_state_dict(1), tiny_state_dict(2)
    path = tmp_path / "two.pth"
    torch.save({"state_dict": {**{"model." + k: v for k, v in a.items()},
                               **{"model_ema." + k: v for k, v in b.items()}}}, path)
    model = load(path, weight_set="state_dict.model")
    assert model.weight_set == "state_dict.model"
    check_tiny(model, a)
    with pytest.raises(LoaderError, match="no weight set 'nope'") as err:
        load(path, weight_set="nope")
    assert str(path) in str(err.value) and "state_dict" in str(err.value)


def test_ema_choice_inside_a_requested_set(tmp_path: Path) -> None:
    a, b = tiny_state_dict(1), tiny_state_dict(2)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {**{"model." + k: v for k, v in a.items()},
                               **{"model_ema." + k: v for k, v in b.items()}},
                "callbacks": {"x": {"model.stem.weight": a["stem.weight"]}}}, path)
    model = load(path, weight_set="state_dict")
    assert model.weight_set == "state_dict.model_ema"
    check_tiny(model, b)
    assert [layer.order for layer in model.layers] == [0.0, 6.0, 7.0]  # indices within the set taken


def test_same_shaped_networks_without_ema_are_both_kept(tmp_path: Path) -> None:
    a, b = tiny_state_dict(1), tiny_state_dict(2)
    path = tmp_path / "cyclegan.pth"
    torch.save({"netG_A": a, "netG_B": b}, path)
    model = load(path)
    assert model.weight_set == ""
    names = [layer.name for layer in model.layers]
    assert names == [f"netG_A.{k}" for k in TINY_CONVS] + [f"netG_B.{k}" for k in TINY_CONVS]


def test_nested_dicts_and_lists_are_walked(tmp_path: Path) -> None:
    a = tiny_state_dict(1)
    path = tmp_path / "nested.ckpt"
    weights = {"backbone": {"stem.weight": a["stem.weight"]}, "head": [{"dw.weight": a["dw.weight"]}]}
    torch.save({"meta": {"epoch": 3, "note": "x"}, "weights": weights}, path)
    model = load(path)
    assert [layer.name for layer in model.layers] == ["backbone.stem.weight", "head.0.dw.weight"]
    assert [layer.kind for layer in model.layers] == ["regular", "depthwise"]


def test_bare_state_dict_cannot_see_groups(tmp_path: Path) -> None:
    """What a bare state_dict can and cannot say: exact for the live module, inferred from the file."""
    net = nn.Sequential(nn.Conv2d(8, 16, 3, groups=8), nn.Conv2d(16, 16, 3, groups=4), nn.Conv2d(1, 4, 3))
    path = tmp_path / "g.pth"
    torch.save(net.state_dict(), path)
    inferred = load(path)
    exact = load_module(net, name="g")
    assert [(layer.kind, layer.groups, layer.kind_inferred) for layer in exact.layers] == [
        ("depthwise", 8, False), ("grouped", 4, False), ("regular", 1, False)]
    # documented guesses: multiplier unknown (groups = c_out), grouped looks regular, 1-channel input looks dw
    assert [(layer.kind, layer.groups, layer.kind_inferred) for layer in inferred.layers] == [
        ("depthwise", 16, True), ("regular", 1, True), ("depthwise", 4, True)]
    for x, y in zip(inferred.layers, exact.layers, strict=True):
        np.testing.assert_array_equal(x.kernels(), y.kernels())


# ---------------------------------------------------------------------------------------------- (c) ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout: 7x7 stem, BasicBlock x [2, 2, 2, 2], 64-128-256-512, 1x1 downsample."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, c_in, stages = (64, 128, 256, 512), 64, []
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width, 1)))
            c_in = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.fixture(scope="module")
def resnet18() -> ResNet18:
    torch.manual_seed(0)
    net = ResNet18()
    with torch.no_grad():  # BN statistics that are not the identity, so that folding changes something
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_resnet18_state_dict_holds_the_filterdb_count(tmp_path: Path, resnet18: ResNet18) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18.state_dict(), path)
    model = load(path)
    assert len(model.layers) == 20  # stem + 16 block convs + 3 downsample convs
    assert kernels_of_size(model, 3, 3) == RESNET18_3X3
    assert all(layer.kind == "regular" for layer in model.layers)


def test_resnet18_live_module_holds_the_filterdb_count(resnet18: ResNet18) -> None:
    model = load_module(resnet18, name="resnet18")
    assert model.format == "module" and model.name == "resnet18"
    assert len(model.layers) == 20
    assert kernels_of_size(model, 3, 3) == RESNET18_3X3
    assert all(ly.kind == "regular" and not ly.kind_inferred and not ly.bn_folded for ly in model.layers)
    assert model.layers[0].extra["stride"] == (2, 2) and model.layers[0].extra["padding"] == (3, 3)
    assert not model.warnings


def test_resnet18_fold_bn_needs_a_trace_outside_sequential(resnet18: ResNet18) -> None:
    walked = load_module(resnet18, name="resnet18", fold_bn=True)
    assert {layer.name for layer in walked.layers if layer.bn_folded} == {
        f"layer{i}.0.downsample.0" for i in (2, 3, 4)}
    assert len(walked.warnings) == 1 and "17 BatchNorm2d" in walked.warnings[0]
    assert "example_input" in walked.warnings[0]

    traced = load_module(resnet18, name="resnet18", fold_bn=True, example_input=torch.randn(1, 3, 32, 32))
    assert all(layer.bn_folded for layer in traced.layers) and not traced.warnings
    modules = dict(resnet18.named_modules())
    torch.manual_seed(2)
    for layer in traced.layers:
        conv, bn = modules[layer.name], modules[layer.extra["bn"]]
        assert_folded_matches(conv, bn, layer.weight, torch.randn(1, conv.in_channels, 5, 5))


# --------------------------------------------------------------------------------------------- (d) BN folding


def folded_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """b' = beta + (b - mean) * gamma / sqrt(var + eps), float64 (the loader returns weights only)."""
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(scale)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(scale)
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        return beta + (bias - bn.running_mean.double()) * gamma * scale


def assert_folded_matches(conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: np.ndarray, x: torch.Tensor) -> None:
    """conv -> bn (eval, float64) == conv with the folded weight and bias, to 1e-5."""

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().double()

    with torch.no_grad():
        expected = F.batch_norm(
            F.conv2d(x.double(), f64(conv.weight), f64(conv.bias), conv.stride, conv.padding, conv.dilation,
                     conv.groups),
            f64(bn.running_mean), f64(bn.running_var), f64(bn.weight), f64(bn.bias), False, 0.0, bn.eps)
        folded = torch.from_numpy(np.asarray(weight, dtype=np.float64))
        got = F.conv2d(x.double(), folded, folded_bias(conv, bn), conv.stride, conv.padding, conv.dilation,
                       conv.groups)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def random_bn(c: int, *, affine: bool = True, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.01)
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


# (c_in, c_out, kernel, groups, stride, dilation, bias, bn affine)
FOLD_CASES = [
    (3, 8, 3, 1, 1, 1, True, True),
    (8, 8, 3, 8, 2, 1, False, True),  # depthwise
    (6, 12, 5, 6, 1, 2, True, True),  # depthwise, multiplier 2, dilated
    (8, 4, 3, 2, 1, 1, False, True),  # grouped
    (5, 7, (1, 11), 1, 1, 1, True, False),  # strip kernel, BN without affine
    (1, 1, 1, 1, 1, 1, False, True),
]


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fold_bn_in_sequential_matches_conv_then_bn(case: tuple) -> None:
    c_in, c_out, k, groups, stride, dilation, bias, affine = case
    torch.manual_seed(1)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding=1, dilation=dilation, groups=groups, bias=bias)
    net = nn.Sequential(conv, random_bn(c_out, affine=affine)).eval()
    model = load_module(net, name="seq", fold_bn=True)
    (layer,) = model.layers
    assert layer.bn_folded and layer.extra["bn"] == "1" and layer.weight.dtype == np.float32
    assert not model.warnings
    x = torch.randn(2, c_in, 13, 17)
    assert_folded_matches(conv, net[1], layer.weight, x)
    with torch.no_grad():  # and the whole float32 module agrees with the folded conv
        got = F.conv2d(x, torch.from_numpy(layer.weight), folded_bias(conv, net[1]).float(), conv.stride,
                       conv.padding, conv.dilation, conv.groups)
        torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-5)
    plain = load_module(net, name="seq")
    assert not plain.layers[0].bn_folded
    np.testing.assert_array_equal(plain.layers[0].weight, conv.weight.detach().numpy())


class ConvReluBn(nn.Module):
    """Pre-activation order with an in-place ReLU: the BN's input *is* the conv's output tensor, but
    modified."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = random_bn(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.act(self.conv(x)))


class TwoBranches(nn.Module):
    """Registered b-then-a, run a-then-b; the BN is registered before its conv."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = random_bn(4)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.a = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.bn(self.a(x)))


def test_fold_bn_refuses_modified_or_non_adjacent_inputs() -> None:
    x = torch.randn(1, 3, 8, 8)
    traced = load_module(ConvReluBn(), name="pre", fold_bn=True, example_input=x)
    assert not traced.layers[0].bn_folded and "bn" in traced.warnings[0]
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), random_bn(4))
    assert not load_module(seq, name="seq", fold_bn=True).layers[0].bn_folded


def test_trace_gives_execution_order_and_pairs_by_data_flow() -> None:
    net = TwoBranches().eval()
    walked = load_module(net, name="two")
    assert [(layer.name, layer.order) for layer in walked.layers] == [("b", 0.0), ("a", 1.0)]
    assert walked.meta["order_from"] == "module walk"
    x = torch.randn(1, 3, 8, 8)
    traced = load_module(net, name="two", fold_bn=True, example_input=x)
    assert traced.meta["order_from"] == "forward trace"
    got = {layer.name: (layer.order, layer.bn_folded) for layer in traced.layers}
    assert got == {"a": (0.0, True), "b": (1.0, False)}
    a = next(layer for layer in traced.layers if layer.name == "a")
    assert_folded_matches(net.a, net.bn, a.weight, x)


def test_trace_restores_training_flags_and_statistics() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).train()
    net[2].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    load_module(net, name="n", fold_bn=True, example_input=torch.randn(2, 3, 8, 8))
    assert [m.training for m in net.modules()] == [True, True, True, False]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_forward_failure_names_the_model() -> None:
    with pytest.raises(LoaderError, match="mynet: the forward pass"):
        load_module(nn.Conv2d(3, 4, 3), name="mynet", example_input=torch.randn(1, 5, 8, 8))
    with pytest.raises(LoaderError, match=r"mynet: expected a torch\.nn\.Module"):
        load_module({"w": 1}, name="mynet")


def test_module_skips_other_convs_with_a_warning() -> None:
    net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3),
                        nn.Conv3d(1, 2, 3))
    model = load_module(net, name="mixed")
    assert [layer.name for layer in model.layers] == ["1"]
    text = " | ".join(model.warnings)
    for cls, label in (("Conv1d", "0"), ("ConvTranspose2d", "2"), ("Conv3d", "3")):
        assert f"1 {cls} layer(s) skipped" in text and f"skipped (not 2-D convolutions): {label}" in text


def test_module_dtypes_and_lazy_convs() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3).half(), nn.Conv2d(4, 4, 3).to(torch.bfloat16),
                        nn.Conv2d(4, 4, 3).double(), nn.LazyConv2d(4, 3))
    model = load_module(net, name="dt")
    assert [layer.weight.dtype for layer in model.layers] == [np.float16, np.float32, np.float32]
    np.testing.assert_array_equal(model.layers[1].weight, net[1].weight.float().detach().numpy())
    assert any("layer 3" in w and "lazy" in w for w in model.warnings)


def test_quantized_module_conv_is_dequantized() -> None:
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

    conv = quietly(QuantizedConv2d, 4, 8, 3, groups=4)
    (layer,) = load_module(nn.Sequential(conv), name="q").layers
    assert (layer.kind, layer.groups, layer.kind_inferred) == ("depthwise", 4, False)
    np.testing.assert_array_equal(layer.weight, conv.weight().dequantize().numpy())


# ------------------------------------------------------------------------------------ re-parametrised weights


def reparam_conv(kind: str) -> nn.Conv2d:
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3)
    wrap = {
        "weight_norm": lambda c: quietly(nn.utils.weight_norm, c),
        "spectral_norm": nn.utils.spectral_norm,
        "param_weight_norm": nn.utils.parametrizations.weight_norm,
        "param_spectral_norm": nn.utils.parametrizations.spectral_norm,
    }[kind]
    conv = wrap(conv)
    conv(torch.randn(1, 4, 6, 6))  # a training step of the power iteration: u, v move
    return conv.eval()


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "param_weight_norm", "param_spectral_norm"])
def test_reparametrised_weights_are_recombined(tmp_path: Path, kind: str) -> None:
    conv = reparam_conv(kind)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        expected_out = conv(x)  # eval: the weight the network computes with
        expected = conv.weight.detach().numpy().copy()
    path = tmp_path / f"{kind}.pth"
    torch.save({"block": {"conv." + k: v for k, v in conv.state_dict().items()}}, path)
    model = load(path)
    (layer,) = model.layers
    assert layer.name == "block.conv.weight" and layer.extra["reparametrization"].endswith("norm")
    np.testing.assert_allclose(layer.weight, expected, rtol=1e-5, atol=1e-6)
    live = load_module(conv, name=kind)
    np.testing.assert_allclose(live.layers[0].weight, expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, torch.from_numpy(layer.weight), conv.bias), expected_out)


# -------------------------------------------------------------------------------------- dtypes, NaN, no convs


def test_dtypes(tmp_path: Path) -> None:
    w = torch.randn(4, 1, 3, 3)
    sd = {"half.weight": w.half(), "bf16.weight": w.bfloat16(), "f64.weight": w.double(),
          "int8.weight": torch.zeros(4, 1, 3, 3, dtype=torch.int8),
          "q.weight": quietly(torch.quantize_per_tensor, w, 0.05, 0, torch.qint8)}
    path = tmp_path / "dtypes.pth"
    torch.save(sd, path)
    model = load(path)
    layers = {layer.name: layer for layer in model.layers}
    assert sorted(layers) == ["bf16.weight", "f64.weight", "half.weight", "q.weight"]
    assert layers["half.weight"].weight.dtype == np.float16
    np.testing.assert_array_equal(layers["bf16.weight"].weight, w.bfloat16().float().numpy())
    assert layers["f64.weight"].weight.dtype == np.float32
    np.testing.assert_allclose(layers["q.weight"].weight, w.numpy(), atol=0.026)
    (warning,) = model.warnings
    assert "int8.weight" in warning and "skipped" in warning and str(path) in warning


def test_nan_and_inf_weights_are_kept_and_named(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    sd["dw.weight"][3, 0, 2, 2] = float("nan")
    sd["dw.weight"][5, 0, 0, 1] = float("inf")
    sd["pw.weight"][0, 0, 0, 0] = float("-inf")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    model = load(path)
    assert len(model.layers) == 3
    assert int(np.isnan(model.layers[1].weight).sum()) == 1
    assert len(model.warnings) == 2
    assert "dw.weight" in model.warnings[0] and "2 of 16 kernels" in model.warnings[0]
    assert "pw.weight" in model.warnings[1] and "1 of 64 kernels" in model.warnings[1]
    live = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        live.weight[1, 1, 1, 1] = float("nan")
    assert "layer (root)" in load_module(live, name="live").warnings[0]


@pytest.mark.parametrize("content", ["no_convs", "empty_dict", "tensor", "conv1d_and_3d"])
def test_checkpoint_without_convs_is_an_empty_model(tmp_path: Path, content: str) -> None:
    obj = {
        "no_convs": {"fc.weight": torch.randn(3, 4), "bn.weight": torch.randn(4),
                     "emb.weight": torch.randn(9, 2)},
        "empty_dict": {},
        "tensor": torch.randn(3, 3, 3, 3),
        "conv1d_and_3d": {"c1.weight": torch.randn(4, 2, 3), "c3.weight": torch.randn(4, 2, 3, 3, 3)},
    }[content]
    path = tmp_path / "noconv.pt"
    torch.save(obj, path)
    model = load(path)
    assert model.layers == [] and model.warnings == [] and model.format == "torch"


# ---------------------------------------------------------------------------------------------- (e) bad input


class Payload:
    """Unpickling this calls os.system: the loader must refuse it, not run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def write_payload(path: Path, marker: Path, how: str) -> None:
    obj = {"conv.weight": torch.randn(2, 1, 3, 3), "x": Payload(marker)}
    if how == "torch_zip":
        torch.save(obj, path)
    elif how == "torch_legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2 if how == "pickle2" else pickle.DEFAULT_PROTOCOL))


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "pickle2", "pickle_default"])
def test_code_running_pickle_is_refused_not_run(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write_payload(path, marker, how)
    with pytest.raises(LoaderError) as err:
        load(path)
    message = str(err.value)
    assert str(path) in message and "refused" in message and "executed" in message
    if how.startswith("torch"):
        assert "system" in message  # names what it would have called
    assert not marker.exists()


def test_pickled_module_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Conv2d(3, 3, 3), path)
    with pytest.raises(LoaderError, match=r"torch\.nn\.modules\.conv\.Conv2d") as err:
        load(path)
    assert str(path) in str(err.value) and "state_dict" in str(err.value)


def test_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    quietly(torch.jit.save, quietly(torch.jit.script, nn.Conv2d(3, 3, 3)), path)
    with pytest.raises(LoaderError, match="TorchScript") as err:
        load(path)
    assert str(path) in str(err.value)


def truncated_copies(tmp_path: Path) -> list[Path]:
    """First half of a real file of each torch format (when present), and of two saved here."""
    out = []
    sources = [WEIGHTS / "mobilenet_v2_torchvision/mobilenet_v2-b0353104.pth",  # legacy (non-zip) format
               WEIGHTS / "sr_ntire2025/team18_SGSDN.pth"]  # zip format
    own = tmp_path / "own.pth"
    torch.save(tiny_state_dict(0), own)
    own_legacy = tmp_path / "own_legacy.pth"
    torch.save(tiny_state_dict(0), own_legacy, _use_new_zipfile_serialization=False)
    for src in [s for s in sources if s.is_file()] + [own, own_legacy]:
        raw = src.read_bytes()
        dst = tmp_path / f"half_{src.name}"
        dst.write_bytes(raw[: len(raw) // 2])
        out.append(dst)
    return out


def test_truncated_checkpoints(tmp_path: Path) -> None:
    for path in truncated_copies(tmp_path):
        with pytest.raises(LoaderError) as err:
            load(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt", ".safetensors"])
def test_empty_and_random_files(tmp_path: Path, suffix: str) -> None:
    empty = tmp_path / f"empty{suffix}"
    empty.touch()
    with pytest.raises(LoaderError, match="empty") as err:
        load(empty)
    assert str(empty) in str(err.value)
    rng = np.random.default_rng(0)
    for size in (1, 7, 5000):
        noise = tmp_path / f"noise{size}{suffix}"
        noise.write_bytes(rng.bytes(size))
        with pytest.raises(LoaderError) as err:
            load(noise)
        assert str(noise) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="no such file"):
        load(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------------ safetensors


def numpy_sd(seed: int = 0) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tiny_state_dict(seed).items()}


def test_safetensors_gives_the_same_rows_as_torch(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    torch.save(sd, tmp_path / "m.pth")
    save_numpy({k: v.numpy() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    a, b = load(tmp_path / "m.pth"), load(tmp_path / "m.safetensors")
    assert b.format == "safetensors"
    assert sorted(layer.name for layer in a.layers) == sorted(layer.name for layer in b.layers)
    by_name = {layer.name: layer for layer in b.layers}
    for x in a.layers:
        y = by_name[x.name]
        np.testing.assert_array_equal(x.kernels(), y.kernels())
        assert (x.kind, x.groups, x.kind_inferred) == (y.kind, y.groups, y.kind_inferred)


def test_safetensors_content_is_recognised_whatever_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    save_numpy(numpy_sd(0), str(path))
    model = load(path)
    assert model.format == "safetensors"
    assert sorted(layer.name for layer in model.layers) == sorted(TINY_CONVS)


def test_safetensors_bf16_and_wrappers(tmp_path: Path) -> None:
    a, b = tiny_state_dict(1), tiny_state_dict(2)
    tensors = {**{"model." + k: v.bfloat16() for k, v in a.items()},
               **{"model_ema." + k: v.bfloat16() for k, v in b.items()}}
    path = tmp_path / "bf16.safetensors"
    save_torch(tensors, str(path))
    model = load_safetensors(path)
    assert model.weight_set == "model_ema"
    assert sorted(layer.name for layer in model.layers) == sorted(TINY_CONVS)
    for layer in model.layers:
        key = layer.name
        assert layer.weight.dtype == np.float32
        np.testing.assert_array_equal(layer.weight, b[key].bfloat16().float().numpy())


def test_safetensors_order_is_natural(tmp_path: Path) -> None:
    tensors = {f"blocks.{i}.dw.weight": np.zeros((4, 1, 3, 3), np.float32) for i in (0, 1, 2, 10, 11)}
    path = tmp_path / "order.safetensors"
    save_numpy(tensors, str(path))
    names = [layer.name for layer in sorted(load(path).layers, key=lambda layer: layer.order)]
    assert names == [f"blocks.{i}.dw.weight" for i in (0, 1, 2, 10, 11)]


def write_header(path: Path, header: dict, data: bytes, claimed_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claimed_len is None else claimed_len) + raw + data)


LYING_HEADERS = {
    "huge_shape": ({"w.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20, 3, 3],
                                 "data_offsets": [0, 36 * (1 << 40)]}}, "run past the end"),
    "offsets_past_end": ({"w.weight": {"dtype": "F32", "shape": [4, 1, 3, 3], "data_offsets": [0, 144]}},
                         "run past the end"),
    "size_mismatch": ({"w.weight": {"dtype": "F32", "shape": [400, 1, 3, 3], "data_offsets": [0, 16]}},
                      "needs 14400 bytes"),
    "negative_offset": ({"w.weight": {"dtype": "F32", "shape": [1, 1, 2, 2], "data_offsets": [-16, 0]}},
                        "run past the end"),
    "bad_dtype": ({"w.weight": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, "unknown dtype"),
    "not_object": ({"w.weight": [1, 2]}, "not an object"),
}


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
def test_safetensors_header_that_lies(tmp_path: Path, case: str) -> None:
    header, match = LYING_HEADERS[case]
    path = tmp_path / f"{case}.safetensors"
    write_header(path, header, b"\0" * 16)
    with pytest.raises(LoaderError, match=match) as err:
        load_safetensors(path)
    assert str(path) in str(err.value) and "w.weight" in str(err.value)


def test_safetensors_header_length_that_lies(tmp_path: Path) -> None:
    path = tmp_path / "long.safetensors"
    write_header(path, {}, b"", claimed_len=1 << 50)
    with pytest.raises(LoaderError, match="claims") as err:
        load(path)
    assert str(path) in str(err.value)
    path.write_bytes(struct.pack("<Q", 4) + b"{nop")
    with pytest.raises(LoaderError, match="header") as err:
        load(path)
    assert str(path) in str(err.value)


def write_shards(tmp_path: Path, sd: dict[str, np.ndarray], n: int = 2) -> tuple[list[Path], Path]:
    keys = list(sd)
    shards, weight_map = [], {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_numpy(part, str(tmp_path / name))
        weight_map.update(dict.fromkeys(part, name))
        shards.append(tmp_path / name)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return shards, index


def test_sharded_safetensors(tmp_path: Path) -> None:
    sd = numpy_sd(0)
    shards, index = write_shards(tmp_path, sd)
    for source in (index, shards[1], tmp_path):
        model = load_safetensors(source)
        assert sorted(layer.name for layer in model.layers) == sorted(TINY_CONVS)
        assert model.meta["shards"] == [s.name for s in shards]
        for layer in model.layers:
            np.testing.assert_array_equal(layer.weight, sd[layer.name])
    via_load = [layer.name for layer in load(index).layers]
    assert via_load == [layer.name for layer in load_safetensors(index).layers]


def test_sharded_torch_bin_index(tmp_path: Path) -> None:
    sd = tiny_state_dict(0)
    keys = list(sd)
    torch.save({k: sd[k] for k in keys[:5]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in keys[5:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: f"pytorch_model-0000{1 if i < 5 else 2}-of-00002.bin" for i, k in enumerate(keys)}
    index = tmp_path / "pytorch_model.bin.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    model = load(index)
    assert model.format == "torch"
    check_tiny(model, sd)
    assert [layer.order for layer in model.layers] == [0.0, 6.0, 7.0]  # file order across shards


def test_sharded_safetensors_missing_or_inconsistent(tmp_path: Path) -> None:
    shards, index = write_shards(tmp_path, numpy_sd(0))
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map["dw.weight"] = shards[1 - [s.name for s in shards].index(weight_map["dw.weight"])].name
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(LoaderError, match=r"dw\.weight") as err:
        load_safetensors(index)
    assert str(index) in str(err.value)
    shards[0].unlink()
    for source in (index, shards[1]):
        with pytest.raises(LoaderError, match="missing") as err:
            load_safetensors(source)
        assert str(source) in str(err.value) and shards[0].name in str(err.value)
    index.write_text("{not json")
    with pytest.raises(LoaderError, match="not a shard index") as err:
        load_safetensors(index)
    assert str(index) in str(err.value)
