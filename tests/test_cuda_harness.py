"""The CUDA kernels' logic without a GPU: kernelatlas._cuda_harness runs the kernel bodies of cuda/ops/*.cuh,
compiled by the host compiler, block by block and phase by phase (every thread of a block between two barriers),
exactly as a launch would.  Compared here with the float64 reference (the tolerances of test_normalize.py,
test_assign.py and test_prototypes.py) and with the CPU engine itself: the kernels compute the CPU engine's
expressions in the same order, so a row matches the AVX2 / AVX-512 engine bit for bit and the scalar engine
(libm's exp where the SIMD paths use a polynomial) within the reference tolerances.

Rows are chosen to break the launch's tiling: 0, 1, 31 / 32 / 33 (a warp), 127 / 128 / 129 (a block of 128
threads), 1025, and one large odd count; plus launch plans that stage the model in shared memory or read it
from global memory with 128, 64 or 32 threads per block, and thread orders that would expose a missing
barrier.  Real device runs are in tests/gpu/.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
from test_assign import calibrated as calibrated_model
from test_assign import check_assign
from test_normalize import check_normalized
from test_prototypes import calibrated as calibrated_prototypes
from test_prototypes import check_prototypes

import kernelatlas as ka
from kernelatlas import Autoencoder
from kernelatlas.autoencoder import _float32_bounds

H = pytest.importorskip("kernelatlas._cuda_harness", reason="the CUDA harness extension is not built")

ROWS = (0, 1, 31, 32, 33, 127, 128, 129, 1025)
DIMS = (9, 25, 49)
DTYPES = (np.float32, np.float16)
SIMD_ISAS = [name for name in ("avx512", "avx2") if name in ka.build_info()["isa_supported"]]
PLANS = ("staged128", "global128", "global64", "global32")  # the launch plans of plan_launch (common.cuh)


def harness_model(model: Autoencoder) -> H.Autoencoder:
    lo, hi = _float32_bounds(model.clusters or [])
    return H.Autoencoder(
        model.d,
        [(L.weight, L.bias, L.activation) for L in model.encoder],
        [(L.weight, L.bias, L.activation) for L in model.decoder],
        lo,
        hi,
    )


def budget_for(plan: str, row_floats: int, blob_floats: int) -> int:
    """The smallest budget that gives ``plan`` (see plan_launch in cuda/ops/common.cuh)."""
    staged = 4 * ((blob_floats + 3) // 4 * 4 + row_floats * 129)
    threads = {"staged128": 128, "global128": 128, "global64": 64, "global32": 32}[plan]
    if plan == "staged128":
        return staged
    return 4 * row_floats * (threads + 1)


def engine_outputs(fn, isa_name: str):
    previous = ka.set_isa(isa_name)
    try:
        return fn()
    finally:
        ka.set_isa(previous)


def assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [32, 128])
def test_normalize_matches_reference_and_engine(rows, d, dtype, threads, make_kernels):
    x = make_kernels(rows, d, dtype)
    out, norms = H.normalize(x, threads=threads)
    check_normalized(x, out, norms)
    for name in SIMD_ISAS:
        assert_same((out, norms), engine_outputs(lambda: ka.normalize(x, threads=1), name))


def test_normalize_extreme_magnitudes_match_engine():
    """The power-of-two prescale: kernels near fp32's overflow and underflow, fp16 subnormals."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((64, 25))
    x = np.concatenate([base * 1e30, base * 1e-30, base * 1e-36, base + 1e6]).astype(np.float32)
    out, norms = H.normalize(x)
    check_normalized(x, out, norms)
    half = (rng.standard_normal((200, 9)) * 1e-6).astype(np.float16)  # many subnormal halves
    check_normalized(half, *H.normalize(half))
    for name in SIMD_ISAS:
        assert_same((out, norms), engine_outputs(lambda: ka.normalize(x, threads=1), name))
        assert_same(H.normalize(half), engine_outputs(lambda: ka.normalize(half, threads=1), name))


def test_normalize_min_abs_matches_engine(make_kernels):
    x = make_kernels(1025, 9)
    out, norms = H.normalize(x, min_abs=0.3)
    check_normalized(x, out, norms, min_abs=0.3)
    assert np.sum(norms == 0) > 10  # min_abs made some kernels dead


