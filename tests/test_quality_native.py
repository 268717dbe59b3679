"""_core.layer_stats, coef_range and coef_histograms (the CNN Filter DB per-layer statistics, issue 5) against
plain numpy float64 references: counts, sparsity and max|w| exactly; sums and Gram matrices to the documented
accuracy; histogram bins exactly (coefficients are float64 on every path).  Edge cases: empty inputs and
segments, odd sizes, NaN/Inf and all-zero rows, all-zero and identical layers, segments longer than one work
item (2^18 rows), every ISA, 1 and 2 threads (bit-identical), segment order, and every argument check."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R

import kernelatlas
from kernelatlas import _core

PIECE = 1 << 18  # rows per native work item (kQualityPieceRows): longer segments take the multi-piece path
GRAM_RTOL = 1e-6  # of sqrt(G_ii G_jj) >= sum |w_i w_j| (quality.h: fp32 partials over 64 rows per lane)
SPARSE_RTOL = 1e-12  # the sparse rows' moments are float64 sums (quality.h), only the order differs


# ---------------------------------------------------------------------------------------------- references


# ---------------------------------------------------------------------------------------------- data


def kernels(n: int, d: int, dtype, seed: int = 0, specials: bool = True) -> np.ndarray:
    """Random kernels on the scales of trained filters, with NaN/Inf, all-zero, tiny and huge rows."""
    rng = np.random.default_rng([seed, n, d])
    x = rng.standard_normal((n, d)) * rng.uniform(0.01, 1.0, (n, 1)) + rng.normal(0.0, 0.05, (n, 1))
    if specials and n >= 8:
        x[1] = 0.0
        x[2, d // 2] = np.nan
        x[3, 0] = np.inf
        x[4, -1] = -np.inf
        x[5] = 1e-3 * rng.standard_normal(d)  # sparse next to the big rows
        x[6] = x[0]  # a duplicate
    return np.ascontiguousarray(x.astype(dtype))


def segments(rng: np.random.Generator, n: int, count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """count random segments of [0, n), some empty, plus the whole range."""
    cuts = np.sort(rng.integers(0, n + 1, count))
    starts = np.concatenate([[0], cuts, [0]])
    stops = np.concatenate([cuts, [n], [n]])
    return starts.astype(np.int64), stops.astype(np.int64)


def check_stats(got: dict, ref: dict, exact_scaled_sums: bool = False) -> None:
    assert set(got) == set(R.LAYER_STATS_KEYS)
    for k in ("n", "nonfinite", "zeros", "sparse"):
        assert got[k].dtype == np.int64
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    np.testing.assert_array_equal(got["max_abs"], ref["max_abs"])
    for tag in ("", "_scaled"):
        g, r = got["gram" + tag], ref["gram" + tag]
        diag = np.sqrt(np.einsum("lii->li", r))
        scale = diag[:, :, None] * diag[:, None, :]
        assert np.all(np.abs(g - r) <= GRAM_RTOL * scale + 1e-300), f"gram{tag}"
        np.testing.assert_array_equal(g, np.swapaxes(g, 1, 2))  # exactly symmetric
        s, rs = got["sum" + tag], ref["sum" + tag]
        assert np.all(np.abs(s - rs) <= GRAM_RTOL * ref["abs_sum" + tag] + 1e-300), f"sum{tag}"
    g, r = got["gram_sparse"], ref["gram_sparse"]
    assert np.all(np.abs(g - r) <= SPARSE_RTOL * ref["abs_gram_sparse"]), "gram_sparse"
    np.testing.assert_array_equal(g, np.swapaxes(g, 1, 2))
    s, rs = got["sum_sparse"], ref["sum_sparse"]
    assert np.all(np.abs(s - rs) <= SPARSE_RTOL * ref["abs_sum_sparse"]), "sum_sparse"


def layer_stats(x, starts, stops, **kw) -> dict:
    return _core.layer_stats(x, np.asarray(starts, np.int64), np.asarray(stops, np.int64), **kw)


# ---------------------------------------------------------------------------------------------- layer_stats


@pytest.mark.parametrize("n", [0, 1, 7, 8, 1025, 4097])
@pytest.mark.parametrize("d", [9, 25, 49])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_layer_stats_matches_numpy(isa, n, d, dtype):
    x = kernels(n, d, dtype)
    starts, stops = segments(np.random.default_rng(n + d), n)
    got = layer_stats(x, starts, stops, threads=1)
    check_stats(got, R.layer_stats(x, starts, stops))


@pytest.mark.parametrize("d", [1, 2, 4, 9, 16, 17, 33, 64])  # around the SIMD widths, and the limits
def test_layer_stats_any_kernel_size(isa, d):
    x = kernels(301, d, np.float32)
    starts, stops = np.array([0, 5, 300], np.int64), np.array([301, 290, 301], np.int64)
    check_stats(layer_stats(x, starts, stops), R.layer_stats(x, starts, stops))


def test_layer_stats_square_kernels_equal_flat():
    x = kernels(500, 25, np.float16)
    starts, stops = np.array([0, 100], np.int64), np.array([500, 101], np.int64)
    a, b = layer_stats(x.reshape(500, 5, 5), starts, stops), layer_stats(x, starts, stops)
    for k in R.LAYER_STATS_KEYS:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_multi_piece_segments_threads_and_isas_bit_identical(dtype):
    """Segments longer than one work item (2^18 rows: pieces combined in order, sparse rows counted in a second
    pass) next to short ones; 1 and 2 threads and every ISA give the same bits."""
    n = PIECE + 40_000
    x = kernels(n, 9, dtype, seed=3)
    starts = np.array([0, 7, PIECE - 5, 1000, n], np.int64)
    stops = np.array([n, PIECE + 9, n, 1000, n], np.int64)
    ref = R.layer_stats(x, starts, stops)
    results = []
    for name in kernelatlas.build_info()["isa_supported"]:
        if name == "scalar":
            continue  # ~50x slower; covered by the smaller cross-ISA test below
        previous = kernelatlas.set_isa(name)
        try:
            for threads in (1, 2):
                results.append(layer_stats(x, starts, stops, threads=threads))
        finally:
            kernelatlas.set_isa(previous)
    check_stats(results[0], ref)
    for other in results[1:]:
        for k in R.LAYER_STATS_KEYS:
            np.testing.assert_array_equal(other[k], results[0][k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("d", [9, 25, 49])
def test_sparse_moments_of_mostly_sparse_layers(dtype, d):
    """Layers where a third to all of the rows are sparse (degenerate layers of CNN Filter DB): the sparse rows'
    moments (what entropy_clean subtracts) match numpy, in one piece and across pieces, and do not depend on
    the thread count; neighbouring segments share cache lines of the outputs."""
    rng = np.random.default_rng(d)
    n = PIECE + 3001 if d == 9 else 20_000
    x = rng.standard_normal((n, d))
    sparse = rng.random(n) < np.where(np.arange(n) < n // 2, 0.35, 0.999)
    x[sparse] *= 1e-3
    x[[0, n // 2]] = 50.0  # one big row in each half keeps the others sparse
    x = np.ascontiguousarray(x.astype(dtype))
    cuts = np.sort(rng.integers(1, n, 30))
    starts = np.concatenate([[0, 0, n // 2], cuts[:-1]]).astype(np.int64)
    stops = np.concatenate([[n, n // 2, n], cuts[1:]]).astype(np.int64)
    ref = R.layer_stats(x, starts, stops)
    assert ref["sparse"][0] > n // 2  # the case this test is about
    one, two = (layer_stats(x, starts, stops, threads=t) for t in (1, 2))
    check_stats(one, ref)
    for k in R.LAYER_STATS_KEYS:
        np.testing.assert_array_equal(two[k], one[k], err_msg=k)


@pytest.mark.parametrize("d", [9, 25, 49])
def test_isas_bit_identical(d):
    x = kernels(5000, d, np.float16, seed=4)
    starts, stops = segments(np.random.default_rng(d), len(x))
    results = {}
    for name in kernelatlas.build_info()["isa_supported"]:
        previous = kernelatlas.set_isa(name)
        try:
            results[name] = layer_stats(x, starts, stops, threads=2)
        finally:
            kernelatlas.set_isa(previous)
    first = next(iter(results.values()))
    for name, got in results.items():
        for k in R.LAYER_STATS_KEYS:
            np.testing.assert_array_equal(got[k], first[k], err_msg=f"{name} {k}")


def test_threads_bit_identical(threads):
    x = kernels(60_001, 9, np.float32, seed=5)
    starts, stops = segments(np.random.default_rng(5), len(x), count=20)
    got = layer_stats(x, starts, stops, threads=threads)
    one = layer_stats(x, starts, stops, threads=1)
    for k in R.LAYER_STATS_KEYS:
        np.testing.assert_array_equal(got[k], one[k], err_msg=k)


def test_segment_order_does_not_matter():
    x = kernels(30_000, 9, np.float16, seed=6)
    starts, stops = segments(np.random.default_rng(6), len(x), count=12)
    perm = np.random.default_rng(7).permutation(len(starts))
    a = layer_stats(x, starts, stops, threads=2)
    b = layer_stats(x, starts[perm], stops[perm], threads=2)
    for k in R.LAYER_STATS_KEYS:
        np.testing.assert_array_equal(b[k], a[k][perm], err_msg=k)


def test_results_depend_only_on_the_segment_rows():
    """A layer's statistics are the same wherever it sits in x (blocks are counted from the segment start)."""
    layer = kernels(3000, 9, np.float32, seed=8)
    padded = np.concatenate([kernels(777, 9, np.float32, seed=9), layer])
    a = layer_stats(layer, [0], [3000])
    b = layer_stats(padded, [777], [3777])
    for k in R.LAYER_STATS_KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_all_zero_layer_is_fully_sparse():
    x = np.zeros((50, 9), np.float16)
    x[7, 3] = np.nan  # a non-finite row counts only as non-finite
    got = layer_stats(x, [0, 10], [50, 10])
    assert got["n"].tolist() == [49, 0]
    assert got["nonfinite"].tolist() == [1, 0]
    assert got["zeros"].tolist() == [49, 0]
    assert got["max_abs"].tolist() == [0.0, 0.0]
    assert got["sparse"].tolist() == [49, 0]  # S = 1 by the max_abs == 0 rule; an empty layer has none
    for k in ("sum", "gram", "sum_scaled", "gram_scaled"):
        assert not got[k].any()


