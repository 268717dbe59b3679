"""kernelatlas.assign_prototypes (label = the prototype of highest cosine, -1 below the threshold) against the
float64 reference on every ISA / thread count / size / dtype, and the reusable PrototypeEngine."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R

import kernelatlas as ka
from kernelatlas.engine import prototype_engine

SCORE_TOL = 1e-5  # cosine scores, absolute
PROTO_TOL = 1e-6  # normalised prototypes, absolute

_CALIBRATION: dict[int, tuple[np.ndarray, float]] = {}


def calibrated(d: int, make_kernels) -> tuple[np.ndarray, float]:
    """16 random prototypes for d and a threshold that splits a calibration batch's best cosines 40/60."""
    if d not in _CALIBRATION:
        rng = np.random.default_rng(d)
        prototypes = rng.standard_normal((16, d)).astype(np.float32)
        ref = R.assign_prototypes(make_kernels(4096, d, seed=1), prototypes, threshold=-1.0)
        threshold = float(np.float32(np.quantile(ref.scores[ref.norm.good], 0.4)))
        _CALIBRATION[d] = (prototypes, threshold)
    return _CALIBRATION[d]


@R.memo_by_identity
def reference_for(x: np.ndarray, prototypes: np.ndarray, threshold: float, min_abs: float = 0.0):
    return R.assign_prototypes(x, prototypes, threshold=threshold, min_abs=min_abs)


