"""_core.label_counts (the per-layer statistics of assign runs) against numpy: label histograms per segment,
dead kernels (NaN codes, or label -1 with score 0 in prototype mode), both code paths (few labels: compare
passes; many: histogram), 1 and 2 threads, empty and odd segments, and the errors it must raise."""

from __future__ import annotations

import numpy as np
import pytest
import reference as R

from kernelatlas import _core


def segments(rng, n):
    cuts = np.sort(rng.integers(0, n + 1, 6))
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [n]])
    return starts.astype(np.int64), stops.astype(np.int64)


@pytest.mark.parametrize("n", [0, 1, 7, 4097, 300_001])
@pytest.mark.parametrize("n_labels", [0, 1, 5, 31, 32, 200])
@pytest.mark.parametrize("nan_is_dead", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_numpy(n, n_labels, nan_is_dead, threads):
    rng = np.random.default_rng(n * 7 + n_labels)
    labels = rng.integers(-1, n_labels, n).astype(np.int16)
    values = rng.random(n).astype(np.float32)
    dead = rng.random(n) < 0.05
    if nan_is_dead:
        values[dead] = np.nan
    else:
        labels[dead], values[dead] = -1, 0.0
    starts, stops = segments(rng, n)
    got = _core.label_counts(labels, values, starts, stops, n_labels, nan_is_dead, threads)
    np.testing.assert_array_equal(got, R.label_counts(labels, values, starts, stops, n_labels, nan_is_dead))


def test_overlapping_and_empty_segments():
    labels = np.array([0, 1, 1, -1, 2], np.int16)
    values = np.array([0.5, np.nan, 0.2, np.nan, 0.9], np.float32)
    starts, stops = np.array([0, 1, 2, 5], np.int64), np.array([5, 3, 2, 5], np.int64)
    got = _core.label_counts(labels, values, starts, stops, 3, True)
    np.testing.assert_array_equal(got, [[1, 1, 2, 1, 2], [0, 0, 2, 0, 1], [0] * 5, [0] * 5])


def test_no_segments():
    got = _core.label_counts(np.zeros(3, np.int16), np.zeros(3, np.float32), np.zeros(0, np.int64),
                             np.zeros(0, np.int64), 2, True)
    assert got.shape == (0, 4)


def test_labels_outside_the_clusters_are_an_error():
    labels = np.array([0, 3, -2], np.int16)
    with pytest.raises(ValueError, match=r"2 labels are outside -1\.\.2"):
        _core.label_counts(labels, np.zeros(3, np.float32), np.array([0], np.int64), np.array([3], np.int64), 3, True)


@pytest.mark.parametrize("bad", ["dtype", "strided", "length", "segment"])
def test_rejects_bad_arguments(bad):
    labels, values = np.zeros(8, np.int16), np.zeros(8, np.float32)
    starts, stops = np.array([0], np.int64), np.array([8], np.int64)
    if bad == "dtype":
        labels = labels.astype(np.int32)
    elif bad == "strided":
        values = np.zeros(16, np.float32)[::2]
    elif bad == "length":
        values = values[:7]
    else:
        stops = np.array([9], np.int64)
    with pytest.raises((TypeError, ValueError)):
        _core.label_counts(labels, values, starts, stops, 2, True)
