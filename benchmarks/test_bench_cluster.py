"""`kernelatlas assign --cluster local:2` against the in-process run on one machine: the 10^8-kernel 3x3 corpus of
test_bench_corpus.py (page-cached), the same synthetic model, alternating rounds, medians; the outputs of both
are checked byte for byte.  Also the cost of a task: a no-op task's round trip through the scheduler, and the
extra seconds per extra assign task (many small tasks against the default size).

    python -m pytest benchmarks/test_bench_cluster.py -p no:cacheprovider -s

The issue's target (issue 14): throughput ratio (cluster / in-process) >= 0.9.  BENCHMARKS.md turns the
per-node figure into what N machines give.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from kernelatlas.bench import synthetic
from kernelatlas.corpus import Corpus

pytest.importorskip("distributed")

from test_bench_corpus import big_corpus  # noqa: F401  (the 10^8-kernel corpus fixture, built once)

ROUNDS = 5  # the first round of each warms up (worker imports, model load, page cache)


def _noop(i: int) -> int:
    return i


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted((root / "k3").glob("*.npy")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def test_assign_local2_vs_in_process(big_corpus: Corpus, tmp_path: Path) -> None:  # noqa: F811
    from kernelatlas.autoencoder import Autoencoder
    from kernelatlas.cluster import connect
    from kernelatlas.jobs.assign import _task_pieces, assign_corpus, default_chunk_rows

    c = big_corpus
    n = sum(int(s["rows"]) for s in c.manifest["shards"])
    enc, dec = synthetic.make_autoencoder(3)
    model_dir = tmp_path / "model"
    Autoencoder.from_torch(enc, dec, clusters=[(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]).save(model_dir)
    for shard in c.shards(3):  # page-cache the corpus
        arr = c.shard_array(shard)
        for a in range(0, len(arr), 1 << 22):
            float(np.add.reduce(arr[a:a + (1 << 22)], axis=None, dtype=np.float64))

    start = time.perf_counter()
    cl = connect("local:2")
    startup = time.perf_counter() - start
    try:
        times: dict[str, list[float]] = {"in-process": [], "local:2": []}
        digests: dict[str, str] = {}
        for r in range(ROUNDS):
            for name in times:
                shutil.rmtree(c.root / "runs", ignore_errors=True)
                t = time.perf_counter()
                assign_corpus(c, model=model_dir, run_id="bench", progress=False,
                              cluster=cl if name == "local:2" else None)
                if r:
                    times[name].append(time.perf_counter() - t)
                if r == ROUNDS - 1:
                    digests[name] = _digest(c.root / "runs" / "bench")
        assert digests["in-process"] == digests["local:2"]  # the same bytes, not just the same speed

        # a task's cost: the scheduler round trip of a no-op task ...
        tasks = [(i,) for i in range(2000)]
        t = time.perf_counter()
        assert sorted(r for _, r in cl.map(_noop, tasks)) == list(range(2000))
        noop = (time.perf_counter() - t) / len(tasks)
        # ... and the extra seconds per extra assign task (each opens the shard and its output files, fsyncs)
        default_rows = default_chunk_rows(c.shard_array(c.shards(3)[0]).strides[0])  # as assign_corpus picks it
        small_rows = 1 << 18
        per: dict[int, float] = {}
        for rows in (default_rows, small_rows, default_rows, small_rows):
            shutil.rmtree(c.root / "runs", ignore_errors=True)
            t = time.perf_counter()
            assign_corpus(c, model=model_dir, run_id="bench", progress=False, cluster=cl, task_rows=rows)
            per[rows] = min(per.get(rows, float("inf")), time.perf_counter() - t)
        shards = [int(s["rows"]) for s in c.manifest["shards"]]  # every row depthwise: one run per shard
        count = {rows: sum(len(_task_pieces(s, [(0, s)], rows)) for s in shards) for rows in per}
        per_task = (per[small_rows] - per[default_rows]) / (count[small_rows] - count[default_rows])
    finally:
        shutil.rmtree(c.root / "runs", ignore_errors=True)
        cl.close()

    inproc, cluster = float(np.median(times["in-process"])), float(np.median(times["local:2"]))
    ratio = inproc / cluster
    print(f"\nassign {n:,} 3x3 kernels ({len(c.shards(3))} shards, page-cached): in-process "
          f"{n / inproc / 1e6:.1f} M kernels/s, local:2 {n / cluster / 1e6:.1f} M kernels/s, ratio {ratio:.3f} "
          f"(rounds in-process {[round(x, 2) for x in times['in-process']]}, local:2 "
          f"{[round(x, 2) for x in times['local:2']]}); cluster start {startup:.1f} s (not in the rounds)\n"
          f"per task: no-op round trip {noop * 1e3:.2f} ms; assign tasks of {small_rows:,} vs {default_rows:,} rows: "
          f"{per[small_rows]:.2f} s ({count[small_rows]} tasks) vs {per[default_rows]:.2f} s "
          f"({count[default_rows]} tasks): {per_task * 1e3:.1f} ms per extra task")
    assert ratio >= 0.9, f"local:2 runs at {ratio:.3f} of the in-process throughput (target >= 0.9)"
