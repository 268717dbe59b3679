"""Every input check of the binding (and of the thin Python layer over it): the right exception type, and a
message that names what is wrong and the fix -- checked with pytest.raises(match=...)."""

from __future__ import annotations

import numpy as np
import pytest

import kernelatlas as ka
from kernelatlas import Autoencoder, _core
from kernelatlas.autoencoder import Dense
from kernelatlas.engine import prototype_engine


@pytest.fixture(scope="module")
def model9(make_autoencoder):
    model, _, _ = make_autoencoder(9, clusters=[(0.0, 0.5), (0.5, 1.0)])
    return model


@pytest.fixture(scope="module")
def gelu_model9(make_autoencoder):
    model, _, _ = make_autoencoder(9, act="gelu")
    return model


@pytest.fixture
def x9():
    return np.random.default_rng(0).standard_normal((100, 9)).astype(np.float32)


PROTOTYPES9 = np.random.default_rng(1).standard_normal((4, 9)).astype(np.float32)

# Every entry point that takes kernels: name -> call(x, **kwargs)
KERNEL_CALLS = {
    "normalize": lambda m, x, **kw: ka.normalize(x, **kw),
    "encode": lambda m, x, **kw: m.encode(x, **kw),
    "reconstruct": lambda m, x, **kw: m.reconstruct(x, **kw),
    "assign": lambda m, x, **kw: ka.assign(x, m, **kw),
    "assign_prototypes": lambda m, x, **kw: ka.assign_prototypes(x, PROTOTYPES9, threshold=0.5, **kw),
}


# ---------------------------------------------------------------------------------------------- kernels in


@pytest.mark.parametrize("call", list(KERNEL_CALLS))
@pytest.mark.parametrize("dtype", [np.int64, np.float64, np.int16, np.uint16, np.bool_])
def test_wrong_dtype_names_astype(call, dtype, model9, x9):
    with pytest.raises(TypeError, match=r"x must be float32 or float16, got \w+: convert it with x\.astype\(np\.float32\)"):
        KERNEL_CALLS[call](model9, x9.astype(dtype))


@pytest.mark.parametrize("call", list(KERNEL_CALLS))
@pytest.mark.parametrize("shape", [(9,), (100,), (4, 3, 4), (2, 3, 3, 1), (1, 1, 3, 3)])
def test_wrong_shape(call, shape, model9):
    x = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=r"x must have shape \[n, k\*k\] or \[n, k, k\], got \(.*\): reshape it"):
        KERNEL_CALLS[call](model9, x)


@pytest.mark.parametrize("d", [0, 65, 81])
def test_too_many_or_no_entries_per_kernel(d):
    with pytest.raises(ValueError, match=rf"x has {d} entries per kernel \(shape \(3, {d}\)\); the engine takes 1\.\.64"):
        ka.normalize(np.zeros((3, d), np.float32))


def test_column_count_is_checked_before_narrowing():
    """2**32 + 9 columns used to be cast to int (9) and read as 3x3 kernels.  The view claims far more memory
    than its buffer: only a check made before any read keeps this safe (the buffer holds one real 3x3 row)."""
    buf = np.zeros(16, np.float32)
    cols = 2**32 + 9
    x = np.lib.stride_tricks.as_strided(buf, shape=(1, cols), strides=(4 * cols, 4))
    assert x.flags.c_contiguous
    with pytest.raises(ValueError, match=rf"x has {cols} entries per kernel"):
        ka.normalize(x)
    with pytest.raises(ValueError, match=rf"x has {cols} entries per kernel"):
        _core.normalize(x)
    side = 2**16 + 1  # [n, k, k] with k*k past 2**32
    x3 = np.lib.stride_tricks.as_strided(buf, shape=(1, side, side), strides=(4 * side * side, 4 * side, 4))
    with pytest.raises(ValueError, match=rf"x has {side} entries per kernel"):
        _core.normalize(x3)


def test_prototype_and_layer_extents_are_checked_before_narrowing():
    buf = np.ones(64, np.float32)
    wide = np.lib.stride_tricks.as_strided(buf, shape=(4, 2**32 + 9), strides=(4 * (2**32 + 9), 4))
    with pytest.raises(ValueError, match=r"the prototype size \(entries per row\) is 4294967305; the engine takes at most 64"):
        _core.PrototypeEngine(wide)
    tall = np.lib.stride_tricks.as_strided(buf, shape=(2**32 + 4, 9), strides=(36, 4))
    with pytest.raises(ValueError, match=r"need 1\.\.256 prototypes, got 4294967300"):
        _core.PrototypeEngine(tall)


