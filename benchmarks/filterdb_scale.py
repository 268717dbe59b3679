"""The whole analysis at the CNN Filter DB's scale, on demand (issue 16): a generated dataset.h5 in the CNN Filter
DB layout (``filters`` [N, 3, 3] and the pandas ``meta`` table with the [model_id, conv_depth, conv_depth_norm,
layer_id] index and inclusive ``filter_ids``), then every stage as the `kernelatlas` command a user would run,
each timed, with its peak memory (the stage's own process), against this machine's bounds: the disk's read
rate (O_DIRECT), the page-cache read rate and the FP32 FMA peak.

    python benchmarks/filterdb_scale.py --n 1460000000 --workdir /path/with/60GB   # the real scale
    python benchmarks/filterdb_scale.py --n 20000000                                # a quick check

Filters are generated "structured like real filters": each is a random mix of smooth 3x3 patterns (Gaussian
blobs, first and second derivatives, as kernelatlas.bench.synthetic makes them) plus noise, scaled per layer;
layers are regular convs of c_in x c_out filters (c from 16 to 512), grouped into models of ~50 layers.  The
file stores float16 (the real file stores float64, 105 GB at this scale -- more than the disk of a 2-core
development VM; float16 is also what the corpus keeps).  Disk needed: about 2 x 18 bytes per filter (file and
corpus) plus the runs' outputs (10 bytes per filter for assign); the script checks free space first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _patterns() -> np.ndarray:
    from kernelatlas.bench.synthetic import synthetic_patterns

    return synthetic_patterns(3)


def generate(path: Path, n: int, *, seed: int = 0, progress: bool = True) -> dict[str, int]:
    """Write dataset.h5 with ~n filters (whole layers); returns counts."""
    import h5py
    import pandas as pd
    from tqdm import tqdm

    from kernelatlas.bench.synthetic import synth_kernels

    rng = np.random.default_rng(seed)
    patterns = _patterns()
    widths = np.array([16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512])
    plan: list[tuple[int, int, int, int]] = []  # (model, layer, c_in, c_out)
    total, model = 0, 0
    while total < n:
        depth = int(rng.integers(20, 80))
        for layer in range(depth):
            stage = min(len(widths) - 1, layer * len(widths) // depth + int(rng.integers(0, 2)))
            c_in = int(widths[max(0, stage - 1)]) if layer else 3
            c_out = int(widths[stage])
            if total + c_in * c_out > n and layer:
                break
            plan.append((model, layer, c_in, c_out))
            total += c_in * c_out
        model += 1
    rows = []
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("filters", shape=(total, 3, 3), dtype=np.float16, chunks=(1 << 18, 3, 3))
        offset = 0
        depths: dict[int, int] = {}
        for m, _, _, _ in plan:
            depths[m] = depths.get(m, 0) + 1
        bar = tqdm(total=total, unit="filter", unit_scale=True, desc="generating", disable=not progress)
        for m, layer, c_in, c_out in plan:
            k = c_in * c_out
            w = synth_kernels(rng, k, 3, patterns).reshape(k, 3, 3)
            w *= np.float32(rng.uniform(0.02, 0.5))
            ds[offset:offset + k] = w.astype(np.float16)
            rows.append({"model_id": m, "conv_depth": layer, "conv_depth_norm": layer / max(1, depths[m] - 1),
                         "layer_id": layer, "filter_ids": f"{offset}:{offset + k - 1}", "model": f"gen_{m}",
                         "Name": f"GenNet-{m}", "Task": ("Classification", "Segmentation", "Detection")[m % 3],
                         "Visual Category": ("natural", "medical", "digits")[m % 3],
                         "Training-Dataset": f"set{m % 5}", "producer": "kernelatlas benchmark", "op_set": "13",
                         "Paper": "", "in_channels": c_in, "out_channels": c_out, "layer_depth": layer})
            offset += k
            bar.update(k)
        bar.close()
    frame = pd.DataFrame(rows).set_index(["model_id", "conv_depth", "conv_depth_norm", "layer_id"])
    frame.to_hdf(tmp, key="meta", format="table")
    os.replace(tmp, path)
    return {"filters": total, "layers": len(plan), "models": model}


def _rss_anon(pid: int) -> int:
    """The process's resident anonymous memory in bytes (heap, buffers: what does not come back when the kernel
    drops page cache), 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _run(cmd: list[str], log: Path) -> dict[str, float]:
    """One stage as its own process: wall seconds, its peak resident memory (ru_maxrss: memory-mapped corpus
    pages included, which the kernel reclaims at will) and its peak anonymous memory (sampled every 50 ms:
    what would have to fit in RAM)."""
    start = time.perf_counter()
    anon = 0
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _rss_anon(proc.pid))
            time.sleep(0.05)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"stage failed ({' '.join(cmd)}): see {log}")
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
            "peak_anon_gib": round(anon / 2**30, 3)}


def _disk_read_rate(path: Path, limit: int = 2 << 30) -> float:
    """GB/s reading the file with O_DIRECT (no page cache), up to ``limit`` bytes."""
    import mmap

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    buf = mmap.mmap(-1, 16 << 20)
    done = 0
    start = time.perf_counter()
    try:
        while done < limit:
            n = os.readv(fd, [buf])
            if n <= 0:
                break
            done += n
    finally:
        os.close(fd)
    return done / (time.perf_counter() - start) / 1e9