def check_prototypes(got, x, prototypes, threshold, *, min_abs: float = 0.0, max_ties: int | None = None) -> None:
    labels, scores = got
    n = len(x)
    assert labels.dtype == np.int16 and scores.dtype == np.float32 and labels.shape == scores.shape == (n,)
    ref = reference_for(x, prototypes, threshold, min_abs)
    good = ref.norm.good
    assert np.all(labels[~good] == -1) and np.all(scores[~good] == 0)
    err = np.abs(scores - ref.scores)
    off = np.flatnonzero(~(err <= SCORE_TOL))
    assert off.size == 0, f"{off.size} scores off, e.g. errors {err[off[:5]]}"
    # the label rule on the engine's own score: -1 exactly when the best cosine is below the threshold
    np.testing.assert_array_equal(labels[good] == -1, scores[good] < np.float32(threshold))
    assert np.all((labels >= -1) & (labels < len(prototypes)))
    # the reference's label, except at a threshold tie or an argmax tie between two prototypes
    top2 = np.sort(ref.cosines, axis=1)[:, -2:] if len(prototypes) > 1 else np.zeros((n, 2))
    tie = (top2[:, 1] - top2[:, 0] <= SCORE_TOL) if len(prototypes) > 1 else np.zeros(n, bool)
    ambiguous = (np.abs(ref.scores - threshold) <= SCORE_TOL) | tie
    mismatch = labels != ref.labels
    assert not np.any(mismatch & ~ambiguous), f"labels differ at rows {np.flatnonzero(mismatch & ~ambiguous)[:10]}"
    max_ties = max(3, n // 1000) if max_ties is None else max_ties
    assert mismatch.sum() <= max_ties, f"{mismatch.sum()} labels at a tie"


def test_prototypes_match_reference(isa, threads, rows, d, dtype, make_kernels):
    prototypes, threshold = calibrated(d, make_kernels)
    x = make_kernels(rows, d, dtype)
    got = ka.assign_prototypes(x, prototypes, threshold=threshold, threads=threads)
    check_prototypes(got, x, prototypes, threshold)
    if rows >= 1025:
        assert set(np.unique(got[0])) == set(range(-1, 16)), "the batch should reach every label"


def test_engine_is_reusable_and_normalises_its_prototypes(isa, make_kernels):
    prototypes, threshold = calibrated(25, make_kernels)
    engine = prototype_engine(prototypes)
    assert engine.d == 25 and engine.n_prototypes == 16
    np.testing.assert_allclose(engine.normalized, R.normalize_prototypes(prototypes), atol=PROTO_TOL)
    x = make_kernels(1025, 25)
    for a, b in zip(
        ka.assign_prototypes(x, engine, threshold=threshold), ka.assign_prototypes(x, prototypes, threshold=threshold), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # [P, k, k] prototypes and a float64 array are accepted (converted once, at construction)
    engine3 = prototype_engine(prototypes.reshape(16, 5, 5).astype(np.float64))
    np.testing.assert_array_equal(engine3.normalized, engine.normalized)


@pytest.mark.parametrize("n_prototypes", [1, 2, 255, 256])
def test_prototype_counts(isa, threads, n_prototypes, make_kernels):
    rng = np.random.default_rng(n_prototypes)
    prototypes = rng.standard_normal((n_prototypes, 9)).astype(np.float32)
    x = make_kernels(5000, 9)
    got = ka.assign_prototypes(x, prototypes, threshold=0.3, threads=threads)
    check_prototypes(got, x, prototypes, 0.3)
    if n_prototypes == 1:
        assert set(np.unique(got[0])) == {-1, 0}


def test_ties_go_to_the_first_prototype(isa, make_kernels):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 9)).astype(np.float32)
    prototypes = np.stack([a, b, a])  # 0 and 2 are the same: every cosine with them is bit-identical
    labels, _ = ka.assign_prototypes(make_kernels(1025, 9), prototypes, threshold=-1.0)
    assert set(np.unique(labels)) == {-1, 0, 1}


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 1.0])
def test_threshold_extremes(isa, threshold, make_kernels):
    prototypes, _ = calibrated(9, make_kernels)
    x = np.concatenate([make_kernels(1025, 9), prototypes * 3 - 1])  # the last 16 rows are the prototypes
    labels, scores = ka.assign_prototypes(x, prototypes, threshold=threshold)
    # the rows that are prototypes score 1 up to rounding: at threshold 1 their labels are a coin toss
    check_prototypes((labels, scores), x, prototypes, threshold, max_ties=16)
    if threshold == -1.0:
        good = R.normalize(x).good
        assert np.all(labels[good] >= 0)
    np.testing.assert_allclose(scores[-16:], 1.0, atol=SCORE_TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_special_kernels_do_not_touch_their_neighbours(isa, threads, dtype, make_kernels):
    prototypes, threshold = calibrated(49, make_kernels)
    x = np.array(make_kernels(5000, 49, dtype, specials=False, seed=8))
    special = [0, 63, 64, 65, 2047, 4096, 4999]
    for r, v in zip(special, [0.0, np.nan, 0.25, np.inf, -np.inf, 0.0, np.nan], strict=True):
        if np.isfinite(v):
            x[r] = v
        else:
            x[r, r % 49] = v
    got = ka.assign_prototypes(x, prototypes, threshold=threshold, threads=threads)
    check_prototypes(got, x, prototypes, threshold)
    assert np.all(got[0][special] == -1) and np.all(got[1][special] == 0)
    keep = np.setdiff1d(np.arange(len(x)), special)
    clean = ka.assign_prototypes(np.ascontiguousarray(x[keep]), prototypes, threshold=threshold, threads=threads)
    for a, b in zip(got, clean, strict=True):
        np.testing.assert_array_equal(a[keep], b)


def test_min_abs(isa, make_kernels):
    prototypes, threshold = calibrated(9, make_kernels)
    x = np.array(make_kernels(2000, 9, specials=False, seed=2))
    x[::3] *= 1e-3
    got = ka.assign_prototypes(x, prototypes, threshold=threshold, min_abs=0.01)
    check_prototypes(got, x, prototypes, threshold, min_abs=0.01)
    dead = np.abs(x).max(axis=1) <= np.float32(0.01)
    assert dead.sum() > 500 and np.all(got[0][dead] == -1) and np.all(got[1][dead] == 0)


@pytest.mark.parametrize("n", [0, 1])
def test_zero_and_one_rows_and_kkk_input(isa, n, make_kernels):
    prototypes, threshold = calibrated(49, make_kernels)
    x = make_kernels(n, 49, seed=6)
    got = ka.assign_prototypes(x, prototypes, threshold=threshold)
    check_prototypes(got, x, prototypes, threshold)
    got3 = ka.assign_prototypes(x.reshape(n, 7, 7), prototypes.reshape(16, 7, 7), threshold=threshold)
    for a, b in zip(got, got3, strict=True):
        np.testing.assert_array_equal(a, b)


def test_memmap_in_and_out(isa, threads, tmp_path, make_kernels):
    prototypes, threshold = calibrated(25, make_kernels)
    x = make_kernels(6000, 25, np.float16)
    np.save(tmp_path / "kernels.npy", x)
    x_map = np.load(tmp_path / "kernels.npy", mmap_mode="r")
    out = (
        np.memmap(tmp_path / "labels.i16", dtype=np.int16, mode="w+", shape=(len(x),)),
        np.memmap(tmp_path / "scores.f32", dtype=np.float32, mode="w+", shape=(len(x),)),
    )
    got = ka.assign_prototypes(x_map, prototypes, threshold=threshold, threads=threads, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    for o in out:
        o.flush()
    expected = ka.assign_prototypes(x, prototypes, threshold=threshold, threads=threads)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "labels.i16", np.int16), expected[0])
    np.testing.assert_array_equal(np.fromfile(tmp_path / "scores.f32", np.float32), expected[1])
    check_prototypes(expected, x, prototypes, threshold)


def test_preallocated_outputs_are_returned(isa, make_kernels):
    prototypes, threshold = calibrated(9, make_kernels)
    x = make_kernels(1025, 9)
    out = (np.full(1025, 77, np.int16), np.full(1025, 7.0, np.float32))
    got = ka.assign_prototypes(x, prototypes, threshold=threshold, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    check_prototypes(got, x, prototypes, threshold)