# ---------------------------------------------------------------------------------------------- byte order
# A '>f4' array holds its numbers byte-swapped: read as native floats it is garbage, so every array the engine
# reads raw must be refused (issue 12, item 10) -- the kernels, the segment bounds, labels and groups.

FOREIGN = ">" if np.little_endian else "<"


@pytest.mark.parametrize("call", list(KERNEL_CALLS))
@pytest.mark.parametrize("dtype", ["f4", "f2"])
def test_non_native_byte_order_is_refused(call, dtype, model9, x9):
    x = x9.astype(FOREIGN + dtype)
    assert x.dtype.byteorder == FOREIGN and x.flags.c_contiguous
    astype = "np.float32" if dtype == "f4" else "np.float16"
    with pytest.raises(TypeError, match=rf"x is stored in the non-native byte order \(dtype {FOREIGN}{dtype}\).*"
                                        rf"convert it with x\.astype\({astype}\)"):
        KERNEL_CALLS[call](model9, x)
    # the same values in native order are accepted (the check is on the order, not the values)
    KERNEL_CALLS[call](model9, x.astype(x.dtype.newbyteorder("=")))


def test_non_native_byte_order_of_codes_and_outputs(model9, x9):
    codes = model9.encode(x9)
    with pytest.raises(TypeError, match=r"codes must be float32"):
        model9.decode(codes.astype(FOREIGN + "f4"))
    with pytest.raises(TypeError, match=r"scores must be float32"):
        model9._engine.assign(x9, scores=np.zeros(len(x9), FOREIGN + "f4"))


def test_non_native_segments_labels_and_groups():
    x = np.zeros((4, 9), np.float32)
    starts, stops = np.array([0, 2], np.int64), np.array([2, 4], np.int64)
    with pytest.raises(TypeError, match=r"starts must be a C-contiguous 1-D int64 array"):
        _core.layer_stats(x, starts.astype(FOREIGN + "i8"), stops)
    with pytest.raises(TypeError, match=r"stops must be a C-contiguous 1-D int64 array"):
        _core.label_counts(np.zeros(4, np.int16), np.zeros(4, np.float32), starts, stops.astype(FOREIGN + "i8"), 2, True)
    with pytest.raises(TypeError, match=r"labels must be a C-contiguous 1-D int16 array"):
        _core.label_counts(np.zeros(4, FOREIGN + "i2"), np.zeros(4, np.float32), starts, stops, 2, True)
    with pytest.raises(TypeError, match=r"values must be a C-contiguous 1-D float32 array"):
        _core.label_counts(np.zeros(4, np.int16), np.zeros(4, FOREIGN + "f4"), starts, stops, 2, True)
    mean, basis = np.zeros(9), np.eye(2, 9)
    lo, hi = np.full(2, -1.0), np.full(2, 1.0)
    with pytest.raises(TypeError, match=r"groups must be a C-contiguous 1-D int32 array"):
        _core.coef_histograms(x, starts, stops, np.zeros(2, FOREIGN + "i4"), 1, mean, basis, lo, hi, bins=4)
    # native twins of every array are accepted
    _core.coef_histograms(x, starts, stops, np.zeros(2, np.int32), 1, mean, basis, lo, hi, bins=4)
    _core.label_counts(np.zeros(4, np.int16), np.zeros(4, np.float32), starts, stops, 2, True)


@pytest.mark.parametrize("call", list(KERNEL_CALLS))
@pytest.mark.parametrize("view", ["columns", "transposed", "rows"])
def test_non_contiguous_input_names_ascontiguousarray(call, view, model9):
    base = np.random.default_rng(0).standard_normal((200, 18)).astype(np.float32)
    views = {
        "columns": base[:, ::2],  # [200, 9], every other entry
        "transposed": np.ascontiguousarray(base[:9]).T,  # [18, 9], Fortran order
        "rows": np.ascontiguousarray(base[:, :9])[::2],  # [100, 9], every other row
    }
    x = views[view]
    assert x.shape[1] == 9 and not x.flags.c_contiguous
    with pytest.raises(ValueError, match=r"x is not C-contiguous .*pass np\.ascontiguousarray\(x\)"):
        KERNEL_CALLS[call](model9, x)


