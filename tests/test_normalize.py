"""kernelatlas.normalize against the float64 reference: every ISA, thread count, size and input dtype, and the
kernels that must not break it (dead, flat, non-finite, [n, k, k], memmaps in and out)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R

import kernelatlas as ka

NORM_TOL = 1e-6  # normalised values, absolute, x conditioning (see reference.conditioning)


@R.memo_by_identity
def reference_for(x: np.ndarray, min_abs: float = 0.0) -> tuple[R.Normalized, np.ndarray]:
    norm = R.normalize(x, min_abs)
    return norm, R.conditioning(x, norm)


def check_normalized(x: np.ndarray, out: np.ndarray, norms: np.ndarray, min_abs: float = 0.0) -> None:
    ref, cond = reference_for(x, min_abs)
    n = len(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert norms.dtype == np.float32 and norms.shape == (n,)
    rows = out.reshape(ref.rows.shape)
    err = np.abs(rows - ref.rows).max(axis=1, initial=0.0)
    bad = np.flatnonzero(~(err <= NORM_TOL * cond))
    assert bad.size == 0, f"{bad.size} rows off, e.g. row {bad[:5]}: err {err[bad[:5]]}"
    # dead / flat / non-finite rows are exact zeros with norm 0 (NaN when non-finite)
    assert np.all(rows[~ref.good] == 0.0)
    np.testing.assert_array_equal(np.isnan(norms), ref.nonfinite)
    assert np.all(norms[ref.dead | ref.flat] == 0.0)
    rel = np.abs(norms[ref.good] / ref.norms[ref.good] - 1.0)
    off = np.flatnonzero(~(rel <= NORM_TOL * cond[ref.good]))
    assert off.size == 0, f"{off.size} norms off, e.g. relative errors {rel[off[:5]]}"


def test_normalize_matches_reference(isa, threads, rows, d, dtype, make_kernels):
    x = make_kernels(rows, d, dtype)
    out, norms = ka.normalize(x, threads=threads)
    check_normalized(x, out, norms)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_kkk_input_keeps_its_shape(isa, n, make_kernels):
    x = make_kernels(n, 25, specials=False)
    out3, norms3 = ka.normalize(x.reshape(n, 5, 5))
    out2, norms2 = ka.normalize(x)
    assert out3.shape == (n, 5, 5)
    np.testing.assert_array_equal(out3.reshape(n, 25), out2)
    np.testing.assert_array_equal(norms3, norms2)


@pytest.mark.parametrize("d", [9, 49])
def test_zero_and_one_rows(isa, d):
    out, norms = ka.normalize(np.zeros((0, d), np.float32))
    assert out.shape == (0, d) and norms.shape == (0,)
    x = np.arange(d, dtype=np.float32)[None]
    out, norms = ka.normalize(x)
    check_normalized(x, out, norms)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dead_flat_and_nonfinite_rows_do_not_touch_their_neighbours(isa, threads, dtype, make_kernels):
    # the special rows sit around the 64-row tile boundaries and in both halves of a 2-thread run
    n, d = 5000, 9
    x = np.array(make_kernels(n, d, dtype, specials=False, seed=3))
    specials = {
        0: 0.0,
        62: np.nan,
        63: np.inf,
        64: -np.inf,
        65: 1.5,  # constant
        127: 0.0,
        128: -0.25,
        2500: np.nan,
        4999: np.inf,
    }
    for r, v in specials.items():
        if np.isfinite(v):
            x[r] = v
        else:
            x[r, r % d] = v
    x[3000] = np.nan
    x[3001, :] = [np.inf, -np.inf] * 4 + [np.nan]
    out, norms = ka.normalize(x, threads=threads)
    check_normalized(x, out, norms)
    clean = np.delete(x, [*specials, 3000, 3001], axis=0)
    out_clean, norms_clean = ka.normalize(clean, threads=threads)
    keep = np.setdiff1d(np.arange(n), [*specials, 3000, 3001])
    np.testing.assert_array_equal(out[keep], out_clean)
    np.testing.assert_array_equal(norms[keep], norms_clean)
    assert np.isnan(norms[[62, 63, 64, 2500, 4999, 3000, 3001]]).all()
    assert (norms[[0, 65, 127, 128]] == 0).all()


@pytest.mark.parametrize("value", [1e-6, 0.37, -2.5, 1000.0, 65504.0])
@pytest.mark.parametrize("d", [9, 25, 49])
def test_constant_kernels_are_flat(isa, value, d):
    x = np.full((3, d), value, np.float32)
    out, norms = ka.normalize(x)
    assert np.all(out == 0) and np.all(norms == 0)


def test_near_flat_kernel_is_kept(isa):
    # a constant kernel with one entry off by 1e-3 of its value: centred norm ~1e-3 x max|w| >> 1e-5
    x = np.full((1, 9), 2.0, np.float32)
    x[0, 4] += 2e-3
    out, norms = ka.normalize(x)
    check_normalized(x, out, norms)
    assert norms[0] > 0


@pytest.mark.parametrize("min_abs", [0.0, 1e-3, 0.5])
def test_min_abs_marks_small_kernels_dead(isa, threads, min_abs, make_kernels):
    x = np.array(make_kernels(2000, 9, specials=False, seed=5))
    x[::7] *= 1e-3  # every 7th kernel has max|w| of a few 1e-3
    x[::11] *= 0.2
    out, norms = ka.normalize(x, min_abs=min_abs, threads=threads)
    check_normalized(x, out, norms, min_abs)
    ref = R.normalize(x, min_abs)
    expected_dead = np.abs(x).max(axis=1) <= np.float32(min_abs)
    np.testing.assert_array_equal(ref.dead, expected_dead)
    if min_abs > 0:
        assert expected_dead.any() and not expected_dead.all()


def test_min_abs_is_inclusive(isa):
    # dead means all |w| <= min_abs: a kernel whose max|w| equals min_abs is dead, one just above is not
    x = np.array([[0.5, -0.25, 0.1, 0, 0, 0, 0, 0, 0]] * 2, np.float32)
    x[1, 0] = np.nextafter(np.float32(0.5), np.float32(1))
    out, norms = ka.normalize(x, min_abs=0.5)
    assert norms[0] == 0 and np.all(out[0] == 0)
    assert norms[1] > 0


def test_preallocated_outputs_are_returned(isa, make_kernels):
    x = make_kernels(1025, 25)
    out = np.full(x.shape, 7.0, np.float32)
    norms = np.full(len(x), 7.0, np.float32)
    got_out, got_norms = ka.normalize(x, out=out, norms=norms)
    assert got_out is out and got_norms is norms
    check_normalized(x, out, norms)


@pytest.mark.parametrize("d", [9, 25, 49])
@pytest.mark.parametrize("offset", [0, 1, 3, 15])
@pytest.mark.parametrize("rows", [1000, 180_001])
def test_outputs_at_any_alignment_and_nothing_outside_them(isa, threads, d, offset, rows, make_kernels):
    # the engine streams large outputs of rows with d >= 16 out past the cache, whole 64-byte lines only
    # (kStreamMinDim, kStreamMinFloats = 2^22 in cpp/src/isa/tile_impl.h: 180,001 rows x 25 or 49 are above it,
    # 1,000 rows below): an output view that starts inside a line, a partial last tile, and the floats just before
    # and after the view that it must not touch
    x = make_kernels(rows, d)
    backing = np.full(offset + x.size + 17, 7.0, np.float32)
    out = backing[offset : offset + x.size].reshape(x.shape)
    norms = np.full(len(x), 7.0, np.float32)
    got_out, _ = ka.normalize(x, out=out, norms=norms, threads=threads)
    assert got_out is out
    check_normalized(x, out, norms)
    assert np.all(backing[:offset] == 7.0) and np.all(backing[offset + x.size :] == 7.0)
    expected, _ = ka.normalize(x, threads=threads)
    np.testing.assert_array_equal(out, expected)


def test_memmap_in_and_out(isa, threads, tmp_path, make_kernels):
    x = make_kernels(5000, 49, np.float16)
    np.save(tmp_path / "kernels.npy", x)
    x_map = np.load(tmp_path / "kernels.npy", mmap_mode="r")
    assert not x_map.flags.writeable
    out = np.memmap(tmp_path / "normalized.f32", dtype=np.float32, mode="w+", shape=x.shape)
    norms = np.memmap(tmp_path / "norms.f32", dtype=np.float32, mode="w+", shape=(len(x),))
    got_out, got_norms = ka.normalize(x_map, out=out, norms=norms, threads=threads)
    assert got_out is out and got_norms is norms
    out.flush()
    norms.flush()
    expected_out, expected_norms = ka.normalize(x, threads=threads)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "normalized.f32", np.float32).reshape(x.shape), expected_out)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "norms.f32", np.float32), expected_norms)
    check_normalized(x, got_out, got_norms)


def test_isa_paths_agree(make_kernels):
    # every path gives the same results to fp32 rounding (set_isa's promise), here on one batch
    x = make_kernels(1025, 49, pattern_model=(49,))
    results = []
    for name in ka.build_info()["isa_supported"]:
        previous = ka.set_isa(name)
        try:
            results.append(ka.normalize(x))
        finally:
            ka.set_isa(previous)
    for out, norms in results[1:]:
        np.testing.assert_allclose(out, results[0][0], atol=2e-6)
        np.testing.assert_allclose(norms, results[0][1], rtol=2e-6)


# ---------------------------------------------------------------------------------------------- extreme magnitudes
# Regression tests: normalize_tile once summed x and (x - mean)^2 in float32 without scaling by max|w| first, so
# kernels of |w| >~ 1e19 normalised to zero rows (or NaN past 1e37) and kernels of |w| <~ 1e-19 were called flat.
# The flat rule (centred norm <= 1e-5 x max|w|) is scale-invariant, and so must the engine be: it now scales by
# max|w| before squaring.  fp16 input cannot reach these magnitudes.
PATTERN = np.array([[0.3, -1.2, 0.8, 0.1, -0.4, 0.9, -0.7, 0.2, 0.5]])


@pytest.mark.parametrize("scale", [1e-30, 1e20, 1e37])
def test_extreme_magnitude_kernels_are_normalised(isa, scale):
    x = (PATTERN * scale).astype(np.float32)
    out, norms = ka.normalize(x)
    ref = R.normalize(x)
    assert ref.good[0]
    np.testing.assert_allclose(out, ref.rows, atol=NORM_TOL)
    np.testing.assert_allclose(norms, ref.norms, rtol=NORM_TOL)


@pytest.mark.parametrize("value", [3e38])
def test_huge_constant_kernels_are_flat(isa, value):
    out, norms = ka.normalize(np.full((1, 49), value, np.float32))
    assert np.all(out == 0) and np.all(norms == 0), (out[0, :3], norms)