# ---------------------------------------------------------------------------------------------- assign


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoder", ["segments", "mlp"])
def test_assign_matches_reference_and_engine(rows, d, dtype, decoder, make_autoencoder, make_kernels):
    model, enc, dec, intervals, threshold = calibrated_model(d, make_autoencoder, make_kernels)
    x = make_kernels(rows, d, dtype, pattern_model=(d,))
    hm = harness_model(model)
    labels, scores, codes, plan = hm.assign(x, threshold=threshold, decoder=decoder)
    assert plan["threads"] == 128 and plan["stage_floats"] > 0
    got = (labels, scores, codes)
    check_assign(got, x, enc, dec, intervals, threshold)
    for name in SIMD_ISAS:
        assert_same(got, engine_outputs(lambda: ka.assign(x, model, threshold=threshold, threads=1, decoder=decoder), name))
    # the scalar engine computes the sigmoid code with libm's exp: equal to the reference tolerances
    scalar = engine_outputs(lambda: ka.assign(x, model, threshold=threshold, threads=1, decoder=decoder), "scalar")
    check_assign(scalar, x, enc, dec, intervals, threshold)
    good = np.isfinite(codes)
    np.testing.assert_array_equal(good, np.isfinite(scalar[2]))
    assert np.all(np.abs(codes[good] - scalar[2][good]) <= 1e-6 * R.conditioning(x, R.normalize(x))[good])
    assert np.all(np.abs(scores - scalar[1]) <= 1e-5)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_matches_engine(d, dtype, make_autoencoder, make_kernels):
    model, _, _, _, _ = calibrated_model(d, make_autoencoder, make_kernels)
    x = make_kernels(1025, d, dtype, pattern_model=(d,))
    codes, plan = harness_model(model).encode(x)
    assert plan["stage_floats"] > 0
    for name in SIMD_ISAS:
        np.testing.assert_array_equal(codes, engine_outputs(lambda: model.encode(x, threads=1), name))
    _, _, fused_codes, _ = harness_model(model).assign(x, threshold=0.0)
    np.testing.assert_array_equal(codes, fused_codes)  # the fused pass encodes exactly like encode


def test_assign_large_odd_batch(make_autoencoder, make_kernels):
    model, enc, dec, intervals, threshold = calibrated_model(9, make_autoencoder, make_kernels)
    x = make_kernels(100003, 9, pattern_model=(9,))
    labels, scores, codes, _ = harness_model(model).assign(x, threshold=threshold)
    check_assign((labels, scores, codes), x, enc, dec, intervals, threshold)
    assert set(np.unique(labels)) == {-1, 0, 1, 2, 3}
    for name in SIMD_ISAS:
        assert_same((labels, scores, codes), engine_outputs(lambda: ka.assign(x, model, threshold=threshold), name))


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("decoder", ["segments", "mlp"])
def test_every_launch_plan_gives_the_same_outputs(plan, decoder, make_autoencoder, make_kernels):
    """Staged in shared memory or read from global memory, 128, 64 or 32 threads per block: the same bits."""
    model, enc, dec, intervals, threshold = calibrated_model(49, make_autoencoder, make_kernels)
    x = make_kernels(1025, 49, pattern_model=(49,))
    hm = harness_model(model)
    want = hm.assign(x, threshold=threshold, decoder=decoder)
    mlp = decoder == "mlp"
    w = 64  # the default model's widest padded layer (64 -> 32 -> 1, mirrored)
    row_floats = 49 + 2 * w
    budget = budget_for(plan, row_floats, hm.blob_floats if mlp else want[3]["stage_floats"])
    got = hm.assign(x, threshold=threshold, decoder=decoder, budget=budget)
    expected_threads = {"staged128": 128, "global128": 128, "global64": 64, "global32": 32}[plan]
    assert got[3]["threads"] == expected_threads
    assert (got[3]["stage_floats"] > 0) == (plan == "staged128")
    assert_same(got[:3], want[:3])
    check_assign(got[:3], x, enc, dec, intervals, threshold)


@pytest.mark.parametrize("order", ["reverse", "interleaved"])
def test_thread_order_within_a_phase_does_not_matter(order, make_autoencoder, make_kernels):
    """A phase that read what another thread writes in the same phase (a missing barrier) would differ."""
    model, _, _, _, threshold = calibrated_model(25, make_autoencoder, make_kernels)
    x = make_kernels(1025, 25, np.float16, pattern_model=(25,))
    hm = harness_model(model)
    for decoder in ("segments", "mlp"):
        assert_same(hm.assign(x, threshold=threshold, decoder=decoder, order=order)[:3],
                    hm.assign(x, threshold=threshold, decoder=decoder)[:3])
    assert_same(H.normalize(x, order=order), H.normalize(x))
    P, thr = calibrated_prototypes(25, make_kernels)
    hp = H.Prototypes(P)
    assert_same(hp.assign(x, threshold=thr, order=order)[:2], hp.assign(x, threshold=thr)[:2])


def test_launch_plan_choices():
    # 128 threads with the blob staged when it all fits ...
    assert H.plan(100, 1001, 10**6) == {"threads": 128, "stage_floats": 1001, "smem_bytes": 4 * (1004 + 100 * 129)}
    # ... else the blob from global memory, with as many threads as fit, down to 32, else nothing
    assert H.plan(100, 10**6, 4 * 100 * 129) == {"threads": 128, "stage_floats": 0, "smem_bytes": 4 * 100 * 129}
    assert H.plan(100, 10**6, 4 * 100 * 129 - 1)["threads"] == 64
    assert H.plan(100, 10**6, 4 * 100 * 33)["threads"] == 32
    assert H.plan(100, 10**6, 4 * 100 * 33 - 1)["threads"] == 0