@pytest.mark.parametrize("call", ["encode", "reconstruct", "assign", "assign_prototypes"])
def test_kernel_size_must_match_the_model(call, model9):
    x = np.zeros((5, 25), np.float32)
    with pytest.raises(ValueError, match=r"x holds 5x5 kernels but the model is for 3x3 kernels"):
        KERNEL_CALLS[call](model9, x)
    with pytest.raises(ValueError, match=r"x holds 4x4 kernels but the model is for 3x3 kernels"):
        KERNEL_CALLS[call](model9, np.zeros((5, 4, 4), np.float32))


# ---------------------------------------------------------------------------------------------- outputs


def test_assign_out_arrays(model9, x9):
    good = (np.zeros(100, np.int16), np.zeros(100, np.float32), np.zeros(100, np.float32))
    cases = [
        ((np.zeros(100, np.int32), good[1], good[2]), TypeError, r"labels must be int16, got int32"),
        ((good[0], np.zeros(100, np.float64), good[2]), TypeError, r"scores must be float32, got float64"),
        ((good[0], good[1], np.zeros(100, np.float16)), TypeError, r"codes must be float32, got float16"),
        ((np.zeros(99, np.int16), good[1], good[2]), ValueError, r"labels must have shape \(100,\), got \(99,\)"),
        ((good[0], np.zeros((100, 1), np.float32), good[2]), ValueError, r"scores must have shape \(100,\), got \(100, 1\)"),
        ((good[0], good[1], np.zeros(200, np.float32)[::2]), ValueError, r"codes must be C-contiguous"),
    ]
    for out, exc, match in cases:
        with pytest.raises(exc, match=match):
            ka.assign(x9, model9, out=out)
    readonly = np.zeros(100, np.float32)
    readonly.setflags(write=False)
    with pytest.raises(ValueError, match=r"scores is read-only: open an output memmap with mode 'r\+' or 'w\+'"):
        ka.assign(x9, model9, out=(good[0], readonly, good[2]))


def test_read_only_memmap_output(tmp_path, model9, x9):
    np.zeros(100, np.int16).tofile(tmp_path / "labels.i16")
    labels = np.memmap(tmp_path / "labels.i16", dtype=np.int16, mode="r", shape=(100,))
    with pytest.raises(ValueError, match=r"labels is read-only"):
        ka.assign(x9, model9, out=(labels, np.zeros(100, np.float32), np.zeros(100, np.float32)))


def test_prototype_out_arrays(x9):
    with pytest.raises(TypeError, match=r"labels must be int16, got int64"):
        ka.assign_prototypes(x9, PROTOTYPES9, threshold=0.5, out=(np.zeros(100, np.int64), np.zeros(100, np.float32)))
    with pytest.raises(ValueError, match=r"scores must have shape \(100,\), got \(101,\)"):
        ka.assign_prototypes(x9, PROTOTYPES9, threshold=0.5, out=(np.zeros(100, np.int16), np.zeros(101, np.float32)))


def test_normalize_out_arrays(x9):
    with pytest.raises(TypeError, match=r"out must be float32, got float16"):
        ka.normalize(x9, out=np.zeros((100, 9), np.float16))
    with pytest.raises(ValueError, match=r"out must have shape \(100, 3, 3\), got \(100, 9\)"):
        ka.normalize(x9.reshape(100, 3, 3), out=np.zeros((100, 9), np.float32))
    with pytest.raises(ValueError, match=r"norms must have shape \(100,\), got \(100, 1\)"):
        ka.normalize(x9, norms=np.zeros((100, 1), np.float32))
    with pytest.raises(ValueError, match=r"out must be C-contiguous"):
        ka.normalize(x9, out=np.zeros((9, 100), np.float32).T)


def test_encode_decode_reconstruct_out_arrays(model9, x9):
    with pytest.raises(ValueError, match=r"out must have shape \(100,\), got \(50,\)"):
        model9.encode(x9, out=np.zeros(50, np.float32))
    with pytest.raises(TypeError, match=r"out must be float32, got float64"):
        model9.reconstruct(x9, out=np.zeros((100, 9)))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 9\), got \(3, 25\)"):
        model9.decode(np.zeros(3, np.float32), out=np.zeros((3, 25), np.float32))


