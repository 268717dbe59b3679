"""pytest-benchmark: the native engine against the PyTorch peer (reference/README.md section C) per stage
and kernel size, on the same synthetic corpus memmap (KERNELATLAS_BENCH_N kernels, default 2,000,000), both in
this run.  Each group ``<stage>-k<k>`` holds the engine and the peer, run one after the other, so

    python -m pytest benchmarks/ -p no:cacheprovider --benchmark-group-by=group

tables them side by side; the ratios are printed at the end of the run (conftest.py).  Stages: normalise only;
normalise + encode; the whole assignment (normalise, encode, decode, cosine, label); prototype assignment.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch", reason="the benchmarks compare against the PyTorch peer")
pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark")

from kernelatlas.jobs.bench import STAGES

KERNEL_SIZES = (3, 7)

CASES = [
    pytest.param(stage, k, who, id=f"{stage}-k{k}-{who}", marks=pytest.mark.benchmark(group=f"{stage}-k{k}"))
    for k in KERNEL_SIZES
    for stage in STAGES
    for who in ("engine", "peer")
]


@pytest.mark.parametrize(("stage", "k", "who"), CASES)
def test_engine_vs_peer(benchmark: Any, setups: Any, medians: Any, stage: str, k: int, who: str) -> None:
    setup = setups(k)
    benchmark.extra_info.update(kernels=len(setup.corpus), kernel_size=k, contender=who)
    benchmark.pedantic(setup.runner(stage, who), rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        medians.setdefault((stage, k), {})[who] = benchmark.stats.stats.median