def _page_cache_rate(corpus: Path) -> float:
    """GB/s of a numpy pass over the corpus's shards, read as raw 16-bit words (a max, vectorised; read twice,
    the second pass timed)."""
    from kernelatlas.corpus import Corpus

    c = Corpus.open(corpus)
    nbytes = 0

    def passes() -> None:
        nonlocal nbytes
        nbytes = 0
        for shard in c.shards(3):
            arr = c.shard_array(shard)
            for a in range(0, len(arr), 1 << 22):
                int(np.asarray(arr[a:a + (1 << 22)]).view(np.uint16).max())
            nbytes += arr.nbytes

    passes()
    start = time.perf_counter()
    passes()
    return nbytes / (time.perf_counter() - start) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_460_000_000, help="filters (default: CNN Filter DB's 1.46e9)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kernelatlas-filterdb")
    ap.add_argument("--sample", type=int, default=2_000_000, help="training sample (default 2M)")
    ap.add_argument("--train-args", default="", help="extra `kernelatlas train` options, e.g. '--max-steps 20000'")
    ap.add_argument("--keep", action="store_true", help="keep the generated file and corpus for a rerun")
    ap.add_argument("--only", default="", metavar="STAGE[,STAGE]",
                    help="with --keep: run only these stages again (import-filterdb, train, clusters, assign, "
                    "quality, shift)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    exe = [sys.executable, "-m", "kernelatlas.cli"]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    need = int(args.n * (18 + 18 + 12) * 1.05)
    free = _free_bytes(work)
    print(f"filterdb-scale: {args.n:,} filters; needs ~{need / 1e9:.1f} GB in {work}, {free / 1e9:.1f} GB free")
    if free < need and not (work / "dataset.h5").exists():
        print(f"filterdb-scale: not enough disk in {work}: give --workdir on a disk with {need / 1e9:.0f} GB free",
              file=sys.stderr)
        return 2
    info = json.loads(subprocess.run([*exe, "build-info", "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    from kernelatlas import _core

    peak = _core.fma_peak_gflops(0.5, 0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    h5, corpus, model, log = work / "dataset.h5", work / "corpus", work / "model-k3", work / "stages.log"
    results: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    if not h5.exists():
        start = time.perf_counter()
        made = generate(h5, args.n)
        results["generate (not part of the analysis)"] = {"seconds": round(time.perf_counter() - start, 2)}
        print(f"filterdb-scale: generated {made['filters']:,} filters in {made['layers']:,} layers of "
              f"{made['models']} models", flush=True)
    import h5py

    with h5py.File(h5, "r") as f:
        n = int(f["filters"].shape[0])
    counts = {"filters": n}
    disk = _disk_read_rate(h5)
    t_analysis = time.perf_counter()
    if corpus.exists() and not args.keep:
        shutil.rmtree(corpus)
    if model.exists() and not args.only:
        shutil.rmtree(model)
    stages = [
        ("import-filterdb", [*exe, "import-filterdb", str(h5), "--out", str(corpus), "--dtype", "float16",
                             "--no-progress"]),
        ("train (2M sample)", [*exe, "train", str(corpus), "--kernel-size", "3", "--out", str(model), "--kind",
                               "all", "--sample", str(args.sample), *args.train_args.split()]),
        ("clusters", [*exe, "clusters", str(model)]),
        ("assign", [*exe, "assign", str(corpus), "--model", str(model), "--kind", "all", "--no-progress"]),
        ("quality", [*exe, "quality", str(corpus), "--no-progress", "--no-figures", "--recompute"]),
        ("shift (by task)", [*exe, "shift", str(corpus), "--by", "task", "--no-progress", "--no-figures",
                             "--recompute"]),
    ]
    if args.only:
        stages = [st for st in stages if st[0].split()[0] in args.only.split(",")]
    elif args.keep and (corpus / "manifest.json").exists():
        # a kept corpus: the import would skip every model and its time would mean nothing
        print("filterdb-scale: import-filterdb skipped (corpus kept from an earlier run)", flush=True)
        stages = stages[1:]
    if any(name == "assign" for name, _ in stages) and (corpus / "runs").is_dir():
        for run_json in (corpus / "runs").glob("*/run.json"):  # an assign run resumes: time it from scratch
            if json.loads(run_json.read_text()).get("format") == "kernelatlas-run":
                shutil.rmtree(run_json.parent)
    for name, cmd in stages:
        print(f"filterdb-scale: {name} ...", flush=True)
        results[name] = _run(cmd, log)
        print(f"  {results[name]}", flush=True)
    wall = time.perf_counter() - t_analysis
    cache = _page_cache_rate(corpus)
    gb16 = n * 18 / 1e9
    lines = [f"machine: {cpu}, {os.cpu_count()} CPUs, engine ISA {info.get('isa')}, FP32 FMA peak {peak:.0f} GFLOP/s "
             f"(measured); disk read {disk:.2f} GB/s (O_DIRECT), page cache {cache:.1f} GB/s (numpy pass)",
             f"{n:,} filters ({gb16:.1f} GB as float16); whole analysis {wall / 60:.1f} min "
             f"(from the start: {(time.perf_counter() - t0) / 60:.1f} min)"]
    for name, r in results.items():
        extra = ""
        if name in ("import-filterdb", "assign", "quality"):
            rate = n / r["seconds"]
            extra = (f"; {rate / 1e6:.1f} M filters/s = {rate * 18 / 1e9:.2f} GB/s of float16 input "
                     f"(disk bound {disk:.2f}, page cache {cache:.1f} GB/s)")
        lines.append(f"  {name:<38} {r['seconds']:>9.1f} s   peak RSS {r.get('peak_rss_gib', float('nan')):.2f} GiB"
                     f" (anonymous {r.get('peak_anon_gib', float('nan')):.2f} GiB)" + extra)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "stages": results, "disk_gbs": disk, "cache_gbs": cache,
                                         "fma_peak_gflops": peak, "cpu": cpu, "isa": info.get("isa"),
                                         "analysis_seconds": wall}, indent=1))
    if not args.keep:
        shutil.rmtree(corpus, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