def test_decode_codes_checks(model9):
    with pytest.raises(ValueError, match=r"codes must be 1-D \[n\], got shape \(3, 1\)"):
        model9.decode(np.zeros((3, 1), np.float32))
    with pytest.raises(TypeError, match=r"codes must be float32, got float64: use codes\.astype\(np\.float32\)"):
        model9.decode(np.zeros(3))
    with pytest.raises(ValueError, match=r"codes must be C-contiguous: pass np\.ascontiguousarray\(codes\)"):
        model9.decode(np.zeros(6, np.float32)[::2])


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("threshold", [1.5, -1.01, float("nan"), float("inf"), -float("inf")])
def test_bad_threshold(threshold, model9, x9):
    with pytest.raises(ValueError, match=r"threshold must be a cosine in \[-1, 1\], got"):
        ka.assign(x9, model9, threshold=threshold)
    with pytest.raises(ValueError, match=r"threshold must be a cosine in \[-1, 1\], got"):
        ka.assign_prototypes(x9, PROTOTYPES9, threshold=threshold)


@pytest.mark.parametrize("call", list(KERNEL_CALLS))
@pytest.mark.parametrize("min_abs", [-1e-3, float("nan"), float("inf")])
def test_bad_min_abs(call, min_abs, model9, x9):
    with pytest.raises(ValueError, match=r"min_abs must be finite and >= 0 \(0 = only exact zeros are dead\), got"):
        KERNEL_CALLS[call](model9, x9, min_abs=min_abs)


@pytest.mark.parametrize("call", ["normalize", "assign", "assign_prototypes"])
@pytest.mark.parametrize("threads", [0, -2])
def test_bad_thread_count(call, threads, model9, x9):
    with pytest.raises(ValueError, match=rf"threads must be >= 1 \(or None for all cores\), got {threads}"):
        KERNEL_CALLS[call](model9, x9, threads=threads)


def test_decoder_option(model9, gelu_model9, x9):
    with pytest.raises(ValueError, match=r"decoder='segments' needs a decoder whose activations are all relu/identity"):
        ka.assign(x9, gelu_model9, decoder="segments")
    with pytest.raises(ValueError, match=r"decoder must be 'auto', 'segments' or 'mlp', got 'table'"):
        ka.assign(x9, model9, decoder="table")


def test_device_option(model9, x9):
    from kernelatlas import gpu

    if not gpu.available():  # with a GPU, tests/gpu/ covers device='cuda'
        for call in (lambda: ka.assign(x9, model9, device="cuda"), lambda: ka.assign_prototypes(x9, PROTOTYPES9, threshold=0.5, device="cuda")):
            with pytest.raises(gpu.GpuUnavailable, match=r"device='cuda' needs a usable GPU: "):
                call()
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu' or 'cuda', got 'tpu'"):
        ka.assign(x9, model9, device="tpu")
    ka.assign(x9, model9, device="cpu")
    ka.assign(x9, model9, device="auto")


# ---------------------------------------------------------------------------------------------- ISA


def test_set_isa_rejects_unknown_names():
    before = ka.build_info()["isa"]
    with pytest.raises(ValueError, match=r"unknown ISA 'bogus': use scalar, avx2 or avx512"):
        ka.set_isa("bogus")
    assert ka.build_info()["isa"] == before


def test_set_isa_returns_the_previous_setting():
    supported = ka.build_info()["isa_supported"]
    original = ka.set_isa("scalar")
    try:
        assert ka.build_info()["isa"] == "scalar" and ka.build_info()["isa_forced"] == "scalar"
        assert ka.set_isa(supported[-1]) == "scalar"
        assert ka.set_isa(None) == supported[-1]
        assert ka.build_info()["isa"] == supported[-1] and ka.build_info()["isa_forced"] == ""
        assert ka.set_isa("auto") is None
    finally:
        ka.set_isa(original)


@pytest.mark.skipif(len(ka.build_info()["isa_supported"]) == 3, reason="this CPU runs every ISA path")
def test_set_isa_rejects_paths_the_cpu_lacks():
    with pytest.raises(ValueError, match=r"this CPU cannot run the avx512 path"):
        ka.set_isa("avx512")


# ---------------------------------------------------------------------------------------------- models


def _dense(out: int, inp: int, act: str = "relu", value: float = 0.1) -> Dense:
    return Dense(np.full((out, inp), value, np.float32), np.zeros(out, np.float32), act)


def _engine(encoder, decoder, d=9, lo=(), hi=()):
    return _core.AutoencoderEngine(
        d, [(L.weight, L.bias, L.activation) for L in encoder], [(L.weight, L.bias, L.activation) for L in decoder], list(lo), list(hi)
    )


def test_unknown_activation():
    with pytest.raises(ValueError, match=r"unknown activation 'swish': use one of identity, relu, sigmoid, tanh, gelu, gelu_tanh"):
        Dense(np.zeros((1, 9)), np.zeros(1), "swish")
    w, b = np.zeros((1, 9), np.float32), np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"unknown activation 'swish': use one of identity, relu"):
        _core.AutoencoderEngine(9, [(w, b, "swish")], [(np.zeros((9, 1), np.float32), np.zeros(9, np.float32), "identity")])


