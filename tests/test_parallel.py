"""The engine's parallel-for: every tile runs exactly once, and an exception thrown in worker threads is
collected and raised once on the calling thread (no crash, no hang, no std::terminate)."""

import pytest

from kernelatlas import _core


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [0, 1, 63, 64, 65, 4095, 4096, 100_003])
def test_every_tile_runs_once(rows, threads):
    assert _core._check_parallel_errors(rows, 10**12, threads) == (rows + 63) // 64


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fail_from_tile", [0, 7, 1000])
def test_worker_exception_is_raised_once(threads, fail_from_tile):
    with pytest.raises(RuntimeError, match=r"tile \d+ failed"):
        _core._check_parallel_errors(200_000, fail_from_tile, threads)
    # the engine is still usable afterwards
    assert _core._check_parallel_errors(10_000, 10**12, threads) == (10_000 + 63) // 64
