"""The Autoencoder class: encode / decode / reconstruct against the float64 torch reference on every ISA,
conversion from and to torch, the model-directory round trip, and the piecewise-linear decoder table that the
fused assign pass uses instead of the decoder MLP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference as R
import torch
from torch import nn

import kernelatlas as ka
from kernelatlas import Autoencoder
from kernelatlas.autoencoder import Dense

CODE_TOL = 1e-6  # codes, absolute, x conditioning (reference.conditioning)
DECODE_TOL = 1e-6  # decoded values, x max(1, |value|)
RECON_TOL = 1e-6  # reconstructed values, x conditioning


@R.memo_by_identity
def _encode_reference(x: np.ndarray, enc: nn.Module) -> tuple[np.ndarray, np.ndarray, R.Normalized]:
    norm = R.normalize(x)
    return R.encode(enc, norm), R.conditioning(x, norm), norm


@R.memo_by_identity
def _reconstruct_reference(x: np.ndarray, enc: nn.Module, dec: nn.Module) -> np.ndarray:
    codes, _, _ = _encode_reference(x, enc)
    return R.decode(dec, codes) if len(x) else np.zeros((0, x.shape[1]))


def check_codes(codes: np.ndarray, ref: np.ndarray, cond: np.ndarray, good: np.ndarray) -> None:
    assert codes.dtype == np.float32 and codes.shape == ref.shape
    assert np.isnan(codes[~good]).all(), "dead / flat / non-finite kernels must get code NaN"
    err = np.abs(codes[good] - ref[good])
    off = np.flatnonzero(~(err <= CODE_TOL * cond[good]))
    assert off.size == 0, f"{off.size} codes off, e.g. errors {err[off[:5]]}"


def assert_within(got: np.ndarray, want: np.ndarray, tol: np.ndarray | float) -> None:
    err = np.abs(got - want)
    off = ~(err <= tol)
    assert not off.any(), f"{off.sum()} values off, worst error {err[off].max():.3g}"


# ---------------------------------------------------------------------------------------------- inference


def test_encode_matches_reference(isa, threads, rows, d, dtype, make_autoencoder, make_kernels):
    model, enc, _ = make_autoencoder(d)
    x = make_kernels(rows, d, dtype, pattern_model=(d,))
    codes = model.encode(x, threads=threads)
    ref, cond, norm = _encode_reference(x, enc)
    check_codes(codes, ref, cond, norm.good)


@pytest.mark.parametrize("n", [0, 1, 7, 1025, 100003])
@pytest.mark.parametrize("d", [9, 25, 49])
def test_decode_matches_reference(isa, threads, n, d, make_autoencoder):
    model, _, dec = make_autoencoder(d)
    rng = np.random.default_rng(n)
    codes = rng.uniform(-0.5, 1.5, n).astype(np.float32)  # the sigmoid code range [0, 1] and beyond
    bad = np.arange(n)[3::97]
    codes[bad] = np.array([np.nan, np.inf, -np.inf], np.float32)[np.arange(len(bad)) % 3]
    out = model.decode(codes, threads=threads)
    assert out.dtype == np.float32 and out.shape == (n, d)
    ref = R.decode(dec, codes) if n else np.zeros((0, d))
    assert np.isnan(out[bad]).all()
    good = np.isfinite(codes)
    assert_within(out[good], ref[good], DECODE_TOL * np.maximum(1.0, np.abs(ref[good])))


def test_reconstruct_matches_reference(isa, threads, rows, d, dtype, make_autoencoder, make_kernels):
    model, enc, dec = make_autoencoder(d)
    x = make_kernels(rows, d, dtype, pattern_model=(d,))
    rec = model.reconstruct(x, threads=threads)
    assert rec.dtype == np.float32 and rec.shape == (rows, d)
    _, cond, norm = _encode_reference(x, enc)
    ref = _reconstruct_reference(x, enc, dec)
    assert np.isnan(rec[~norm.good]).all()
    err = np.abs(rec - ref)[norm.good].max(axis=1, initial=0.0)
    off = np.flatnonzero(~(err <= RECON_TOL * cond[norm.good]))
    assert off.size == 0, f"{off.size} rows off, e.g. errors {err[off[:5]]}"


def test_kkk_input_and_preallocated_outputs(isa, make_autoencoder, make_kernels):
    model, _, _ = make_autoencoder(25)
    x = make_kernels(300, 25)
    x3 = x.reshape(300, 5, 5)
    codes = np.full(300, 7.0, np.float32)
    assert model.encode(x3, out=codes) is codes
    np.testing.assert_array_equal(codes, model.encode(x))
    rec = np.zeros((300, 25), np.float32)
    assert model.reconstruct(x3, out=rec) is rec
    np.testing.assert_array_equal(rec, model.reconstruct(x))
    dec = np.zeros((300, 25), np.float32)
    assert model.decode(codes, out=dec) is dec
    np.testing.assert_array_equal(dec, rec)  # reconstruct is decode(encode(x)), NaN rows included


def test_min_abs_in_encode_and_reconstruct(isa, make_autoencoder):
    model, _, _ = make_autoencoder(9)
    x = np.array([[0.1, -0.05, 0.02, 0, 0, 0, 0, 0, 0.08], [1.0, -0.5, 0.2, 0, 0, 0, 0, 0, 0.8]], np.float32)
    codes = model.encode(x, min_abs=0.2)
    assert np.isnan(codes[0]) and np.isfinite(codes[1])
    rec = model.reconstruct(x, min_abs=0.2)
    assert np.isnan(rec[0]).all() and np.isfinite(rec[1]).all()
    assert np.isfinite(model.encode(x)).all()


# ---------------------------------------------------------------------------------------------- torch


def test_from_torch_copies_every_layer(make_torch_autoencoder):
    enc, dec = make_torch_autoencoder(49, hidden=(64, 32), act="gelu", code_act="tanh")
    model = Autoencoder.from_torch(enc, dec, clusters=[(-1.0, 0.0), (0.0, 1.0)], names=["neg", "pos"])
    assert model.kernel_size == 7 and model.d == 49
    assert [L.activation for L in model.encoder] == ["gelu", "gelu", "tanh"]
    assert [L.activation for L in model.decoder] == ["gelu", "gelu", "identity"]
    assert model.code_activation == "tanh"
    linears = [m for m in [*enc, *dec] if isinstance(m, nn.Linear)]
    for layer, lin in zip([*model.encoder, *model.decoder], linears, strict=True):
        np.testing.assert_array_equal(layer.weight, lin.weight.detach().numpy())
        np.testing.assert_array_equal(layer.bias, lin.bias.detach().numpy())
    assert model.clusters == [(-1.0, 0.0), (0.0, 1.0)] and model.cluster_names == ["neg", "pos"]


def test_from_torch_layer_kinds():
    torch.manual_seed(1)
    enc = nn.Sequential(nn.Linear(9, 8, bias=False), nn.Identity(), nn.Linear(8, 1), nn.Sigmoid())
    dec = nn.Sequential(nn.Linear(1, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 9))
    model = Autoencoder.from_torch(enc, dec)
    assert [L.activation for L in model.encoder] == ["identity", "sigmoid"]
    assert [L.activation for L in model.decoder] == ["gelu_tanh", "identity"]
    np.testing.assert_array_equal(model.encoder[0].bias, np.zeros(8, np.float32))
    assert model.clusters is None


@pytest.mark.parametrize(
    ("encoder", "match"),
    [
        (lambda: nn.Sequential(nn.ReLU(), nn.Linear(9, 1)), "comes before any Linear"),
        (lambda: nn.Sequential(nn.Linear(9, 4), nn.ReLU(), nn.Tanh(), nn.Linear(4, 1)), "two activations"),
        (lambda: nn.Sequential(nn.Linear(9, 4), nn.LeakyReLU(), nn.Linear(4, 1)), "LeakyReLU"),
        (lambda: nn.Sequential(), "no Linear layer"),
        (lambda: nn.Sequential(nn.Linear(10, 1)), "not a square kernel"),
    ],
)
def test_from_torch_rejects(encoder, match):
    dec = nn.Sequential(nn.Linear(1, 9))
    with pytest.raises(ValueError, match=match):
        Autoencoder.from_torch(encoder(), dec)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "tanh", "sigmoid"])
def test_to_torch_runs_the_same_network(act, make_torch_autoencoder, make_kernels):
    enc, dec = make_torch_autoencoder(25, act=act)
    model = Autoencoder.from_torch(enc, dec)
    enc2, dec2 = model.to_torch()
    x = torch.from_numpy(np.nan_to_num(np.asarray(make_kernels(500, 25), np.float32)))
    with torch.no_grad():
        np.testing.assert_array_equal(enc2(x).numpy(), enc(x).numpy())
        z = enc(x)
        np.testing.assert_array_equal(dec2(z).numpy(), dec(z).numpy())
    again = Autoencoder.from_torch(enc2, dec2)
    for a, b in zip([*model.encoder, *model.decoder], [*again.encoder, *again.decoder], strict=True):
        np.testing.assert_array_equal(a.weight, b.weight)
        assert a.activation == b.activation


# ---------------------------------------------------------------------------------------------- model directory


def test_save_load_round_trip(tmp_path, isa, make_autoencoder, make_kernels):
    model, _, _ = make_autoencoder(49, clusters=[(0.0, 0.46), (0.46, 0.47), (0.48, 1.0)])
    model.info["trained_on"] = "unit-test"
    path = model.save(tmp_path / "model")
    assert sorted(p.name for p in path.iterdir()) == ["autoencoder.safetensors", "clusters.json", "model.json"]
    meta = json.loads((path / "model.json").read_text())
    assert meta["kernel_size"] == 7 and meta["code_activation"] == "sigmoid" and meta["trained_on"] == "unit-test"
    loaded = Autoencoder.load(path)
    assert loaded.kernel_size == 7
    assert loaded.clusters == model.clusters and loaded.cluster_names == model.cluster_names
    for a, b in zip([*model.encoder, *model.decoder], [*loaded.encoder, *loaded.decoder], strict=True):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)
        assert a.activation == b.activation
    x = make_kernels(1025, 49, pattern_model=(49,))
    for got, want in zip(ka.assign(x, loaded, threshold=0.3), ka.assign(x, model, threshold=0.3), strict=True):
        np.testing.assert_array_equal(got, want)


def test_save_load_without_clusters(tmp_path, make_autoencoder):
    model, _, _ = make_autoencoder(9)
    path = model.save(tmp_path)
    assert not (path / "clusters.json").exists()
    loaded = Autoencoder.load(path)
    assert loaded.clusters is None


def test_load_rejects_what_is_not_a_model(tmp_path, make_autoencoder):
    with pytest.raises(FileNotFoundError, match="not a kernelatlas model directory"):
        Autoencoder.load(tmp_path)
    model, _, _ = make_autoencoder(9)
    path = model.save(tmp_path / "m")
    meta = json.loads((path / "model.json").read_text())
    (path / "model.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="newer than this kernelatlas reads"):
        Autoencoder.load(path)
    (path / "model.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match="format is 'something-else'"):
        Autoencoder.load(path)
    (path / "model.json").write_text(json.dumps({**meta, "encoder": [{"in": 9, "out": 5, "activation": "relu"}] + meta["encoder"][1:]}))
    with pytest.raises(ValueError, match=r"model\.json says"):
        Autoencoder.load(path)


def test_with_clusters_keeps_the_network(make_autoencoder, make_kernels):
    model, _, _ = make_autoencoder(9)
    other = model.with_clusters([(0.0, 0.47), (0.47, 1.0)], names=["low", "high"])
    assert other.cluster_names == ["low", "high"] and model.clusters is None
    x = make_kernels(1025, 9, pattern_model=(9,))
    labels, scores, codes = ka.assign(x, other, threshold=-1.0)
    _, scores0, codes0 = ka.assign(x, model, threshold=-1.0)
    np.testing.assert_array_equal(scores, scores0)
    np.testing.assert_array_equal(codes, codes0)
    good = np.isfinite(codes)
    np.testing.assert_array_equal(labels[good], np.where(codes[good] < np.float32(0.47), 0, 1))


# ---------------------------------------------------------------------------------------------- segment table

SEGMENT_MODELS = {
    "default": {},
    "relu-code": {"code_act": "relu"},
    "identity-code": {"code_act": "identity"},
    "tanh-code": {"code_act": "tanh"},
    "deep": {"hidden": (128, 64, 32, 16)},
    "wide": {"hidden": (256,)},
    "linear-decoder": {"decoder_act": "identity"},
    "no-hidden": {"hidden": ()},
}
CODE_RANGE = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "relu": (0.0, np.inf), "identity": (-np.inf, np.inf)}


def evaluate_segments(table: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    """The documented table: segment s = number of breakpoints <= z, decoded as values[s] + (z - centers[s]) x
    slopes[s] (float64 here)."""
    seg = np.searchsorted(table["breakpoints"].astype(np.float64), z, side="right")
    centers = table["centers"].astype(np.float64)[seg]
    return table["values"].astype(np.float64)[seg] + (z - centers)[:, None] * table["slopes"].astype(np.float64)[seg]


@pytest.mark.parametrize("kind", list(SEGMENT_MODELS))
@pytest.mark.parametrize("d", [9, 49])
def test_segment_table_is_the_decoder(kind, d, make_autoencoder):
    kwargs = SEGMENT_MODELS[kind]
    model, _, dec = make_autoencoder(d, **kwargs)
    assert model.piecewise_linear
    table = model._engine.segments()
    n = model.n_segments
    assert n >= 1 and table["centers"].shape == (n,) and table["breakpoints"].shape == (n - 1,)
    assert table["values"].shape == (n, d) and table["slopes"].shape == (n, d)
    t = table["breakpoints"]
    assert np.all(np.diff(t) > 0), "breakpoints must be sorted and distinct"
    if kind == "linear-decoder" or kind == "no-hidden":
        assert n == 1
    else:
        assert n > 1
    lo, hi = CODE_RANGE[kwargs.get("code_act", "sigmoid")]
    assert np.all((t > lo) & (t < hi)), "only breakpoints inside the code's range matter"
    # test codes: the whole range of a bounded code, past every breakpoint of an unbounded one
    lo = lo if np.isfinite(lo) else min(-4.0, 1.5 * t.min(initial=0.0))
    hi = hi if np.isfinite(hi) else max(4.0, 1.5 * t.max(initial=0.0))
    rng = np.random.default_rng(d)
    z = np.concatenate([rng.uniform(lo, hi, 20000), np.linspace(lo, hi, 5001), t, np.nextafter(t, -np.inf)])
    z = z.astype(np.float32).astype(np.float64)
    ref = R.decode(dec, z)
    got = evaluate_segments(table, z)
    assert_within(got, ref, DECODE_TOL * np.maximum(1.0, np.abs(ref)))
    # continuity: both segments next to a breakpoint give the same pattern there
    if n > 1:
        left = table["values"][:-1] + (t - table["centers"][:-1])[:, None] * table["slopes"][:-1]
        right = table["values"][1:] + (t - table["centers"][1:])[:, None] * table["slopes"][1:]
        np.testing.assert_allclose(left, right, atol=DECODE_TOL)


@pytest.mark.parametrize("kind", ["default", "identity-code", "deep"])
def test_segments_and_mlp_decoders_agree(isa, threads, kind, make_autoencoder, make_kernels):
    model, _, _ = make_autoencoder(25, **SEGMENT_MODELS[kind])
    model = model.with_clusters([(-10.0, 0.0), (0.0, 0.47), (0.47, 10.0)])
    x = make_kernels(5000, 25, pattern_model=(25,))
    seg = ka.assign(x, model, threshold=0.4, decoder="segments", threads=threads)
    auto = ka.assign(x, model, threshold=0.4, threads=threads)
    mlp = ka.assign(x, model, threshold=0.4, decoder="mlp", threads=threads)
    for a, b in zip(seg, auto, strict=True):
        np.testing.assert_array_equal(a, b)  # 'auto' takes the table of a ReLU decoder
    np.testing.assert_array_equal(seg[2], mlp[2])  # same encoder, same codes
    np.testing.assert_allclose(seg[1], mlp[1], atol=2e-6)
    differ = seg[0] != mlp[0]
    assert np.all(np.abs(seg[1][differ] - 0.4) <= 2e-6), "labels may differ only at the threshold"


@pytest.mark.parametrize(("act", "decoder_act"), [("relu", "gelu"), ("relu", "tanh"), ("gelu", None), ("tanh", "sigmoid")])
def test_smooth_decoder_has_no_table_and_still_assigns(isa, act, decoder_act, make_autoencoder, make_kernels):
    model, enc, dec = make_autoencoder(9, act=act, decoder_act=decoder_act)
    assert model.piecewise_linear is False and model.n_segments == 0
    table = model._engine.segments()
    assert table["centers"].shape == (0,) and table["values"].shape == (0, 9)
    x = make_kernels(1025, 9, pattern_model=(9,))
    auto = ka.assign(x, model, threshold=0.4)
    mlp = ka.assign(x, model, threshold=0.4, decoder="mlp")
    for a, b in zip(auto, mlp, strict=True):
        np.testing.assert_array_equal(a, b)
    ref = R.assign(x, enc, dec, intervals=None, threshold=0.4)
    good = ref.norm.good
    cond = R.conditioning(x, ref.norm)
    assert np.all(np.abs(auto[2][good] - ref.codes[good]) <= CODE_TOL * cond[good])
    assert np.all(np.abs(auto[1] - ref.scores) <= 1e-5)


def test_dense_validates_its_arrays():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        Dense(np.zeros((2, 3)), np.zeros(2), "swish")
    with pytest.raises(ValueError, match="weight must be"):
        Dense(np.zeros((2, 3)), np.zeros(3))
    layer = Dense(np.ones((2, 3), np.float64), [0, 1])
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