@pytest.mark.parametrize(
    ("encoder", "decoder", "match"),
    [
        ([_dense(4, 9), _dense(2, 4)], [_dense(9, 1, "identity")], r"encoder must end in 1 output\(s\), got 2 \(the code is one-dimensional\)"),
        ([_dense(1, 9)], [_dense(4, 1), _dense(8, 4, "identity")], r"decoder must end in 9 output\(s\), got 8"),
        ([_dense(4, 9), _dense(1, 5)], [_dense(9, 1, "identity")], r"encoder layer 1 takes 5 inputs but the previous layer gives 4"),
        ([_dense(257, 9), _dense(1, 257)], [_dense(9, 1, "identity")], r"encoder layer 0 is 257 wide; the engine supports widths up to 256"),
        ([_dense(4, 9)] + [_dense(4, 4)] * 4 + [_dense(1, 4)], [_dense(9, 1, "identity")], r"encoder must have 1\.\.5 Linear layers"),
        ([_dense(1, 9)], [], r"decoder must have 1\.\.5 Linear layers"),
        ([_dense(1, 9, value=np.nan)], [_dense(9, 1, "identity")], r"encoder layer 0: weight holds NaN or Inf; the model is corrupt"),
        ([_dense(1, 9)], [Dense(np.zeros((9, 1)), np.full(9, np.inf), "identity")], r"decoder layer 0: bias holds NaN or Inf"),
    ],
)
def test_bad_layer_stacks(encoder, decoder, match):
    with pytest.raises(ValueError, match=match):
        _engine(encoder, decoder)


@pytest.mark.parametrize(
    ("clusters", "match"),
    [
        ([(0.0, 0.5), (0.4, 1.0)], r"cluster intervals must be sorted and must not overlap: interval 1 starts before interval 0 ends"),
        ([(0.5, 1.0), (0.0, 0.4)], r"must be sorted and must not overlap"),
        ([(0.5, 0.5)], r"cluster interval 0 = \[0\.5\d*, 0\.5\d*\) must be finite with lo < hi"),
        ([(0.0, 0.2), (0.6, 0.3)], r"cluster interval 1 = .* must be finite with lo < hi"),
        ([(0.0, float("nan"))], r"must be finite with lo < hi"),
        ([(-float("inf"), 0.0)], r"must be finite with lo < hi"),
    ],
)
def test_bad_intervals(clusters, match, model9):
    with pytest.raises(ValueError, match=match):
        model9.with_clusters(clusters)


def test_touching_intervals_are_fine(model9):
    assert model9.with_clusters([(0.0, 0.5), (0.5, 1.0)]).clusters == [(0.0, 0.5), (0.5, 1.0)]


def test_cluster_names_must_match(model9):
    with pytest.raises(ValueError, match=r"cluster_names must name every interval"):
        Autoencoder(model9.encoder, model9.decoder, 3, [(0.0, 1.0)], ["a", "b"])


def test_encoder_must_take_the_kernel(model9):
    with pytest.raises(ValueError, match=r"the encoder must take 25 inputs for 5x5 kernels"):
        Autoencoder(model9.encoder, model9.decoder, 5)


# ---------------------------------------------------------------------------------------------- prototypes


@pytest.mark.parametrize(
    ("prototypes", "match"),
    [
        (np.random.default_rng(0).standard_normal((257, 9)), r"need 1\.\.256 prototypes, got 257"),
        (np.zeros((0, 9)), r"need 1\.\.256 prototypes, got 0"),
        (np.vstack([np.arange(9.0), np.full(9, 3.0)]), r"prototype 1 is constant or all zero"),
        (np.vstack([np.zeros(9), np.arange(9.0)]), r"prototype 0 is constant or all zero"),
        (np.vstack([np.arange(9.0), [np.nan] + [0.0] * 8]), r"prototype 1 holds NaN or Inf"),
    ],
)
def test_bad_prototypes(prototypes, match):
    with pytest.raises(ValueError, match=match):
        prototype_engine(prototypes)


def test_prototype_engine_takes_float32_only():
    with pytest.raises(ValueError, match=r"prototypes must be a C-contiguous float32 array \[n_prototypes, k\*k\], got float64"):
        _core.PrototypeEngine(np.zeros((2, 9)))