@pytest.mark.parametrize(("d", "hidden"), [(9, (256, 128)), (49, (256, 128))])
def test_long_segment_tables_and_wide_layers(d, hidden, make_autoencoder, make_kernels):
    """Tables of 50-121 segments and 256-wide layers: too wide to stage at 128 threads, still exact."""
    model, enc, dec, intervals, threshold = calibrated_model(d, make_autoencoder, make_kernels, hidden=hidden)
    assert model.n_segments >= 50
    x = make_kernels(1025, d, pattern_model=(d,))
    hm = harness_model(model)
    for decoder in ("segments", "mlp"):
        labels, scores, codes, plan = hm.assign(x, threshold=threshold, decoder=decoder)
        check_assign((labels, scores, codes), x, enc, dec, intervals, threshold)
        for name in SIMD_ISAS:
            assert_same((labels, scores, codes),
                        engine_outputs(lambda dec=decoder: ka.assign(x, model, threshold=threshold, threads=1, decoder=dec),
                                       name))
        # d + 2 x 256 floats per row: too wide for 128 threads in 227 KB, so 64 threads read the model globally
        assert plan == {"threads": 64, "stage_floats": 0, "smem_bytes": 4 * (d + 2 * 256) * 65}


@pytest.mark.parametrize(("act", "code_act", "decoder_act"), [("gelu", "sigmoid", "relu"), ("tanh", "tanh", "gelu_tanh"),
                                                              ("gelu_tanh", "identity", "tanh")])
def test_smooth_activations_match_engine(act, code_act, decoder_act, make_autoencoder, make_kernels):
    """GELU / tanh / sigmoid: the kernels use vecmath.h's polynomial forms, the SIMD engine's own."""
    model, enc, dec, intervals, threshold = calibrated_model(25, make_autoencoder, make_kernels, act=act,
                                                             code_act=code_act, decoder_act=decoder_act)
    x = make_kernels(1025, 25, pattern_model=(25,))
    got = harness_model(model).assign(x, threshold=threshold)[:3]
    check_assign(got, x, enc, dec, intervals, threshold)
    for name in SIMD_ISAS:
        assert_same(got, engine_outputs(lambda: ka.assign(x, model, threshold=threshold, threads=1), name))


@pytest.mark.parametrize("threshold", [-1.0, 0.5])
def test_model_without_clusters_and_single_layer_encoder(threshold, make_autoencoder, make_kernels):
    model, enc, dec = make_autoencoder(9, code_act="identity", hidden=())
    x = make_kernels(129, 9, pattern_model=(9,))
    got = harness_model(model).assign(x, threshold=threshold)[:3]
    check_assign(got, x, enc, dec, None, threshold)
    assert set(np.unique(got[0])) <= {-1, 0}
    for name in SIMD_ISAS:
        assert_same(got, engine_outputs(lambda: ka.assign(x, model, threshold=threshold, threads=1), name))


def test_special_rows_get_label_minus_one(make_autoencoder, make_kernels):
    model = calibrated_model(9, make_autoencoder, make_kernels)[0]
    x = np.array(make_kernels(33, 9, pattern_model=(9,)))
    x[10] = np.nan
    x[11] = 0.0
    x[12] = -4.0
    x[13, 3] = -np.inf
    labels, scores, codes, _ = harness_model(model).assign(x, threshold=-1.0)
    bad = [1, 3, 5, 6, 10, 11, 12, 13]
    assert np.all(labels[bad] == -1) and np.all(scores[bad] == 0) and np.isnan(codes[bad]).all()
    others = np.setdiff1d(np.arange(33), bad)
    assert np.all(labels[others] >= -1) and np.isfinite(codes[others]).all()


# ---------------------------------------------------------------------------------------------- prototypes


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prototypes_match_reference_and_engine(rows, d, dtype, make_kernels):
    prototypes, threshold = calibrated_prototypes(d, make_kernels)
    x = make_kernels(rows, d, dtype)
    labels, scores, plan = H.Prototypes(prototypes).assign(x, threshold=threshold)
    assert plan["stage_floats"] == 16 * d
    check_prototypes((labels, scores), x, prototypes, threshold)
    for name in SIMD_ISAS:
        assert_same((labels, scores), engine_outputs(lambda: ka.assign_prototypes(x, prototypes, threshold=threshold,
                                                                                  threads=1), name))


def test_prototypes_unstaged_and_256_prototypes(make_kernels):
    rng = np.random.default_rng(3)
    prototypes = rng.standard_normal((256, 49)).astype(np.float32)
    x = make_kernels(129, 49)
    hp = H.Prototypes(prototypes)
    staged = hp.assign(x, threshold=0.2)
    unstaged = hp.assign(x, threshold=0.2, budget=4 * 49 * 129)
    assert staged[2]["stage_floats"] == 256 * 49 and unstaged[2]["stage_floats"] == 0
    assert_same(staged[:2], unstaged[:2])
    check_prototypes(staged[:2], x, prototypes, 0.2)