def test_all_nonfinite_layer():
    x = np.full((20, 9), np.inf, np.float32)
    got = layer_stats(x, [0], [20])
    assert got["n"].tolist() == [0] and got["nonfinite"].tolist() == [20] and got["sparse"].tolist() == [0]
    assert got["max_abs"].tolist() == [0.0] and not got["gram"].any()


def test_identical_kernels():
    w = np.array([0.5, -0.25, 0.125, 1.0, -2.0, 0.75, 0.0, 0.0625, -1.5], np.float32)
    x = np.tile(w, (3000, 1))
    got = layer_stats(x, [0], [3000])
    # exact: every product and partial sum is a short binary fraction
    np.testing.assert_array_equal(got["gram"][0], 3000 * np.outer(w, w).astype(np.float64))
    np.testing.assert_array_equal(got["sum"][0], 3000 * w.astype(np.float64))
    np.testing.assert_array_equal(got["sum_scaled"][0], 3000 * (w / 2.0).astype(np.float64))
    assert got["sparse"][0] == 0 and got["zeros"][0] == 0 and got["max_abs"][0] == 2.0


def test_sparse_threshold_is_exact():
    """|w| < 0.01 * max|w| compared as float64 does, for values next to the threshold."""
    t = np.float32(0.01)  # 0.00999999977648258 < 0.01 (float64)
    rows = [np.float32(1.0), t, np.nextafter(t, np.float32(1)), np.nextafter(t, np.float32(0)), np.float32(0.0)]
    x = np.zeros((len(rows), 9), np.float32)
    x[:, 4] = rows
    x[1:, 0] = -x[1:, 4]  # negative entries count by magnitude
    got = layer_stats(x, [0], [len(rows)])
    ref = R.layer_stats(x, np.array([0]), np.array([len(rows)]))
    assert got["sparse"][0] == ref["sparse"][0] == 3  # t, the one below it, and the zero row


