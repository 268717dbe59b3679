"""More than 2^31 kernels in one call: every row count and offset in the engine must be 64-bit.

The input is a float16 [2^31 + 4099, 9] memmap over a *sparse* file: its apparent size is 38.7 GB but only the
pages holding the handful of real kernels written near the start, around row 2^31 and at the very end are
allocated (reading a hole allocates nothing); every other row is an all-zero (dead) kernel.  The outputs are
memmaps opened with mode 'w+': labels int16 + scores float32 + codes float32 = 10 bytes a row = 21.5 GB, and
all of it is really written (dead rows get label -1, score 0 and code NaN, so no output page stays a hole).
The test therefore needs ~22 GB of free disk where pytest puts tmp_path (plus 2 GB of margin) and skips
with the reason otherwise; it deletes its files when done.  It took ~100 s on 2 cores with AVX-512 (one full
assign pass over 2.1 billion rows, then a scan of the labels).  Run it with ``pytest -m slow``.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import reference as R

import kernelatlas as ka

pytestmark = pytest.mark.slow

D = 9
ROWS = 2**31 + 4099  # past 2^31, and not a whole number of 64-row tiles
OUTPUT_BYTES = ROWS * (2 + 4 + 4)
MARGIN_BYTES = 2 * 2**30
# the real kernels: the first tiles, the tiles on both sides of row 2^31 (a tile starts exactly there, at byte
# offset 2^31 x 18 > 2^32), and the last, partial tile
REAL_BLOCKS = [(0, 130), (2**31 - 131, 2**31 + 133), (ROWS - 100, ROWS)]


def test_more_than_2_31_rows_through_sparse_memmaps(tmp_path, make_autoencoder, make_kernels):
    free = shutil.disk_usage(tmp_path).free
    if free < OUTPUT_BYTES + MARGIN_BYTES:
        pytest.skip(f"needs {(OUTPUT_BYTES + MARGIN_BYTES) / 2**30:.1f} GiB free under {tmp_path} for the outputs, "
                    f"has {free / 2**30:.1f} GiB")
    input_path = tmp_path / "kernels.f16"
    paths = [input_path] + [tmp_path / name for name in ("labels.i16", "scores.f32", "codes.f32")]
    try:
        with open(input_path, "wb") as fh:
            fh.truncate(ROWS * D * 2)
        x_w = np.memmap(input_path, dtype=np.float16, mode="r+", shape=(ROWS, D))
        real_rows = np.concatenate([np.arange(a, b) for a, b in REAL_BLOCKS])
        real = np.array(make_kernels(len(real_rows), D, np.float16, seed=31, specials=False, pattern_model=(D,)))
        real[5] = 0.0  # a dead kernel among the real ones
        real[len(real) // 2] = np.nan  # and a non-finite one, at row 2^31 + 1
        x_w[real_rows] = real
        x_w.flush()
        del x_w
        if os.stat(input_path).st_blocks * 512 > 2**30:
            pytest.skip(f"the filesystem under {tmp_path} does not keep the input sparse")

        model, enc, dec = make_autoencoder(D, clusters=[(0.0, 0.466), (0.466, 0.47), (0.47, 1.0)])
        threshold = 0.3
        x = np.memmap(input_path, dtype=np.float16, mode="r", shape=(ROWS, D))
        out = (
            np.memmap(paths[1], dtype=np.int16, mode="w+", shape=(ROWS,)),
            np.memmap(paths[2], dtype=np.float32, mode="w+", shape=(ROWS,)),
            np.memmap(paths[3], dtype=np.float32, mode="w+", shape=(ROWS,)),
        )
        labels, scores, codes = ka.assign(x, model, threshold=threshold, out=out)
        assert labels is out[0] and scores is out[1] and codes is out[2]

        # the real kernels: exactly what an in-memory call gives (rows are computed independently of their
        # position), and the float64 reference
        expected = ka.assign(real, model, threshold=threshold)
        got = (labels[real_rows], scores[real_rows], codes[real_rows])
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)
        ref = R.assign(real, enc, dec, intervals=model.clusters, threshold=threshold)
        good = ref.norm.good
        assert (~good).sum() == 2
        cond = R.conditioning(real, ref.norm)
        assert np.all(np.abs(got[2][good] - ref.codes[good]) <= 1e-6 * cond[good])
        assert np.all(np.abs(got[1] - ref.scores) <= 1e-5)
        ambiguous = (np.abs(ref.scores - threshold) <= 1e-5) | R.near_interval_edge(ref.codes, model.clusters, 1e-6 * cond)
        assert np.all((got[0] == ref.labels) | ambiguous)
        assert (got[0] >= 0).sum() > 50, "most real kernels should pass the threshold"

        # every other row is a dead (all-zero) kernel: label -1 everywhere (scanned in full), score 0 and
        # code NaN (sampled)
        chunk = 2**27
        for start in range(0, ROWS, chunk):
            stop = min(start + chunk, ROWS)
            block = np.asarray(labels[start:stop])
            is_real = (real_rows >= start) & (real_rows < stop)
            minus_one = block == -1
            minus_one[real_rows[is_real] - start] = True
            assert minus_one.all(), f"rows {start + np.flatnonzero(~minus_one)[:5]} of zero kernels got a label"
        sample = np.unique(np.concatenate([np.arange(130, ROWS - 100, 9_999_991), [2**31 - 132, 2**31 + 133, ROWS - 101]]))
        assert np.all(scores[sample] == 0) and np.isnan(codes[sample]).all()
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
