"""precision='tf32' of the CUDA kernels, without a GPU: the first encoder layer as a warp's tensor-core mma
(cuda/ops/tensor_core.cuh), run by the CPU harness with the mma emulated over the 32 lanes' fragments, placed
by the same layout functions the kernel's loads and stores use.

What is checked: the TF32 codes equal a float64 reference that rounds the first layer's operands to TF32 as
cvt.rna does (so the tiling, the K padding, the fragment indexing and the bias / activation are right, on every
warp and block edge); the rest of the pipeline is the exact path's; labels agree with fp32 on >= 99.9% of
kernels, and rows near a decision, recomputed with the exact first layer, are fp32's to the bit.  What only a
device can check -- that the layout functions match the hardware's -- is in tests/gpu/ and the runtime check
(kernelatlas.gpu.tf32_check).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as R
import torch
from test_assign import calibrated as calibrated_model
from test_cuda_harness import DIMS, DTYPES, ROWS, harness_model

H = pytest.importorskip("kernelatlas._cuda_harness", reason="the CUDA harness extension is not built")

AGREEMENT = 0.999


def to_tf32(a: np.ndarray) -> np.ndarray:
    """float32 -> TF32 values (float32), to nearest with ties away from zero; Inf / NaN kept."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    special = (bits & 0x7F800000) == 0x7F800000
    out = np.where(special, bits, (bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).astype(np.uint32)
    return out.view(np.float32)


def tf32_reference_codes(x: np.ndarray, enc: torch.nn.Sequential) -> np.ndarray:
    """Codes with the first layer on TF32-rounded operands (exact products, float64 sums), the rest in float64;
    from the harness's own normalised rows (the GPU's normalise, tested against the CPU engine elsewhere)."""
    rows, _ = H.normalize(x)
    good = R.normalize(x).good
    w0 = enc[0].weight.detach().numpy().astype(np.float32)
    b0 = enc[0].bias.detach().numpy().astype(np.float32)
    pre = to_tf32(rows).astype(np.float64) @ to_tf32(w0).astype(np.float64).T + b0.astype(np.float64)
    codes = R.run_stack(enc[1:], pre)[:, 0] if len(x) else np.zeros(0)
    return np.where(good, codes, np.nan)


def test_tf32_rounding_matches_cvt_rna():
    # TF32 keeps 10 mantissa bits: its last bit at 1.0 is 2^-10, half of it 2^-11
    a = np.array([1.0, 1.0 + 2**-11, 1.0 + 2**-12, 1.0 + 3 * 2**-12, -(1.0 + 2**-11), np.finfo(np.float32).max, np.inf, -np.inf, 0.0,
                  1e-40], dtype=np.float32)
    got = to_tf32(a)
    # a tie rounds away from zero, less than half down, more than half up; the largest floats round to Inf
    np.testing.assert_array_equal(got[:5], np.float32([1.0, 1.0 + 2**-10, 1.0, 1.0 + 2**-10, -(1.0 + 2**-10)]))
    assert np.isinf(got[5]) and got[6] == np.inf and got[7] == -np.inf and got[8] == 0.0


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tf32_codes_match_the_tf32_reference(rows, d, dtype, make_autoencoder, make_kernels):
    model, enc, _ = make_autoencoder(d)
    x = make_kernels(rows, d, dtype, pattern_model=(d,))
    hm = harness_model(model)
    assert hm.tf32_applies
    codes, plan = hm.encode(x, precision="tf32")
    exact, _ = hm.encode(x)
    want = tf32_reference_codes(x, enc)
    np.testing.assert_array_equal(np.isnan(codes), np.isnan(want))
    good = ~np.isnan(want)
    tol = 1e-6 * R.conditioning(x, R.normalize(x))[good]
    assert np.all(np.abs(codes[good] - want[good]) <= tol)
    if rows >= 32:
        # the fp32 path is measurably farther from this reference: the TF32 rounding really happened
        assert np.median(np.abs(exact[good] - want[good])) > 4 * np.median(np.abs(codes[good] - want[good]))
    assert plan["threads"] == 128


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("decoder", ["segments", "mlp"])
def test_tf32_labels_agree_and_rechecked_rows_are_exact(d, decoder, make_autoencoder, make_kernels):
    model, _, _, _, threshold = calibrated_model(d, make_autoencoder, make_kernels)
    x = make_kernels(20011, d, pattern_model=(d,))
    hm = harness_model(model)
    l32, s32, c32, _ = hm.assign(x, threshold=threshold, decoder=decoder)
    raw = hm.assign(x, threshold=threshold, decoder=decoder, precision="tf32")[:3]
    live = ~np.isnan(c32)
    np.testing.assert_array_equal(np.isnan(raw[2]), ~live)  # dead / flat / non-finite rows alike
    assert np.all(raw[0][~live] == -1)
    assert np.abs(raw[2][live] - c32[live]).max() < 5e-3
    # margins as Autoencoder.tf32_margins derives them: twice the 90th percentile of the TF32 deviation
    dz = 2 * float(np.quantile(np.abs(raw[2][live] - c32[live]), 0.9))
    ds = 2 * float(np.quantile(np.abs(raw[1][live] - s32[live]), 0.9))
    labels, scores, codes, _ = hm.assign(x, threshold=threshold, decoder=decoder, precision="tf32", recheck_code=dz,
                                         recheck_score=ds)
    assert np.mean(labels == l32) >= AGREEMENT, np.mean(labels == l32)
    edges = np.array([e for iv in model.clusters for e in iv], dtype=np.float32)
    near = live & ((np.abs(raw[1] - np.float32(threshold)) <= ds) |
                   (np.abs(raw[2][:, None] - edges[None, :]) <= dz).any(axis=1))
    assert near.any()
    for got, want in zip((labels, scores, codes), (l32, s32, c32), strict=True):
        np.testing.assert_array_equal(got[near], want[near])  # recomputed exactly
    far = live & ~near
    np.testing.assert_array_equal(codes[far], raw[2][far])  # the others keep the TF32 result
    # and with margins that take in every row, the TF32 path gives fp32's outputs exactly
    every = hm.assign(x, threshold=threshold, decoder=decoder, precision="tf32", recheck_code=10.0,
                      recheck_score=10.0)[:3]
    for got, want in zip(every, (l32, s32, c32), strict=True):
        np.testing.assert_array_equal(got, want)


def test_tf32_is_the_same_for_every_launch_plan_and_thread_order(make_autoencoder, make_kernels):
    model = calibrated_model(25, make_autoencoder, make_kernels)[0]
    x = make_kernels(1025, 25, pattern_model=(25,))
    hm = harness_model(model)
    ref = hm.assign(x, threshold=0.5, precision="tf32")
    row_floats = 25 + 2 * max(L.weight.shape[0] for L in model.encoder) + 1
    for budget in (4 * row_floats * 65, 4 * row_floats * 33):  # 64 and 32 threads, model read from global memory
        got = hm.assign(x, threshold=0.5, precision="tf32", budget=budget)
        assert got[3]["threads"] < 128 and got[3]["stage_floats"] == 0
        for g, w in zip(got[:3], ref[:3], strict=True):
            np.testing.assert_array_equal(g, w)
    for order in ("reverse", "interleaved"):
        for g, w in zip(hm.assign(x, threshold=0.5, precision="tf32", order=order)[:3], ref[:3], strict=True):
            np.testing.assert_array_equal(g, w)


def test_single_layer_encoder_keeps_the_exact_path(make_autoencoder, make_kernels):
    model, _, _ = make_autoencoder(9, code_act="identity", hidden=())
    hm = harness_model(model)
    assert not hm.tf32_applies
    x = make_kernels(129, 9, pattern_model=(9,))
    for g, w in zip(hm.assign(x, threshold=0.5, precision="tf32"), hm.assign(x, threshold=0.5), strict=True):
        if isinstance(g, dict):
            assert g == w
        else:
            np.testing.assert_array_equal(g, w)


def test_precision_and_margins_are_checked(make_autoencoder, make_kernels):
    hm = harness_model(make_autoencoder(9)[0])
    x = make_kernels(10, 9)
    with pytest.raises(ValueError, match="precision on the GPU must be 'fp32' or 'tf32', got 'bf16'"):
        hm.assign(x, precision="bf16")
    with pytest.raises(ValueError, match="recheck_code must be finite and >= 0"):
        hm.assign(x, precision="tf32", recheck_code=-1.0)
    with pytest.raises(ValueError, match="recheck_score must be finite and >= 0"):
        hm.assign(x, precision="tf32", recheck_score=float("nan"))
