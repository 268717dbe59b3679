"""Property tests (hypothesis): what must hold for any batch of kernels, not just the random ones of the
matrix tests -- unit rows or flagged zero rows, invariance to scaling and shifting, no exception and label -1
for NaN / Inf / zero kernels, labels always in range.  They run on the default ISA (the matrix tests cover
the paths) and keep their example counts small so that the suite stays fast."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference as R
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import kernelatlas as ka

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Magnitudes 1e-30..1e30, past the 1e+-19 where a float32 sum of squares over/underflows (the engine scales
# by max|w| first; test_normalize.py has the regression tests); scaling/shifting tests stay below float32's max.
_magnitude = st.floats(2.0**-100, 2.0**100, width=32)
finite = st.one_of(st.just(0.0), _magnitude, _magnitude.map(lambda v: -v))
special = st.sampled_from([0.0, np.nan, np.inf, -np.inf])


@st.composite
def kernel_batches(draw, elements=finite, max_rows: int = 80):
    d = draw(st.sampled_from([9, 25, 49]))
    n = draw(st.integers(0, max_rows))
    x = draw(arrays(np.float32, (n, d), elements=elements))
    # some rows constant (flat) or zero (dead)
    for r in draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=4)) if n else []:
        x[r] = draw(st.sampled_from([0.0, 1.0, -3.5, 1e4]))
    return x


@st.composite
def batches_with_special_rows(draw):
    x = draw(kernel_batches(max_rows=70))
    n, d = x.shape
    rows = sorted(set(draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=8)))) if n else []
    for r in rows:
        kind = draw(st.sampled_from(["zero", "nan", "inf", "-inf", "all-nan", "mixed"]))
        if kind == "zero":
            x[r] = 0.0
        elif kind == "all-nan":
            x[r] = np.nan
        elif kind == "mixed":
            x[r, draw(st.integers(0, d - 1))] = np.nan
            x[r, draw(st.integers(0, d - 1))] = np.inf
        else:
            x[r, draw(st.integers(0, d - 1))] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
    return x, np.array(rows, np.int64)


@SETTINGS
@given(kernel_batches())
def test_rows_are_unit_and_centred_or_flagged_zero(x):
    out, norms = ka.normalize(x, threads=1)
    ref = R.normalize(x)
    good = norms > 0
    assert np.all(out[~good] == 0)
    assert np.all((norms[~good] == 0) | np.isnan(norms[~good]))
    np.testing.assert_array_equal(np.isnan(norms), ref.nonfinite)
    if good.any():
        cond = R.conditioning(x, ref)[good]
        assert np.all(np.abs(out[good].astype(np.float64).mean(axis=1)) <= 1e-6 * cond)
        assert np.all(np.abs(np.linalg.norm(out[good].astype(np.float64), axis=1) - 1) <= 1e-5)
    # the engine's flag is the reference's, except for kernels within 2x of the flat threshold
    amax = np.abs(np.nan_to_num(x.astype(np.float64), nan=0, posinf=0, neginf=0)).max(axis=1, initial=0)
    centred = R.as_rows(x) - R.as_rows(x).mean(axis=1, keepdims=True) if len(x) else np.zeros((0, 1))
    ratio = np.linalg.norm(centred, axis=1) / np.where(amax > 0, amax, 1)
    boundary = (ratio > 0.5e-5) & (ratio < 2e-5)
    np.testing.assert_array_equal(good[~boundary], ref.good[~boundary])


@SETTINGS
@given(
    kernel_batches(max_rows=40),
    st.floats(1e-3, 1e3),
    st.floats(-100, 100),
)
# found by CI: a one-entry 1e-9 kernel next to a shift of 50 is constant in fp32
@example(np.array([[0] * 8 + [1e-9], range(9)], np.float32), 2.0, 50.0)
def test_invariant_to_positive_scaling_and_shifting(x, scale, shift):
    ref = R.normalize(x)
    cond = R.conditioning(x, ref)
    keep = ref.good & (cond < 1e3)  # not near-flat: the shift below must not swamp the pattern in fp32
    assume(keep.any())
    x, cond = x[keep], cond[keep]
    y = (x.astype(np.float64) * scale + shift).astype(np.float32)
    # A shift can swamp a pattern whose spread is below one fp32 ulp of the shift: y is then constant as
    # stored, so there is nothing left to be invariant to -- the engine must call such rows flat.
    constant = np.ptp(y, axis=1) == 0
    if constant.any():
        nc, norms_c = ka.normalize(y[constant], threads=1)
        assert np.all(nc == 0) and np.all(norms_c == 0)
    ref_y = R.normalize(y)
    survived = ref_y.good
    assume(survived.any())
    x, cond, y = x[survived], cond[survived], y[survived]
    cond_y = R.conditioning(y, R.normalize(y))
    ny, _ = ka.normalize(y, threads=1)
    nx, _ = ka.normalize(x, threads=1)
    sx, _ = ka.normalize((x.astype(np.float64) * scale).astype(np.float32), threads=1)
    err = np.abs(ny - nx).max(axis=1)
    # both sides carry ~1e-7 x conditioning of fp32 rounding (the input's own rounding included)
    assert np.all(err <= 2e-6 * (cond + cond_y)), err.max()
    assert np.all(np.abs(sx - nx).max(axis=1) <= 2e-6 * cond)


@pytest.fixture(scope="module")
def model9(make_autoencoder):
    model, _, _ = make_autoencoder(9)
    return model


@pytest.fixture(scope="module")
def model25(make_autoencoder):
    model, _, _ = make_autoencoder(25)
    return model


@pytest.fixture(scope="module")
def model49(make_autoencoder):
    model, _, _ = make_autoencoder(49)
    return model


@SETTINGS
@given(batches_with_special_rows(), st.floats(-1, 1), st.sampled_from(["auto", "mlp"]))
def test_nonfinite_and_zero_kernels_never_raise_and_get_minus_one(model9, model25, model49, batch, threshold, decoder):
    x, rows = batch
    model = {9: model9, 25: model25, 49: model49}[x.shape[1]].with_clusters([(-10.0, 0.47), (0.47, 10.0)])
    labels, scores, codes = ka.assign(x, model, threshold=threshold, threads=1, decoder=decoder)
    assert np.all(labels[rows] == -1) and np.all(scores[rows] == 0) and np.isnan(codes[rows]).all()
    ref = R.normalize(x)
    assert np.all(labels[~ref.good] == -1) and np.isnan(codes[~ref.good]).all()
    prototypes = np.random.default_rng(0).standard_normal((5, x.shape[1])).astype(np.float32)
    plabels, pscores = ka.assign_prototypes(x, prototypes, threshold=threshold, threads=1)
    assert np.all(plabels[rows] == -1) and np.all(pscores[rows] == 0)
    assert np.isfinite(scores).all() and np.isfinite(pscores).all()


@st.composite
def interval_sets(draw):
    edges = sorted(set(draw(st.lists(st.floats(0.375, 0.625, width=32), min_size=2, max_size=12))))
    assume(len(edges) >= 2)
    pairs = list(itertools.pairwise(edges))
    keep = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    intervals = [p for p, k in zip(pairs, keep, strict=True) if k]
    assume(intervals)
    return intervals


@SETTINGS
@given(kernel_batches(elements=st.floats(width=32, allow_nan=True, allow_infinity=True)), interval_sets(), st.floats(-1, 1))
def test_labels_are_in_range(model9, model25, model49, x, intervals, threshold):
    model = {9: model9, 25: model25, 49: model49}[x.shape[1]].with_clusters(intervals)
    labels, scores, codes = ka.assign(x, model, threshold=threshold, threads=1)
    assert labels.dtype == np.int16
    assert np.all((labels >= -1) & (labels < len(intervals)))
    labelled = labels >= 0
    assert np.all(scores[labelled] >= np.float32(threshold))
    lo = np.array([a for a, _ in intervals], np.float32)[labels[labelled]]
    hi = np.array([b for _, b in intervals], np.float32)[labels[labelled]]
    assert np.all((codes[labelled] >= lo) & (codes[labelled] <= hi))
    prototypes = np.random.default_rng(1).standard_normal((7, x.shape[1])).astype(np.float32)
    plabels, _ = ka.assign_prototypes(x, prototypes, threshold=threshold, threads=1)
    assert np.all((plabels >= -1) & (plabels < 7))