def test_subnormal_and_huge_rows_scale_without_overflow():
    x = np.zeros((40, 9), np.float32)
    x[:10, 2] = 1e-40  # fp32 subnormals: 1 / max|w| overflows without the rescaling step
    x[10:20, 5] = -3e15  # (fp32 Gram partials hold products up to ~3e38: |w| up to ~1e19)
    x[20:30] = np.random.default_rng(0).standard_normal((10, 9))
    x[30:] = 1e-38
    got = layer_stats(x, [0], [40])
    ref = R.layer_stats(x, np.array([0]), np.array([40]))
    check_stats(got, ref)
    assert np.isfinite(got["gram_scaled"]).all()


def test_no_segments_and_empty_input():
    got = layer_stats(np.zeros((0, 9), np.float16), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert got["gram"].shape == (0, 9, 9) and got["sum"].shape == (0, 9) and got["n"].shape == (0,)
    got = layer_stats(np.zeros((0, 3, 3), np.float32), [0, 0], [0, 0])
    assert got["n"].tolist() == [0, 0] and got["gram"].shape == (2, 9, 9)


# ---------------------------------------------------------------------------------------------- coefficients


def pca_basis(d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return np.full(d, -0.04), np.ascontiguousarray(q[:k])


@pytest.mark.parametrize("d,k", [(9, 9), (9, 3), (25, 5), (49, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("scale", [True, False])
def test_coef_range_matches_numpy(isa, d, k, dtype, scale):
    x = kernels(2001, d, dtype, seed=10)
    mean, basis = pca_basis(d, k)
    starts, stops = np.array([0, 100, 1500], np.int64), np.array([50, 1400, 2001], np.int64)
    lo, hi = _core.coef_range(x, starts, stops, mean, basis, scale_maxabs=scale)
    c, finite = R.pca_coefficients(x, mean, basis, scale)
    rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
    rows = rows[finite[rows]]
    np.testing.assert_allclose(lo, c[rows].min(axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hi, c[rows].max(axis=0), rtol=1e-12, atol=1e-14)


def test_coef_range_without_rows():
    mean, basis = pca_basis(9, 4)
    lo, hi = _core.coef_range(np.full((3, 9), np.nan, np.float32), np.array([0, 1], np.int64),
                              np.array([3, 1], np.int64), mean, basis)
    assert np.all(lo == np.inf) and np.all(hi == -np.inf)


@pytest.mark.parametrize("n", [0, 1, 7, 4097])
@pytest.mark.parametrize("d,k", [(9, 9), (25, 4), (49, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_coef_histograms_match_numpy(isa, n, d, k, dtype):
    x = kernels(n, d, dtype, seed=11)
    mean, basis = pca_basis(d, k, seed=1)
    rng = np.random.default_rng(12)
    starts, stops = segments(rng, n)
    groups = rng.integers(-1, 3, len(starts)).astype(np.int32)
    # a range narrower than the data: the tails land in the edge bins
    lo, hi = np.full(k, -0.8), np.full(k, 0.9)
    got = _core.coef_histograms(x, starts, stops, groups, 3, mean, basis, lo, hi, bins=70)
    ref, n_near = R.coef_histograms(x, starts, stops, groups, 3, mean, basis, lo, hi, 70, True)
    assert n_near == 0  # no coefficient within 1e-9 bins of an edge: the two must agree exactly
    assert got.dtype == np.int64 and got.shape == (3, k, 70)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("scale", [True, False])
def test_coef_histograms_threads_isas_and_groups(scale):
    n = PIECE + 5000
    x = kernels(n, 9, np.float16, seed=13)
    mean, basis = pca_basis(9, 9, seed=2)
    starts = np.array([0, 10, 3000, PIECE, 0], np.int64)
    stops = np.array([n, 2000, 3000, n, 0], np.int64)
    groups = np.array([1, 0, 2, -1, 0], np.int32)
    lo, hi = _core.coef_range(x, starts, stops, mean, basis, scale_maxabs=scale)
    results = []
    for name in kernelatlas.build_info()["isa_supported"]:
        if name == "scalar":
            continue
        previous = kernelatlas.set_isa(name)
        try:
            for threads in (1, 2):
                results.append(_core.coef_histograms(x, starts, stops, groups, 4, mean, basis, lo, hi, bins=70,
                                                     scale_maxabs=scale, threads=threads))
        finally:
            kernelatlas.set_isa(previous)
    ref, n_near = R.coef_histograms(x, starts, stops, groups, 4, mean, basis, lo, hi, 70, scale)
    assert n_near == 0  # lo and hi are attained exactly (t = 0 and 70), where clamping decides
    np.testing.assert_array_equal(results[0], ref)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    assert not results[0][3].any()  # group 3 holds no segment
    finite = np.isfinite(x.astype(np.float32)).all(axis=1)
    assert results[0][1].sum(axis=1).tolist() == [int(finite.sum())] * 9


def test_coef_histogram_edges_and_clamping():
    """Exactly representable coefficients: an edge value opens its bin, hi itself and everything above land in
    the last bin, everything below lo in the first."""
    values = np.array([-5.0, 0.0, 0.2499, 0.25, 0.5, 0.9999, 1.0, 7.0], np.float32)
    x = np.zeros((len(values), 9), np.float32)
    x[:, 0] = values
    basis = np.eye(9)[:1]
    got = _core.coef_histograms(x, np.array([0], np.int64), np.array([len(values)], np.int64),
                                np.array([0], np.int32), 1, np.zeros(9), basis, [0.0], [1.0], bins=4,
                                scale_maxabs=False)
    # bins [0, .25) [.25, .5) [.5, .75) [.75, 1]: -5, 0, .2499 | .25 | .5 | .9999, 1, 7
    assert got[0, 0].tolist() == [3, 1, 1, 3]


def test_coef_histograms_scaled_rows_match_scaling_by_hand():
    x = kernels(3000, 9, np.float32, seed=14, specials=False)
    m = np.abs(x).max(axis=1, keepdims=True)
    mean, basis = pca_basis(9, 9, seed=3)
    args = (np.array([0], np.int64), np.array([3000], np.int64), np.array([0], np.int32), 1, mean, basis,
            np.full(9, -1.5), np.full(9, 1.5))
    scaled = _core.coef_histograms(x, *args, scale_maxabs=True)
    by_hand = _core.coef_histograms((x / m).astype(np.float32), *args, scale_maxabs=False)
    # x / m rounded to float32 moves coefficients by ~1e-7: at most a few rows change bins
    assert np.abs(scaled - by_hand).sum() <= 20
    assert scaled.sum() == 9 * 3000


# ---------------------------------------------------------------------------------------------- argument checks


X9 = np.zeros((10, 9), np.float32)
S0, S1 = np.array([0], np.int64), np.array([10], np.int64)
MEAN, BASIS = np.zeros(9), np.eye(9)[:3]


def _calls(x, starts, stops):
    return {
        "layer_stats": lambda: _core.layer_stats(x, starts, stops),
        "coef_range": lambda: _core.coef_range(x, starts, stops, MEAN, BASIS),
        "coef_histograms": lambda: _core.coef_histograms(x, starts, stops, np.zeros(len(starts), np.int32), 1,
                                                         MEAN, BASIS, np.zeros(3), np.ones(3)),
    }


@pytest.mark.parametrize("call", ["layer_stats", "coef_range", "coef_histograms"])
@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.uint16, np.bool_])
def test_wrong_dtype_names_astype(call, dtype):
    with pytest.raises(TypeError, match=r"x must be float32 or float16, got \w+: convert it with x\.astype"):
        _calls(X9.astype(dtype), S0, S1)[call]()


@pytest.mark.parametrize("call", ["layer_stats", "coef_range", "coef_histograms"])
def test_non_contiguous_rejected(call):
    wide = np.zeros((10, 18), np.float32)
    with pytest.raises(ValueError, match=r"not C-contiguous.*np\.ascontiguousarray\(x\)"):
        _calls(wide[:, ::2], S0, S1)[call]()
    with pytest.raises(ValueError, match=r"not C-contiguous"):
        _calls(np.zeros((9, 10), np.float32).T, S0, S1)[call]()


@pytest.mark.parametrize("call", ["layer_stats", "coef_range", "coef_histograms"])
def test_bad_shapes_rejected(call):
    with pytest.raises(ValueError, match=r"shape \[n, k\*k\] or \[n, k, k\]"):
        _calls(np.zeros((10, 3, 4), np.float32), S0, S1)[call]()
    with pytest.raises(ValueError, match=r"65 entries per kernel"):
        _calls(np.zeros((10, 65), np.float32), S0, S1)[call]()


@pytest.mark.parametrize("call", ["layer_stats", "coef_range", "coef_histograms"])
@pytest.mark.parametrize("starts,stops", [([-1], [5]), ([5], [4]), ([0], [11]), ([11], [11])])
def test_bad_segments_rejected(call, starts, stops):
    with pytest.raises(ValueError, match=r"segment 0 .* is not a range of the 10 rows"):
        _calls(X9, np.array(starts, np.int64), np.array(stops, np.int64))[call]()


@pytest.mark.parametrize("call", ["layer_stats", "coef_range", "coef_histograms"])
def test_segment_arrays_checked(call):
    with pytest.raises(TypeError, match=r"starts must be a C-contiguous 1-D int64 array.*dtype=np\.int64"):
        _calls(X9, np.array([0], np.int32), S1)[call]()
    with pytest.raises(TypeError, match=r"stops must be a C-contiguous 1-D int64 array"):
        _calls(X9, S0, np.array([[10]], np.int64))[call]()
    with pytest.raises(ValueError, match=r"same length"):
        _calls(X9, np.array([0, 0], np.int64), S1)[call]()


def test_threads_must_not_be_negative():
    with pytest.raises(ValueError, match=r"threads must be >= 0"):
        _core.layer_stats(X9, S0, S1, threads=-1)


def test_projection_arguments_checked():
    with pytest.raises(ValueError, match=r"mean must have shape \(9,\)"):
        _core.coef_range(X9, S0, S1, np.zeros(4), BASIS)
    with pytest.raises(ValueError, match=r"basis must have shape \(3, 9\)"):
        _core.coef_range(X9, S0, S1, MEAN, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"basis must be 2-D"):
        _core.coef_range(X9, S0, S1, MEAN, np.zeros(9))
    with pytest.raises(ValueError, match=r"mean must be finite"):
        _core.coef_range(X9, S0, S1, np.full(9, np.nan), BASIS)
    lo, hi = _core.coef_range(X9, S0, S1, MEAN.astype(np.float32), BASIS.tolist())  # small params: any reals
    assert lo.dtype == hi.dtype == np.float64 and lo.shape == hi.shape == (3,)


def test_histogram_arguments_checked():
    def hist(groups=None, n_groups=1, lo=None, hi=None, **kw):
        groups = np.zeros(1, np.int32) if groups is None else groups
        lo = np.zeros(3) if lo is None else lo
        hi = np.ones(3) if hi is None else hi
        return _core.coef_histograms(X9, S0, S1, groups, n_groups, MEAN, BASIS, lo, hi, **kw)

    with pytest.raises(TypeError, match=r"groups must be a C-contiguous 1-D int32 array"):
        hist(groups=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"groups must have one entry per segment"):
        hist(groups=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=r"groups\[0\] = 1 is outside -1\.\.0"):
        hist(groups=np.ones(1, np.int32))
    with pytest.raises(ValueError, match=r"groups\[0\] = -2"):
        hist(groups=np.full(1, -2, np.int32))
    with pytest.raises(ValueError, match=r"n_groups must be >= 0"):
        hist(n_groups=-1)
    with pytest.raises(ValueError, match=r"hi must be > lo.*component 1"):
        hist(hi=np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"lo must have shape \(3,\)"):
        hist(lo=np.zeros(2))
    with pytest.raises(ValueError, match=r"bins must be in 1\.\.1048576"):
        hist(bins=0)
    assert hist(bins=1).shape == (1, 3, 1) and hist(n_groups=0, groups=np.full(1, -1, np.int32)).shape == (0, 3, 70)


# ---------------------------------------------------------------------------------------------- sparse moments


def sparse_moments_in_row_order(x: np.ndarray, max_abs: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The sparse rows' float64 sum and Gram as running sums in row order (np.cumsum adds sequentially; the
    products of float32 entries are exact in float64): the bits the native pass must give on every ISA; and
    their count."""
    w = x.astype(np.float64)
    finite = np.isfinite(w).all(axis=1)
    m = np.where(finite, np.abs(np.where(finite[:, None], w, 0.0)).max(axis=1, initial=0.0), np.inf)
    sp = w[m < 0.01 * max_abs]
    d = x.shape[1]
    if len(sp) == 0:
        return np.zeros(d), np.zeros((d, d)), 0
    return np.cumsum(sp, axis=0)[-1], np.cumsum(sp[:, :, None] * sp[:, None, :], axis=0)[-1], len(sp)


@pytest.mark.parametrize("n", [1, 2, 17, 1023, 1024, 1025, 3000])  # around the 1024-row scan batch
@pytest.mark.parametrize("d", [1, 2, 9, 16, 17, 25, 49, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sparse_moments_bit_exact_in_row_order(isa, n, d, dtype):
    """Every ISA's vectorised sparse pass gives exactly the row-order float64 sums (one segment of one piece),
    with NaN/Inf rows, all-zero rows (sparse, adding zeros) and a big first row."""
    rng = np.random.default_rng([n, d])
    x = rng.standard_normal((n, d)) * np.where(rng.random((n, 1)) < 0.4, 1e-3, 1.0)
    x[0] = 10.0  # above every other entry
    if n > 10:
        x[3, d // 2] = np.nan
        x[5, 0] = -np.inf
        x[7] = 0.0
    x = np.ascontiguousarray(x.astype(dtype))
    got = layer_stats(x, [0], [n], threads=1)
    want_sum, want_gram, count = sparse_moments_in_row_order(x, float(got["max_abs"][0]))
    assert got["max_abs"][0] == 10.0
    assert got["sparse"][0] == count
    np.testing.assert_array_equal(got["sum_sparse"][0], want_sum)
    np.testing.assert_array_equal(got["gram_sparse"][0], want_gram)
    if n >= 1000:
        assert got["sparse"][0] > n // 5  # the case this test is about


def test_sparse_moments_segments_across_pieces_bit_exact():
    """A segment of several pieces: per-piece row-order sums added in piece order -- compared against that, and
    the sparse rows of the piece boundary included exactly once."""
    n = PIECE + 2500
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, 9)) * np.where(rng.random((n, 1)) < 0.3, 1e-3, 1.0)
    x[PIECE - 1] *= 1e-3
    x[PIECE] *= 1e-3
    x = np.ascontiguousarray(x.astype(np.float32))
    got = layer_stats(x, [0], [n], threads=2)
    big = float(got["max_abs"][0])
    parts = [sparse_moments_in_row_order(x[a:a + PIECE], big) for a in (0, PIECE)]
    assert got["sparse"][0] == parts[0][2] + parts[1][2] > n // 5
    np.testing.assert_array_equal(got["sum_sparse"][0], parts[0][0] + parts[1][0])
    np.testing.assert_array_equal(got["gram_sparse"][0], parts[0][1] + parts[1][1])


# ---------------------------------------------------------------------------------------------- orthogonality


ORTH_TOL = 1e-6  # kernelatlas.jobs.quality.ORTHOGONALITY_TOL


def orthogonality_float64(f: np.ndarray) -> float:
    if len(f) == 0:
        return float("nan")  # (the reference's reshape needs a row)
    return R.layer_quality(f.reshape(f.shape[0], 1, f.shape[1], 1).astype(np.float64))["orthogonality"]


@pytest.mark.parametrize("c_out", [0, 1, 2, 3, 4, 5, 17, 65])
@pytest.mark.parametrize("m", [1, 9, 15, 16, 17, 144, 577])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_orthogonality_matches_float64(isa, c_out, m, dtype):
    rng = np.random.default_rng([c_out, m])
    f = rng.standard_normal((c_out, m)) * rng.uniform(0.01, 1.0, (c_out, 1))
    if c_out >= 5:
        f[1] = 0.0  # an all-zero filter stays a zero row
        f[3, m // 2] = np.nan  # left out
        f[4] = f[0] * -2.0  # anti-parallel: |G| = 1
    f = f.astype(dtype)
    want = orthogonality_float64(f)
    got = _core.orthogonality(f)
    if c_out - (c_out >= 5) < 2:
        assert np.isnan(want) and np.isnan(got)
    else:
        assert abs(got - want) <= ORTH_TOL, (got, want)


def test_orthogonality_edge_layers(isa):
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((36, 36)))
    assert _core.orthogonality((q[:20] * 3.0).astype(np.float32)) == pytest.approx(1.0, abs=ORTH_TOL)
    same = np.tile(rng.standard_normal((1, 27)).astype(np.float32), (6, 1))
    assert _core.orthogonality(same) == pytest.approx(0.0, abs=ORTH_TOL)
    zeros = np.zeros((7, 9), np.float16)  # every filter all-zero: G = 0, the diagonal counts 1 each
    assert _core.orthogonality(zeros) == pytest.approx(orthogonality_float64(zeros), abs=ORTH_TOL)
    nan = np.full((4, 9), np.nan, np.float32)
    nan[0] = 1.0
    assert np.isnan(_core.orthogonality(nan))  # one finite filter
    inf = rng.standard_normal((6, 9)).astype(np.float32)
    inf[2, 0] = np.inf
    assert _core.orthogonality(inf) == pytest.approx(orthogonality_float64(inf), abs=ORTH_TOL)
    assert np.isnan(_core.orthogonality(np.zeros((0, 9), np.float32)))
    assert np.isnan(_core.orthogonality(np.zeros((0, 0), np.float32)))


@pytest.mark.parametrize("threads", [1, 2])
def test_orthogonality_threads_deterministic_and_large(threads):
    """Past the threading threshold (512 filters of 1152: many panels): the same bits for 1 and 2 threads."""
    rng = np.random.default_rng(8)
    f = (rng.standard_normal((515, 1152)) * 0.05).astype(np.float16)
    got = _core.orthogonality(f, threads=threads)
    assert got == _core.orthogonality(f, threads=1)
    assert abs(got - orthogonality_float64(f)) <= ORTH_TOL


def test_orthogonality_arguments_checked():
    with pytest.raises(TypeError, match=r"filters must be float32 or float16, got float64.*astype\(np\.float32\)"):
        _core.orthogonality(np.zeros((4, 9)))
    with pytest.raises(ValueError, match=r"not C-contiguous.*np\.ascontiguousarray\(filters\)"):
        _core.orthogonality(np.zeros((4, 18), np.float32)[:, ::2])
    with pytest.raises(ValueError, match=r"2-D \[c_out"):
        _core.orthogonality(np.zeros((4, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"at least one entry"):
        _core.orthogonality(np.zeros((4, 0), np.float32))
    with pytest.raises(ValueError, match=r"threads must be >= 0"):
        _core.orthogonality(np.zeros((4, 9), np.float32), threads=-1)
